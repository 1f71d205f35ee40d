"""drbench continuous: which processes run in which order, what each is given, resume, the user's checkout left
alone, and the comparison of what they stored (processes replaced by a fake that stores records)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drbench.cli import app
from drbench.config import load_config
from drbench.continuous import (
    ContinuousError, Job, JobOutcome, MeasurementError, Revision, cell_suite, comparable_records, interleaved_jobs,
    recorded_threads, resolve_revision, run_command, run_continuous, runs_per_cell, worktree_environment,
)
from drbench.environment import machine_id
from drbench.record import Record
from drbench.results import RunWriter
from drbench.stats import Verdict
from drbench.suite import Cell, load_suite
from comparison_records import git_repo, timings
from throwaway import SOURCES, git, throwaway_repository

runner = CliRunner()

TINY_SUITE = """\
name: tiny
fixed: {model: mobilenetv1, width: 0.25, input_size: 16, num_classes: 10}
axes:
  op: [conv, condconv]
  experts: [2]
metrics:
  macs: {}
  latency: {budget_s: 0.05, warmup: 1, min_blocks: 3}
"""

BASE, HEAD = Revision("main", "a" * 40), Revision("HEAD", "b" * 40)


def cell(op: str = "conv") -> Cell:
    return Cell(model="mobilenetv1", width=0.25, op=op, input_size=16, device="cpu")


def stored_record(config: dict, commit: str, *, latency: float = 0.01, suite: str = "tiny", dirty: bool = False,
                  machine: str | None = None, threads: int = 1, status: str = "ok") -> dict:
    """A record as `drbench run` stores it, with the latency samples of one run (and its reference's)."""
    import random

    from drbench.measure.timing import LatencyMeasurement
    from drbench.suite import config_hash

    rng = random.Random(hash((commit, latency)))
    reference = LatencyMeasurement(tuple(timings(rng, 0.001, 10)), 1, 1, 1, threads, "cpu")
    timed = LatencyMeasurement(tuple(timings(rng, latency, 10)), 1, 1, 1, threads, "cpu", reference=reference)
    return Record.model_validate({
        "schema": 1, "suite": suite, "config": config, "config_hash": config_hash(config), "status": status,
        "error": None if status == "ok" else "boom",
        "metrics": {"latency": {"value": timed.median, **timed.to_dict()}, "macs": {"value": 1000}}
        if status == "ok" else {},
        "env": {"git_commit": commit, "git_dirty": dirty, "machine": machine or machine_id(), "threads": threads,
                "torch_version": "2.13.0"},
        "started": "2025-01-01T00:00:00+00:00",
    }).to_dict()


# Pure parts -----------------------------------------------------------------------------------------------------


def test_jobs_alternate_the_commits_cell_by_cell_and_swap_their_order_every_other_round():
    jobs = interleaved_jobs([cell("conv"), cell("condconv")], [BASE, HEAD], 2, {})
    assert [(job.round, job.cell.op, job.revision.spec) for job in jobs] == [
        (0, "conv", "main"), (0, "conv", "HEAD"), (0, "condconv", "main"), (0, "condconv", "HEAD"),
        (1, "conv", "HEAD"), (1, "conv", "main"), (1, "condconv", "HEAD"), (1, "condconv", "main"),
    ]


def test_stored_rounds_of_a_cell_and_commit_are_not_run_again():
    conv = cell("conv")
    stored = {(conv.config_hash(), BASE.commit): 2, (conv.config_hash(), HEAD.commit): 1}
    jobs = interleaved_jobs([conv], [BASE, HEAD], 3, stored)
    assert [(job.round, job.revision.spec) for job in jobs] == [(1, "HEAD"), (2, "main"), (2, "HEAD")]
    assert interleaved_jobs([conv], [BASE, HEAD], 2, {(conv.config_hash(), c): 2 for c in ("a" * 40, "b" * 40)}) == []


def test_only_clean_records_of_this_suite_machine_and_thread_count_are_comparable():
    config = cell().config()
    kept = stored_record(config, "a" * 40)
    records = [kept, stored_record(config, "a" * 40, dirty=True), stored_record(config, "a" * 40, suite="other"),
               stored_record(config, "a" * 40, machine="elsewhere"), stored_record(config, "a" * 40, threads=2),
               stored_record(config, "a" * 40, status="error")]
    comparable = comparable_records(records, "tiny", machine_id(), 1)
    assert comparable == [kept, records[-1]]
    assert runs_per_cell(comparable) == {(kept["config_hash"], "a" * 40): 1}
    assert runs_per_cell(comparable, successful=False) == {(kept["config_hash"], "a" * 40): 2}


def test_a_cell_becomes_a_suite_of_its_own_that_reads_back_as_the_same_cell():
    config = load_config()
    suite = load_suite(Path("suites/quick.yaml"), config)
    for quick_cell in suite.cells:
        resolved = quick_cell.with_device("cpu")
        text = cell_suite("quick", resolved, {"latency": {"budget_s": 0.3}}, config)
        assert "name: quick" in text and "budget_s: 0.3" in text
    with pytest.raises(ContinuousError, match="cannot be written as a suite of its own"):
        cell_suite("quick", cell(), {"no_such_metric": {}}, config)


def test_each_process_imports_the_worktree_first_and_measures_what_it_is_told():
    environment = worktree_environment(Path("/wt/abc"), {"PYTHONPATH": "/elsewhere", "HOME": "/home/me"})
    assert environment["PYTHONPATH"].split(os.pathsep) == ["/wt/abc", "/elsewhere"]
    assert environment["HOME"] == "/home/me"
    assert worktree_environment(Path("/wt/abc"), {})["PYTHONPATH"] == "/wt/abc"
    command = run_command(Path("/s/cell.yaml"), Path("/r"), 2, "cpu", None)
    # -P: the current directory (a checkout of drbench itself) must not come before the worktree on sys.path
    assert command[:5] == [sys.executable, "-P", "-m", "drbench", "run"]
    assert {"--force", "/s/cell.yaml"} <= set(command) and command[command.index("--threads") + 1] == "2"


# run_continuous with processes replaced by a fake -----------------------------------------------------------------


class FakeProcesses:
    """Stores the record a process would, latency ``slowdown`` times longer at the head commit."""

    def __init__(self, results: Path, head: str, slowdown: float = 1.0, store: bool = True) -> None:
        self.results, self.head, self.slowdown, self.store = results, head, slowdown, store
        self.jobs: list[tuple[Job, Path, Path]] = []

    def __call__(self, job: Job, suite_file: Path, worktree: Path) -> JobOutcome:
        self.jobs.append((job, suite_file, worktree))
        assert (worktree / ".git").exists() and suite_file.is_file()
        if self.store:
            latency = 0.01 * (self.slowdown if job.revision.commit == self.head else 1.0)
            with RunWriter(self.results / "tiny" / f"run-{len(self.jobs)}.jsonl") as writer:
                writer.append(stored_record(job.cell.config(), job.revision.commit, latency=latency,
                                            threads=recorded_threads(1)))
        return JobOutcome(job, 0, 0.1, "")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A git repository of three commits with a tiny suite, as the current directory."""
    commits = git_repo(tmp_path / "repo", 3)
    (tmp_path / "repo" / "tiny.yaml").write_text(TINY_SUITE)
    monkeypatch.chdir(tmp_path / "repo")
    config = load_config(overrides={"paths.results_dir": str(tmp_path / "results"), "run.threads": 1})
    return tmp_path, commits, config, load_suite("tiny.yaml", config)


def test_a_slower_head_is_a_regression_and_a_second_call_measures_nothing(project):
    tmp_path, commits, config, suite = project
    fake = FakeProcesses(tmp_path / "results", commits[2], slowdown=1.5)
    result = run_continuous("HEAD~2", "HEAD", suite, config, rounds=2, measure=fake)
    assert len(result.measured) == len(fake.jobs) == 2 * 2 * 2 and result.skipped == 0
    worktrees = {job.revision.commit: tree for job, _, tree in fake.jobs}
    assert set(worktrees) == {commits[0], commits[2]} and len(set(worktrees.values())) == 2
    rows = {(row.label.split()[2], row.metric): row for row in result.comparison.cells}
    assert rows[("conv", "latency")].verdict is Verdict.REGRESSED and rows[("conv", "latency")].baseline_n == 20
    assert rows[("conv", "macs")].verdict is Verdict.UNCHANGED
    assert result.comparison.baseline.name == "HEAD~2" and commits[0][:7] in result.comparison.baseline.source

    again = run_continuous("HEAD~2", "HEAD", suite, config, rounds=2, measure=FakeProcesses(tmp_path, "", 1.0))
    assert again.measured == () and again.skipped == 8
    assert again.comparison.counts() == result.comparison.counts()
    # the worktrees are gone, the user's checkout is where it was
    assert git(tmp_path / "repo", "worktree", "list").count("\n") == 0  # the checkout itself only
    assert git(tmp_path / "repo", "rev-parse", "HEAD") == commits[2]


def test_the_same_code_at_two_commits_is_no_regression_and_only_narrows_the_cells(project):
    tmp_path, commits, config, suite = project
    fake = FakeProcesses(tmp_path / "results", commits[2], slowdown=1.0)
    result = run_continuous(commits[1], commits[2], suite, config, only="op=condconv", rounds=1, measure=fake)
    assert {job.cell.op for job, _, _ in fake.jobs} == {"condconv"}
    assert result.comparison.regressed == () and {row.label.split()[2] for row in result.comparison.cells} == {
        "condconv(experts=2)"}


def test_uncommitted_changes_are_not_measured_and_the_comparison_says_so(project):
    tmp_path, commits, config, suite = project
    (tmp_path / "repo" / "tracked.txt").write_text("one")
    git(tmp_path / "repo", "add", "tracked.txt")
    fake = FakeProcesses(tmp_path / "results", commits[2])
    result = run_continuous("HEAD~1", "HEAD", suite, config, rounds=1, only="op=conv", measure=fake)
    assert any("uncommitted changes; they were not measured" in note for note in result.comparison.notes)
    assert git(tmp_path / "repo", "status", "--porcelain", "--untracked-files=no") == "A  tracked.txt"


def test_a_process_that_stores_nothing_is_an_error_quoting_its_output(project):
    tmp_path, commits, config, suite = project
    fake = FakeProcesses(tmp_path / "results", commits[2], store=False)
    with pytest.raises(MeasurementError, match="stored no record"):
        run_continuous("HEAD~1", "HEAD", suite, config, rounds=1, measure=fake)
    assert git(tmp_path / "repo", "worktree", "list").count("\n") == 0


@pytest.mark.parametrize("arguments, message", [
    (["no-such-ref", "HEAD"], "'no-such-ref' is not a commit of the git repository"),
    (["HEAD~1", "HEAD", "--only", "op=local"], "no cell of suite tiny matches"),
    (["HEAD~1", "HEAD", "--only", "colour=red"], "unknown key 'colour'"),
    (["HEAD~1", "HEAD", "--rounds", "0"], "--rounds"),
    (["HEAD", "HEAD~0"], "are the same commit"),
    (["HEAD~1", "HEAD", "--threshold", "200"], "--threshold"),
])
def test_usage_errors_exit_2_before_anything_is_measured(project, arguments, message):
    tmp_path, _, _, _ = project
    result = runner.invoke(app, ["continuous", *arguments[:2], "--suite", "tiny.yaml", *arguments[2:],
                                 "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "results").exists()


def test_a_ref_is_never_read_by_git_as_an_option(project):
    tmp_path, _, _, _ = project
    with pytest.raises(ContinuousError, match="is not a commit"):
        resolve_revision("--output=" + str(tmp_path / "written"), tmp_path / "repo")
    assert not (tmp_path / "written").exists()


def test_outside_a_git_checkout_exits_2(tmp_path, monkeypatch):
    (tmp_path / "tiny.yaml").write_text(TINY_SUITE)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["continuous", "HEAD~1", "HEAD", "--suite", "tiny.yaml", "--repo", str(tmp_path)])
    assert result.exit_code == 2 and "is not in a git checkout" in result.output


# Real processes and timings --------------------------------------------------------------------------------------


@pytest.mark.timing
def test_doubled_conv_work_is_flagged_and_a_comment_is_not_each_within_minutes(tmp_path):
    """The issue's check, in a throwaway repository of drbench's sources: ``drbench continuous HEAD~1 HEAD --suite
    quick --only op=conv`` exits 0 between two commits that differ in a comment, and 1 when conv does twice the work
    (its latency flagged, not only its MACs)."""
    repo = tmp_path / "repo"
    base, comment, slower = throwaway_repository(repo)
    drbench = str(Path(sys.executable).parent / "drbench")
    environment = {**os.environ, "PYTHONPATH": str(SOURCES.parent)}
    for (old, new), expected in (((base, comment), 0), ((comment, slower), 1)):
        git(repo, "checkout", "-q", new)
        started = time.monotonic()
        finished = subprocess.run([drbench, "continuous", "HEAD~1", "HEAD", "--suite", "quick", "--only", "op=conv",
                                   "--format", "json"], cwd=repo, env=environment, capture_output=True, text=True)
        minutes = (time.monotonic() - started) / 60
        assert finished.returncode == expected, finished.stdout + finished.stderr
        assert minutes < 5, f"{minutes:.1f} minutes"
        latency = {cell["label"]: cell["verdict"] for cell in json.loads(finished.stdout)["cells"]
                   if cell["metric"] == "latency"}
        assert set(latency.values()) == ({"unchanged"} if expected == 0 else {"regressed"}), latency
