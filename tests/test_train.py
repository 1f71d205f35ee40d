"""The short-schedule trainer: schedule, optimiser groups, augmentation, determinism, divergence, checkpoints,
the accuracy suite metric and ``drbench train``. Tiny models and tiny data keep every test fast."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from drbench.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from drbench.cli import app
from drbench.data import ImageDataset, Normalization, get_dataset
from drbench.measure.accuracy import (
    AccuracySettings,
    Precision,
    TrainRecipe,
    TrainResult,
    evaluate,
    learning_rate,
    measure_accuracy,
    model_config_for,
    parameter_groups,
    random_crop_flip,
    summarize,
    train,
)
from drbench.metric_registry import RunContext, get_metric
from drbench.config import load_config
from drbench.models import create_model
from drbench.suite import Cell

runner = CliRunner()


def colour_dataset(count: int, seed: int, split: str = "train") -> ImageDataset:
    """A trivially learnable set: the class is the colour channel that is bright, under a little noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    images = torch.randint(0, 60, (count, 3, 8, 8), generator=generator)
    images[torch.arange(count), labels] += 150
    return ImageDataset("colours", split, images.to(torch.uint8), labels, ("red", "green", "blue"))


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


FAST = TrainRecipe(epochs=2, batch_size=32, lr=0.1, warmup_epochs=0.5)


# --- the recipe's parts ---------------------------------------------------------------------------------------------


def test_learning_rate_warms_up_then_decays_to_zero():
    assert learning_rate(0.0, 0.4, 0.2) == 0.0
    assert learning_rate(0.1, 0.4, 0.2) == pytest.approx(0.2)
    assert learning_rate(0.2, 0.4, 0.2) == pytest.approx(0.4)
    assert learning_rate(0.6, 0.4, 0.2) == pytest.approx(0.2)
    assert learning_rate(1.0, 0.4, 0.2) == 0.0
    assert learning_rate(0.6, 0.4, 0.2, "cosine") == pytest.approx(0.2)  # half-way through the decay
    assert learning_rate(0.4, 0.4, 0.2, "cosine") == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(0.5, 1.0, 0.0) == pytest.approx(0.5)  # no warm-up
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        learning_rate(0.5, 1.0, 0.1, "step")


def test_weight_decay_skips_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4), nn.Flatten(), nn.Linear(4, 2))
    decayed, plain = parameter_groups(model, 5e-4)
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[4].weight)}
    assert len(plain["params"]) == 5  # conv bias, BN weight and bias, PReLU slopes, linear bias


def test_recipe_rejects_bad_values():
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        TrainRecipe(momentum=0.0)
    with pytest.raises(ValueError, match="epochs"):
        TrainRecipe(epochs=0)
    with pytest.raises(ValueError, match="unknown_field"):
        TrainRecipe(unknown_field=1)


def test_random_crop_flip_takes_crops_of_the_padded_image():
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    crops = random_crop_flip(images, torch.Generator().manual_seed(0), flip=True)
    again = random_crop_flip(images, torch.Generator().manual_seed(0), flip=True)
    assert torch.equal(crops, again) and crops.shape == images.shape
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    mirrored = 0
    for image, crop in zip(padded, crops):
        windows = [image[:, r : r + 16, c : c + 16] for r in range(5) for c in range(5)]
        plain = any(torch.equal(crop, window) for window in windows)
        flipped = any(torch.equal(crop.flip(2), window) for window in windows)
        assert plain or flipped
        mirrored += flipped and not plain
    assert 0 < mirrored < 16
    unflipped = random_crop_flip(images, torch.Generator().manual_seed(1), flip=False)
    for image, crop in zip(padded, unflipped):
        assert any(torch.equal(crop, image[:, r : r + 16, c : c + 16]) for r in range(5) for c in range(5))


def test_precision_uses_amp_and_channels_last_on_cuda_only(monkeypatch):
    assert Precision.for_device(torch.device("cpu"), TrainRecipe()) == Precision(None, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert Precision.for_device(torch.device("cuda"), TrainRecipe()) == Precision(torch.bfloat16, True)
    assert Precision.for_device(torch.device("cuda"), TrainRecipe(amp=False, channels_last=False)) == Precision(
        None, False
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    older = Precision.for_device(torch.device("cuda"), TrainRecipe())
    assert older.autocast_dtype == torch.float16 and older.needs_loss_scaling


def test_evaluate_counts_top1_and_topk():
    data = colour_dataset(6, seed=0)

    class Fixed(nn.Module):  # always ranks green > blue > red
        def forward(self, x):
            return torch.tensor([[0.0, 2.0, 1.0]]).expand(x.shape[0], 3)

    top1, topk = evaluate(Fixed(), data, Normalization.of(data))
    assert top1 == pytest.approx(100 / 3) and topk == 100.0  # k = min(5, 3 classes)


# --- training -------------------------------------------------------------------------------------------------------


def test_training_learns_a_learnable_task():
    trained = train(tiny_cnn, colour_dataset(192, 0), colour_dataset(96, 1, "test"), FAST, seed=0)
    result = trained.result
    assert result.status == "ok" and result.top1 > 80
    assert len(result.train_loss) == 2 and result.train_loss[1] < result.train_loss[0]
    assert result.steps == 12 and result.epochs_run == 2 and result.images_per_s > 0
    assert not trained.model.training


def test_same_seed_same_result_to_the_last_digit():
    train_set, test_set = colour_dataset(128, 0), colour_dataset(64, 1, "test")
    before = torch.random.get_rng_state()
    first = train(tiny_cnn, train_set, test_set, FAST, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    again = train(tiny_cnn, train_set, test_set, FAST, seed=5)
    other = train(tiny_cnn, train_set, test_set, FAST, seed=6)
    assert first.result.top1 == again.result.top1 and first.result.train_loss == again.result.train_loss
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name
    assert other.result.train_loss != first.result.train_loss


@pytest.mark.parametrize("op, options", [("drconv", {"regions": 4}), ("condconv", {"experts": 4})])
def test_dynamic_operators_train_deterministically(op, options):
    train_set = get_dataset("synthetic", split="train", limit=16)
    test_set = get_dataset("synthetic", split="test", limit=8)
    config = model_config_for("shufflenetv2", train_set, width=0.5, op=op, **options)
    recipe = TrainRecipe(epochs=2, batch_size=8)
    first, again = (train(lambda: create_model(**config), train_set, test_set, recipe, seed=3) for _ in range(2))
    assert first.result.train_loss == again.result.train_loss and first.result.top1 == again.result.top1
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name


def one_plain_step(**clipping: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter of ``tiny_cnn`` before and after one plain SGD step at lr 0.5 (the linear decay's value
    half-way through a one-step run): the step is the clipped gradient times the rate."""
    initial: dict[str, torch.Tensor] = {}

    def build() -> nn.Module:
        model = tiny_cnn()
        initial.update({name: p.detach().clone() for name, p in model.named_parameters()})
        return model

    recipe = TrainRecipe(epochs=1, batch_size=64, lr=1.0, warmup_epochs=0, momentum=0, nesterov=False,
                         weight_decay=0, augment=False, **{"clip_grad_norm": 0.0, **clipping})
    model = train(build, colour_dataset(64, 0), colour_dataset(32, 1, "test"), recipe, seed=0).model
    return {name: (initial[name], p.detach()) for name, p in model.named_parameters()}


def test_clipping_bounds_the_gradient_norm_of_a_step():
    def step_norm(clip: float) -> float:
        return torch.cat([(after - before).flatten() for before, after in
                          one_plain_step(clip_grad_norm=clip).values()]).norm().item()

    assert step_norm(1e-3) == pytest.approx(0.5e-3, rel=1e-4)
    assert step_norm(0) > 100 * 0.5e-3  # without clipping: the whole gradient


def test_adaptive_clipping_bounds_each_units_step_relative_to_its_weight():
    clipped_steps, plain_steps = one_plain_step(agc_factor=1e-3), one_plain_step()

    def unit_ratios(steps: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each output unit's step norm over its weight norm, for the weights (2+ dimensions)."""
        return {name: (after - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1)
                for name, (before, after) in steps.items() if before.dim() > 1}

    clipped, plain = unit_ratios(clipped_steps), unit_ratios(plain_steps)
    for name in clipped:
        assert (clipped[name] <= 0.5e-3 * (1 + 1e-4)).all(), name  # lr 0.5 x factor 1e-3
        assert clipped[name].max() == pytest.approx(0.5e-3, rel=1e-4), name  # these gradients are all clipped
        assert (plain[name] > 2 * 0.5e-3).any(), name
    vectors = [name for name, (before, _) in clipped_steps.items() if before.dim() == 1]
    assert all(torch.equal(clipped_steps[name][1], plain_steps[name][1]) for name in vectors)  # never clipped


def test_a_diverged_run_is_recorded_not_raised():
    result = train(tiny_cnn, colour_dataset(64, 0), colour_dataset(32, 1, "test"),
                   TrainRecipe(epochs=3, batch_size=32, lr=1e30), seed=0).result
    assert result.status == "diverged" and result.diverged_at_epoch == 1
    assert result.top1 is None and result.top5 is None and result.train_loss == []


def test_time_budget_stops_training_early():
    recipe = TrainRecipe(epochs=50, batch_size=16, time_budget_s=0.01)
    result = train(tiny_cnn, colour_dataset(64, 0), colour_dataset(32, 1, "test"), recipe, seed=0).result
    assert result.status == "ok" and result.epochs_run < 50 and len(result.train_loss) >= 1


def test_train_and_test_must_match():
    with pytest.raises(ValueError, match="train and test splits differ"):
        train(tiny_cnn, colour_dataset(32, 0), get_dataset("synthetic", split="test", num_images=10), FAST)


def test_summarize_reports_mean_and_spread_of_finished_runs():
    def run(top1, status="ok"):
        return TrainResult(
            seed=0, status=status, top1=top1, top5=top1, topk=5, num_classes=10, epochs=1, epochs_run=1, steps=1,
            train_loss=[1.0], train_time_s=2.0, eval_time_s=0.1, images_per_s=1.0, device="cpu", threads=1,
            autocast_dtype=None, channels_last=False, recipe={},
        )

    summary = summarize([run(50.0), run(54.0), run(None, "diverged")])
    assert summary["top1_mean"] == 52.0 and summary["top1_std"] == pytest.approx(math.sqrt(8))
    assert summary["runs"] == 3 and summary["diverged"] == 1 and summary["epoch_time_s_mean"] == 2.0
    assert summarize([run(None, "diverged")])["top1_mean"] is None


def test_model_config_follows_the_data_set():
    data = get_dataset("synthetic", split="test", num_images=10)
    config = model_config_for("mobilenetv2", data, width=0.5, op="drconv", regions=4)
    assert config == {"name": "mobilenetv2", "width": 0.5, "op": "drconv", "num_classes": 10, "input_size": 32,
                      "placement": "default", "small_input": True, "regions": 4}


# --- checkpoints ----------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    data = get_dataset("synthetic", split="test", num_images=4)
    config = model_config_for("shufflenetv2", data, width=0.5, op="drconv", regions=2)
    torch.manual_seed(0)
    model = create_model(**config).eval()
    source = {"name": "synthetic", "data_path": None, "seed": 0}
    stats = Normalization.of(data)
    path = Checkpoint(config, model.state_dict(), stats, source, {"top1": 1.0}).save(tmp_path / "sub" / "m.pt")
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["format"] == "drbench-checkpoint/1"
    loaded = load_checkpoint(path)
    assert loaded.model_config == config and loaded.data == source and loaded.normalization == stats
    with torch.no_grad():
        assert torch.equal(loaded.build_model()(stats(data.images)), model(stats(data.images)))


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt: not a drbench checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


# --- the suite metric -----------------------------------------------------------------------------------------------


def test_accuracy_metric_trains_once_per_seed():
    assert get_metric("accuracy").settings is AccuracySettings
    settings = AccuracySettings(seeds=[0, 1], epochs=1, batch_size=16, train_images=32, test_images=16)
    statuses = []
    cell = Cell(model="shufflenetv2", width=0.5, op="conv", input_size=224, device="cpu")
    result = measure_accuracy(cell, settings, RunContext(load_config(), threads=1, status=statuses.append))
    assert [run["seed"] for run in result["runs"]] == [0, 1]
    assert result["value"] == pytest.approx(sum(run["top1"] for run in result["runs"]) / 2)
    assert result["std"] >= 0 and result["diverged"] == 0
    assert result["trained_model"]["input_size"] == 32 and result["trained_model"]["num_classes"] == 10
    assert result["dataset"]["train_images"] == 32
    assert statuses == ["accuracy: seed 0, epoch 1/1", "accuracy: seed 1, epoch 1/1"]
    json.dumps(result)  # stored as-is in the results file


def test_accuracy_settings_are_strict():
    with pytest.raises(ValueError, match="seeds"):
        AccuracySettings(seeds=[])
    with pytest.raises(ValueError, match="epochs"):
        AccuracySettings.model_validate({"epochs": "3"})


# --- the command line -----------------------------------------------------------------------------------------------


TINY_RUN = ["--width", "0.5", "--epochs", "1", "--batch-size", "16", "--train-images", "32", "--test-images", "16"]


def test_train_json_prints_one_object(tmp_path):
    checkpoint = tmp_path / "model.pt"
    result = runner.invoke(app, ["train", "shufflenetv2", *TINY_RUN, "--json", "--checkpoint", str(checkpoint),
                                 "--agc", "0.05"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["recipe"]["agc_factor"] == 0.05
    for key in ("top1", "top5", "num_classes", "epochs", "seed", "train_time_s"):
        assert key in summary
    assert summary["num_classes"] == 10 and summary["epochs"] == 1 and summary["seed"] == 0
    assert 0 <= summary["top1"] <= summary["top5"] <= 100
    assert load_checkpoint(checkpoint).result["top1"] == summary["top1"]


def test_train_reports_user_errors_in_one_line():
    wrong_option = runner.invoke(app, ["train", "shufflenetv2", "--op", "conv", "--regions", "4"])
    assert wrong_option.exit_code == 2 and "--regions applies to --op drconv" in wrong_option.output
    no_path = runner.invoke(app, ["train", "shufflenetv2", "--dataset", "cifar10"])
    assert no_path.exit_code == 2 and "--data PATH" in no_path.output
    missing = runner.invoke(app, ["train", "shufflenetv2", "--dataset", "cifar10", "--data", "/nonexistent"])
    assert missing.exit_code == 2 and "cifar10 not found at /nonexistent" in missing.output
    assert "Traceback" not in missing.output


def test_list_datasets():
    result = runner.invoke(app, ["list", "datasets"])
    assert result.exit_code == 0
    for name in ("synthetic", "cifar10", "cifar100", "imagefolder", "digits"):
        assert name in result.output


def test_train_takes_any_operator_option_as_key_value_pairs(tmp_path):
    checkpoint = tmp_path / "independent.pt"
    result = runner.invoke(app, ["train", "shufflenetv2", *TINY_RUN, "--op", "drconv", "--regions", "4", "--option",
                                 "init=independent", "--option", "guide_bias=true", "--json",
                                 "--checkpoint", str(checkpoint)])
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["model"]
    assert model["init"] == "independent" and model["guide_bias"] is True
    for pair, message in [("init", "expected KEY=VALUE"), ("init=zeros", "init must be one of"),
                          ("shape=[1, 2]", "plain value")]:
        refused = runner.invoke(app, ["train", "shufflenetv2", "--op", "drconv", "--option", pair])
        assert refused.exit_code == 2 and message in refused.output, (pair, refused.output)
