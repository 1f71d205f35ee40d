"""drbench.compare: the decision rules on synthetic samples, and comparisons of hand-made result stores."""

from __future__ import annotations

import json
import math
import random

import pytest
from comparison_records import CONV, DRCONV, git_repo, make_record, timings, write_store

from drbench.compare import compare, compare_results, parse_threshold
from drbench.compare_format import comparison_json, comparison_markdown
from drbench.metric_registry import format_value
from drbench.sides import CompareError, Side, resolve_side
from drbench.stats import Verdict, decide_exact, decide_samples, decide_seeds, decide_threshold, min_p_value


def side(name: str, records: list[dict]) -> Side:
    return Side(name, name, tuple(records))


# Latency: threshold AND Mann-Whitney U --------------------------------------------------------------------------


def test_identical_distributions_never_count_over_many_draws():
    rng = random.Random(0)
    verdicts = [decide_samples(timings(rng, 0.01, 30), timings(rng, 0.01, 30), 0.10).verdict for _ in range(200)]
    assert verdicts.count(Verdict.UNCHANGED) == 200


def test_a_twenty_percent_slowdown_is_a_regression_and_the_reverse_an_improvement():
    rng = random.Random(1)
    before, after = timings(rng, 0.010, 20), timings(rng, 0.012, 20)
    slower = decide_samples(before, after, 0.10)
    assert slower.verdict is Verdict.REGRESSED
    assert slower.ratio == pytest.approx(1.2, rel=0.05) and slower.p_value < 0.002
    assert decide_samples(after, before, 0.10).verdict is Verdict.IMPROVED


def test_a_significant_change_within_the_threshold_does_not_count():
    rng = random.Random(2)
    decision = decide_samples(timings(rng, 0.010, 50, noise=0.005), timings(rng, 0.0105, 50, noise=0.005), 0.10)
    assert decision.p_value < 1e-6  # clearly different...
    assert decision.verdict is Verdict.UNCHANGED  # ...but by 5%, under the 10% threshold


def test_heavy_noise_hides_a_twenty_percent_shift():
    rng = random.Random(3)
    decision = decide_samples(timings(rng, 0.010, 8, noise=0.6), timings(rng, 0.012, 8, noise=0.6), 0.10)
    assert decision.p_value > 0.002
    assert decision.verdict is Verdict.UNCHANGED


def test_smallest_p_values_of_the_exact_test():
    # 2 / C(n + m, n): the two extreme rank arrangements out of all of them.
    assert min_p_value(5, 5) == pytest.approx(2 / 252)
    assert min_p_value(6, 6) == pytest.approx(2 / 924)
    assert min_p_value(7, 7) < 0.002 < min_p_value(6, 6)
    assert min_p_value(1, 1) == 1.0


def test_five_samples_each_fall_back_to_requiring_no_overlap():
    separated = decide_samples([1.00, 1.01, 1.02, 1.03, 1.04], [1.30, 1.31, 1.32, 1.33, 1.34], 0.10)
    assert separated.verdict is Verdict.REGRESSED and "no overlap" in separated.rule
    assert separated.p_value == pytest.approx(2 / 252)
    overlapping = decide_samples([1.00, 1.01, 1.02, 1.03, 1.40], [1.30, 1.31, 1.32, 1.33, 1.34], 0.10)
    assert overlapping.verdict is Verdict.UNCHANGED


def test_three_samples_each_are_too_few_to_judge():
    decision = decide_samples([1.0, 1.01, 1.02], [2.0, 2.01, 2.02], 0.10)
    assert decision.verdict is Verdict.UNCHANGED
    assert "too few" in decision.rule


# Deterministic, single-figure and seeded metrics ----------------------------------------------------------------


def test_deterministic_metrics_count_on_any_change():
    assert decide_exact([1_000_000], [1_000_001], 0.10).verdict is Verdict.REGRESSED
    assert decide_exact([1_000_000], [999_999], 0.10).verdict is Verdict.IMPROVED
    assert decide_exact([1_000_000], [1_000_000], 0.10).verdict is Verdict.UNCHANGED


def test_single_figures_count_beyond_the_threshold():
    assert decide_threshold([100.0], [109.0], 0.10).verdict is Verdict.UNCHANGED
    assert decide_threshold([100.0], [111.0], 0.10).verdict is Verdict.REGRESSED
    assert decide_threshold([0.0], [0.0], 0.10).verdict is Verdict.UNCHANGED


def test_accuracy_is_judged_against_the_spread_of_the_seeds():
    baseline = [70.0, 71.0, 72.0]  # std 1.0
    assert decide_seeds(baseline, [67.0, 68.0, 69.0], 0.10).verdict is Verdict.REGRESSED  # 3 std lower
    assert decide_seeds(baseline, [74.0, 75.0, 76.0], 0.10).verdict is Verdict.IMPROVED
    within = decide_seeds(baseline, [69.5, 70.5, 71.5], 0.10)
    assert within.verdict is Verdict.UNCHANGED and 0.05 < within.p_value < 1


def test_accuracy_of_a_deterministic_trainer_counts_any_change_and_one_seed_uses_the_threshold():
    assert decide_seeds([70.0, 70.0], [69.9, 69.9], 0.10).verdict is Verdict.REGRESSED
    assert decide_seeds([70.0], [69.0], 0.10).verdict is Verdict.UNCHANGED  # 1.4%: within 10%
    assert decide_seeds([70.0], [60.0], 0.10).verdict is Verdict.REGRESSED


def test_threshold_parsing():
    assert parse_threshold("10%") == pytest.approx(0.10)
    assert parse_threshold("0.05") == pytest.approx(0.05)
    for bad in ("10", "ten", "-5%"):
        with pytest.raises(CompareError, match="--threshold"):
            parse_threshold(bad)


def test_values_are_shown_in_their_units():
    assert format_value("latency", 0.0123) == "12.3 ms"
    assert format_value("macs", 146_000_000) == "146 M"
    assert format_value("latency", 1.5) == "1,500 ms"
    assert format_value("latency", None) == "-"


# Comparisons of stores ------------------------------------------------------------------------------------------


def test_cells_are_matched_by_configuration_whatever_the_environment():
    rng = random.Random(4)
    base = [make_record(CONV, latency=timings(rng, 0.010, 20), macs=100, threads=2),
            make_record(DRCONV, latency=timings(rng, 0.020, 20), macs=120, threads=2)]
    cur = [make_record(CONV, latency=timings(rng, 0.015, 20), macs=100, threads=1),
           make_record({**CONV, "width": 1.0}, latency=timings(rng, 0.03, 20), macs=300, threads=1)]
    comparison = compare(side("base", base), side("cur", cur))
    by = {(c.label.split()[2], c.metric, c.label.split()[1]): c.verdict for c in comparison.cells}
    assert by[("conv", "latency", "0.5x")] is Verdict.REGRESSED
    assert by[("conv", "macs", "0.5x")] is Verdict.UNCHANGED
    assert by[("drconv(regions=4)", "latency", "0.5x")] is Verdict.ONLY_BASELINE
    assert by[("conv", "latency", "1x")] is Verdict.ONLY_CURRENT
    assert comparison.environment_differences == ("threads differs: 2 (baseline) vs 1 (current)",)
    assert [c.metric for c in comparison.regressed] == ["latency"]


def drifting_run(rng: random.Random, cell_s: float, machine_speed: list[float]) -> dict:
    """A run on a machine whose speed moves between rounds: cell and reference both slowed by the same factor."""
    cell = [cell_s * factor * math.exp(rng.gauss(0, 0.03)) for factor in machine_speed]
    reference = [0.0005 * factor * math.exp(rng.gauss(0, 0.03)) for factor in machine_speed]
    return make_record(CONV, latency=cell, reference=reference)


def test_a_machine_that_runs_slower_for_a_while_is_not_a_regression_relative_to_the_reference():
    rng = random.Random(7)
    base = drifting_run(rng, 0.010, [1.0] * 20)
    slow_machine = drifting_run(rng, 0.010, [1.6 + 0.2 * math.sin(i) for i in range(20)])
    (row,) = compare(side("base", [base]), side("cur", [slow_machine]), metrics=["latency"]).cells
    assert row.current / row.baseline > 1.4  # the raw medians moved
    assert row.verdict is Verdict.UNCHANGED and row.rule.startswith("vs reference")
    assert 0.9 < row.ratio < 1.1
    raw = [dict(r, metrics={"latency": {k: v for k, v in r["metrics"]["latency"].items() if k != "reference"}})
           for r in (base, slow_machine)]
    (raw_row,) = compare(side("base", raw[:1]), side("cur", raw[1:]), metrics=["latency"]).cells
    assert raw_row.verdict is Verdict.REGRESSED and not raw_row.rule.startswith("vs reference")


def test_a_slower_cell_on_a_steady_reference_is_a_regression():
    rng = random.Random(8)
    base = drifting_run(rng, 0.010, [1.0] * 20)
    slower = drifting_run(rng, 0.013, [1.0] * 20)
    (row,) = compare(side("base", [base]), side("cur", [slower]), metrics=["latency"]).cells
    assert row.verdict is Verdict.REGRESSED and row.rule.startswith("vs reference") and row.ratio > 1.2


def test_raw_samples_are_judged_when_a_side_lacks_the_reference_or_torch_differs():
    rng = random.Random(9)
    calibrated = drifting_run(rng, 0.010, [1.0] * 20)
    plain = make_record(CONV, latency=timings(rng, 0.010, 20))
    (row,) = compare(side("base", [calibrated]), side("cur", [plain]), metrics=["latency"]).cells
    assert not row.rule.startswith("vs reference")
    other_torch = dict(calibrated, env={**calibrated["env"], "torch_version": "2.14.0"})
    comparison = compare(side("base", [calibrated]), side("cur", [other_torch]), metrics=["latency"])
    assert not comparison.cells[0].rule.startswith("vs reference")
    assert any("torch versions differ" in note for note in comparison.notes)


def test_runs_of_a_cell_are_pooled_and_a_cell_that_now_fails_is_a_regression():
    rng = random.Random(5)
    base = [make_record(CONV, latency=timings(rng, 0.010, 20), started="2025-01-01T00:00:00+00:00"),
            make_record(CONV, latency=timings(rng, 0.011, 20), started="2025-01-02T00:00:00+00:00")]
    cur = [make_record(CONV, error="RuntimeError: out of memory")]
    (row,) = compare(side("base", base), side("cur", cur)).cells
    assert row.baseline_n == 40 and 0.010 < row.baseline < 0.011
    assert row.verdict is Verdict.REGRESSED and "out of memory" in row.rule
    (fixed,) = compare(side("cur", cur), side("base", base)).cells
    assert fixed.verdict is Verdict.IMPROVED and "failed before" in fixed.rule
    assert compare(side("a", cur), side("b", cur)).notes == ("1 cells failed on both sides (not compared)",)


def test_outputs_for_tools_and_pull_requests():
    rng = random.Random(6)
    base = [make_record(CONV, latency=timings(rng, 0.010, 20), macs=100)]
    cur = [make_record(CONV, latency=timings(rng, 0.013, 20), macs=100, dirty=True)]
    comparison = compare(side("main", base), side("feature", cur), metrics=["latency"])
    data = json.loads(comparison_json(comparison))
    assert data["counts"]["regressed"] == 1 and data["metrics"] == ["latency"]
    (cell,) = data["cells"]
    assert cell["verdict"] == "regressed" and cell["ratio"] == pytest.approx(1.3, rel=0.05)
    markdown = comparison_markdown(comparison)
    assert "`main` → `feature`" in markdown and "| **regressed** |" in markdown
    assert "uncommitted changes" in markdown


def test_an_unknown_metric_or_a_missing_side_is_a_clear_error(tmp_path):
    records = [make_record(CONV, macs=100)]
    with pytest.raises(CompareError, match="metric latency is on neither side; measured: macs, params"):
        compare(side("a", records), side("b", records), metrics=["latency"])
    with pytest.raises(CompareError, match="neither a results file or folder nor a git commit"):
        resolve_side("no-such-thing", write_store(tmp_path / "results" / "s" / "run.jsonl", records).parent)


def test_sides_can_be_git_refs_with_results_in_the_store(tmp_path):
    first, second = git_repo(tmp_path / "repo", 2)
    rng = random.Random(7)
    store = tmp_path / "results"
    write_store(store / "synthetic" / "run1.jsonl", [make_record(CONV, latency=timings(rng, 0.01, 20), commit=first)])
    write_store(store / "synthetic" / "run2.jsonl", [make_record(CONV, latency=timings(rng, 0.01, 20), commit=second)])
    comparison = compare_results("HEAD~1", "HEAD", results_dir=store, repo=tmp_path / "repo")
    assert comparison.baseline.commits() == [first[:7]] and comparison.current.commits() == [second[:7]]
    assert comparison.counts()["regressed"] == 0
    for repo in (tmp_path / "repo", tmp_path):  # git resolves the prefix; without git, the store's commits do
        assert resolve_side(second[:10], store, repo=repo).commits() == [second[:7]]
    with pytest.raises(CompareError, match="no records of suite 'other'"):
        resolve_side("HEAD", store, suite="other", repo=tmp_path / "repo")
