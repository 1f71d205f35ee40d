"""The runner: one record per cell, errors recorded and the matrix goes on, resume, filters, interrupts."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from drbench.config import load_config
from drbench.measure.complexity import complexity
from drbench.models import create_model
from drbench.ops.drconv import default_drconv_impl
from drbench.ops.functional import default_region_conv_impl
from drbench.results import ResultsStore, StoreLockedError, read_records
from drbench.runner import _sigint_deferred, plan, resolve_device, run_suite
from drbench.suite import parse_suite

TINY = """\
name: tiny
fixed: {model: shufflenetv2, width: 0.5, input_size: 16, small_input: true, num_classes: 4}
axes:
  op: [conv, condconv, drconv]
  regions: [2]
  experts: [2]
metrics:
  latency: {budget_s: 0.02, warmup: 1, min_blocks: 2}
"""


@pytest.fixture
def config(tmp_path):
    return load_config(overrides={"paths.results_dir": str(tmp_path / "results"), "run.threads": 1})


def test_each_cell_is_stored_once_and_a_second_run_adds_nothing(config):
    suite = parse_suite(TINY)
    first = run_suite(suite, config)
    assert (first.ok, first.errors, first.skipped) == (3, 0, 0)
    records = read_records(first.results_file)
    assert [r["config"]["op"] for r in records] == ["conv", "condconv", "drconv"]
    assert [r["config_hash"] for r in records] == [cell.with_device("cpu").config_hash() for cell in suite.cells]
    record = records[2]
    assert record["config"]["regions"] == 2 and record["config"]["device"] == "cpu"
    assert record["status"] == "ok" and record["metrics"]["latency"]["value"] > 0
    assert len(record["metrics"]["latency"]["samples"]) >= 2
    assert record["env"]["threads"] == 1 == record["metrics"]["latency"]["threads"]
    # what a drconv cell without an impl option ran
    assert record["env"]["drconv_impl"] == default_drconv_impl("cpu")
    assert record["env"]["region_conv_impl"] == default_region_conv_impl("cpu")
    assert record["metric_settings"]["latency"]["budget_s"] == 0.02

    second = run_suite(suite, config)
    assert (second.ok, second.errors, second.skipped, second.results_file) == (0, 0, 3, None)
    assert len(ResultsStore(first.results_file.parent).records()) == 3
    assert all(p.stored for p in plan(suite, config))

    forced = run_suite(suite, config, force=True, only="op=drconv")
    assert (forced.ok, forced.planned) == (1, 1)
    assert len(ResultsStore(first.results_file.parent).records()) == 4


def test_changed_metric_settings_or_threads_measure_again(config, tmp_path):
    run_suite(parse_suite(TINY), config)
    longer = parse_suite(TINY.replace("budget_s: 0.02", "budget_s: 0.03"))
    assert not any(p.stored for p in plan(longer, config))
    two_threads = load_config(overrides={"paths.results_dir": str(tmp_path / "results"), "run.threads": 2})
    assert not any(p.stored for p in plan(parse_suite(TINY), two_threads))


def test_a_failing_cell_is_recorded_and_the_matrix_goes_on(config):
    # DRConv on every convolution puts it on depthwise convs, which it rejects when the model is built
    text = TINY.replace("op: [conv, condconv, drconv]", "op: [drconv, conv]").replace("  experts: [2]\n", "").replace(
        "num_classes: 4}", "num_classes: 4, placement: all}"
    )
    summary = run_suite(parse_suite(text), config)
    assert (summary.ok, summary.errors) == (1, 1)
    failed, ok = read_records(summary.results_file)
    assert failed["status"] == "error" and "groups=1 only" in failed["error"]
    assert failed["error"].startswith("ValueError:") and "Traceback" in failed["traceback"]
    assert failed["metrics"] == {} and ok["status"] == "ok"
    assert "groups=1 only" in summary.error_messages[0]
    again = run_suite(parse_suite(text), config)
    assert (again.skipped, again.errors) == (1, 1)  # failures are retried, successes are not


@pytest.mark.slow  # the first fvcore trace and FlopCounterMode of a process cost several seconds
def test_every_builtin_metric_is_measured_and_stored(config):
    suite = parse_suite(TINY.replace("op: [conv, condconv, drconv]", "op: [drconv]").replace("  experts: [2]\n", "").replace(
        "metrics:\n", "metrics:\n  macs: {by_layer: true}\n  params: {}\n  memory: {}\n"))
    record = read_records(run_suite(suite, config).results_file)[0]
    assert list(record["metrics"]) == ["macs", "params", "memory", "latency"]
    expected = complexity(create_model("shufflenetv2", width=0.5, op="drconv", num_classes=4, input_size=16,
                                       small_input=True, regions=2), 16)
    assert record["metrics"]["macs"]["value"] == expected.macs
    assert record["metrics"]["params"]["value"] == expected.params
    assert record["metrics"]["macs"]["by_layer"]
    memory = record["metrics"]["memory"]
    assert memory["value"] > memory["input_bytes"] > 0 and memory["param_bytes"] > 0


def test_only_selects_cells_and_rejects_unknown_keys(config):
    suite = parse_suite(TINY)
    assert [p.cell.op for p in plan(suite, config, only="op=conv|drconv")] == ["conv", "drconv"]
    assert [p.cell.op for p in plan(suite, config, only="regions=2")] == ["drconv"]
    with pytest.raises(ValueError, match="unknown key 'opp'"):
        plan(suite, config, only="opp=conv")


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda"
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ValueError, match="no CUDA device; use --device cpu"):
            resolve_device("cuda")


def test_a_suite_being_run_elsewhere_is_refused(config):
    suite = parse_suite(TINY)
    with ResultsStore(f"{config.get('paths.results_dir')}/tiny").lock():
        with pytest.raises(StoreLockedError):
            run_suite(suite, config)


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler for the test: a process started in the background of a non-interactive shell
    (as CI may start it) inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_while_a_record_is_written_is_delivered_after_it(python_sigint_handler):
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with _sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("record written")
    assert steps == ["record written"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
