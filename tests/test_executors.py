"""Executors: worker processes that survive crashes, hangs and segfaults, GPU pinning, per-metric executors,
submitit (its local cluster, and the sbatch script the SLURM settings make), records that merge their parts."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import executor_plugin  # noqa: F401  (registers the test metrics, here and in every worker)
import pytest
from typer.testing import CliRunner

from drbench.cli import app
from drbench.config import ConfigError, load_config
from drbench.environment import git_state
from drbench.executors import (
    Dispatch,
    ExecutorError,
    PartOutcome,
    ProcessExecutor,
    interference_warning,
    route_metrics,
)
from drbench.executors.claims import CLAIMS_FOLDER, process_exists
from drbench.executors.process import describe_exit
from drbench.executors.settings import SlurmSettings
from drbench.executors.slurm import SlurmExecutor, submitit_parameters
from drbench.results import read_records
from drbench.runner import plan, record_from_parts, resolve_device, run_suite
from drbench.suite import parse_suite

FAULTS = """\
name: faults
fixed: {model: mobilenetv1, input_size: 16, small_input: true, num_classes: 4}
axes:
  width: [0.25, 0.5]
  op: [conv, condconv, drconv]
  regions: [2]
  experts: [2]
metrics:
  fault: {segfault_on: {op: conv, width: 0.5}, exit_on: {op: condconv, width: 0.5}, hang_on: {op: drconv, width: 0.5}}
"""

TINY = """\
name: tiny
fixed: {model: mobilenetv1, width: 0.25, input_size: 16, small_input: true, num_classes: 4}
axes:
  op: [conv, drconv]
  regions: [2]
metrics:
"""


def settings(tmp_path: Path, **overrides) -> dict:
    return {"paths.results_dir": str(tmp_path / "results"), "run.threads": 1, **overrides}


@pytest.fixture
def no_commit(tmp_path, monkeypatch):
    """Workers and jobs record the git commit they see, and resume compares it: a commit landing in this
    checkout during the test (other work in the same tree) would make them differ from this process. With no
    repository in sight, every process of the test records none."""
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-repository"))
    git_state.cache_clear()
    yield
    git_state.cache_clear()


def test_a_crash_a_segfault_and_a_hang_are_their_cells_errors_and_the_rest_is_stored_once(tmp_path, no_commit):
    config = load_config(overrides=settings(tmp_path, **{"executor.name": "process", "executor.workers": 2,
                                                         "executor.timeout_s": 5}))
    suite = parse_suite(FAULTS)
    summary = run_suite(suite, config)

    records = read_records(summary.results_file)
    by_cell = {(r["config"]["op"], r["config"]["width"]): r for r in records}
    assert len(records) == len(by_cell) == 6 and (summary.ok, summary.errors) == (3, 3)
    assert by_cell["conv", 0.5]["error"] == "WorkerCrashed: worker process killed by SIGSEGV while measuring this cell"
    assert by_cell["condconv", 0.5]["error"] == ("WorkerCrashed: worker process exited with code 3 while measuring "
                                                 "this cell")
    assert by_cell["drconv", 0.5]["error"].startswith("TimeoutError: the cell did not finish within the per-cell "
                                                      "timeout of 5 s; its worker process (pid ")
    for op in ("conv", "condconv", "drconv"):
        ok = by_cell[op, 0.25]
        assert ok["status"] == "ok" and ok["metrics"]["fault"]["value"] != os.getpid()  # measured in a worker
        assert ok["execution"][0]["executor"] == "process" and ok["execution"][0]["pid"] == ok["metrics"]["fault"]["value"]
    workers = {part["pid"] for record in records for part in record["execution"]}
    assert len(workers) >= 2 and not any(process_exists(pid) for pid in workers)  # crashed ones were replaced
    assert not list((tmp_path / "results" / "faults" / CLAIMS_FOLDER).glob("*.json"))

    # resume across executors: what the workers stored is not measured again in-process; the failures are
    in_process = load_config(overrides=settings(tmp_path))
    assert {(p.cell.op, p.cell.width) for p in plan(suite, in_process) if p.stored} == {
        ("conv", 0.25), ("condconv", 0.25), ("drconv", 0.25)}


def test_gpus_pin_one_worker_each_and_metrics_can_go_to_different_executors(tmp_path):
    """``--gpus 0,1``: each worker sees only its GPU. ``executor.metrics``: latency timed in this process while
    the fault metric runs in the workers; each cell still gets one record with both."""
    text = TINY + (f"  latency: {{budget_s: 0.01, warmup: 0, min_blocks: 2}}\n"
                   f"  fault: {{meet_on: {{width: 0.25}}, meet_dir: '{tmp_path / 'meet'}', meet_parties: 2}}\n")
    config = load_config(overrides=settings(tmp_path, **{"executor.name": "process", "executor.gpus": "0,1",
                                                         "executor.metrics": {"latency": "local"}}))
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    summary = run_suite(parse_suite(text), config)

    assert (summary.ok, summary.errors) == (2, 0)
    records = read_records(summary.results_file)
    assert [list(r["metrics"]) for r in records] == [["latency", "fault"]] * 2
    for record in records:
        local, process = record["execution"]
        assert (local["executor"], local["metrics"], local["pid"]) == ("local", ["latency"], os.getpid())
        assert (process["executor"], process["metrics"]) == ("process", ["fault"])
        assert process["cuda_visible_devices"] == record["metrics"]["fault"]["cuda_visible_devices"]
        assert record["env"]["machine"] == records[0]["env"]["machine"]
    assert sorted(r["execution"][1]["cuda_visible_devices"] for r in records) == ["0", "1"]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before


@pytest.mark.slow
def test_submitit_local_cluster_stores_the_same_cells_as_an_in_process_run(tmp_path, no_commit):
    pytest.importorskip("submitit")  # the [cluster] extra
    suite = parse_suite(TINY + "  macs: {}\n  params: {}\n")
    here = run_suite(suite, load_config(overrides=settings(tmp_path / "here")))
    jobs = load_config(overrides=settings(tmp_path / "jobs", **{"executor.name": "slurm", "slurm.cluster": "local",
                                                               "slurm.time_min": 10}))
    there = run_suite(suite, jobs)

    def cells(summary) -> set:
        return {(r["config_hash"], r["metrics"]["macs"]["value"], r["metrics"]["params"]["value"])
                for r in read_records(summary.results_file)}

    assert (there.ok, there.errors) == (2, 0) and cells(there) == cells(here)
    assert {r["execution"][0]["executor"] for r in read_records(there.results_file)} == {"slurm"}
    assert list((tmp_path / "jobs" / "results" / "tiny" / ".submitit").iterdir())  # submitit's job folders
    # resume across executors: the cluster's cells are done for an in-process run from this machine
    in_process = load_config(overrides=settings(tmp_path / "jobs"))
    assert all(p.stored for p in plan(suite, in_process))


def test_slurm_settings_become_the_sbatch_script(tmp_path, monkeypatch):
    """Without a cluster: submitit writes the sbatch script from drbench's [slurm] settings."""
    submitit = pytest.importorskip("submitit")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit's SLURM executor looks for srun on PATH
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    config = load_config(overrides={"slurm.partition": "gpu", "slurm.time_min": 90, "slurm.gpus_per_task": 1,
                                    "slurm.array_parallelism": 4, "slurm.setup": ["module load cuda"],
                                    "slurm.additional": {"exclusive": True}, "slurm.mem_gb": 16})
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(**submitit_parameters(config.section("slurm"), "drbench-width"))
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --job-name=drbench-width", "#SBATCH --mem=16GB",
                 "#SBATCH --exclusive", "module load cuda"):
        assert line in script
    assert executor._executor.parameters["array_parallelism"] == 4


def test_a_failed_job_is_its_cells_error_with_submitits_message(tmp_path):
    UncompletedJobError = pytest.importorskip("submitit.core.utils").UncompletedJobError

    class LostJob:
        job_id = "4242_3"

        def result(self):
            raise UncompletedJobError("Job 4242_3 (task: 0) with path /x has not produced any output "
                                      "(state: TIMEOUT)\nError stream produced:\n----\nslurmstepd: CANCELLED")

    suite = parse_suite(TINY + "  params: {}\n")
    config = load_config(overrides=settings(tmp_path))
    task = Dispatch(suite.cells[:1], suite.metrics, config, threads=1, suite_dir=tmp_path).assignments[0][1][0]
    outcome = SlurmExecutor(SlurmSettings(), tmp_path, "drbench-tiny")._outcome(task, LostJob())
    assert outcome.error == ("JobFailed: job 4242_3: Job 4242_3 (task: 0) with path /x has not produced any output "
                             "(state: TIMEOUT)")
    assert "slurmstepd: CANCELLED" in outcome.traceback
    assert outcome.worker == {"hostname": None, "pid": None, "cuda_visible_devices": None, "slurm_job_id": "4242_3"}


def test_a_record_joins_its_parts_in_the_suites_metric_order():
    suite = parse_suite(TINY + "  params: {}\n  latency: {}\n  fault: {}\n")
    cell = suite.cells[0].with_device("cpu")
    env = {"git_commit": "abc", "machine": "m", "threads": 1}
    fast = PartOutcome(0, "local", ("params", "latency"), {"latency": {"value": 0.1}, "params": {"value": 7}}, None,
                       None, env, "t0", 1.0, {"pid": 1})
    slow = PartOutcome(0, "process", ("fault",), {}, "WorkerCrashed: boom", None, None, "t1", 2.0, {"pid": 2})
    record = record_from_parts(suite, cell, [fast, slow], "run")
    assert list(record["metrics"]) == ["params", "latency"] and record["env"] == env
    assert (record["status"], record["error"], record["duration_s"]) == ("error", "WorkerCrashed: boom", 3.0)
    assert [(p["executor"], p["metrics"], p["pid"]) for p in record["execution"]] == [
        ("local", ["params", "latency"], 1), ("process", ["fault"], 2)]


def test_cells_measured_as_jobs_take_their_device_from_the_jobs(tmp_path):
    """A login node without GPUs plans GPU jobs: ``auto`` follows ``slurm.gpus_per_task``, and ``cuda`` is not
    refused here; when some metric is measured here, the device is resolved here."""
    suite = parse_suite(TINY + "  params: {}\n")
    jobs = {"executor.name": "slurm"}
    assert {p.cell.device for p in plan(suite, load_config(overrides=settings(
        tmp_path, **jobs, **{"slurm.gpus_per_task": 1})))} == {"cuda"}
    assert {p.cell.device for p in plan(suite, load_config(overrides=settings(tmp_path, **jobs)))} == {"cpu"}
    assert {p.cell.device for p in plan(suite, load_config(overrides=settings(tmp_path, **jobs)), device="cuda")} == {
        "cuda"}
    split = load_config(overrides=settings(tmp_path, **jobs, **{"slurm.gpus_per_task": 1,
                                                                "executor.metrics": {"params": "local"}}))
    assert {p.cell.device for p in plan(suite, split)} == {resolve_device("auto")}


def test_metrics_are_routed_to_their_executors():
    config = load_config(overrides={"executor.name": "slurm", "executor.metrics": {"latency": "local"}})
    assert route_metrics(["macs", "latency", "accuracy"], config.section("executor")) == {
        "slurm": ("macs", "accuracy"), "local": ("latency",)}
    with pytest.raises(ExecutorError, match="unknown metric 'latncy'"):
        route_metrics(["macs"], load_config(overrides={"executor.metrics": {"latncy": "local"}}).section("executor"))
    with pytest.raises(ConfigError, match="executor.metrics"):
        load_config(overrides={"executor.metrics": {"latency": "cluster"}})


def test_concurrent_timing_is_warned_about():
    timed = ["macs", "latency"]
    assert interference_warning(timed, load_config(overrides={"executor.name": "process"})) is None  # one worker
    warning = interference_warning(timed, load_config(overrides={"executor.name": "process", "executor.workers": 2}))
    assert warning.startswith("latency measured by 2 worker processes at once")
    split = load_config(overrides={"executor.name": "process", "executor.workers": 2,
                                   "executor.metrics": {"latency": "local"}})
    assert interference_warning(timed, split) is None


def test_gpus_from_toml_or_flag_and_one_worker_per_gpu(tmp_path):
    toml = tmp_path / "drbench.toml"
    toml.write_text("[executor]\nname = 'process'\ngpus = [0, 1]\n")
    assert load_config(toml).section("executor").gpus == ("0", "1")
    assert load_config(overrides={"executor.gpus": "2, GPU-8f3a"}).section("executor").gpus == ("2", "GPU-8f3a")
    assert ProcessExecutor(gpus=("0", "1")).workers == 2
    with pytest.raises(ExecutorError, match="one worker per GPU"):
        ProcessExecutor(workers=3, gpus=("0", "1"))


def test_worker_endings_are_described():
    assert describe_exit(-signal.SIGSEGV) == "worker process killed by SIGSEGV"
    assert describe_exit(-signal.SIGKILL).startswith("worker process killed by SIGKILL (out of memory?")
    assert describe_exit(3) == "worker process exited with code 3"


def test_metrics_of_a_script_cannot_go_to_workers(tmp_path, monkeypatch):
    suite = parse_suite(TINY + "  fault: {}\n")
    monkeypatch.setattr(executor_plugin.measure_fault, "__module__", "__main__")
    config = load_config(overrides=settings(tmp_path, **{"executor.name": "process"}))
    with pytest.raises(ExecutorError, match="metric 'fault' is defined in the __main__ script"):
        Dispatch(suite.cells, suite.metrics, config, threads=1, suite_dir=tmp_path)


def test_bad_executor_flags_exit_2_with_one_line(tmp_path):
    suite_file = tmp_path / "tiny.yaml"
    suite_file.write_text(TINY + "  params: {}\n")
    cases = [(["--executor", "cluster"], "executor.name"),
             (["--executor", "process", "--workers", "3", "--gpus", "0,1"], "one worker per GPU")]
    for flags, message in cases:
        result = CliRunner().invoke(app, ["run", str(suite_file), "--results-dir", str(tmp_path / "r"), *flags])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
