"""``drbench compare`` and ``drbench history`` as a user runs them: exit codes, formats, and real measurements
(the same suite twice must not be a regression; a real slowdown must be)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comparison_records import CONV, DRCONV, git_repo, make_record, timings, write_store
from typer.testing import CliRunner

from drbench.cli import app
from drbench.compare import compare_results
from drbench.stats import Verdict
from drbench.config import load_config
from drbench.runner import run_suite
from drbench.suite import parse_suite

runner = CliRunner()

# A small suite: two cells of a tiny model, timed long enough for the Mann-Whitney U test to reach p < 0.002.
TINY_SUITE = """
name: tiny
description: two cells of a tiny model, for comparisons
fixed: {input_size: 32, batch_size: 4, num_classes: 10, small_input: true}
axes:
  model: [shufflenetv2]
  width: [0.5]
  op: [conv, drconv]
  regions: [4]
metrics:
  latency: {budget_s: 0.4, warmup: 2, min_blocks: 10}
"""


@pytest.fixture()
def stores(tmp_path):
    rng = random.Random(0)
    base = write_store(tmp_path / "base.jsonl", [make_record(CONV, latency=timings(rng, 0.010, 20), macs=100),
                                                  make_record(DRCONV, latency=timings(rng, 0.020, 20), macs=120)])
    same = write_store(tmp_path / "same.jsonl", [make_record(CONV, latency=timings(rng, 0.010, 20), macs=100),
                                                  make_record(DRCONV, latency=timings(rng, 0.020, 20), macs=120)])
    slower = write_store(tmp_path / "slower.jsonl", [make_record(CONV, latency=timings(rng, 0.013, 20), macs=100),
                                                      make_record(DRCONV, latency=timings(rng, 0.020, 20), macs=120)])
    return base, same, slower


def test_exit_code_says_whether_anything_regressed(stores):
    base, same, slower = stores
    unchanged = runner.invoke(app, ["compare", str(base), str(same)])
    assert unchanged.exit_code == 0, unchanged.output
    assert "0 regressed" in unchanged.output
    regressed = runner.invoke(app, ["compare", str(base), str(slower)])
    assert regressed.exit_code == 1
    assert "1 regressed" in regressed.output
    assert runner.invoke(app, ["compare", str(slower), str(base)]).exit_code == 0  # an improvement


def test_json_and_markdown_formats(stores):
    base, _, slower = stores
    result = runner.invoke(app, ["compare", str(base), str(slower), "--format", "json", "--metric", "latency"])
    data = json.loads(result.output)
    assert data["counts"]["regressed"] == 1 and data["counts"]["unchanged"] == 1
    assert {c["metric"] for c in data["cells"]} == {"latency"}
    markdown = runner.invoke(app, ["compare", str(base), str(slower), "--format", "markdown"]).output
    assert markdown.startswith("### drbench compare:") and "| **regressed** |" in markdown


@pytest.mark.parametrize("arguments, message", [
    (["--threshold", "ten"], "--threshold 'ten'"),
    (["--metric", "accuracy"], "metric accuracy is on neither side"),
    (["--format", "html"], "html"),
])
def test_usage_errors_exit_2(stores, arguments, message):
    base, same, _ = stores
    result = runner.invoke(app, ["compare", str(base), str(same), *arguments])
    assert result.exit_code == 2
    assert message in result.output


def test_a_side_that_does_not_exist_exits_2(stores, tmp_path):
    result = runner.invoke(app, ["compare", str(stores[0]), "v9.9", "--results-dir", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "'v9.9' is not a results file or folder" in result.output


def test_history_prints_the_steps_and_writes_the_plot(tmp_path, monkeypatch):
    commits = git_repo(tmp_path / "repo", 4)
    rng = random.Random(1)
    records = [make_record(CONV, latency=timings(rng, 0.010 if i < 2 else 0.015, 20), commit=c,
                           started=f"2025-01-0{i + 1}T00:00:00+00:00") for i, c in enumerate(commits)]
    write_store(tmp_path / "results" / "synthetic" / "run.jsonl", records)
    # history orders commits in drbench's own checkout; these commits are not there, so it falls back to time.
    out = tmp_path / "history.svg"
    result = runner.invoke(app, ["history", str(tmp_path / "results"), "--suite", "synthetic", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 cells over 4 commits" in result.output
    assert commits[2][:7] in result.output and "regressed" in result.output
    assert out.read_text().lstrip().startswith("<?xml")
    bad = runner.invoke(app, ["history", str(tmp_path / "results"), "--cell", "colour=red"])
    assert bad.exit_code == 2 and "unknown key 'colour'" in bad.output


# Real measurements ----------------------------------------------------------------------------------------------


def _measure(results_dir: Path) -> Path:
    config = load_config(overrides={"run.threads": 1, "run.device": "cpu"})
    run_suite(parse_suite(TINY_SUITE, "tiny.yaml", config), config, results_dir=results_dir, force=True)
    return results_dir / "tiny"


@pytest.mark.timing
def test_the_same_suite_measured_twice_is_not_a_regression_and_doubled_conv_work_is(tmp_path, monkeypatch):
    """Real timings: each run times the reference kernel in turns with the cells, so a machine whose load changes
    between the two runs (other jobs starting) shifts both alike and the comparison judges the ratio."""
    first, second = _measure(tmp_path / "first"), _measure(tmp_path / "second")
    result = runner.invoke(app, ["compare", str(first), str(second)])
    assert result.exit_code == 0, result.output
    assert "0 regressed" in result.output

    # A "commit" that makes every convolution do its work twice: conv latency must be flagged.
    forward = torch.nn.Conv2d.forward
    monkeypatch.setattr(torch.nn.Conv2d, "forward", lambda self, x: (forward(self, x), forward(self, x))[1])
    slowed = _measure(tmp_path / "slowed")
    comparison = compare_results(str(first), str(slowed))
    verdicts = {(row.label.split()[2], row.metric): row for row in comparison.cells}
    conv = verdicts[("conv", "latency")]
    # the whole model's forward, conv layers doubled among the rest (1.48x relative to the reference on the idle VM)
    assert conv.verdict is Verdict.REGRESSED and conv.ratio > 1.3 and conv.p_value < 0.002, conv
    assert runner.invoke(app, ["compare", str(first), str(slowed)]).exit_code == 1


@pytest.mark.timing
def test_threads_1_against_threads_2_is_flagged_from_the_command_line(tmp_path):
    """The issue's check as a new user runs it: the same suite with --threads 2, then --threads 1.

    At 224x224, batch 8, two idle cores make the forward faster, so one thread is the slower side (a regression,
    exit 1); at 64x64 they did not on the 2-core VM (ShuffleNetV2 0.5x conv: 40.5 ms on two threads, 35.8 ms on
    one). On an oversubscribed machine two threads can be many times slower than one (OpenMP threads wait for
    descheduled siblings): the change must then be flagged as an improvement. Either way it is flagged, and the
    exit code follows its direction."""
    suite = tmp_path / "tiny.yaml"
    # conv only: DRConv's memory-bound passes gain little from a second thread (1.0-1.2x here)
    suite.write_text(TINY_SUITE.replace("input_size: 32, batch_size: 4, num_classes: 10, small_input: true",
                                        "input_size: 224, batch_size: 8, num_classes: 10")
                     .replace("op: [conv, drconv]\n  regions: [4]", "op: [conv]"))
    drbench = str(Path(sys.executable).parent / "drbench")
    for threads in (2, 1):
        subprocess.run([drbench, "run", str(suite), "--results-dir", str(tmp_path / f"t{threads}"), "--threads",
                        str(threads), "--device", "cpu"], check=True, capture_output=True)
    result = subprocess.run([drbench, "compare", str(tmp_path / "t2"), str(tmp_path / "t1"), "--format", "json"],
                            capture_output=True, text=True)
    data = json.loads(result.stdout)
    assert data["environment_differences"] == ["threads differs: 2 (baseline) vs 1 (current)"]
    verdicts = {cell["verdict"] for cell in data["cells"]}
    assert verdicts in ({"regressed"}, {"improved"}), data["cells"]
    assert result.returncode == (1 if verdicts == {"regressed"} else 0)


@pytest.mark.timing
def test_the_issues_thread_count_case_is_flagged_and_the_same_configuration_twice_is_not(tmp_path):
    """Exactly as the issue ran it: ShuffleNetV2 0.5x conv, 224px, batch 8, the default latency settings, `drbench
    run --threads 2`, then `--threads 1` (twice), then `drbench compare`. One thread is slower on an idle 2-core
    machine (64.5 -> 102 ms there): a regression; the two one-thread runs are not one."""
    suite = tmp_path / "threads.yaml"
    suite.write_text("name: threads\nfixed: {model: shufflenetv2, width: 0.5, op: conv, input_size: 224, "
                     "batch_size: 8}\nmetrics: [latency]\n")
    drbench = str(Path(sys.executable).parent / "drbench")
    for name, threads in (("two", 2), ("one", 1), ("one-again", 1)):
        subprocess.run([drbench, "run", str(suite), "--results-dir", str(tmp_path / name), "--threads",
                        str(threads), "--device", "cpu"], check=True, capture_output=True)
    fewer = subprocess.run([drbench, "compare", str(tmp_path / "two"), str(tmp_path / "one"), "--format", "json"],
                           capture_output=True, text=True)
    [row] = json.loads(fewer.stdout)["cells"]
    assert row["verdict"] == "regressed" and row["rule"].startswith("vs reference"), row
    assert fewer.returncode == 1
    same = subprocess.run([drbench, "compare", str(tmp_path / "one"), str(tmp_path / "one-again"), "--format",
                           "json"], capture_output=True, text=True)
    [row] = json.loads(same.stdout)["cells"]
    assert row["verdict"] == "unchanged" and same.returncode == 0, row
