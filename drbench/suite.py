"""Suite files: a matrix of experiments in YAML, validated before anything is measured, expanded into cells.

A suite names its cells' settings and the metrics to measure on each::

    name: width                         # also the results folder: results/width/
    description: Fig. 4 axes
    fixed:                              # settings shared by every cell
      input_size: 224
      batch_size: 1
    axes:                               # the matrix: every combination of these lists, first axis outermost
      model: [shufflenetv2]
      width: [0.5, 1.0]
      op: [conv, condconv, drconv]
      regions: [8]                      # an operator option: kept only on cells whose op takes it
      experts: [8]
    exclude:                            # drop the combinations a rule matches (a list value: any of them)
      - {op: condconv, width: [1.5, 2.0]}
    include:                            # extra cells, each merged over `fixed` (lists expand as a product)
      - {model: mobilenetv2, width: 0.35, op: drconv, regions: [4, 8]}
    metrics:                            # name: settings (null or {} for the defaults); or a plain list of names
      macs: {}
      params: {}
      latency: {budget_s: 2.0}
      memory: {}

Cell settings (and their defaults) are the fields of :class:`Cell`; operator options are the names in
``drbench list ops`` (``regions``, ``experts``, ``generator``, ``hidden_channels``, ``impl``, ...). An option is
dropped from cells whose operator does not take it, so ``op: [conv, drconv]`` with ``regions: [4, 8]`` gives one
conv cell and two drconv cells; duplicate cells are kept once. Exclude rules see the cells after that, with every
default filled in. In ``axes``, ``include`` and ``exclude`` a list means alternatives, so an (H, W) input size is
written ``input_size: [[112, 96]]``.

Any mistake (YAML syntax, an unknown key, a wrong type, an unknown model, operator, width, placement or metric,
an operator option its operator rejects) raises :class:`SuiteError` with one message naming the file, the line,
the field and what was expected.

>>> suite = load_suite("suites/quick.yaml")
>>> len(suite.cells), suite.cells[1].label()
(6, 'shufflenetv2 0.5x condconv(experts=4) 32px b2 small_input=True num_classes=10')
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping

import torch
import torch.nn as nn
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

# drbench's own metrics register on import, in the order listings and errors show them: accuracy last
import drbench.metrics  # noqa: F401  # isort: skip
import drbench.measure.accuracy  # noqa: F401  # isort: skip
from drbench.config import Config, load_config
from drbench.metric_registry import get_metric, list_metrics, resolve_settings
from drbench.models import create_model, get_model, list_models
from drbench.ops import create_conv, get_op, list_ops
from drbench.record import check_suite_name, short_repr
from drbench.safe_yaml import YamlError, load_yaml

MAX_INPUT_SIZE = 8192
"""The largest input side a cell may ask for (pixels)."""

MAX_OPTION_VALUE = 1024
"""The largest integer operator option (``regions``, ``experts``, ``hidden_channels``, ...): operators grow their
filters and memory with it, so a typo such as ``regions: 100000`` would take gigabytes at run time."""

MAX_CELLS = 10_000
"""The most cells a suite may expand to (each is validated by building a layer, then measured)."""

InputSide = Annotated[int, Field(ge=1, le=MAX_INPUT_SIZE)]

SUITE_KEYS = ("name", "description", "fixed", "axes", "include", "exclude", "metrics")
FieldPath = tuple[str | int, ...]


class SuiteError(ValueError):
    """A malformed suite (or cell filter); the message names the file, the line, the field and what was expected."""


class Cell(BaseModel):
    """One experiment: a model, its operator and options, its input, and where it runs.

    ``config()`` is the flat, JSON-able form stored with results; ``config_hash()`` its stable identity.

    >>> cell = Cell(model="shufflenetv2", width=0.5, op="drconv", op_options={"regions": 4}, input_size=32,
    ...             device="cpu")
    >>> cell.label()
    'shufflenetv2 0.5x drconv(regions=4) 32px b1'
    >>> model, x = cell.build_model(), cell.example_input()
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: str
    width: float = Field(1.0, gt=0)
    op: str = "conv"
    op_options: dict[str, Any] = Field(default_factory=dict)
    input_size: InputSide | tuple[InputSide, InputSide] = 224
    placement: str = "default"
    small_input: bool = False
    num_classes: int | None = Field(None, ge=1, description="None: the family's default output size")
    batch_size: int = Field(1, ge=1)
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = "float32"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")

    @field_validator("input_size", mode="before")
    @classmethod
    def _pair_from_list(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return _registered(name, list_models(), "model")

    @field_validator("width")
    @classmethod
    def _width_of_model(cls, width: float, info) -> float:
        if "model" in info.data:
            _as_custom_error(lambda: get_model(info.data["model"]).check_width(width))
        return width

    @field_validator("op")
    @classmethod
    def _known_op(cls, name: str) -> str:
        return _registered(name, list_ops(), "operator")

    @field_validator("op_options")
    @classmethod
    def _options_build(cls, options: dict[str, Any], info) -> dict[str, Any]:
        """Build one small layer with these options: the operator's own checks say what is wrong."""
        for name, value in options.items():
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_OPTION_VALUE:
                raise PydanticCustomError("invalid_setting", "{message}", {
                    "message": f"{name}={value}: expected at most {MAX_OPTION_VALUE} (the operator's size grows "
                               "with it)"})
        if "op" in info.data:
            op = info.data["op"]
            _as_custom_error(lambda: create_conv(op, 8, 8, 1, input_size=(8, 8), **options))
        return options

    @field_validator("placement")
    @classmethod
    def _placement_of_model(cls, placement: str, info) -> str:
        if "model" in info.data:
            _as_custom_error(lambda: get_model(info.data["model"]).placement(placement))
        return placement

    def config(self) -> dict[str, Any]:
        """Flat JSON-able settings, operator options inline (the form of results records and ``--only``)."""
        fields = self.model_dump(exclude={"op_options"})
        if isinstance(self.input_size, tuple):
            fields["input_size"] = list(self.input_size)
        return {**fields, **self.op_options}

    def config_hash(self) -> str:
        return config_hash(self.config())

    def label(self) -> str:
        """A short human name: :func:`label` of :meth:`config`."""
        return label(self.config())

    def with_device(self, device: str) -> Cell:
        return self.model_copy(update={"device": device})

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            raise ValueError("resolve the cell's device first (Cell.with_device); 'auto' is not a torch device")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def spatial_size(self) -> tuple[int, int]:
        return (self.input_size, self.input_size) if isinstance(self.input_size, int) else self.input_size

    def build_model(self, seed: int = 0) -> nn.Module:
        """A fresh model for this cell, initialised from ``seed``, on the cell's device and dtype."""
        torch.manual_seed(seed)
        model = create_model(
            self.model,
            width=self.width,
            op=self.op,
            num_classes=self.num_classes,
            input_size=self.input_size,
            placement=self.placement,
            small_input=self.small_input,
            **self.op_options,
        )
        return model.to(device=self.torch_device, dtype=self.torch_dtype)

    def example_input(self, seed: int = 0) -> torch.Tensor:
        """A random (batch_size, 3, H, W) input on the cell's device and dtype."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch_size, 3, *self.spatial_size, generator=generator)
        return x.to(device=self.torch_device, dtype=self.torch_dtype)


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable identity of a configuration: SHA-256 of its canonical JSON (sorted keys), 16 hex digits."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


CELL_KEYS = tuple(name for name in Cell.model_fields if name != "op_options")

LABEL_SETTINGS = ("placement", "small_input", "num_classes", "dtype")
"""Cell settings a label names only where they differ from the default."""


def label(config: Mapping[str, Any]) -> str:
    """A cell's short human name from its flat configuration (:meth:`Cell.config`, a record's ``config``): model,
    width, operator with its options, input size and batch size, then each of :data:`LABEL_SETTINGS` that is not
    the default. Pure: nothing is validated or built, so it names any stored record alike.

    >>> label({"model": "mobilenetv2", "width": 0.5, "op": "drconv", "input_size": [112, 96], "regions": 8})
    'mobilenetv2 0.5x drconv(regions=8) 112x96px b1'
    >>> label({"model": "shufflenetv2", "dtype": "float16"})
    'shufflenetv2 1x conv 224px b1 dtype=float16'
    """
    defaults = cell_defaults()
    setting = lambda name: config.get(name, defaults.get(name))  # noqa: E731
    options = ",".join(f"{key}={value}" for key, value in config.items() if key not in CELL_KEYS)
    op, size, width = setting("op"), setting("input_size"), setting("width")
    parts = [str(config.get("model", "?")), f"{width:g}x" if isinstance(width, (int, float)) else f"{width}x",
             f"{op}({options})" if options else str(op),
             f"{'x'.join(map(str, size)) if isinstance(size, (list, tuple)) else size}px", f"b{setting('batch_size')}"]
    parts += [f"{name}={setting(name)}" for name in LABEL_SETTINGS if setting(name) != defaults[name]]
    return " ".join(parts)


def cell_defaults() -> dict[str, Any]:
    """The default of every cell setting (``model`` has none: every cell must name one)."""
    return {
        name: field.get_default(call_default_factory=True)
        for name, field in Cell.model_fields.items()
        if not field.is_required()
    }


def option_names() -> dict[str, list[str]]:
    """Each operator option name and the operators that take it."""
    names: dict[str, list[str]] = {}
    for op in list_ops():
        for option in get_op(op).options:
            names.setdefault(option, []).append(op)
    return names


@dataclass(frozen=True)
class Suite:
    """A validated suite: its cells in matrix order and the resolved settings of each metric."""

    name: str
    description: str
    path: Path | None
    cells: tuple[Cell, ...]
    metrics: Mapping[str, BaseModel]


class _SuiteSpec(BaseModel):
    """The shape of a suite file (values are checked cell by cell, where their origin is known)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        _as_custom_error(lambda: check_suite_name(name))
        return name

    description: str = ""
    fixed: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    metrics: Any = Field(description="a mapping of metric names to settings, or a list of names")



def load_suite(path: str | Path, config: Config | None = None) -> Suite:
    """Read, validate and expand the suite at ``path``; metric defaults come from ``config`` (drbench.toml)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SuiteError(f"{path}: cannot read suite file ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise SuiteError(f"{path}: not a suite file (byte {error.start} is not UTF-8 text; expected YAML)") from None
    return parse_suite(text, source=path, config=config)


def parse_suite(text: str, source: str | Path = "<suite>", config: Config | None = None) -> Suite:
    """Validate and expand suite YAML ``text``; ``source`` names it in errors."""
    try:
        data, root = load_yaml(text)
    except YamlError as error:
        raise SuiteError(f"{source}:{error.line}: {error.problem}" if error.line else f"{source}: {error.problem}"
                         ) from None
    where = _Locator(root, str(source))
    if not isinstance(data, dict):
        raise SuiteError(f"{source}: a suite must be a mapping with keys {', '.join(SUITE_KEYS)}")
    try:
        spec = _SuiteSpec.model_validate(data)
    except ValidationError as error:
        raise where.validation_error(error, ()) from None
    metrics = _resolve_metrics(spec, where, config or load_config())
    _check_keys(spec, where)
    cells = _expand(spec, where)
    if not cells:
        raise SuiteError(f"{source}: the suite has no cells (the exclude rules remove every combination)")
    return Suite(spec.name, spec.description, Path(source) if source else None, tuple(cells), metrics)


def list_suites(directory: str | Path) -> list[Path]:
    """The suite files (``*.yaml``, ``*.yml``) in ``directory``, sorted by name."""
    directory = Path(directory)
    return sorted(p for p in directory.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))


def parse_filter(expression: str) -> dict[str, list[Any]]:
    """Parse a cell filter ``key=value[|value...],key=value...`` (values read as YAML scalars).

    >>> parse_filter("op=drconv|condconv,width=0.5")
    {'op': ['drconv', 'condconv'], 'width': [0.5]}
    """
    rule: dict[str, list[Any]] = {}
    for term in filter(None, (t.strip() for t in expression.split(","))):
        key, eq, values = term.partition("=")
        key = key.strip()
        if not eq or not key or not values.strip():
            raise SuiteError(f"--only: {term!r} is not key=value; expected e.g. 'op=drconv,model=shufflenetv2'")
        known = (*CELL_KEYS, *option_names())
        if key not in known:
            raise SuiteError(f"--only: unknown key {key!r}; expected one of: {', '.join(known)}")
        rule[key] = [_filter_value(key, value) for value in values.split("|")]
    if not rule:
        raise SuiteError("--only: empty filter; expected e.g. 'op=drconv,model=shufflenetv2'")
    return rule


def _filter_value(key: str, text: str) -> Any:
    """One value of a cell filter, read as a YAML scalar (``0.5``, ``true``, ``[112, 96]``)."""
    try:
        return load_yaml(text)[0]
    except YamlError as error:
        raise SuiteError(f"--only: {key}={text.strip()!r} is not a YAML value ({error.problem}); "
                         "expected e.g. 'width=0.5'") from None


def matches(values: Mapping[str, Any], rule: Mapping[str, Any]) -> bool:
    """Whether every key of ``rule`` has one of its values (a list: any of them) in ``values``."""
    return all(
        _canonical(values.get(key)) in [_canonical(v) for v in _alternatives(allowed)]
        for key, allowed in rule.items()
    )


def _alternatives(value: Any) -> list[Any]:
    """A setting's alternatives as a new list (callers extend it; the suite's own lists stay as written)."""
    return list(value) if isinstance(value, list) else [value]


def _canonical(value: Any) -> Any:
    """Compare input sizes written as lists or tuples alike."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _resolve_metrics(spec: _SuiteSpec, where: _Locator, config: Config) -> dict[str, BaseModel]:
    """``metrics:`` as a list of names or a mapping of names to settings (null for the defaults)."""
    if isinstance(spec.metrics, list):
        requested: list[tuple[FieldPath, Any, Any]] = [(("metrics", i), name, {}) for i, name in enumerate(spec.metrics)]
    elif isinstance(spec.metrics, dict):
        requested = [(("metrics", name), name, settings) for name, settings in spec.metrics.items()]
    else:
        raise where.error(("metrics",), f"expected a mapping of metric names to settings or a list of names "
                                        f"(got {short_repr(spec.metrics)})")
    resolved = {}
    for path, name, settings in requested:
        if not isinstance(name, str) or name not in list_metrics():
            raise where.error(path, f"unknown metric {short_repr(name)}; expected one of: {', '.join(list_metrics())}")
        if settings is not None and not isinstance(settings, dict):
            raise where.error(path, f"expected a mapping of settings or null (got {short_repr(settings)})")
        spec_ = get_metric(name)
        try:
            resolved[name] = resolve_settings(spec_, settings or {}, config)
        except ValidationError as error:
            raise where.validation_error(error, path, known=spec_.settings.model_fields) from None
    if not resolved:
        raise where.error(("metrics",), "no metrics; expected at least one of: " + ", ".join(list_metrics()))
    return resolved


def _check_keys(spec: _SuiteSpec, where: _Locator) -> None:
    """Every setting key is a cell field or an operator option that one of the suite's operators takes."""
    options = option_names()
    known = (*CELL_KEYS, *options)
    ops = _alternatives(spec.axes.get("op", spec.fixed.get("op", cell_defaults()["op"])))
    ops += [op for entry in spec.include for op in _alternatives(entry.get("op", []))]
    all_ops_known = all(op in list_ops() for op in ops)  # else the cell check names the unknown operator
    sections: list[tuple[FieldPath, Mapping[str, Any]]] = [(("fixed",), spec.fixed), (("axes",), spec.axes)]
    sections += [(("include", i), entry) for i, entry in enumerate(spec.include)]
    sections += [(("exclude", i), entry) for i, entry in enumerate(spec.exclude)]
    for path, section in sections:
        for key in section:
            if key not in known:
                raise where.error((*path, key), f"unknown setting {key!r}; expected one of: {', '.join(known)}")
            takes = any(op in options[key] for op in ops) if key in options else True
            if not takes and all_ops_known and path[0] != "exclude":
                takers = ", ".join(options[key])
                raise where.error((*path, key), f"no operator of this suite takes {key!r} (taken by: {takers})")
    for key in spec.fixed.keys() & spec.axes.keys():
        raise where.error(("axes", key), f"{key!r} is both fixed and an axis; expected it in one of them")


def _expand(spec: _SuiteSpec, where: _Locator) -> list[Cell]:
    """Matrix product, minus excluded combinations, plus included cells; validated; duplicates removed."""
    _check_size(spec, where)
    fixed = {key: (value, ("fixed", key)) for key, value in spec.fixed.items()}
    candidates = [
        {**fixed, **combination}
        for combination in _product({key: (values, ("axes", key)) for key, values in spec.axes.items()})
    ]
    candidates = [c for c in map(_applicable, candidates) if not _excluded(c, spec.exclude)]
    for index, entry in enumerate(spec.include):
        entry_axes = {key: (_alternatives(value), ("include", index, key)) for key, value in entry.items()}
        candidates += [_applicable({**fixed, **combination}) for combination in _product(entry_axes)]
    cells: dict[str, Cell] = {}
    for candidate in candidates:
        cell = _validate_cell(candidate, where)
        cells.setdefault(cell.config_hash(), cell)
    return list(cells.values())


def _check_size(spec: _SuiteSpec, where: _Locator) -> None:
    """At most MAX_CELLS combinations before exclusion (counted, not built)."""
    combinations = math.prod(len(values) for values in spec.axes.values())
    combinations += sum(math.prod(len(_alternatives(v)) for v in entry.values()) for entry in spec.include)
    if combinations > MAX_CELLS:
        raise where.error(("axes",), f"{combinations} combinations; expected at most {MAX_CELLS} cells in a suite "
                                     "(split it into several suites)")


def _product(axes: Mapping[str, tuple[list[Any], FieldPath]]) -> Iterable[dict[str, tuple[Any, FieldPath]]]:
    """Every combination of the axes' values; each value keeps the path of the list item it came from."""
    keys = list(axes)
    choices = [[(value, (*path, i)) for i, value in enumerate(values)] for values, path in axes.values()]
    for combination in itertools.product(*choices):
        yield dict(zip(keys, combination))


def _applicable(candidate: dict[str, tuple[Any, FieldPath]]) -> dict[str, tuple[Any, FieldPath]]:
    """Drop operator options that the candidate's operator does not take."""
    op = candidate.get("op", (cell_defaults()["op"], ()))[0]
    taken = set(get_op(op).options) if op in list_ops() else set()
    options = option_names()
    return {key: item for key, item in candidate.items() if key not in options or key in taken}


def _excluded(candidate: Mapping[str, tuple[Any, FieldPath]], rules: list[dict[str, Any]]) -> bool:
    values = {**cell_defaults(), **{key: value for key, (value, _) in candidate.items()}}
    return any(matches(values, rule) for rule in rules)


def _validate_cell(candidate: Mapping[str, tuple[Any, FieldPath]], where: _Locator) -> Cell:
    options = option_names()
    fields = {key: value for key, (value, _) in candidate.items() if key not in options}
    op_options = {key: value for key, (value, _) in candidate.items() if key in options}
    try:
        return Cell.model_validate({**fields, "op_options": op_options})
    except ValidationError as error:
        first = error.errors()[0]
        key = first["loc"][0] if first["loc"] else "model"
        if key == "op_options":
            key = next(iter(op_options), "op")
        if first["type"] == "missing":
            raise where.error((), f"every cell needs {key!r}; set it in fixed or axes") from None
        if key not in candidate:  # a default that does not suit the cell's other settings
            raise where.error((), f"{key} (default {short_repr(first.get('input'))}): {_message(first)}") from None
        raise where.validation_error(error, candidate[key][1], single_value=True) from None


def _registered(name: str, known: list[str], kind: str) -> str:
    if name not in known:
        raise PydanticCustomError("unknown_name", "unknown {kind} '{name}'; expected one of: {known}",
                                  {"kind": kind, "name": name, "known": ", ".join(known)})
    return name


def _as_custom_error(check) -> None:
    """Run a registry check; its ValueError/TypeError message becomes the validation message as it is."""
    try:
        check()
    except (ValueError, TypeError, RuntimeError) as error:
        raise PydanticCustomError("invalid_setting", "{message}", {"message": str(error)}) from None


class _Locator:
    """Turns a path in the suite data into ``file:line: field`` using the YAML node marks."""

    def __init__(self, root: yaml.Node | None, source: str) -> None:
        self.source = source
        self.root = root

    def error(self, path: FieldPath, message: str) -> SuiteError:
        line = self._line(path)
        prefix = f"{self.source}:{line}" if line else self.source
        field = _dotted(path)
        return SuiteError(f"{prefix}: {field}: {message}" if field else f"{prefix}: {message}")

    def validation_error(
        self, error: ValidationError, base: FieldPath, single_value: bool = False, known: Iterable[str] = SUITE_KEYS
    ) -> SuiteError:
        """The first pydantic error, phrased as "expected ..., got ..."; ``base`` is where the value came from,
        ``known`` the keys its section takes."""
        first = error.errors()[0]
        path = base if single_value else (*base, *first["loc"])
        if first["type"] == "extra_forbidden":
            return self.error(path, f"unknown key {first['loc'][-1]!r}; expected one of: {', '.join(known)}")
        if first["type"] == "missing":
            return self.error(path, "missing; this key is required")
        return self.error(path, _message(first))

    def _line(self, path: FieldPath) -> int | None:
        node, line = self.root, None
        for part in path:
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value if k.value == part), None)
                if match is None:
                    break
                line, node = match[0].start_mark.line + 1, match[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                break
        return line


def _message(error: Mapping[str, Any]) -> str:
    """A pydantic error as "expected ... (got ...)"; drbench's own checks already say what was expected."""
    message = re.sub(r"^Input should be", "expected", error["msg"])
    if error["type"] not in ("unknown_name", "invalid_setting"):
        message += f" (got {short_repr(error.get('input'))})"
    return message


def _dotted(path: FieldPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
