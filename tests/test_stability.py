"""The stability instruments (drbench.measure.stability, ``drbench train --trace``)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from drbench.data import get_dataset
from drbench.measure.accuracy import TrainRecipe, model_config_for, train
from drbench.measure.stability import StabilityTrace, first_rise, summarize_trace, traced_layers
from drbench.models import create_model
from drbench.ops.drconv import DRConv2d


def small_model(op: str) -> nn.Module:
    torch.manual_seed(0)
    conv = DRConv2d(3, 8, 3, padding=1, regions=4, init="independent") if op == "drconv" else nn.Conv2d(3, 8, 3, 1, 1)
    return nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


def step_once(model: nn.Module, trace: StabilityTrace, scale: float):
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.5)  # its norm over all parameters: 0.5 * sqrt(count)
    trace.before_update(model)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1 + scale)
    return trace.after_update(model, step=1, loss=1.0, lr=0.1)


def test_a_conv_moves_its_output_as_much_as_its_weights_and_has_no_churn():
    model = small_model("conv")
    trace = StabilityTrace(torch.randn(8, 3, 6, 6))
    trace.start(model)
    step = step_once(model, trace, 1e-3)
    assert step.update_ratio == {"weights": pytest.approx(1e-3, rel=1e-3)}
    assert step.grad_norm == pytest.approx(0.5 * sum(p.numel() for p in model.parameters()) ** 0.5)
    assert step.most_moved in {"0.weight", "3.weight"}
    assert step.mask_churn is None
    assert step.output_change < 1e-2


def test_region_layers_report_churn_and_roles_and_the_probe_leaves_batchnorm_statistics_alone():
    model = small_model("drconv")
    norm = model[1]
    trace = StabilityTrace(torch.randn(8, 3, 6, 6))
    trace.start(model)
    before = norm.running_mean.clone(), int(norm.num_batches_tracked)
    step = step_once(model, trace, 0.5)
    assert set(step.update_ratio) == {"weights", "guide", "generator"}
    assert 0 <= step.mask_churn <= 1 and step.mask_churn_max >= step.mask_churn
    assert torch.equal(norm.running_mean, before[0]) and int(norm.num_batches_tracked) == before[1]
    assert list(traced_layers(model)) == ["0", "3"]  # the guide inside the DRConv is not a layer of its own


def test_only_every_nth_step_is_traced():
    model = small_model("conv")
    trace = StabilityTrace(torch.randn(2, 3, 6, 6), every=3)
    trace.start(model)
    traced = [step_once(model, trace, 1e-3) for _ in range(6)]
    assert [t is not None for t in traced] == [False, False, True, False, False, True]
    with pytest.raises(ValueError, match="every must be >= 1"):
        StabilityTrace(torch.randn(1, 3, 4, 4), every=0)


def test_first_rise_ignores_single_noisy_steps():
    assert first_rise([2.3] * 10 + [2.9] + [2.2] * 19, window=5) is None
    assert first_rise([2.3] * 3, window=5) is None


def test_training_with_a_trace_records_every_step_and_a_summary():
    train_set = get_dataset("synthetic", split="train", num_images=64)
    test_set = get_dataset("synthetic", split="test", num_images=32)
    config = model_config_for("shufflenetv2", train_set, width=0.5, op="drconv", regions=4)
    trace = StabilityTrace.on_dataset(train_set, images=8)
    trained = train(lambda: create_model(**config), train_set, test_set, TrainRecipe(epochs=2, batch_size=16),
                    trace=trace)
    assert [s.step for s in trace.steps] == list(range(1, trained.result.steps + 1))
    assert [json.loads(line)["step"] for line in trace.to_jsonl().splitlines()] == [1, 2, 3, 4, 5, 6, 7, 8]
    summary = summarize_trace(trace.steps)
    assert set(summary["mask_churn"]) == {"first", "middle", "last"} and "guide" in summary["peak_update_ratio"]
    assert all(norm > 0 for norm in summary["grad_norm"].values())


def test_the_trace_sees_the_gradient_before_clipping():
    train_set = get_dataset("synthetic", split="train", num_images=32)
    test_set = get_dataset("synthetic", split="test", num_images=16)
    config = model_config_for("shufflenetv2", train_set, width=0.5, op="conv")
    trace = StabilityTrace.on_dataset(train_set, images=4)
    train(lambda: create_model(**config), train_set, test_set,
          TrainRecipe(epochs=1, batch_size=16, clip_grad_norm=1e-3), trace=trace)
    assert all(step.grad_norm > 1e-2 for step in trace.steps)  # far above the 1e-3 that was applied
    assert all(step.update_ratio["weights"] < 1e-3 for step in trace.steps)


def test_a_traced_run_trains_exactly_as_an_untraced_one():
    """The probe must not change training: a model with dropout (MobileNetV2) ends with the same weights."""
    train_set = get_dataset("synthetic", split="train", num_images=32)
    test_set = get_dataset("synthetic", split="test", num_images=16)
    config = model_config_for("mobilenetv2", train_set, width=0.25, op="drconv", regions=2)
    runs = [train(lambda: create_model(**config), train_set, test_set, TrainRecipe(epochs=1, batch_size=16),
                  trace=trace) for trace in (None, StabilityTrace.on_dataset(train_set, images=4))]
    plain, traced = (run.model.state_dict() for run in runs)
    assert all(torch.equal(plain[name], traced[name]) for name in plain)
    assert runs[0].result.train_loss == runs[1].result.train_loss


def test_drbench_train_trace_writes_one_line_per_step(tmp_path):
    from typer.testing import CliRunner

    from drbench.cli import app

    path = tmp_path / "trace.jsonl"
    result = CliRunner().invoke(app, ["train", "shufflenetv2", "--width", "0.5", "--op", "drconv", "--regions", "4",
                                      "--epochs", "1", "--batch-size", "16", "--train-images", "32",
                                      "--test-images", "16", "--json", "--trace", str(path)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(0 <= line["mask_churn"] <= 1 for line in lines)
