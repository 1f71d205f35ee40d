"""Suite files: matrix expansion, and one clear error (file, line, field, expectation) for each kind of mistake."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from drbench.config import load_config
from drbench.suite import Cell, SuiteError, config_hash, list_suites, load_suite, matches, parse_filter, parse_suite

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"


def suite_from(text: str, tmp_path: Path):
    return load_suite(_write(tmp_path, textwrap.dedent(text)))


BASE = """\
name: t
fixed: {input_size: 32, small_input: true}
axes:
  model: [shufflenetv2]
  width: [0.5, 1.0]
  op: [conv, drconv, condconv]
  regions: [4, 8]
  experts: [4]
metrics: [params]
"""


def test_matrix_drops_options_an_operator_does_not_take_and_keeps_each_cell_once(tmp_path):
    suite = suite_from(BASE, tmp_path)
    labels = [cell.label() for cell in suite.cells]
    # per width: 1 conv + 2 drconv (regions) + 1 condconv; regions/experts only where the op takes them
    assert len(suite.cells) == 2 * (1 + 2 + 1)
    assert labels[:4] == [
        "shufflenetv2 0.5x conv 32px b1 small_input=True",
        "shufflenetv2 0.5x drconv(regions=4) 32px b1 small_input=True",
        "shufflenetv2 0.5x drconv(regions=8) 32px b1 small_input=True",
        "shufflenetv2 0.5x condconv(experts=4) 32px b1 small_input=True",
    ]
    conv = suite.cells[0].config()
    assert "regions" not in conv and "experts" not in conv
    assert len({cell.config_hash() for cell in suite.cells}) == len(suite.cells)
    assert list(suite.metrics) == ["params"]


def test_exclude_sees_defaults_and_include_adds_cells(tmp_path):
    text = BASE + textwrap.dedent("""\
        exclude:
          - {op: drconv, regions: 8}
          - {width: 1.0, op: [condconv, conv]}
        include:
          - {model: mobilenetv2, width: 0.35, op: drconv, regions: [2, 4]}
        """)
    suite = suite_from(text, tmp_path)
    configs = [cell.config() for cell in suite.cells]
    assert not any(c["op"] == "drconv" and c["regions"] == 8 for c in configs)
    assert [c["op"] for c in configs if c["width"] == 1.0 and c["model"] == "shufflenetv2"] == ["drconv"]
    included = [c for c in configs if c["model"] == "mobilenetv2"]
    assert [(c["regions"], c["input_size"], c["small_input"]) for c in included] == [(2, 32, True), (4, 32, True)]


def test_an_included_operator_does_not_join_the_axes(tmp_path):
    text = textwrap.dedent("""\
        name: t
        fixed: {input_size: 32, small_input: true}
        axes:
          model: [shufflenetv2]
          op: [conv, condconv]
        include:
          - {model: shufflenetv2, op: drconv, regions: 8, impl: [fast, reference]}
        metrics: [params]
        """)
    labels = [cell.label() for cell in suite_from(text, tmp_path).cells]
    assert labels == [
        "shufflenetv2 1x conv 32px b1 small_input=True",
        "shufflenetv2 1x condconv 32px b1 small_input=True",
        "shufflenetv2 1x drconv(regions=8,impl=fast) 32px b1 small_input=True",
        "shufflenetv2 1x drconv(regions=8,impl=reference) 32px b1 small_input=True",
    ]


def test_metric_settings_come_from_config_unless_the_suite_sets_them(tmp_path):
    text = BASE.replace("metrics: [params]", "metrics:\n  latency: {budget_s: 0.25}\n  memory: null")
    (tmp_path / "drbench.toml").write_text("[timing]\nwarmup = 7\n")
    suite = load_suite(_write(tmp_path, text), load_config(tmp_path / "drbench.toml"))
    assert suite.metrics["latency"].budget_s == 0.25
    assert suite.metrics["latency"].warmup == 7
    assert list(suite.metrics) == ["latency", "memory"]


def test_an_input_size_pair_is_written_as_a_list_in_a_list(tmp_path):
    text = BASE.replace("fixed: {input_size: 32, small_input: true}", "fixed: {small_input: true}")
    text = text.replace("axes:\n", "axes:\n  input_size: [[32, 24], 16]\n")
    suite = suite_from(text, tmp_path)
    assert {cell.spatial_size for cell in suite.cells} == {(32, 24), (16, 16)}
    assert suite.cells[0].config()["input_size"] == [32, 24]


@pytest.mark.parametrize(
    "change, expected",
    [
        # YAML syntax: the line of the problem
        (("op: [conv, drconv, condconv]", "op: [conv, drconv"), r"s.yaml:7: YAML syntax error: .*expected"),
        # unknown top-level key
        (("metrics: [params]", "metrics: [params]\nmetric: [macs]"), r"s.yaml:10: metric: unknown key 'metric'; "
                                                                       r"expected one of: name, description"),
        # unknown setting in a section
        (("  experts: [4]", "  expert: [4]"), r"s.yaml:8: axes.expert: unknown setting 'expert'; expected one of: "
                                              r"model, width, .*experts"),
        # wrong type, in an axis list: the item's line and index
        (("width: [0.5, 1.0]", "width: [0.5, big]"), r"s.yaml:5: axes.width\[1\]: expected a valid number "
                                                     r".*\(got 'big'\)"),
        (("fixed: {input_size: 32, small_input: true}", "fixed: {input_size: 32, small_input: maybe}"),
         r"s.yaml:2: fixed.small_input: expected a valid boolean"),
        (("  width: [0.5, 1.0]", "  width: 0.5"), r"s.yaml:5: axes.width: expected a valid list \(got 0.5\)"),
        (("  width: [0.5, 1.0]", "  width: []"), r"s.yaml:5: axes.width: List should have at least 1 item"),
        # unknown model, operator, metric
        (("model: [shufflenetv2]", "model: [shufflenet]"), r"s.yaml:4: axes.model\[0\]: unknown model 'shufflenet';"
                                                           r" expected one of: shufflenetv2, mobilenetv2"),
        (("op: [conv, drconv, condconv]", "op: [conv, dr_conv, condconv]"),
         r"s.yaml:6: axes.op\[1\]: unknown operator 'dr_conv'; expected one of: conv, drconv"),
        (("metrics: [params]", "metrics: [params, speed]"), r"s.yaml:9: metrics\[1\]: unknown metric 'speed'; "
                                                            r"expected one of: macs, params, latency, memory"),
        # values the model or operator rejects
        (("width: [0.5, 1.0]", "width: [0.5, 0.8]"), r"s.yaml:5: axes.width\[1\]: shufflenetv2 has no width 0.8"),
        (("regions: [4, 8]", "regions: [0, 8]"), r"s.yaml:7: axes.regions\[0\]: .*regions must be >= 1"),
        (("fixed: {input_size: 32, small_input: true}", "fixed: {input_size: 32, placement: everywhere}"),
         r"s.yaml:2: fixed.placement: shufflenetv2 has no placement 'everywhere'"),
        # an option no operator of the suite takes
        (("op: [conv, drconv, condconv]", "op: [conv, drconv]"), r"s.yaml:8: axes.experts: no operator of this "
                                                                 r"suite takes 'experts' \(taken by: condconv\)"),
        # metric settings
        (("metrics: [params]", "metrics:\n  latency: {budget: 1}"), r"s.yaml:10: metrics.latency.budget: unknown "
                                                                   r"key 'budget'; expected one of: budget_s"),
        (("metrics: [params]", "metrics:\n  latency: {budget_s: fast}"), r"s.yaml:10: metrics.latency.budget_s: "
                                                                        r"expected a valid number"),
        (("metrics: [params]", "metrics: []"), r"s.yaml:9: metrics: no metrics; expected at least one of"),
        # required keys and duplicates
        (("name: t\n", ""), r"s.yaml: name: missing; this key is required"),
        (("  model: [shufflenetv2]\n", ""), r"s.yaml: every cell needs 'model'; set it in fixed or axes"),
        (("fixed: {input_size: 32, small_input: true}", "fixed: {input_size: 32, width: 0.5}"),
         r"s.yaml:5: axes.width: 'width' is both fixed and an axis"),
        (("name: t", "name: a suite"), r"s.yaml:1: name: expected letters, digits, '.', '_' or '-' \(it names the results folder\), got 'a suite'"),
    ],
)
def test_each_kind_of_mistake_gives_one_message_naming_file_line_field_and_expectation(tmp_path, change, expected):
    old, new = change
    assert old in BASE
    with pytest.raises(SuiteError, match=expected) as raised:
        suite_from(BASE.replace(old, new), tmp_path)
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_a_suite_that_is_not_a_mapping_or_missing_is_an_error(tmp_path):
    with pytest.raises(SuiteError, match=r"s.yaml: a suite must be a mapping"):
        suite_from("- a\n- b\n", tmp_path)
    with pytest.raises(SuiteError, match=r"nothing.yaml: cannot read suite file"):
        load_suite(tmp_path / "nothing.yaml")


def test_excluding_everything_is_an_error(tmp_path):
    with pytest.raises(SuiteError, match="no cells"):
        suite_from(BASE + "exclude:\n  - {model: shufflenetv2}\n", tmp_path)


def test_shipped_suites_are_valid():
    paths = list_suites(SUITES_DIR)
    assert {p.stem for p in paths} >= {"quick", "width", "regions", "spatial", "table1"}
    for path in paths:
        suite = load_suite(path)
        assert suite.name == path.stem and suite.cells


def test_width_suite_has_the_papers_fig4_axes():
    cells = [c.config() for c in load_suite(SUITES_DIR / "width.yaml").cells]
    widths = {(c["model"], c["width"]) for c in cells}
    assert widths == {("shufflenetv2", w) for w in (0.5, 1.0, 1.5, 2.0)} | {
        ("mobilenetv2", w) for w in (0.25, 0.5, 0.75, 1.0)
    }
    assert {c["op"] for c in cells} == {"conv", "condconv", "drconv"} and len(cells) == 24


def test_filter_expressions():
    assert parse_filter("op=drconv|conv, width=0.5") == {"op": ["drconv", "conv"], "width": [0.5]}
    config = {"model": "shufflenetv2", "op": "drconv", "width": 0.5, "input_size": [32, 24]}
    assert matches(config, parse_filter("op=drconv,width=0.5"))
    assert matches(config, {"input_size": [(32, 24)]})
    assert not matches(config, parse_filter("op=conv"))
    assert not matches(config, parse_filter("regions=8"))  # conv cells have no regions
    for bad, message in [("op", "not key=value"), ("colour=red", "unknown key 'colour'"), (",", "empty filter")]:
        with pytest.raises(SuiteError, match=message):
            parse_filter(bad)


def test_config_hash_is_stable_and_order_free():
    a = {"model": "shufflenetv2", "width": 0.5, "op": "conv"}
    assert config_hash(a) == config_hash(dict(reversed(a.items())))
    assert config_hash(a) == "b246e74c5df5ca57"  # fixed forever: stored results are matched by it
    assert config_hash({**a, "width": 1.0}) != config_hash(a)


def test_cell_builds_the_model_it_describes():
    cell = Cell(model="mobilenetv2", width=0.35, op="drconv", op_options={"regions": 2}, input_size=32,
                small_input=True, num_classes=10, device="cpu")
    model = cell.build_model()
    assert sum(type(m).__name__ == "DRConv2d" for m in model.modules()) > 0
    assert model.eval()(cell.example_input()).shape == (1, 10)
    with pytest.raises(ValueError, match="resolve the cell's device"):
        Cell(model="mobilenetv2").torch_device


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path
