"""Issue 15: where the first optimiser steps' gradient sits and how far each step moves the weights, in the real
trainer (:func:`drbench.measure.accuracy.train`) with the default recipe but no clipping, on the synthetic data set.

    .venv/bin/python notes/first_steps.py shufflenetv2 1 200      # model, seed, steps (width 0.5, conv, one thread)
    .venv/bin/python notes/first_steps.py mobilenetv2 0 60 drconv

Each line: the step's learning rate and loss, the gradient's norm over all parameters, the four weight tensors
moved most relative to their norm (``||w_after - w_before|| / ||w_before||``) and the three largest gradients.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from drbench.data import get_dataset
from drbench.measure.accuracy import TrainRecipe, model_config_for, train
from drbench.models import create_model


class _Enough(Exception):
    """Raised from the probe to end training after the steps asked for."""


class FirstStepsProbe:
    """A trace (the hooks :func:`train` calls around every optimiser step) that prints each step's gradient and
    update sizes per weight tensor, then stops training after ``steps`` steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.before: dict[str, torch.Tensor] = {}
        self.grads: dict[str, float] = {}

    def start(self, model: nn.Module) -> None:
        pass

    def before_update(self, model: nn.Module) -> None:
        self.before = {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() > 1}
        self.grads = {name: float(p.grad.norm()) for name, p in model.named_parameters() if p.grad is not None}

    def after_update(self, model: nn.Module, step: int, loss: float, lr: float) -> None:
        total = sum(g * g for g in self.grads.values()) ** 0.5
        moved = {name: float((p.detach() - self.before[name]).norm() / self.before[name].norm())
                 for name, p in model.named_parameters() if name in self.before}
        most_moved = sorted(moved.items(), key=lambda item: -item[1])[:4]
        largest = sorted(self.grads.items(), key=lambda item: -item[1])[:3]
        print(f"step {step:3d} lr {lr:.4f} loss {loss:.3f} |g| {total:5.2f}  moved: "
              + ", ".join(f"{name} {ratio:.3f}" for name, ratio in most_moved)
              + " | grad: " + ", ".join(f"{name} {norm:.2f}" for name, norm in largest))
        if step >= self.steps:
            raise _Enough


def main(model: str, seed: int, steps: int, op: str = "conv") -> None:
    torch.set_num_threads(1)
    train_set = get_dataset("synthetic", None, "train", 0)
    test_set = get_dataset("synthetic", None, "test", 0, limit=100)
    config = model_config_for(model, train_set, width=0.5, op=op)
    try:
        train(lambda: create_model(**config), train_set, test_set, TrainRecipe(clip_grad_norm=0), seed=seed,
              trace=FirstStepsProbe(steps))
    except _Enough:
        pass


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
