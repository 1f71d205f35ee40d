"""The report's Pareto front goes only through values the report itself trusts: not one-seed smoke-test accuracy,
not accuracy at chance, not noisy latency."""

from __future__ import annotations

import pandas as pd

from drbench.report.plots import pareto


def cells(top1: list[float], seeds: int, num_classes: int = 10) -> pd.DataFrame:
    return pd.DataFrame({
        "model": "shufflenetv2", "op": ["conv", "condconv", "drconv"], "macs_m": [10.9, 11.4, 12.0],
        "top1": top1, "top1_std": [1.0] * 3, "top1_seeds": seeds, "num_classes": num_classes,
    })


def legend_labels(plot) -> list[str]:
    return [text.get_text() for text in plot.figure.axes[0].get_legend().get_texts()]


def test_one_seed_smoke_test_accuracy_below_chance_draws_no_front():
    plot = pareto(cells([6.25, 12.5, 4.69], seeds=1), ["model", "op"])
    assert "Pareto front" not in legend_labels(plot) and "left out of the front" in legend_labels(plot)
    assert "no Pareto front" in plot.title
    assert "Crossed: 3 of 3 cells with a single seed" in plot.caption and "too few cells remain" in plot.caption


def test_accuracy_over_several_seeds_above_chance_has_its_front_and_chance_level_cells_stay_off_it():
    plot = pareto(cells([32.9, 36.0, 35.4], seeds=3), ["model", "op"])
    assert "Pareto front" in legend_labels(plot) and "left out of the front" not in legend_labels(plot)
    assert "no Pareto front" not in plot.title

    at_chance = pareto(cells([32.9, 36.0, 10.0], seeds=3), ["model", "op"])
    assert "Pareto front" in legend_labels(at_chance) and "Crossed: 1 of 3 cells" in at_chance.caption


def test_noisy_latency_is_left_out_of_the_latency_front():
    frame = cells([float("nan")] * 3, seeds=0).assign(
        latency_ms=[3.0, 5.0, 6.0], latency_q1_ms=[2.9, 4.0, 5.9], latency_q3_ms=[3.1, 6.0, 6.1],
        latency_rel_iqr=[0.05, 0.4, 0.03])
    plot = pareto(frame, ["model", "op"])
    assert "Crossed: 1 of 3 cells with noisy latency" in plot.caption and "Pareto front" in legend_labels(plot)
