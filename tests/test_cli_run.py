"""``drbench run / show / config / list suites`` as a user runs them, Ctrl-C and resume included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drbench.cli import app
from drbench.config import load_config
from drbench.results import read_records
from drbench.runner import plan, run_suite
from drbench.suite import load_suite

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

SUITE = """\
name: cli
fixed: {model: shufflenetv2, width: 0.5, input_size: 16, small_input: true, num_classes: 4}
axes:
  op: [conv, drconv]
  regions: [2, 4]
metrics:
  latency: {budget_s: 0.02, warmup: 1, min_blocks: 2}
"""


@pytest.fixture
def suite_file(tmp_path):
    path = tmp_path / "cli.yaml"
    path.write_text(SUITE)
    return path


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_malformed_suite_exits_2_with_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE.replace("op: [conv, drconv]", "op: [conv, drconvv]"))
    result = invoke("run", str(bad))
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("error:") and "bad.yaml:4: axes.op[1]: unknown operator 'drconvv'" in message
    assert "Traceback" not in result.output and len(message.splitlines()) <= 2  # one message, maybe wrapped


def test_dry_run_lists_cells_and_stores_nothing(suite_file, tmp_path):
    result = invoke("run", str(suite_file), "--dry-run", "--results-dir", str(tmp_path / "r"))
    assert result.exit_code == 0
    assert "3 cells" in result.output and "drconv(regions=4)" in result.output
    assert not (tmp_path / "r").exists()


def test_run_then_resume_then_show(suite_file, tmp_path):
    results = tmp_path / "r"
    first = invoke("run", str(suite_file), "--results-dir", str(results), "--threads", "1")
    assert first.exit_code == 0, first.output
    assert "3 cells measured (0 errors), 0 already stored" in first.output
    second = invoke("run", str(suite_file), "--results-dir", str(results), "--only", "op=drconv")
    assert second.exit_code == 0 and "0 cells measured (0 errors), 2 already stored" in second.output
    shown = invoke("show", str(results))
    assert shown.exit_code == 0
    assert "3 records" in shown.output and "regions" in shown.output and "ms" in shown.output


def test_bad_flags_exit_2(suite_file):
    assert invoke("run", str(suite_file), "--only", "colour=red").exit_code == 2
    result = invoke("run", str(suite_file), "--device", "tpu")
    assert result.exit_code == 2 and "run.device" in result.output
    assert invoke("show", "no/such/results").exit_code == 2


def test_config_says_where_each_setting_came_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./drbench.toml is read by default
    toml = tmp_path / "drbench.toml"
    toml.write_text("[timing]\nbudget_s = 0.5\n")
    result = invoke("config", "--threads", "3")
    assert result.exit_code == 0
    row = lambda key: next(line for line in result.output.splitlines() if f" {key} " in line)  # noqa: E731
    assert "0.5" in row("timing.budget_s") and "drbench.toml" in row("timing.budget_s")
    assert "3" in row("run.threads") and "flag" in row("run.threads")
    assert "default" in row("timing.warmup")
    toml.write_text("[timing]\nbudget = 0.5\n")
    bad = invoke("config")
    assert bad.exit_code == 2 and "unknown key 'timing.budget'" in bad.output


def test_list_suites_shows_the_shipped_suites():
    result = invoke("list", "suites", "--config", str(ROOT / "drbench.toml"))
    assert result.exit_code == 0
    for name in ("quick", "width", "regions", "spatial", "table1"):
        assert name in result.output


@pytest.mark.slow
def test_sigint_mid_matrix_loses_at_most_the_cell_in_flight_and_resumes_to_the_same_records(tmp_path):
    suite_path = tmp_path / "interrupt.yaml"
    suite_path.write_text(SUITE.replace("name: cli", "name: interrupt").replace("regions: [2, 4]", "regions: [1, 2, 4, 8]")
                          .replace("budget_s: 0.02", "budget_s: 0.4"))
    results = tmp_path / "r"
    command = [sys.executable, "-c", "from drbench.cli import main; main()", "run", str(suite_path),
               "--results-dir", str(results), "--threads", "1"]
    env = {**os.environ, "COLUMNS": "200"}
    # SIGINT as a terminal delivers it, even where CI started this test with SIGINT ignored (inherited by children).
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not _stored_lines(results) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    assert "interrupted:" in err and "run the same command again to resume" in err
    interrupted = read_records(results)  # every stored line is a whole record (no StoreWarning)
    assert 1 <= len(interrupted) < 5

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{len(interrupted)} already stored" in resumed.stdout

    config = load_config(overrides={"paths.results_dir": str(tmp_path / "uninterrupted"), "run.threads": 1})
    suite = load_suite(suite_path, config)
    uninterrupted = read_records(run_suite(suite, config).results_file)
    final = read_records(results)
    assert sorted(r["config_hash"] for r in final) == sorted(r["config_hash"] for r in uninterrupted)
    assert len({r["config_hash"] for r in final}) == len(final) == len(plan(suite, config)) == 5
    assert all(r["status"] == "ok" for r in final)


def _stored_lines(results: Path) -> int:
    return sum(len(path.read_text().splitlines()) for path in results.rglob("*.jsonl")) if results.exists() else 0
