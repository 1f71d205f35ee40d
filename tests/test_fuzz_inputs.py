"""Property-based fuzzing of everything a user hands drbench (issue 16): valid suites, configuration files and result
records, mutated (types, encodings, sizes, YAML features, path-like and markup-like strings), through the CLI.

Whatever the input: the command ends with exit code 0, 1 or 2, never a traceback; nothing is written outside the
results and reports folders given; the stored records are unchanged. Bounded: 60 derandomized examples per
property (about 10 s in all on a 2-core machine, so it runs in CI), no deadline per example (the first report imports
matplotlib). To explore, raise max_examples and set derandomize=False.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from drbench.cli import app
from report_records import record

runner = CliRunner()

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SUITE: dict[str, Any] = {
    "name": "fuzz",
    "fixed": {"model": "mobilenetv1", "width": 0.25, "input_size": 16, "small_input": True, "num_classes": 4},
    "axes": {"op": ["conv", "drconv"], "regions": [2]},
    "metrics": {"macs": {}, "latency": {"budget_s": 0.1}},
}
CONFIG = "[paths]\nresults_dir = \"results\"\n\n[run]\nthreads = 1\n\n[timing]\nbudget_s = 0.5\nwarmup = 2\n"

HOSTILE_TEXT = st.sampled_from([
    "..", ".", "/tmp/drbench-fuzz-outside", "../../outside", "a/b", "--output=victim", "-rf", "[/x]", "[bold]",
    "<script>alert(1)</script>", "=HYPERLINK(\"x\")", "line\nbreak", "\x00", "é", "x" * 300, "", "*alias", "&anchor",
    "{a: 1}", "!!python/object:os.system", "0" * 40,
])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), HOSTILE_TEXT,
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def paths_of(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into nested dicts and lists (the places a mutation can hit)."""
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += paths_of(value, (*prefix, index))
    return found


@st.composite
def mutated(draw: st.DrawFn, original: Any) -> Any:
    """``original`` (a JSON-like document) with one to three values replaced, removed or added."""
    data = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths_of(data)))
        if not path:
            return draw(VALUES)
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif action == "remove":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8) | HOSTILE_TEXT)] = draw(VALUES)
        else:
            parent.append(draw(VALUES))
    return data


@st.composite
def encoded(draw: st.DrawFn, text: str) -> bytes:
    """``text`` as bytes, now and then spoiled: cut short, bytes inserted (binary, not UTF-8), or repeated."""
    raw = text.encode("utf-8")
    spoil = draw(st.sampled_from(["none", "none", "cut", "insert", "repeat"]))
    if spoil == "cut":
        return raw[: draw(st.integers(0, len(raw)))]
    if spoil == "insert":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at:]
    if spoil == "repeat":
        return raw * draw(st.integers(2, 50))
    return raw


YAML_TRICKS = st.sampled_from([
    "", "\nfixed: {batch_size: 2}\n", "\nbomb: &a [x, x, x]\nmore: [*a, *a, *a, *a]\n", "\nloop: &l [*l]\n",
    "\n" + "[" * 200 + "]" * 200 + "\n", "\n%YAML 1.1\n---\n", "\n--- second document\n", "\n? [complex, key]\n: v\n",
])


@contextmanager
def workspace() -> Iterator[Path]:
    """A fresh working directory (the suites, configs and records go in it); restores the previous one."""
    previous = Path.cwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            yield Path(folder)
        finally:
            os.chdir(previous)


def snapshot(folder: Path, outputs: tuple[str, ...] = ("results", "reports")) -> dict[Path, bytes]:
    """Every file under ``folder`` except those in the output folders, with its content."""
    return {path: path.read_bytes() for path in folder.rglob("*")
            if path.is_file() and path.relative_to(folder).parts[0] not in outputs}


def check(*args: str | Path, root: Path, stored: dict[Path, bytes] | None = None) -> None:
    """Run drbench; assert exit 0/1/2, no traceback, nothing written outside results/ and reports/ under ``root``,
    and ``stored`` (records given as input) unchanged."""
    before = snapshot(root)
    outside = set(Path(tempfile.gettempdir()).glob("drbench-fuzz-outside*"))
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output
    assert snapshot(root) == before
    assert set(Path(tempfile.gettempdir()).glob("drbench-fuzz-outside*")) == outside
    for path, content in (stored or {}).items():
        assert path.read_bytes() == content


@FUZZ
@given(suite=mutated(SUITE), trick=YAML_TRICKS, data=st.data())
def test_mutated_suites_are_run_or_refused_cleanly(suite, trick, data):
    with workspace() as root:
        text = yaml.safe_dump(suite, allow_unicode=True) + trick
        (root / "suite.yaml").write_bytes(data.draw(encoded(text)))
        only = data.draw(st.none() | st.sampled_from(["op=drconv", "width=[1", "regions=*x", "x=1", "op=conv|drconv"]))
        check("run", "suite.yaml", "--dry-run", "--results-dir", "results", *(["--only", only] if only else []),
              root=root)


TOML_KEYS = st.sampled_from(["results_dir", "reports_dir", "suites_dir", "device", "threads", "budget_s", "warmup",
                             "min_blocks", "target_rel_iqr", "name", "workers", "unknown", "[section]", "[timing]"])
TOML_VALUES = st.sampled_from(["inf", "-inf", "nan", "-1", "0", "1e999", "9" * 30, "true", '"x"', '""', "[1, 2]",
                               "{a = 1}", '"../../outside"', '"/tmp/drbench-fuzz-outside"', '"[/x]"', '"cuda"'])


@st.composite
def config_text(draw: st.DrawFn) -> str:
    """drbench.toml with a few lines inserted (known and unknown keys, out-of-range and ill-typed values), or any
    text at all."""
    lines = CONFIG.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        line = f"{draw(TOML_KEYS)} = {draw(TOML_VALUES)}"
        lines.insert(draw(st.integers(0, len(lines))), line)
    return draw(st.just("\n".join(lines) + "\n") | st.text(max_size=200))


@FUZZ
@given(config=config_text(), data=st.data())
def test_mutated_configuration_files_are_read_or_refused_cleanly(config, data):
    with workspace() as root:
        (root / "drbench.toml").write_bytes(data.draw(encoded(config)))
        (root / "suite.yaml").write_text(yaml.safe_dump(SUITE))
        check(*data.draw(st.sampled_from([["config"], ["run", "suite.yaml", "--dry-run"], ["list", "suites"]])),
              root=root)


RECORDS = [record(macs=1_000_000, latency=[0.010, 0.011, 0.012], top1=[70.0, 71.0]),
           record(op="drconv", regions=4, macs=1_100_000, latency=[0.020, 0.021, 0.022]),
           record(op="local", error="ValueError: does not fit")]


@st.composite
def record_with_mutated(draw: st.DrawFn, part: str) -> dict:
    """A valid record whose ``part`` (config, metrics, env) alone is mutated: the deep values readers compute on."""
    changed = json.loads(json.dumps(RECORDS[0]))
    changed[part] = draw(mutated(changed[part]))
    return changed


MUTATED_RECORDS = (mutated(RECORDS[0]) | st.sampled_from(RECORDS)
                   | st.sampled_from(["config", "metrics", "env"]).flatmap(record_with_mutated))


@FUZZ
@given(records=st.lists(MUTATED_RECORDS, min_size=1, max_size=4), data=st.data())
def test_mutated_records_are_read_or_skipped_cleanly_by_every_reader(records, data):
    with workspace() as root:
        lines = "".join(json.dumps(r, allow_nan=True) + "\n" for r in records)
        store = root / "results" / "handmade" / "run.jsonl"
        store.parent.mkdir(parents=True)
        store.write_bytes(data.draw(encoded(lines)))
        stored = {store: store.read_bytes()}
        command = data.draw(st.sampled_from(["show", "compare", "history", "report", "status", "run"]))
        (root / "handmade.yaml").write_text(yaml.safe_dump({**SUITE, "name": "handmade", "metrics": ["macs"]}))
        if command in ("status", "run"):  # the store read as a suite's: plan, resume, claims
            check(*(["status", "results", "--suite"] if command == "status" else ["run"]), "handmade.yaml",
                  "--dry-run" if command == "run" else "--all", root=root, stored=stored)
        elif command == "show":
            check("show", store, root=root, stored=stored)
        elif command == "compare":
            check("compare", store, store, "--format", data.draw(st.sampled_from(["table", "markdown", "json"])),
                  root=root, stored=stored)
        elif command == "history":
            check("history", store, "--metric", "macs", "--out", "reports/h.png", root=root, stored=stored)
        else:
            check("report", store, root=root, stored=stored)
