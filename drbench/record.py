"""The typed result record: the one shape every results file line must have before any reader sees it.

A results file is something users pass around (CI artifacts, a colleague's run, a pull request), so its lines are
untrusted input. :class:`Record` validates one line strictly: a field of the wrong type, a suite name that is not a
plain folder name or a commit that is not a hexadecimal hash makes the line invalid (the store skips it with a
warning, :mod:`drbench.results`), so that no reader downstream meets a surprise and nothing taken from a record can
name a path or reach git as an option.

Versions: ``schema`` is the record format version (:data:`SCHEMA_VERSION`); every version listed in
:data:`READABLE_SCHEMAS` still loads.

This module is a leaf: it imports nothing of drbench, so that every other module may import it.

>>> record = Record.model_validate({"schema": 1, "suite": "quick", "config": {"model": "mobilenetv1"},
...                                 "config_hash": "0123456789abcdef", "status": "ok",
...                                 "env": {"git_commit": "3db48f3", "threads": 2}})
>>> record.env.git_commit, record.to_dict()["metrics"]
('3db48f3', {})
>>> Record.model_validate({**record.to_dict(), "suite": ".."})
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for Record
...
"""

from __future__ import annotations

import re
import reprlib
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, model_validator

SCHEMA_VERSION = 1
READABLE_SCHEMAS = (1,)

MAX_INT = 2**63 - 1
"""The largest integer a record may hold: what every reader (floats, pandas' int64) can represent."""

SUITE_NAME_MAX = 100
"""A suite's name is a folder name (results, reports): short enough for any file system, with room to spare."""

_SUITE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_COMMIT = re.compile(r"[0-9a-fA-F]{1,64}")


def check_suite_name(name: str) -> str:
    """``name`` if it can name a folder on its own (letters, digits, ``.``, ``_``, ``-``; not ``.`` or ``..``; at
    most :data:`SUITE_NAME_MAX` characters), else ValueError saying what is expected.

    >>> check_suite_name("quick")
    'quick'
    >>> check_suite_name("../etc")
    Traceback (most recent call last):
    ...
    ValueError: expected letters, digits, '.', '_' or '-' (it names the results folder), got '../etc'
    """
    if not _SUITE_NAME.fullmatch(name) or set(name) == {"."}:
        raise ValueError(f"expected letters, digits, '.', '_' or '-' (it names the results folder), "
                         f"got {short_repr(name)}")
    if len(name) > SUITE_NAME_MAX:
        raise ValueError(f"expected at most {SUITE_NAME_MAX} characters (it names the results folder), "
                         f"got {len(name)}")
    return name


def is_commit(text: str) -> bool:
    """Whether ``text`` is a (possibly abbreviated) hexadecimal commit hash, so git cannot read it as an option.

    >>> is_commit("3db48f3"), is_commit("--output=/tmp/x")
    (True, False)
    """
    return bool(_COMMIT.fullmatch(text))


def _check_commit(text: str) -> str:
    if not is_commit(text):
        raise ValueError(f"expected a hexadecimal commit hash, got {short_repr(text)}")
    return text


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` in at most about ``limit`` characters: user input quoted in a message must not grow it
    without bound (a YAML alias bomb expands to gigabytes), so large containers are not even walked in full.

    >>> short_repr("x" * 100, limit=12)
    "'xxx...xxxx'"
    >>> len(short_repr([[list(range(100))] * 100] * 100))
    83
    """
    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = limit
    shortener.maxlevel, shortener.maxlist, shortener.maxdict, shortener.maxtuple = 2, 6, 6, 6
    text = shortener.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


SuiteName = Annotated[str, AfterValidator(check_suite_name)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
"""A configuration key or metric name: they become table columns, CSV headers and plot names."""
CommitHash = Annotated[str, AfterValidator(_check_commit)]
def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {short_repr(value)}")
    if isinstance(value, int) and abs(value) > MAX_INT:  # readers compute in floats (and pandas in 64 bits)
        raise ValueError(f"expected a number of at most 64 bits, got {short_repr(value)}")
    return value


Number = Annotated[int | float, PlainValidator(_number)]
"""An int or a float as stored (never a bool or a numeric string)."""


class _Open(BaseModel):
    """A part of a record: the fields readers use are typed, anything else is kept as it is."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class Timing(_Open):
    """A stored latency measurement (:meth:`drbench.measure.timing.LatencyMeasurement.to_dict`)."""

    samples: list[Number] | None = None
    median_s: Number | None = None
    iqr_s: Number | None = None
    throughput: Number | None = None
    noisy: bool | None = None
    reference: Timing | None = None


class SeedRun(_Open):
    """One training run of the ``accuracy`` metric (``top1`` is None where training diverged)."""

    top1: Number | None = None
    status: str | None = None


class MetricResult(Timing):
    """One metric's result: ``value`` is the headline figure; the rest is the metric's own (raw samples, runs)."""

    value: Number | None = None
    std: Number | None = None
    train: Timing | None = None
    runs: list[SeedRun] | None = None


class Environment(_Open):
    """Where and with what the record was measured (:func:`drbench.environment.capture_environment`)."""

    git_commit: CommitHash | None = None
    git_dirty: bool | None = None
    machine: str | None = None
    hostname: str | None = None
    threads: int | None = None
    device: str | None = None
    device_name: str | None = None
    torch_version: str | None = None
    time: str | None = None


ConfigScalar = str | bool | int | float | None
ConfigValue = ConfigScalar | list[ConfigScalar]
"""A setting of a cell's flat configuration: a scalar, or a list of scalars (an (H, W) input size); readers group
and compare settings, so they must be hashable once lists become tuples."""


class Record(BaseModel):
    """One measured cell, as stored on one line of a results file (see :mod:`drbench.results` for the fields)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True, populate_by_name=True)

    schema_version: Literal[READABLE_SCHEMAS] = Field(SCHEMA_VERSION, alias="schema")  # type: ignore[valid-type]
    suite: SuiteName
    run_id: str = ""
    config: dict[Name, ConfigValue]
    config_hash: Annotated[str, Field(min_length=1, max_length=64)]
    metric_settings: dict[Name, dict[str, Any]] = Field(default_factory=dict)
    status: Literal["ok", "error"]
    error: str | None = None
    traceback: str | None = None
    metrics: dict[Name, MetricResult] = Field(default_factory=dict)
    env: Environment = Field(default_factory=Environment)
    started: str | None = None
    duration_s: Number | None = None

    @model_validator(mode="before")
    @classmethod
    def _every_field_present(cls, data: Any) -> Any:
        """Fill the optional fields, so that :meth:`to_dict` lists each one as the runner writes them."""
        if not isinstance(data, dict):
            return data
        defaults = {"run_id": "", "metric_settings": {}, "error": None, "traceback": None, "metrics": {},
                    "env": {}, "started": None, "duration_s": None}
        return {**defaults, **data}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form written to results files and handed to readers (extra fields kept as stored)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)
