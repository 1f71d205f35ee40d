"""Checkpoints of trained models that carry what it takes to rebuild them.

A checkpoint is one ``torch.save`` file holding plain data only (so ``torch.load(..., weights_only=True)`` reads
it): the state dict, the keyword arguments of :func:`drbench.models.create_model` that built the model, the
input normalisation it was trained with, where its data came from (the arguments of
:func:`drbench.data.get_dataset`) and the training result.

With ``model.pt`` from ``drbench train shufflenetv2 --op drconv --checkpoint model.pt``:

>>> checkpoint = load_checkpoint("model.pt")
>>> model = checkpoint.build_model()
>>> checkpoint.model_config["op"], checkpoint.data["name"], model.training
('drconv', 'synthetic', False)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drbench.data import Normalization
from drbench.record import short_repr

FORMAT = "drbench-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or not one drbench wrote."""


@dataclass(frozen=True)
class Checkpoint:
    """``model_config`` rebuilds the model; ``data`` reloads its data set with ``get_dataset(**data, split=...)``."""

    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    normalization: Normalization
    data: dict[str, Any]
    result: dict[str, Any]

    def build_model(self) -> nn.Module:
        """The trained model, in eval mode, on the CPU; CheckpointError when the stored configuration does not
        build it or the stored weights do not fit it."""
        from drbench.models import create_model

        try:
            model = create_model(**self.model_config)
            model.load_state_dict(self.state_dict)
        except (TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"the checkpoint's model does not build ({type(error).__name__}: "
                                  f"{short_repr(str(error), 300)})") from None
        return model.eval()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        content = {**asdict(self), "format": FORMAT, "normalization": self.normalization.to_dict()}
        torch.save(content, path)
        return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :meth:`Checkpoint.save`, with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file or foreign pickle fails in many ways: name the file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a drbench checkpoint (expected format {FORMAT!r})")
    try:
        stored = _Stored.model_validate(content)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(map(str, first["loc"]))
        if first["type"] == "missing":
            raise CheckpointError(f"{path}: checkpoint lacks {field}") from None
        raise CheckpointError(f"{path}: {field}: {first['msg']} (got {short_repr(first.get('input'))})") from None
    return Checkpoint(
        model_config=stored.model_settings,
        state_dict=stored.state_dict,
        normalization=Normalization(tuple(stored.normalization.mean), tuple(stored.normalization.std)),
        data=stored.data,
        result=stored.result,
    )


class _Statistics(BaseModel):
    model_config = ConfigDict(strict=True)

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)


class _Stored(BaseModel):
    """The content of a checkpoint file, typed: a field of the wrong type is named, never a traceback later."""

    model_config = ConfigDict(strict=True, arbitrary_types_allowed=True, protected_namespaces=())

    format: str
    model_settings: dict[str, Any] = Field(alias="model_config")
    state_dict: dict[str, torch.Tensor]
    normalization: _Statistics
    data: dict[str, str | int | float | bool | None]
    result: dict[str, Any]
