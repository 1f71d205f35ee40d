"""Project settings: built-in defaults, overridden by ``drbench.toml``, overridden by command-line flags.

Every value remembers where it came from, so ``drbench config`` can say why a setting has the value it has.

``drbench.toml`` is read from the working directory (or the path given to :func:`load_config`). It holds
sections of settings; each section is a pydantic model registered with :func:`register_config_section`, so a
module that needs settings of its own (data paths, a cluster partition) registers its section without touching
this file. An unknown section or key, or a value of the wrong type, is a :class:`ConfigError` naming the file,
the key and what was expected.

>>> config = load_config(overrides={"run.threads": 2})
>>> config.get("run.threads"), config.source("run.threads")
(2, 'flag')
>>> config.section("timing").budget_s > 0
True
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drbench.record import short_repr

CONFIG_FILE = "drbench.toml"

DEFAULT_SOURCE = "default"
FLAG_SOURCE = "flag"


class ConfigError(ValueError):
    """A malformed ``drbench.toml`` or override; the message names the file, the key and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PathSettings(_Section):
    """Where drbench reads suites and writes results and reports (relative to the working directory)."""

    results_dir: str = "results"
    reports_dir: str = "reports"
    suites_dir: str = "suites"


class RunSettings(_Section):
    """How ``drbench run`` executes cells."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    threads: int = Field(
        1,
        ge=0,
        description="torch intra-op threads; 1 (torch.utils.benchmark's default) keeps timings stable on a shared "
        "machine; 0 keeps torch's default (the physical cores)",
    )


# The bounds of the latency settings, shared by [timing] and a suite's `metrics: {latency: ...}` so that neither
# can ask for a measurement that never ends (an infinite budget) or cannot start (a negative one).
BudgetSeconds = Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]
WarmupCalls = Annotated[int, Field(ge=0, le=10_000)]
MinBlocks = Annotated[int, Field(ge=2, le=10_000)]
RelativeIqr = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class TimingSettings(_Section):
    """Defaults of the ``latency`` metric; a suite's ``metrics.latency`` section overrides them per suite."""

    budget_s: BudgetSeconds = Field(1.0, description="time spent in timed blocks per measurement, at most")
    warmup: WarmupCalls = Field(3, description="untimed calls before timing")
    min_blocks: MinBlocks = Field(5, description="timed blocks before the spread is judged")
    target_rel_iqr: RelativeIqr = Field(0.05, description="stop once IQR/median is at most this")


_SECTIONS: dict[str, type[BaseModel]] = {}


def register_config_section(name: str, model: type[BaseModel]) -> type[BaseModel]:
    """Declare section ``[name]`` of ``drbench.toml``; ``model``'s fields are its keys, with their defaults."""
    if name in _SECTIONS and _SECTIONS[name] is not model:
        raise ValueError(f"config section {name!r} is already registered")
    _SECTIONS[name] = model
    return model


register_config_section("paths", PathSettings)
register_config_section("run", RunSettings)
register_config_section("timing", TimingSettings)


@dataclass(frozen=True)
class Config:
    """The effective settings: one pydantic model per section, and the source of every ``section.key``."""

    sections: Mapping[str, BaseModel]
    sources: Mapping[str, str]
    file: Path | None

    def section(self, name: str) -> Any:
        """The settings model of section ``name`` (``config.section("timing").budget_s``)."""
        return self.sections[name]

    def get(self, key: str) -> Any:
        """The value of ``"section.key"``."""
        section, name = _split_key(key)
        return getattr(self.sections[section], name)

    def source(self, key: str) -> str:
        """Where ``"section.key"`` came from: ``default``, the path of ``drbench.toml``, or ``flag``."""
        return self.sources[key]

    def items(self) -> list[tuple[str, Any, str]]:
        """``(key, value, source)`` for every setting, section by section."""
        return [
            (f"{section}.{name}", getattr(model, name), self.sources[f"{section}.{name}"])
            for section, model in self.sections.items()
            for name in type(model).model_fields
        ]


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read ``path`` (default: ``./drbench.toml`` when it exists) and apply ``overrides``.

    ``overrides`` maps ``"section.key"`` to a value; ``None`` values are ignored, so a CLI can pass every flag
    and let unset ones fall through.
    """
    file = Path(path) if path is not None else Path(CONFIG_FILE)
    if path is not None and not file.is_file():
        raise ConfigError(f"{file}: no such configuration file")
    from_file = _read_toml(file) if file.is_file() else {}
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    for key in given:
        _check_known(key, f"override {key!r}")

    sections: dict[str, BaseModel] = {}
    sources: dict[str, str] = {}
    for name, model in _SECTIONS.items():
        values = dict(from_file.get(name, {}))
        for field in model.model_fields:
            key = f"{name}.{field}"
            if key in given:
                values[field] = given[key]
                sources[key] = FLAG_SOURCE
            elif field in values:
                sources[key] = str(file)
            else:
                sources[key] = DEFAULT_SOURCE
        try:
            sections[name] = model.model_validate(values)
        except ValidationError as error:
            first = error.errors()[0]
            key = f"{name}.{first['loc'][0]}" if first["loc"] else name
            origin = "command line" if sources.get(key) == FLAG_SOURCE else str(file)
            raise ConfigError(f"{origin}: {key}: {first['msg']} (got {short_repr(first.get('input'))})") from None
    return Config(sections, sources, file if file.is_file() else None)


def _read_toml(file: Path) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{file}: cannot read configuration file ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{file}: not a configuration file (byte {error.start} is not UTF-8 text; expected TOML)"
                          ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{file}: not valid TOML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{file}: not valid TOML: nested too deeply") from None
    for section, values in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{file}: unknown section [{section}]; expected one of: {', '.join(_SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{file}: {section} must be a [{section}] table of settings")
        for key in values:
            _check_known(f"{section}.{key}", str(file))
    return data


def _check_known(key: str, origin: str) -> None:
    section, name = _split_key(key)
    if section not in _SECTIONS:
        raise ConfigError(f"{origin}: unknown section {section!r}; expected one of: {', '.join(_SECTIONS)}")
    fields = _SECTIONS[section].model_fields
    if name not in fields:
        raise ConfigError(f"{origin}: unknown key {key!r}; [{section}] takes: {', '.join(fields)}")


def _split_key(key: str) -> tuple[str, str]:
    section, dot, name = key.partition(".")
    if not dot:
        raise ConfigError(f"setting {key!r} must be written as section.key, e.g. run.threads")
    return section, name
