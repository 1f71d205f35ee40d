"""The two sides of a comparison: the records of a results file or folder, or of a git commit (or ref) whose records
are in the results store.

A side given as a commit is looked up with git (``rev-parse --end-of-options``, so that no argument is read as an
option), else as a unique prefix of a commit stored in the results; records carry only hexadecimal commits
(:class:`drbench.record.Record`).

>>> side = resolve_side("results/quick", "results")
>>> side.commits(), len(side.records)
(['1a2b3c4', '5e6f7a8'], 12)
>>> resolve_side("5e6f7a8", "results").source          # a commit with stored results (a unique prefix)
'commit 5e6f7a8 in results'
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from drbench.environment import run_git
from drbench.results import read_records

ENVIRONMENT_KEYS = ("threads", "machine", "device_name", "cpu_model", "torch_version", "cuda_version",
                    "cudnn_benchmark", "python_version", "region_conv_impl", "drconv_impl")
"""Environment fields whose difference between the two sides the comparison reports."""


class CompareError(ValueError):
    """A side that cannot be resolved or a metric that is not there; the message says what was expected."""


@dataclass(frozen=True)
class Side:
    """The records of one side of a comparison and where they came from (``name``: what the user gave)."""

    name: str
    source: str
    records: tuple[dict, ...] = field(repr=False)

    def environment(self) -> dict[str, list[str]]:
        """Each of :data:`ENVIRONMENT_KEYS` -> the distinct values among this side's records."""
        return {key: sorted({str(r.get("env", {}).get(key)) for r in self.records}) for key in ENVIRONMENT_KEYS}

    def commits(self) -> list[str]:
        """Distinct commits of the records, dirty ones marked ``+`` (uncommitted changes)."""
        return sorted({commit_label(r.get("env", {})) for r in self.records})

    def by_cell(self) -> dict[str, list[dict]]:
        """config hash -> that cell's records, oldest first."""
        cells: dict[str, list[dict]] = {}
        for record in sorted(self.records, key=record_time):
            cells.setdefault(record["config_hash"], []).append(record)
        return cells

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "records": len(self.records),
                "commits": self.commits(), "environment": self.environment()}


def record_time(record: Mapping[str, Any]) -> tuple[str, str]:
    """A sort key that orders records by when they were measured."""
    return record.get("started") or record.get("env", {}).get("time") or "", record.get("run_id") or ""


def commit_label(env: Mapping[str, Any]) -> str:
    """``3db48f3`` for a clean checkout, ``3db48f3+`` with uncommitted changes, ``unknown`` outside git."""
    commit = env.get("git_commit")
    return f"{commit[:7]}{'+' if env.get('git_dirty') else ''}" if commit else "unknown"


def resolve_side(spec: str, results_dir: str | Path = "results", *, suite: str | None = None,
                 repo: str | Path | None = None) -> Side:
    """``spec`` as a results file or folder if one exists, else as a git commit or ref whose records are in
    ``results_dir`` (a ref git knows, or a unique prefix of a commit stored there); ``suite`` keeps one suite."""
    path = Path(spec)
    if path.exists():
        side = Side(spec, str(path), tuple(read_records(path)))
    else:
        side = _commit_side(spec, Path(results_dir), repo)
    if suite is not None:
        kept = tuple(r for r in side.records if r.get("suite") == suite)
        if not kept:
            found = ", ".join(sorted({str(r.get("suite")) for r in side.records})) or "none"
            raise CompareError(f"{side.source}: no records of suite {suite!r}; suites there: {found}")
        side = Side(side.name, f"{side.source}, suite {suite}", kept)
    if not side.records:
        raise CompareError(f"{side.source}: no records")
    return side


def _commit_side(spec: str, results_dir: Path, repo: str | Path | None) -> Side:
    if not results_dir.is_dir():
        raise CompareError(f"{spec!r} is not a results file or folder, and the results folder {results_dir} "
                           "(where commits are looked up) does not exist")
    records = read_records(results_dir)
    stored = {r.get("env", {}).get("git_commit") for r in records} - {None}
    commit = commit_of(spec, repo)
    if commit is None:
        prefixed = [c for c in stored if len(spec) >= 4 and c.startswith(spec.lower())]
        commit = prefixed[0] if len(prefixed) == 1 else None
    known = ", ".join(sorted(c[:7] for c in stored)) or "none"
    if commit is None:
        raise CompareError(f"{spec!r} is neither a results file or folder nor a git commit with results in "
                           f"{results_dir} (commits with results: {known})")
    kept = tuple(r for r in records if r.get("env", {}).get("git_commit") == commit)
    if not kept:
        raise CompareError(f"no results of commit {commit[:7]} ({spec}) in {results_dir}; run `drbench run` on "
                           f"that commit first (commits with results: {known})")
    named = "" if commit.startswith(spec.lower()) else f" ({spec})"
    return Side(spec, f"commit {commit[:7]}{named} in {results_dir}", kept)


def commit_of(ref: str, repo: str | Path | None = None) -> str | None:
    """The full hash git gives ``ref`` in ``repo`` (default: drbench's own checkout), or None when git does not
    know it (or there is no git); ``ref`` is never read as an option."""
    try:
        return run_git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}", repo=repo) or None
    except (OSError, subprocess.SubprocessError):
        return None
