"""drbench status: done / running / failed / pending cells of a suite, claims and their liveness."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import executor_plugin  # noqa: F401  (registers the `claims` metric)
import pytest
from typer.testing import CliRunner

from drbench.cli import app
from drbench.config import load_config
from drbench.executors import PartOutcome
from drbench.executors.claims import CLAIMS_FOLDER, Claim, is_live, read_claims, release_claim, write_claim
from drbench.measure.timing import fixed_threads
from drbench.results import ResultsStore, read_records
from drbench.runner import record_from_parts, run_suite
from drbench.status import suite_status
from drbench.suite import parse_suite

SUITE = """\
name: tiny
fixed: {model: mobilenetv1, width: 0.25, input_size: 16, small_input: true, num_classes: 4}
axes:
  op: [conv, condconv, drconv, local]
  regions: [2]
  experts: [2]
metrics: [params]
"""


@pytest.fixture
def config(tmp_path):
    return load_config(overrides={"paths.results_dir": str(tmp_path / "results"), "run.threads": 1})


def stored(suite, cell, error: str | None = None, **env) -> dict:
    """The record a run would store for ``cell`` (measured here, now), with ``env`` changes."""
    with fixed_threads(1):
        outcome = PartOutcome(0, "local", ("params",), {} if error else {"params": {"value": 1}}, error, None, None,
                              "2026-01-01T00:00:00+00:00", 0.1)
        record = record_from_parts(suite, cell, [outcome], "run")
    record["env"].update(env)
    return record


def test_each_cell_is_done_running_failed_or_pending(config, tmp_path):
    suite = parse_suite(SUITE)
    conv, condconv, drconv, local = (cell.with_device("cpu") for cell in suite.cells)
    store = ResultsStore(tmp_path / "results" / "tiny")
    with store.writer("20260101T000000Z-a") as writer:
        writer.append(stored(suite, conv))
        writer.append(stored(suite, condconv, error="ValueError: does not fit"))
        writer.append(stored(suite, drconv, git_commit="01dc0ffee0"))
    write_claim(store.directory / CLAIMS_FOLDER, local.config_hash(), "process", local.label())

    with store.lock():
        report = suite_status(tmp_path / "results", suite, config)
        assert report.run == f"drbench run (pid {os.getpid()} on {os.uname().nodename})"
        assert [cell.state for cell in report.cells] == ["done", "failed", "pending", "running"]
        assert report.counts == {"done": 1, "running": 1, "failed": 1, "pending": 1}
        (failed,) = report.of("failed")
        assert failed.error == "ValueError: does not fit" and failed.label == condconv.label()
        (pending,) = report.of("pending")
        assert pending.note.startswith("stored on commit 01dc0ffe, machine ")
        (running,) = report.of("running")
        assert (running.claim.executor, running.claim.pid, running.label) == ("process", os.getpid(), local.label())

    # no run holds the folder: the claim is a leftover, the cell is pending again
    report = suite_status(tmp_path / "results" / "tiny", suite, config)  # the suite's own folder works too
    assert report.run is None and [cell.state for cell in report.cells] == ["done", "failed", "pending", "pending"]

    # a failure measured again successfully is done
    with store.writer("20260101T000001Z-b") as writer:
        writer.append(stored(suite, condconv))
    assert suite_status(tmp_path / "results", suite, config).of("done")[1].label == condconv.label()


def test_a_claim_is_live_while_its_run_holds_the_folder_and_its_process_exists(tmp_path):
    claim = write_claim(tmp_path, "abc", "local", "cell")
    assert read_claims(tmp_path) == [claim] and claim.where == f"pid {os.getpid()} on {claim.hostname}"
    assert is_live(claim, suite_locked=True) and not is_live(claim, suite_locked=False)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not is_live(dataclasses.replace(claim, pid=int(finished.stdout)), suite_locked=True)
    elsewhere = Claim("abc", "slurm", "cell", "node-17", 1, "2026-01-01T00:00:00+00:00", "4242_3")
    assert is_live(elsewhere, suite_locked=True) and elsewhere.where == "pid 1 on node-17, job 4242_3"
    release_claim(tmp_path, "abc", "local")
    assert read_claims(tmp_path) == [] and read_claims(tmp_path / "absent") == []


def test_a_cell_is_running_while_it_is_measured_and_not_after(config, tmp_path):
    suite_dir = tmp_path / "results" / "probe"
    suite = parse_suite(SUITE.replace("name: tiny", "name: probe").replace(
        "metrics: [params]", f"metrics: {{claims: {{suite_dir: '{suite_dir}'}}}}"))
    summary = run_suite(suite, config, only="op=conv|drconv")
    seen = [record["metrics"]["claims"] for record in read_records(summary.results_file)]
    assert [s["labels"] for s in seen] == [[cell.with_device("cpu").label()] for cell in suite.cells[::2]]
    assert all(s["pids"] == [os.getpid()] and s["executors"] == ["local"] for s in seen)
    assert read_claims(suite_dir / CLAIMS_FOLDER) == []
    assert suite_status(tmp_path / "results", suite, config).counts == {"done": 2, "running": 0, "failed": 0,
                                                                         "pending": 2}


def test_status_command_shows_states_and_errors(config, tmp_path):
    suite = parse_suite(SUITE)
    suites_dir = tmp_path / "suites"
    suites_dir.mkdir()
    (suites_dir / "tiny.yaml").write_text(SUITE)
    toml = tmp_path / "drbench.toml"
    toml.write_text(f"[paths]\nsuites_dir = '{suites_dir}'\n[run]\nthreads = 1\n")
    with ResultsStore(tmp_path / "results" / "tiny").writer("r") as writer:
        writer.append(stored(suite, suite.cells[0].with_device("cpu")))
        writer.append(stored(suite, suite.cells[1].with_device("cpu"), error="ValueError: does not fit"))

    runner = CliRunner()
    for arguments in (["--suite", str(suites_dir / "tiny.yaml")], []):  # named, or found by the folder's name
        result = runner.invoke(app, ["status", str(tmp_path / "results"), "--config", str(toml), *arguments])
        output = " ".join(result.output.split())
        assert result.exit_code == 0, result.output
        assert "4 cells: 1 done, 0 running, 1 failed, 2 pending" in output
        assert "ValueError: does not fit" in output
    everything = runner.invoke(app, ["status", str(tmp_path / "results"), "--config", str(toml), "--all"])
    assert "done" in everything.output.split("cells:")[1]

    (tmp_path / "results" / "other").mkdir()
    (tmp_path / "results" / "other" / "r.jsonl").write_text("")
    unknown = runner.invoke(app, ["status", str(tmp_path / "results"), "--config", str(toml)])
    message = " ".join(unknown.output.split())
    assert unknown.exit_code == 2 and "other.yaml for the results in" in message and "pass --suite FILE" in message
