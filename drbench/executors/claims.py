"""Claim files: which cells are being measured right now, and by which process on which host.

The process that measures a part of a cell (the run itself for the local executor, a worker process, a SLURM job
on a compute node) writes ``<results_dir>/<suite>/.running/<config_hash>.<executor>.json`` before it starts and
removes it when it is done; the run removes it too once the cell's record is stored, which covers a worker that
died. A claim left behind by a killed run is harmless: :func:`is_live` ignores it.

A claim is *live* when some run holds the suite folder's lock (``drbench run`` holds it from start to end) and
the claimer is alive as far as this host can tell: a process on this host must still exist; one on another host
(a SLURM job) is trusted while the lock is held. ``drbench status`` reports cells with a live claim as running.

>>> claim = write_claim(Path("results/quick/.running"), "0123abcd", "process", "shufflenetv2 0.5x conv")
>>> [c.label for c in read_claims(Path("results/quick/.running"))]
['shufflenetv2 0.5x conv']
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

CLAIMS_FOLDER = ".running"


@dataclass(frozen=True)
class Claim:
    """Who is measuring which cell, since when."""

    config_hash: str
    executor: str
    label: str
    hostname: str
    pid: int
    started: str
    job_id: str | None = None

    @property
    def where(self) -> str:
        """``pid 1234 on host`` (with the SLURM job id when there is one)."""
        job = f", job {self.job_id}" if self.job_id else ""
        return f"pid {self.pid} on {self.hostname}{job}"


def claim_path(folder: Path, config_hash: str, executor: str) -> Path:
    return folder / f"{config_hash}.{executor}.json"


def write_claim(folder: Path, config_hash: str, executor: str, label: str) -> Claim:
    """Claim a cell for this process (atomically: written aside, then renamed into place)."""
    claim = Claim(
        config_hash=config_hash,
        executor=executor,
        label=label,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        job_id=os.environ.get("SLURM_JOB_ID"),
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = claim_path(folder, config_hash, executor)
    partial = path.with_name(f".{path.name}.{claim.hostname}.{claim.pid}")
    partial.write_text(json.dumps(asdict(claim)))
    partial.replace(path)
    return claim


def release_claim(folder: Path, config_hash: str, executor: str) -> None:
    claim_path(folder, config_hash, executor).unlink(missing_ok=True)


def read_claims(folder: Path) -> list[Claim]:
    """Every readable claim in ``folder`` (none if it does not exist)."""
    claims = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            claims.append(Claim(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # removed or being replaced while we read: not a claim to report
    return claims


def is_live(claim: Claim, suite_locked: bool) -> bool:
    """Whether ``claim`` belongs to a measurement still in progress (see the module docstring)."""
    if not suite_locked:
        return False
    if claim.hostname != socket.gethostname():
        return True
    return process_exists(claim.pid)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True
