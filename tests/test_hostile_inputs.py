"""Inputs that must not hurt the user (issue 16): each one ends with exit code 2 (usage or input) or 1 (the
environment) and one clear line naming the file and field, or is skipped with a warning; never a traceback,
nothing written outside the results and reports folders, nothing already stored lost."""

from __future__ import annotations

import errno
import json
import re
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from drbench.checkpoint import CheckpointError, load_checkpoint
from drbench.cli import app
from drbench.compare import compare_results
from drbench.history import commit_positions
from drbench.record import SCHEMA_VERSION
from drbench.sides import CompareError
from report_records import record, write_store

runner = CliRunner()

SUITE = """\
name: tiny
fixed: {model: mobilenetv1, width: 0.25, input_size: 16, small_input: true, num_classes: 4}
axes:
  op: [conv, drconv]
  regions: [2]
metrics: {macs: {}, params: {}}
"""


def cli(*args: str | Path):
    """Run drbench; the result of a command that ended as drbench meant it to (an exit code, no exception)."""
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def files_under(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def raw_store(path: Path, *lines: dict | bytes) -> Path:
    """A results file written byte for byte, bypassing the writer's validation (a hand-edited or hostile file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with a suite file; drbench's default folders (results, reports) live in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(SUITE)
    return tmp_path


# 1. A record's commit never reaches git as an option -------------------------------------------------------------


def test_a_commit_that_reads_as_a_git_option_is_skipped_and_empties_nothing(workdir):
    victim = workdir / "victim.txt"
    victim.write_text("precious")
    hostile = {**record(op="conv", latency=[0.01] * 5), "env": {"git_commit": f"--output={victim}"}}
    store = raw_store(workdir / "results" / "handmade" / "run.jsonl", record(op="conv", latency=[0.01] * 5), hostile)
    result = cli("history", store, "--out", workdir / "reports" / "h.png")
    assert result.exit_code == 0
    assert victim.read_text() == "precious"
    assert f"{store}:2" in result.stderr and "env.git_commit" in result.stderr


def test_git_is_never_given_a_non_hex_commit_or_ref_as_an_option(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    assert commit_positions({f"--output={victim}"}) is None
    raw_store(tmp_path / "results" / "s" / "run.jsonl", record())
    with pytest.raises(CompareError):
        compare_results(f"--output={victim}", str(tmp_path / "results"), results_dir=tmp_path / "results")
    assert victim.read_text() == "precious"


# 2. Output paths never come from record contents; suite names are plain folder names ------------------------------


@pytest.mark.parametrize("suite", ["..", "/tmp/elsewhere", "../../outside", "a/b"])
def test_a_record_suite_that_is_a_path_is_skipped_and_the_report_stays_in_reports(workdir, suite):
    store = raw_store(workdir / "results" / "handmade" / "run.jsonl", record(macs=1_000_000),
                      {**record(op="drconv", regions=4, macs=1_100_000), "suite": suite})
    before = {path for path in workdir.rglob("*")}
    result = cli("report", workdir / "results")
    assert result.exit_code == 0
    written = {path for path in workdir.rglob("*")} - before
    assert written and all(path.is_relative_to(workdir / "reports") for path in written)
    assert (workdir / "reports" / "handmade" / "index.md").is_file()
    assert "run.jsonl:2" in result.stderr and "suite" in result.stderr


def test_a_suite_named_dot_dot_is_refused_before_anything_is_written(workdir):
    (workdir / "up.yaml").write_text(SUITE.replace("name: tiny", "name: '..'"))
    result = cli("run", "up.yaml", "--results-dir", workdir / "results" / "inner")
    assert result.exit_code == 2
    assert "up.yaml:1: name:" in result.stderr
    assert not (workdir / "results").exists()


# 3. A YAML alias bomb is bounded, and the message does not quote its expansion -----------------------------------


def test_a_yaml_alias_bomb_is_refused_quickly_with_a_short_message(workdir):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
               f"*a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    (workdir / "bomb.yaml").write_text("name: bomb\n" + "\n".join(levels) + "\nmetrics: [macs]\n")
    start = time.perf_counter()
    result = cli("run", "bomb.yaml", "--dry-run")
    assert time.perf_counter() - start < 5
    assert result.exit_code == 2
    assert "aliases expand to more than" in result.stderr and len(result.stderr) < 500


def test_a_self_referring_alias_and_deep_nesting_are_refused(workdir):
    (workdir / "loop.yaml").write_text("name: loop\nfixed: &f {model: *f}\nmetrics: [macs]\n")
    (workdir / "deep.yaml").write_text("name: deep\nfixed: " + "[" * 5000 + "]" * 5000 + "\nmetrics: [macs]\n")
    for name in ("loop.yaml", "deep.yaml"):
        result = cli("run", name, "--dry-run")
        assert result.exit_code == 2 and name in result.stderr


# 4. Latency settings are bounded like drbench.toml's [timing] -------------------------------------------------------


@pytest.mark.parametrize("settings, field", [
    ("{budget_s: .inf, target_rel_iqr: -1}", "budget_s"),
    ("{budget_s: -1}", "budget_s"),
    ("{target_rel_iqr: -0.5}", "target_rel_iqr"),
    ("{min_blocks: 1}", "min_blocks"),
])
def test_latency_settings_out_of_bounds_are_suite_errors(workdir, settings, field):
    metrics = f"metrics: {{latency: {settings}}}"
    (workdir / "t.yaml").write_text(SUITE.replace("metrics: {macs: {}, params: {}}", metrics))
    result = cli("run", "t.yaml", "--dry-run")
    assert result.exit_code == 2
    assert f"t.yaml:6: metrics.latency.{field}:" in result.stderr


def test_timing_section_of_the_config_file_refuses_an_infinite_budget(workdir):
    (workdir / "drbench.toml").write_text("[timing]\nbudget_s = inf\n")
    result = cli("config")
    assert result.exit_code == 2 and "timing.budget_s" in result.stderr


# 5. Unreadable or invalid records are skipped with one warning each; every reader goes on --------------------------


@pytest.fixture
def broken_store(workdir):
    """A valid store of the tiny suite plus a file that is not UTF-8 and a record whose fields have the wrong
    types; returns the two broken files."""
    folder = workdir / "results" / "tiny"
    write_store(folder, [record("mobilenetv1", 0.25, "conv", macs=1_000_000, suite="tiny", latency=[0.01] * 5)])
    binary = raw_store(folder / "z-binary.jsonl", b"\xff\xfe\x00garbage")
    wrong = raw_store(folder / "z-wrong.jsonl", {**record(suite="tiny"), "metrics": {"macs": {"value": "many"}}})
    return binary, wrong


@pytest.mark.parametrize("command", [
    ["show", "results/tiny"],
    ["status", "results", "--suite", "tiny.yaml"],
    ["report", "results/tiny"],
    ["compare", "results/tiny", "results/tiny"],
    ["history", "results/tiny", "--metric", "macs", "--out", "reports/h.png"],
    ["run", "tiny.yaml", "--dry-run"],
])
def test_every_reader_skips_broken_records_with_a_warning_naming_file_and_line(broken_store, command):
    binary, wrong = broken_store
    before = files_under(binary.parent)
    result = cli(*command)
    assert result.exit_code == 0, result.output
    assert result.stderr.count(f"{binary.name}:1: skipped") == 1
    assert result.stderr.count(f"{wrong.name}:1: skipped") == 1 and "metrics.macs.value: " in result.stderr
    assert files_under(binary.parent) == before


# 6. Messages are printed as text, never as Rich markup --------------------------------------------------------------


def test_brackets_in_paths_are_printed_not_interpreted(workdir):
    store = write_store(workdir / "results" / "[/x]", [record(macs=1_000_000)])
    result = cli("show", store.parent)
    assert result.exit_code == 0 and "results/[/x]: 1 records" in result.stdout


def test_brackets_in_messages_are_printed_not_interpreted(workdir):
    result = cli("show", "results/[/x]")
    assert result.exit_code == 2 and "results/[/x]" in result.stderr
    (workdir / "drbench.toml").write_text("[section]\nkey = 1\n")
    result = cli("config")
    assert result.exit_code == 2 and "unknown section [section]" in result.stderr


# 7. The environment refuses a write: exit 1 and the file named, nothing stored lost --------------------------------


def test_a_name_too_long_for_the_file_system_is_an_environment_error(workdir):
    write_store(workdir / "results" / "handmade", [record(macs=1_000_000)])
    result = cli("report", "results", "--out", workdir / ("x" * 300))
    assert result.exit_code == 1
    assert "File name too long" in result.stderr and "x" * 300 in result.stderr


def test_a_results_folder_that_cannot_be_created_is_an_environment_error(workdir):
    (workdir / "results").write_text("a file where the results folder should be")
    result = cli("run", "tiny.yaml", "--results-dir", "results")
    assert result.exit_code == 1 and "results" in result.stderr


def test_a_full_disk_is_an_environment_error_and_stored_records_stay(workdir, monkeypatch):
    import drbench.results

    first = cli("run", "tiny.yaml", "--only", "op=conv")
    assert first.exit_code == 0, first.output
    stored = files_under(workdir / "results")

    def full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(drbench.results.os, "fsync", full)
    result = cli("run", "tiny.yaml")
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr and ".jsonl" in result.stderr
    assert all(path.read_bytes().startswith(content) for path, content in stored.items())  # append-only


def test_a_plot_folder_that_cannot_be_created_is_an_environment_error(workdir):
    write_store(workdir / "results" / "handmade", [record(macs=1_000_000, commit="a" * 40)])
    (workdir / "reports").write_text("a file where the reports folder should be")
    result = cli("history", "results", "--metric", "macs", "--out", "reports/h.png")
    assert result.exit_code == 1 and "reports" in result.stderr


# 8. Binary suite and config files, --only values that are not YAML ---------------------------------------------------


def test_control_characters_in_a_suite_are_an_input_error(workdir):
    (workdir / "nul.yaml").write_bytes(b"\x00" + SUITE.encode())
    result = cli("run", "nul.yaml", "--dry-run")
    assert result.exit_code == 2 and "nul.yaml: YAML syntax error" in result.stderr


def test_a_config_file_nested_too_deeply_is_an_input_error(workdir):
    (workdir / "drbench.toml").write_text("[run]\nthreads = " + "[" * 50_000 + "]" * 50_000 + "\n")
    result = cli("config")
    assert result.exit_code == 2 and "drbench.toml: not valid TOML: nested too deeply" in result.stderr


def test_binary_suite_and_config_files_are_input_errors(workdir):
    (workdir / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    result = cli("run", "binary.yaml", "--dry-run")
    assert result.exit_code == 2 and "binary.yaml: not a suite file" in result.stderr
    (workdir / "binary.toml").write_bytes(b"\xff\xfe[run]")
    result = cli("config", "--config", "binary.toml")
    assert result.exit_code == 2 and "binary.toml: not a configuration file" in result.stderr


@pytest.mark.parametrize("only", ["width=[1", "op=*alias", "width={", "op=@x", "colour=red"])
def test_only_values_that_are_not_yaml_are_input_errors_and_write_nothing(workdir, only):
    for dry_run in (["--dry-run"], []):
        result = cli("run", "tiny.yaml", *dry_run, "--only", only)
        assert result.exit_code == 2 and "--only" in result.stderr
    assert not (workdir / "results").exists()


# 9. Sizes that cannot run, and duplicate keys, are suite errors ------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (("input_size: 16", "input_size: [0, 0]"), "fixed.input_size"),
    (("regions: [2]", "regions: [100000]"), "axes.regions[0]"),
    (("metrics:", "fixed: {batch_size: 2}\nmetrics:"), "duplicate key 'fixed'"),
    (("axes:", "axes:\n  dtype: [" + ", ".join(["float32"] * 200) + "]\n  batch_size: [" + ", ".join(["1"] * 60) + "]"),
     "combinations"),
])
def test_suites_that_cannot_run_are_refused_when_read(workdir, change, message):
    (workdir / "bad.yaml").write_text(SUITE.replace(*change))
    result = cli("run", "bad.yaml", "--dry-run")
    assert result.exit_code == 2
    assert "bad.yaml:" in result.stderr and message in result.stderr


def test_a_link_named_like_a_mask_image_is_not_copied_into_the_report(workdir):
    secret = workdir / "secret.txt"
    secret.write_text("private")
    store = write_store(workdir / "results" / "handmade", [record(macs=1_000_000)])
    (store.parent / "leak_mask.png").symlink_to(secret)
    assert cli("report", "results").exit_code == 0
    assert not (workdir / "reports" / "handmade" / "masks").exists()


# 10. Markdown and CSV outputs are escaped ----------------------------------------------------------------------------


HOSTILE_TEXT = "<img src=x onerror=alert(1)>\n# heading"
UNESCAPED_TAG = re.compile(r"(?<!\\)<img")


def test_report_markdown_and_csv_escape_record_text(workdir):
    write_store(workdir / "results" / "handmade", [
        record(macs=1_000_000, latency=[0.01] * 5),
        record(op="drconv", regions=4, error=f"=HYPERLINK(\"http://evil\")\n{HOSTILE_TEXT}"),
    ])
    assert cli("report", "results").exit_code == 0
    page = (workdir / "reports" / "handmade" / "index.md").read_text()
    assert not UNESCAPED_TAG.search(page) and "\n# heading" not in page and "\\<img" in page
    cells = (workdir / "reports" / "handmade" / "cells.csv").read_text()
    assert "'=HYPERLINK" in cells and ",=HYPERLINK" not in cells and "\n# heading" not in cells


def test_compare_markdown_escapes_record_text(workdir):
    base = write_store(workdir / "results" / "base", [record(macs=100, placement=HOSTILE_TEXT)])
    current = write_store(workdir / "results" / "current", [record(macs=120, placement=HOSTILE_TEXT)])
    result = cli("compare", base, current, "--format", "markdown")
    assert result.exit_code == 1  # macs grew: a regression
    assert not UNESCAPED_TAG.search(result.stdout) and "\n# heading" not in result.stdout


# 11. A checkpoint whose fields have the wrong types ------------------------------------------------------------------


def test_a_checkpoint_with_wrong_types_is_named_not_a_traceback(workdir):
    path = workdir / "bad.pt"
    torch.save({"format": "drbench-checkpoint/1", "model_config": {"model": "mobilenetv1"}, "state_dict": [],
                "normalization": {"mean": "x", "std": [1.0]}, "data": {}, "result": {}}, path)
    with pytest.raises(CheckpointError, match="state_dict"):
        load_checkpoint(path)
    result = cli("masks", path, "--out", workdir / "m.png")
    assert result.exit_code == 2 and "bad.pt: state_dict" in result.stderr
    torch.save({"format": "drbench-checkpoint/1", "model_config": {"model": "mobilenetv1", "colour": 3},
                "state_dict": {}, "normalization": {"mean": [0.5], "std": [0.5]},
                "data": {"name": "synthetic"}, "result": {}}, path)
    result = cli("masks", path, "--out", workdir / "m.png")
    assert result.exit_code == 2 and "does not build" in result.stderr
    assert not (workdir / "m.png").exists()


def test_the_factories_write_the_current_schema():
    assert record()["schema"] == SCHEMA_VERSION


# Found by the fuzz test (test_fuzz_inputs.py) -------------------------------------------------------------------------


def test_a_line_nested_too_deeply_for_json_is_skipped(workdir):
    store = raw_store(workdir / "results" / "handmade" / "run.jsonl", b"[" * 100_000 + b"]" * 100_000,
                      record(macs=1))
    result = cli("show", store)
    assert result.exit_code == 0 and "run.jsonl:1: skipped unreadable line (nested too deeply)" in result.stderr


def test_a_configuration_value_that_nests_containers_is_skipped(workdir):
    nested = record(op="drconv", regions=4, macs=2)
    nested["config"] = {**nested["config"], "input_size": [{"h": 32}, [32]]}
    store = raw_store(workdir / "results" / "handmade" / "run.jsonl", record(macs=1), nested)
    result = cli("report", store)
    assert result.exit_code == 0 and "run.jsonl:2: skipped" in result.stderr and "config.input_size" in result.stderr


def test_show_copes_with_a_latency_without_its_spread_and_skips_numbers_beyond_64_bits(workdir):
    partial = record(latency=[0.01] * 5)
    del partial["metrics"]["latency"]["iqr_s"]
    huge = {**record(op="drconv", regions=4, macs=1), "metrics": {"macs": {"value": 2**70}}}
    store = raw_store(workdir / "results" / "handmade" / "run.jsonl", partial, huge)
    result = cli("show", store)
    assert result.exit_code == 0 and "10 ms" in result.stdout
    assert "run.jsonl:2: skipped" in result.stderr and "64 bits" in result.stderr


def test_profile_and_train_flags_are_bounded_like_suites(workdir):
    result = cli("profile", "mobilenetv1", "--op", "drconv", "--regions", "100000")
    assert result.exit_code == 2 and "--regions 100000: expected at most 1024" in result.stderr
    result = cli("profile", "mobilenetv1", "--input-size", "100000")
    assert result.exit_code == 2 and "--input-size" in result.stderr
    result = cli("train", "mobilenetv1", "--op", "condconv", "--experts", "5000")
    assert result.exit_code == 2 and "--experts 5000" in result.stderr
