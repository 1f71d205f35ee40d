"""Two ``drbench run`` processes on one suite and results folder at once: every cell stored exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest

from drbench.results import StoreWarning, read_records

SUITE = """\
name: race
fixed: {model: mobilenetv1, width: 0.25, input_size: 16, small_input: true, num_classes: 4}
axes:
  op: [conv, condconv, drconv, local]
  regions: [2]
  experts: [2]
metrics:
  latency: {budget_s: 0.05, warmup: 1, min_blocks: 2}
"""
DRBENCH = str(Path(sys.executable).with_name("drbench"))


@pytest.mark.slow  # two CLI processes and two workers, each importing torch
def test_two_runs_at_once_store_each_cell_exactly_once(tmp_path):
    (tmp_path / "race.yaml").write_text(SUITE)
    common = ["run", "race.yaml", "--results-dir", "results", "--threads", "1"]
    commands = [[DRBENCH, *common, "--executor", "process", "--workers", "2"], [DRBENCH, *common]]
    # Each run records the git commit it sees and resume compares it: hide the repository, so that a commit
    # landing in this checkout between the two runs (other work in the same tree) cannot tell them apart.
    env = {**os.environ, "GIT_DIR": str(tmp_path / "no-repository")}
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for command in commands]
    outputs = [" ".join(run.communicate(timeout=600)[0].split()) for run in runs]
    codes = [run.returncode for run in runs]

    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreWarning)  # every line of every file must parse
        records = read_records(tmp_path / "results" / "race")
    assert [r["status"] for r in records] == ["ok"] * 4, outputs
    assert set(Counter(r["config_hash"] for r in records).values()) == {1}, outputs
    refused = [output for code, output in zip(codes, outputs) if code == 1]
    # the run that started second was refused (the usual case) or, if the first had finished, skipped everything
    assert 0 in codes and len(refused) <= 1, outputs
    if refused:
        assert "is in use by drbench run (pid" in refused[0] and "Traceback" not in refused[0]
    else:
        assert any("0 cells measured (0 errors), 4 already stored" in output for output in outputs), outputs
