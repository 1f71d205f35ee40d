"""Table builders of drbench report on hand-made results with known answers."""

import math

import numpy as np
import pandas as pd
import pytest

from drbench.report.cells import is_missing, latest_cells, records_frame
from drbench.report.plots import pareto_front
from drbench.report.tables import comparison_table, display_tables, flat_columns, row_keys, significant
from report_records import record

KEYS = ("model", "width", "op", "input_size", "placement", "small_input", "num_classes", "batch_size", "dtype",
        "device", "regions", "experts")


def cells_of(*records: dict) -> pd.DataFrame:
    """The cells frame of these records, built as from a store: ``load()``'s rows, then the latest of each."""
    return latest_cells(*records_frame(records))


def table_of(*records: dict) -> pd.DataFrame:
    frame, keys = records_frame(records)
    return comparison_table(latest_cells(frame, keys), keys)


def test_macs_delta_of_exactly_ten_percent():
    table = table_of(record(op="conv", macs=10_000_000, params=1_000_000),
                     record(op="drconv", macs=11_000_000, params=1_500_000, regions=8))
    row = table.loc[("shufflenetv2", 0.5)]
    assert row[("conv", "MACs (M)")] == 10.0
    assert row[("drconv", "MACs (M)")] == 11.0
    assert row[("drconv", "Δ MACs vs conv (%)")] == pytest.approx(10.0, abs=1e-12)
    assert row[("drconv", "Δ params vs conv (%)")] == pytest.approx(50.0, abs=1e-12)
    assert ("conv", "Δ MACs vs conv (%)") not in table.columns  # conv is the baseline, it has no delta
    shown = display_tables(table)["MACs (M)"]
    assert shown.loc[0, "drconv vs conv"] == "+10.0%"
    assert shown.loc[0, "conv"] == "10.0"


def test_top1_gain_of_exactly_two_points_with_seed_spread():
    table = table_of(record(op="conv", macs=1, top1=[70.0, 72.0]),
                     record(op="drconv", macs=1, top1=[72.0, 74.0], regions=8))
    row = table.loc[("shufflenetv2", 0.5)]
    assert row[("drconv", "Δ top-1 vs conv (points)")] == pytest.approx(2.0, abs=1e-12)
    assert row[("drconv", "top-1 std (%)")] == pytest.approx(math.sqrt(2))  # sample std of 72, 74
    shown = display_tables(table)["top-1 (%)"]
    assert shown.loc[0, "drconv"] == "73.00 ± 1.41"
    assert shown.loc[0, "drconv vs conv"] == "+2.00 pts (CI +2.00 to +2.00): better"  # seeds pair: 2 points each


def test_top1_gain_is_paired_over_seeds_with_a_confidence_interval():
    # per-seed differences +3, +1, -1: mean +1, t(0.975, 2) * 2 / sqrt(3) = 4.97 either side
    table = table_of(record(op="conv", macs=1, top1=[60.0, 62.0, 64.0]),
                     record(op="drconv", macs=1, top1=[63.0, 63.0, 63.0], regions=8),
                     record(op="condconv", macs=1, top1=[61.0, 63.5, 65.5], experts=8))
    row = table.loc[("shufflenetv2", 0.5)]
    assert row[("drconv", "Δ top-1 vs conv (points)")] == pytest.approx(1.0)
    assert row[("drconv", "Δ top-1 vs conv (points) 95% CI low")] == pytest.approx(1.0 - 4.9682, abs=1e-3)
    assert row[("drconv", "Δ top-1 vs conv (points) 95% CI high")] == pytest.approx(1.0 + 4.9682, abs=1e-3)
    assert row[("drconv", "top-1 vs conv: verdict")] == "no difference"
    # differences +1, +1.5, +1.5: small spread, the interval excludes 0
    assert row[("condconv", "top-1 vs conv: verdict")] == "better"
    shown = display_tables(table)["top-1 (%)"]
    assert shown.loc[0, "drconv vs conv"] == "+1.00 pts (CI -3.97 to +5.97): no difference"


def test_a_paired_gain_uses_only_seeds_both_operators_finished():
    table = table_of(record(op="conv", macs=1, top1=[60.0, 62.0, None]),
                     record(op="drconv", macs=1, top1=[None, 65.0, 70.0], regions=8))
    row = table.loc[("shufflenetv2", 0.5)]
    assert row[("drconv", "Δ top-1 vs conv (points)")] == pytest.approx(3.0)  # seed 1 only, not 67.5 - 61
    assert row[("drconv", "top-1 vs conv: verdict")] == "one seed"
    assert display_tables(table)["top-1 (%)"].loc[0, "drconv vs conv"] == "+3.00 pts: one seed"


def test_a_single_seed_has_no_spread():
    table = table_of(record(op="conv", macs=1, top1=[70.0]))
    assert math.isnan(table.loc[("shufflenetv2", 0.5), ("conv", "top-1 std (%)")])
    assert display_tables(table)["top-1 (%)"].loc[0, "conv"] == "70.00"


def test_latency_median_iqr_ratio_and_noise_flag():
    conv = [0.001, 0.002, 0.003, 0.004, 0.005]  # median 3 ms, quartiles 2 and 4 ms
    drconv = [0.0089, 0.0090, 0.0090, 0.0091, 0.0090]  # median 9 ms, quiet
    table = table_of(record(op="conv", latency=conv), record(op="drconv", latency=drconv, regions=8))
    row = table.loc[("shufflenetv2", 0.5)]
    assert row[("conv", "latency (ms)")] == pytest.approx(3.0)
    assert row[("conv", "latency IQR (ms)")] == pytest.approx(2.0)
    assert row[("drconv", "latency (x conv)")] == pytest.approx(3.0)
    shown = display_tables(table)["latency (ms)"]
    assert shown.loc[0, "conv"] == "3.00 (IQR 2.0)*"  # IQR/median 67% > 10%: noisy
    assert shown.loc[0, "drconv"] == "9.00 (IQR 0)"
    assert shown.loc[0, "drconv vs conv"] == "3.00x"
    assert display_tables(table)["throughput (img/s)"].loc[0, "conv"] == "333"


def test_conv_sits_beside_every_region_count_of_its_model():
    table = table_of(record(op="conv", macs=10_000_000),
                     *(record(op="drconv", macs=10_000_000 + m * 1_000_000, regions=m) for m in (2, 4)))
    assert table.index.names == ["model", "width", "regions"]
    assert list(table.index) == [("shufflenetv2", 0.5, 2), ("shufflenetv2", 0.5, 4)]
    assert list(table[("conv", "MACs (M)")]) == [10.0, 10.0]
    assert list(table[("drconv", "Δ MACs vs conv (%)")]) == pytest.approx([20.0, 40.0])
    assert list(display_tables(table)["MACs (M)"]["regions"]) == ["2", "4"]  # integers stay integers


def test_a_configuration_without_a_fuller_row_keeps_its_own():
    table = table_of(record(width=0.5, op="conv", macs=1_000_000),
                     *(record(width=0.5, op="drconv", macs=2_000_000, regions=m) for m in (4, 8)),
                     record(width=2.0, op="conv", macs=8_000_000))
    assert list(table.index[:2]) == [("shufflenetv2", 0.5, 4), ("shufflenetv2", 0.5, 8)]
    assert table.index[2][:2] == ("shufflenetv2", 2.0) and is_missing(table.index[2][2])  # conv has no regions
    assert table[("conv", "MACs (M)")].iloc[2] == 8.0
    assert math.isnan(table[("drconv", "MACs (M)")].iloc[2])


def test_a_cell_left_at_its_operators_default_is_a_row_of_its_own():
    table = table_of(record(op="drconv", macs=1_000_000),  # the operator's default region count, not stored
                     *(record(op="drconv", macs=m * 1_000_000, regions=m) for m in (4, 8)))
    assert list(table.index) == [("shufflenetv2", 0.5, 4), ("shufflenetv2", 0.5, 8), ("shufflenetv2", 0.5, "default")]
    assert table[("drconv", "MACs (M)")].tolist() == [4.0, 8.0, 1.0]


def test_an_init_ablation_merged_with_default_cells_shows_every_cell_once_beside_conv():
    """fig4's cells leave ``init`` at its default; the ablation's set it, differently per operator."""
    top1 = {"conv": [80.0, 82.0, 84.0], "drconv": [40.0, 41.0, 42.0], "condconv": [70.0, 71.0, 72.0],
            "independent": [30.0, 30.5, 31.0], "scaled": [85.0, 86.0, 87.0]}
    table = table_of(record(op="conv", top1=top1["conv"]),
                     record(op="drconv", regions=8, top1=top1["drconv"]),
                     record(op="condconv", experts=8, top1=top1["condconv"]),
                     record(op="drconv", regions=8, init="independent", guide_bias=True, top1=top1["independent"]),
                     record(op="condconv", experts=8, init="scaled", top1=top1["scaled"]))
    assert table.index.names == ["model", "width", "init", "guide_bias"]
    rows = {row[2]: table.loc[row] for row in table.index}
    assert set(rows) == {"default", "independent", "scaled"}
    shown = {(init, op): rows[init][(op, "top-1 (%)")] for init in rows for op in ("conv", "drconv", "condconv")}
    assert shown[("default", "drconv")] == pytest.approx(41.0)
    assert shown[("default", "condconv")] == pytest.approx(71.0)
    assert shown[("independent", "drconv")] == pytest.approx(30.5)
    assert math.isnan(shown[("independent", "condconv")])
    assert shown[("scaled", "condconv")] == pytest.approx(86.0)
    assert math.isnan(shown[("scaled", "drconv")])
    assert all(shown[(init, "conv")] == pytest.approx(82.0) for init in rows)  # conv takes no init: in every row
    assert rows["independent"][("drconv", "Δ top-1 vs conv (points)")] == pytest.approx(-51.5)


def test_rows_sort_numbers_ascending_and_models_in_measured_order():
    records = [record(model, width, "conv", macs=1) for model in ("shufflenetv2", "mobilenetv2")
               for width in (1.0, 0.5)]
    table = table_of(*records)
    assert list(table.index) == [("shufflenetv2", 0.5), ("shufflenetv2", 1.0), ("mobilenetv2", 0.5),
                                 ("mobilenetv2", 1.0)]


def test_varying_settings_become_row_keys():
    cells = cells_of(record(op="conv", macs=1, input_size=16), record(op="conv", macs=4, input_size=32))
    assert row_keys(cells, KEYS) == ["model", "width", "input_size"]


def test_accuracy_columns_only_where_measured():
    table = table_of(record(op="conv", macs=1, params=1))
    quantities = set(table.columns.get_level_values("quantity"))
    assert quantities == {"MACs (M)", "params (M)"}
    assert list(display_tables(table)) == ["MACs (M)", "params (M)"]


def test_failed_cells_are_left_out_and_the_latest_record_wins():
    table = table_of(
        record(op="conv", macs=5_000_000, started="2026-01-01T00:00:00+00:00"),
        record(op="conv", macs=10_000_000, started="2026-01-02T00:00:00+00:00"),  # measured again: wins
        record(op="drconv", error="RuntimeError: out of memory", regions=8),
    )
    assert table[("conv", "MACs (M)")].tolist() == [10.0]
    assert "drconv" not in table.columns.get_level_values("op")


def test_flat_csv_round_trip(tmp_path):
    table = table_of(record(op="conv", macs=10_000_000), record(op="drconv", macs=11_000_000, regions=8))
    path = tmp_path / "comparison.csv"
    flat_columns(table).to_csv(path, index=False)
    loaded = pd.read_csv(path)
    assert list(loaded.columns[:2]) == ["model", "width"]
    assert loaded.loc[0, "drconv Δ MACs vs conv (%)"] == pytest.approx(10.0)


def test_significant_digits():
    assert [significant(v) for v in (146.03, 10.904, 0.35204, 1234.5, 0.0)] == ["146", "10.9", "0.352", "1234", "0"]


def test_pareto_front_keeps_only_undominated_points():
    macs = np.array([10.0, 11.0, 12.0, 20.0, 21.0])
    top1 = np.array([60.0, 59.0, 63.0, 63.0, 70.0])
    assert pareto_front(macs, top1, higher_is_better=True) == [0, 2, 4]
    latency = np.array([5.0, 4.0, 6.0, 3.0, 3.0])
    assert pareto_front(macs, latency, higher_is_better=False) == [0, 1, 3]
