"""Short-schedule accuracy: one fixed training recipe for every operator, several seeds, honest error bars.

:func:`train` trains a freshly built model on an in-memory :class:`~drbench.data.ImageDataset` and measures top-1
and top-5 on the held-out split. The recipe (:class:`TrainRecipe`) follows the paper's: SGD with momentum and
Nesterov, weight decay on weights only (never on norms and biases), a linear warm-up then a linear decay to 0 (or
cosine), label smoothing. Mixed precision (bfloat16 where the GPU has it, else float16 with loss scaling) and
channels-last run on CUDA only; on CPU everything is float32.

Determinism: the seed fixes the initialisation (``torch.manual_seed`` before the model is built), the data order
and the augmentation (one seeded ``torch.Generator``), and on CPU torch's deterministic algorithms are enabled,
so the same seed on the same machine and thread count gives the same accuracy to the last digit. A time budget
(``time_budget_s``) ends training by the clock and is therefore not reproducible.

>>> from drbench.data import get_dataset
>>> from drbench.models import create_model
>>> train_set = get_dataset("synthetic", split="train", num_images=256)
>>> test_set = get_dataset("synthetic", split="test", num_images=128)
>>> config = model_config_for("shufflenetv2", train_set, width=0.5, op="drconv", regions=4)
>>> trained = train(lambda: create_model(**config), train_set, test_set, TrainRecipe(epochs=1, batch_size=64))
>>> trained.result.status, 0 <= trained.result.top1 <= 100
('ok', True)

``accuracy`` is also a suite metric (:func:`measure_accuracy`): each cell is trained once per seed and the
results store keeps every run's curve beside the mean and standard deviation.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from drbench.data import DEFAULT_DATASET, ImageDataset, Normalization, get_dataset
from drbench.metric_registry import Quantity, RunContext, register_metric, seed_values
from drbench.stats import decide_seeds

if TYPE_CHECKING:
    from drbench.measure.stability import StabilityTrace
    from drbench.suite import Cell

SMALL_INPUT_BELOW = 64
"""Images smaller than this many pixels on a side get the models' small-input stem (made for 32x32)."""

TOP_K = 5


class TrainRecipe(BaseModel):
    """The training recipe: the same for every operator in a comparison. Every field has a tested default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(5, ge=1, description="passes over the training split")
    # small batches and a high rate: a short schedule needs many updates (measured on ShuffleNetV2 0.5x and the
    # synthetic set: 250 steps at 0.05 learn, 0.025 does not move in as many; 0.1 at batch 64 blows up)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0, description="peak learning rate, reached at the end of the warm-up")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, description="on weights only: never on norms and biases")
    # 1 epoch, not 0.5: with half an epoch, 1 of 3 seeds blew up in the first epoch (loss above chance, then
    # stuck near 10% top-1) for ShuffleNetV2 0.5x conv and MobileNetV2 0.5x CondConv at 2 epochs; with one epoch
    # ShuffleNetV2's seeds 0-2 reached 32.9 / 31.1 / 34.8% (0.5 epoch: seed 1 10.4%; lr 0.03 instead: 11.4%)
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up from 0 to lr")
    schedule: Literal["linear", "cosine"] = Field("linear", description="decay to 0 after the warm-up")
    # 2.0: above the gradient norm of most steps after the first epoch (ShuffleNetV2 0.5x conv: median 1.6-2.7),
    # below the first steps' 5-15, where a step at the peak rate can throw a run out of its basin. With it, the two
    # collapsed fig4 runs trained (MobileNetV2 0.5x CondConv seed 0: 10.2 -> 59.3%; DRConv seed 2: 27.7 -> 39.3%)
    clip_grad_norm: float = Field(
        2.0, ge=0, description="the largest norm of a step's gradient over all parameters (0: no clipping)")
    agc_factor: float = Field(
        0.0, ge=0, description="adaptive gradient clipping: each output unit's gradient norm at most this times its "
        "weight norm, for every weight of 2 or more dimensions (0: none; see adaptive_clip_grad_)")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    augment: bool = Field(True, description="random crop with padding, and horizontal flips where labels allow")
    time_budget_s: float | None = Field(None, gt=0, description="stop training after this long (not reproducible)")
    amp: bool = Field(True, description="mixed precision where the device supports it (CUDA)")
    channels_last: bool = Field(True, description="channels-last memory format where it helps (CUDA)")
    eval_batch_size: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> TrainRecipe:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


@dataclass(frozen=True)
class TrainProgress:
    """What a progress callback sees after each step; ``epoch_loss`` is set on the last step of an epoch."""

    epoch: int  # 1-based
    epochs: int
    step: int  # steps done in this epoch
    steps_per_epoch: int
    epoch_loss: float | None = None


@dataclass(frozen=True)
class TrainResult:
    """One training run. Accuracies are percentages on the held-out split; ``None`` when the run diverged.

    ``top5`` is top-k accuracy with ``k = topk = min(5, num_classes)``. ``train_loss`` holds the mean training
    loss of each completed epoch. ``images_per_s`` counts training images over ``train_time_s``.
    """

    seed: int
    status: Literal["ok", "diverged"]
    top1: float | None
    top5: float | None
    topk: int
    num_classes: int
    epochs: int
    epochs_run: float
    steps: int
    train_loss: list[float]
    train_time_s: float
    eval_time_s: float
    images_per_s: float
    device: str
    threads: int
    autocast_dtype: str | None
    channels_last: bool
    recipe: dict[str, Any]
    diverged_at_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Trained:
    """The trained model (in eval mode), its result, and the input normalisation it was trained with."""

    model: nn.Module
    result: TrainResult
    normalization: Normalization


def model_config_for(
    model: str,
    dataset: ImageDataset,
    *,
    width: float = 1.0,
    op: str = "conv",
    placement: str = "default",
    **op_options: Any,
) -> dict[str, Any]:
    """Keyword arguments of :func:`drbench.models.create_model` for training ``model`` on ``dataset``.

    The data set fixes the class count and input size; images under :data:`SMALL_INPUT_BELOW` pixels get the
    small-input stem. The dict is JSON-able, so checkpoints and results can store it.
    """
    height, width_px = dataset.image_size
    return {
        "name": model,
        "width": width,
        "op": op,
        "num_classes": dataset.num_classes,
        "input_size": height if height == width_px else [height, width_px],
        "placement": placement,
        "small_input": max(height, width_px) < SMALL_INPUT_BELOW,
        **op_options,
    }


def train(
    build_model: Callable[[], nn.Module],
    train_set: ImageDataset,
    test_set: ImageDataset,
    recipe: TrainRecipe = TrainRecipe(),
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[TrainProgress], None] | None = None,
    trace: StabilityTrace | None = None,
) -> Trained:
    """Build a model with ``build_model()`` (under ``torch.manual_seed(seed)``), train it, evaluate it.

    A loss that becomes NaN or infinite ends training and is reported as ``status="diverged"``, not raised.
    The caller's global RNG state is left as it was. ``trace`` (:mod:`drbench.measure.stability`) watches every
    optimiser step; it reads the loss each step it traces, which stalls a GPU.
    """
    _check_compatible(train_set, test_set)
    device = torch.device(device)
    precision = Precision.for_device(device, recipe)
    normalization = Normalization.of(train_set)
    count = len(train_set)
    batch_size = min(recipe.batch_size, count)
    steps_per_epoch = count // batch_size  # the last partial batch is dropped: tiny batches upset BatchNorm
    total_steps = recipe.epochs * steps_per_epoch
    warmup_fraction = min(1.0, recipe.warmup_epochs / recipe.epochs)

    with _seeded(seed, device):
        model = precision.prepare(build_model().to(device))
        if trace is not None:
            trace.start(model)
        optimizer = torch.optim.SGD(
            parameter_groups(model, recipe.weight_decay), lr=recipe.lr, momentum=recipe.momentum,
            nesterov=recipe.nesterov,
        )
        scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_loss_scaling)
        criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        data_order = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        steps, diverged_at, out_of_time = 0, None, False
        start = time.perf_counter()
        model.train()
        for epoch in range(1, recipe.epochs + 1):
            epoch_loss = torch.zeros((), device=device)
            batches = _epoch_batches(train_set, batch_size, steps_per_epoch, data_order, recipe.augment)
            for step, (images, labels) in enumerate(batches):
                inputs = precision.prepare(normalization(images.to(device, non_blocking=True)))
                labels = labels.to(device, non_blocking=True)
                elapsed = time.perf_counter() - start
                done = (steps + 0.5) / total_steps
                if recipe.time_budget_s is not None:
                    done = max(done, elapsed / recipe.time_budget_s)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(done, recipe.lr, warmup_fraction, recipe.schedule)

                with precision.autocast(device):
                    loss = criterion(model(inputs), labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if recipe.clip_grad_norm or recipe.agc_factor or trace is not None:
                    scaler.unscale_(optimizer)  # clip (and trace) the true gradient, not the loss-scaled one
                if trace is not None:
                    trace.before_update(model)  # before clipping: the trace shows the gradient clipping acts on
                if recipe.agc_factor:
                    adaptive_clip_grad_(model.parameters(), recipe.agc_factor)
                if recipe.clip_grad_norm:
                    nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                epoch_loss += loss.detach().float()
                steps += 1
                if trace is not None:
                    trace.after_update(model, steps, float(loss.detach()), optimizer.param_groups[0]["lr"])
                out_of_time = recipe.time_budget_s is not None and elapsed >= recipe.time_budget_s
                last = step == steps_per_epoch - 1 or out_of_time
                # the loss is read once per epoch: reading it every step would stall a GPU
                mean_loss = float(epoch_loss) / (step + 1) if last else None
                if progress is not None:
                    progress(TrainProgress(epoch, recipe.epochs, step + 1, steps_per_epoch, mean_loss))
                if last:
                    break
            if not math.isfinite(mean_loss):
                diverged_at = epoch
                break
            losses.append(mean_loss)
            if out_of_time:
                break
        _synchronize(device)
        train_time = time.perf_counter() - start

    model.eval()
    start = time.perf_counter()
    top1 = top5 = None
    if diverged_at is None:
        top1, top5 = evaluate(model, test_set, normalization, device, recipe.eval_batch_size, precision)
    eval_time = time.perf_counter() - start
    result = TrainResult(
        seed=seed,
        status="ok" if diverged_at is None else "diverged",
        top1=top1,
        top5=top5,
        topk=min(TOP_K, train_set.num_classes),
        num_classes=train_set.num_classes,
        epochs=recipe.epochs,
        epochs_run=round(steps / steps_per_epoch, 4),
        steps=steps,
        train_loss=losses,
        train_time_s=train_time,
        eval_time_s=eval_time,
        images_per_s=steps * batch_size / train_time,
        device=str(device),
        threads=torch.get_num_threads(),
        autocast_dtype=precision.autocast_name,
        channels_last=precision.channels_last,
        recipe=recipe.model_dump(),
        diverged_at_epoch=diverged_at,
    )
    return Trained(model, result, normalization)


def _epoch_batches(
    data: ImageDataset, batch_size: int, steps: int, generator: torch.Generator, augment: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of (uint8 images, labels) in a fresh random order, augmented when ``augment``."""
    order = torch.randperm(len(data), generator=generator)
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size]
        images = data.images[index]
        if augment:
            images = random_crop_flip(images, generator, flip=data.hflip)
        yield images, data.labels[index]


def learning_rate(progress: float, peak: float, warmup_fraction: float, schedule: str = "linear") -> float:
    """The learning rate once ``progress`` (0..1) of training is done: linear warm-up, then decay to 0.

    >>> [round(learning_rate(p, 1.0, 0.25), 3) for p in (0.125, 0.25, 0.625, 1.0)]
    [0.5, 1.0, 0.5, 0.0]
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_fraction:
        return peak * progress / warmup_fraction
    decayed = (progress - warmup_fraction) / (1 - warmup_fraction) if warmup_fraction < 1 else 1.0
    if schedule == "linear":
        return peak * (1 - decayed)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * decayed))
    raise ValueError(f"unknown schedule {schedule!r}; expected linear or cosine")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimiser groups: weights (decayed) and biases, norm and PReLU parameters (vectors: not decayed)."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    plain = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def adaptive_clip_grad_(parameters: Iterable[nn.Parameter], factor: float, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
    Normalization", Sec. 4.1), in place: each output unit's gradient (a row of a weight: all dimensions but the
    first) is scaled down so that its norm is at most ``factor`` times the unit's weight norm, floored at ``eps``.

    Unlike a global norm, it bounds each unit's step relative to its own size, so a few units with spiking
    gradients (a stem, a guide) are held back without slowing the rest. Only weights of 2 or more dimensions are
    clipped: biases and norm parameters start at 0 or 1, and the ``eps`` floor would hold a bias that starts at 0
    nearly still (a deviation from the paper, which clips every parameter).

    >>> weight = nn.Parameter(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
    >>> weight.grad = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> adaptive_clip_grad_([weight], factor=0.1)
    >>> [[round(g, 6) for g in row] for row in weight.grad.tolist()]  # row norms 5 and 0.5: at most 0.5, 0.05
    [[0.5, 0.0], [0.05, 0.0]]
    """
    with torch.no_grad():
        for weight in parameters:
            if weight.grad is None or weight.dim() < 2:
                continue
            dims = tuple(range(1, weight.dim()))
            limit = torch.linalg.vector_norm(weight, dim=dims, keepdim=True).clamp_(min=eps).mul_(factor)
            norm = torch.linalg.vector_norm(weight.grad, dim=dims, keepdim=True)
            weight.grad.mul_(torch.where(norm > limit, limit / norm.clamp(min=1e-12), torch.ones_like(norm)))


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, *, flip: bool = True) -> torch.Tensor:
    """Random crops of zero-padded images (padding 1/8 of the size), mirrored half of the time when ``flip``.

    Both are folded into one gather: each output pixel reads one pixel of the padded image.
    """
    batch, _, height, width = images.shape
    pad_h, pad_w = max(1, height // 8), max(1, width // 8)
    padded = F.pad(images, (pad_w, pad_w, pad_h, pad_h))
    top = torch.randint(0, 2 * pad_h + 1, (batch, 1), generator=generator)
    left = torch.randint(0, 2 * pad_w + 1, (batch, 1), generator=generator)
    rows = top + torch.arange(height)
    columns = torch.arange(width).expand(batch, width)
    if flip:
        mirrored = torch.rand(batch, 1, generator=generator) < 0.5
        columns = torch.where(mirrored, columns.flip(1), columns)
    columns = left + columns
    picked = padded[torch.arange(batch).view(-1, 1, 1), :, rows.unsqueeze(2), columns.unsqueeze(1)]
    return picked.permute(0, 3, 1, 2).contiguous()  # advanced indexing put channels last


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    normalization: Normalization,
    device: str | torch.device = "cpu",
    batch_size: int = 500,
    precision: Precision | None = None,
) -> tuple[float, float]:
    """Top-1 and top-k (k = min(5, classes)) accuracy of ``model`` on ``dataset``, in percent."""
    device = torch.device(device)
    precision = precision or Precision.for_device(device, TrainRecipe(amp=False, channels_last=False))
    k = min(TOP_K, dataset.num_classes)
    correct1 = correct_k = 0
    model.eval()
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start : start + batch_size].to(device)
        labels = dataset.labels[start : start + batch_size].to(device)
        with precision.autocast(device):
            logits = model(precision.prepare(normalization(images)))
        ranked = logits.topk(k, dim=1).indices
        hits = ranked == labels.unsqueeze(1)
        correct1 += int(hits[:, 0].sum())
        correct_k += int(hits.any(dim=1).sum())
    return 100.0 * correct1 / len(dataset), 100.0 * correct_k / len(dataset)


@dataclass(frozen=True)
class Precision:
    """Mixed precision and memory format for a device: both only on CUDA, where they pay off."""

    autocast_dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def for_device(cls, device: torch.device, recipe: TrainRecipe) -> Precision:
        if device.type != "cuda":
            return cls(None, False)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return cls(dtype if recipe.amp else None, recipe.channels_last)

    @property
    def autocast_name(self) -> str | None:
        """``"bfloat16"``, ``"float16"`` or None, for results."""
        return None if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch.")

    @property
    def needs_loss_scaling(self) -> bool:
        return self.autocast_dtype == torch.float16

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def prepare(self, value: nn.Module | torch.Tensor) -> nn.Module | torch.Tensor:
        """A model or a batch in this memory format."""
        return value.to(memory_format=torch.channels_last) if self.channels_last else value


def summarize(results: list[TrainResult]) -> dict[str, Any]:
    """Mean and sample standard deviation of top-1/top-5 over the runs that did not diverge; mean epoch time."""
    finished = [r for r in results if r.status == "ok"]

    def spread(values: list[float]) -> tuple[float | None, float | None]:
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    top1_mean, top1_std = spread([r.top1 for r in finished])
    top5_mean, top5_std = spread([r.top5 for r in finished])
    return {
        "top1_mean": top1_mean,
        "top1_std": top1_std,
        "top5_mean": top5_mean,
        "top5_std": top5_std,
        "runs": len(results),
        "diverged": len(results) - len(finished),
        "epoch_time_s_mean": statistics.fmean(r.train_time_s / r.epochs_run for r in results if r.epochs_run)
        if any(r.epochs_run for r in results) else None,
    }


def _check_compatible(train_set: ImageDataset, test_set: ImageDataset) -> None:
    if (train_set.classes, train_set.images.shape[1:]) != (test_set.classes, test_set.images.shape[1:]):
        raise ValueError(
            f"train and test splits differ: {train_set.num_classes} vs {test_set.num_classes} classes, "
            f"images {tuple(train_set.images.shape[1:])} vs {tuple(test_set.images.shape[1:])}"
        )


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNGs (restoring them afterwards); deterministic algorithms on CPU, where torch has them all."""
    devices = [device.index or 0] if device.type == "cuda" else []
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The suite metric ----------------------------------------------------------------------------------------------


class AccuracySettings(TrainRecipe):
    """``metrics: {accuracy: {...}}`` in a suite: the recipe, the seeds and the data.

    ``dataset`` and ``data_path`` default to ``[data]`` in drbench.toml. ``train_images`` / ``test_images`` train
    and evaluate on the first images of each split only (for quick suites).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    dataset: str = DEFAULT_DATASET
    data_path: str | None = None
    data_seed: int = Field(0, description="seed of the data set itself (synthetic images, held-out split)")
    train_images: int | None = Field(None, ge=1)
    test_images: int | None = Field(None, ge=1)

    def recipe(self) -> TrainRecipe:
        return TrainRecipe(**self.model_dump(include=set(TrainRecipe.model_fields)))

    def load(self, split: str) -> ImageDataset:
        limit = self.train_images if split == "train" else self.test_images
        return get_dataset(self.dataset, self.data_path, split, self.data_seed, limit=limit)


@register_metric("accuracy", settings=AccuracySettings, defaults_from="data", quantities=[
    Quantity("accuracy", unit="%", read=seed_values("accuracy"), decide=decide_seeds, higher_is_better=True,
             centre=statistics.fmean, column="top-1"),
])
def measure_accuracy(cell: Cell, settings: AccuracySettings, context: RunContext) -> dict[str, Any]:
    """Top-1 accuracy (%) on the held-out split after a short schedule, mean over seeds (each run's curve kept).

    The cell's model, width, operator, options and placement are trained at the data set's image size and class
    count (in float32, with the recipe's batch size): the cell's own input size, batch size and dtype describe
    its latency measurement, not this one.
    """
    from drbench.models import create_model

    train_set, test_set = settings.load("train"), settings.load("test")
    config = model_config_for(
        cell.model, train_set, width=cell.width, op=cell.op, placement=cell.placement, **cell.op_options
    )
    runs = []
    for seed in settings.seeds:

        def report(step: TrainProgress, seed: int = seed) -> None:
            if step.step == 1:
                context.status(f"accuracy: seed {seed}, epoch {step.epoch}/{step.epochs}")

        trained = train(
            lambda: create_model(**config), train_set, test_set, settings.recipe(), seed=seed,
            device=cell.torch_device, progress=report,
        )
        runs.append(trained.result)
    summary = summarize(runs)
    return {
        "value": summary["top1_mean"],
        "std": summary["top1_std"],
        "top5": summary["top5_mean"],
        "top5_std": summary["top5_std"],
        "diverged": summary["diverged"],
        "epoch_time_s": summary["epoch_time_s_mean"],
        "seeds": list(settings.seeds),
        "dataset": {"name": settings.dataset, "data_path": settings.data_path, "seed": settings.data_seed,
                    "train_images": len(train_set), "test_images": len(test_set)},
        "trained_model": config,
        "runs": [run.to_dict() for run in runs],
    }
