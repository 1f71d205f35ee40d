"""drbench report end to end: the report folder, its warnings, which plots apply, the CLI, a real run."""

import pandas as pd
import pytest
from typer.testing import CliRunner

from drbench.cli import app
from drbench.config import load_config
from drbench.report import build_report
from drbench.runner import run_suite
from drbench.suite import load_suite
from report_records import record, sweep_records, write_store

cli = CliRunner()


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    """The report of a store with every plot's axes (built once: four figures take a few seconds)."""
    folder = tmp_path_factory.mktemp("sweep")
    write_store(folder / "results" / "handmade", sweep_records())
    return build_report([folder / "results"], folder / "report")


@pytest.fixture
def small_store(tmp_path):
    """Two cells of one model: tables and one plot (pareto)."""
    write_store(tmp_path / "results" / "small", [record(op="conv", macs=1_000_000, latency=[0.001] * 5),
                                                 record(op="drconv", macs=1_100_000, latency=[0.002] * 5, regions=4)])
    return tmp_path / "results"


def plot_names(report) -> set[str]:
    return {path.name for path in report.plot_files}


def test_report_folder_has_pages_tables_and_every_applicable_plot(sweep_report):
    report = sweep_report
    for path in (report.index_md, report.index_html, *report.csv_files):
        assert path.is_file() and path.stat().st_size > 0
    assert plot_names(report) == {f"{name}.{ext}" for name in ("gain_vs_size", "pareto", "vs_regions", "vs_input_size")
                                  for ext in ("png", "svg")}
    markdown = report.index_md.read_text()
    assert "### MACs (M)" in markdown and "### top-1 (%)" in markdown
    assert "![Top-1 gain over standard convolution vs model size](plots/gain_vs_size.png)" in markdown
    paired = "+2.00 pts (CI +2.00 to +2.00): better"  # every seed 2 points up: a zero-width interval
    assert f"| shufflenetv2 | 0.5 | 32 | 4 | 65.50 ± 0.71 | 67.50 ± 0.71 | {paired} |" in markdown
    cells = pd.read_csv(report.csv_files[1])
    assert len(cells) == len(sweep_records())
    comparison = pd.read_csv(report.csv_files[0])
    assert "drconv Δ top-1 vs conv (points)" in comparison.columns


def test_header_and_warnings_name_what_a_reader_must_know(sweep_report):
    report = sweep_report
    markdown = report.index_md.read_text()
    assert "- **commit**: 0123456" in markdown
    assert "- **device**: cpu (Test CPU)" in markdown
    messages = [notice.message for notice in report.notices]
    assert "Noisy latency (IQR/median above 10%, marked * in the tables) in 1 of 19 cells:" in messages
    failed = next(n for n in report.notices if "failed" in n.message)
    assert failed.details == ("mobilenetv2 1.0x local input_size=32: ValueError: local needs input_size",)
    assert "ValueError: local needs input_size" in report.index_html.read_text()
    assert not any("mix" in m for m in messages)


def test_a_noisy_cell_whose_reference_was_as_noisy_is_blamed_on_the_machine(tmp_path):
    steady_reference, noisy_reference = [1e-4] * 5, [1e-4, 1.3e-4, 1e-4, 1.3e-4, 1e-4]
    noisy_samples = [0.010, 0.013, 0.010, 0.013, 0.010]
    for reference, blamed in ((noisy_reference, True), (steady_reference, False)):
        write_store(tmp_path / str(blamed), [record(op="conv", latency=noisy_samples, reference=reference)])
        notice = next(n for n in build_report([tmp_path / str(blamed)], tmp_path / f"r{blamed}").notices
                      if n.message.startswith("Noisy latency"))
        assert ("so the machine was" in notice.message) is blamed
        beside = "30%" if blamed else "0%"
        assert notice.details == (f"shufflenetv2 0.5x conv: IQR/median 30% (reference kernel beside it: {beside})",)


def test_mixed_commits_and_machines_and_dirty_trees_are_flagged(tmp_path):
    write_store(tmp_path / "store", [
        record(op="conv", macs=1, commit="a" * 40, machine="left"),
        record(op="drconv", macs=2, commit="b" * 40, machine="right", dirty=True, regions=4),
    ])
    messages = [n.message for n in build_report([tmp_path / "store"], tmp_path / "report").notices]
    assert any("mix 2 commits (aaaaaaa, bbbbbbb (uncommitted changes))" in m for m in messages)
    assert any("mix 2 machines (left, right)" in m for m in messages)
    assert any("uncommitted changes" in m for m in messages if "mix" not in m)


def test_diverged_seeds_are_left_out_of_the_accuracy_and_reported(tmp_path):
    write_store(tmp_path / "store", [record(op="conv", macs=1, top1=[70.0, 72.0]),
                                     record(op="drconv", macs=1, top1=[73.0, None, 75.0], regions=4)])
    report = build_report([tmp_path / "store"], tmp_path / "report")
    diverged = next(n for n in report.notices if "diverged" in n.message)
    assert diverged.details == ("shufflenetv2 0.5x drconv: 1 run(s)",)
    # the paired gain uses seed 0 only: seed 1 diverged for drconv, seed 2 was not run for conv
    assert "| shufflenetv2 | 0.5 | 71.00 ± 1.41 | 74.00 ± 1.41 | +3.00 pts: one seed |" in report.index_md.read_text()


def test_plots_follow_the_axes_present(small_store, tmp_path):
    write_store(tmp_path / "one", [record(op="conv", macs=1_000_000, params=1000)])
    single = build_report([tmp_path / "one"], tmp_path / "single")
    assert single.plot_files == ()
    assert "### MACs (M)" in single.index_md.read_text()  # a suite without plot axes still gets its tables
    assert plot_names(build_report([small_store], tmp_path / "pair")) == {"pareto.png", "pareto.svg"}


def test_a_rebuilt_report_drops_plots_that_no_longer_apply(small_store, tmp_path):
    out = tmp_path / "report"
    build_report([small_store], out)
    write_store(tmp_path / "one", [record(op="conv", macs=1)])
    build_report([tmp_path / "one"], out)
    assert not list((out / "plots").glob("*"))


def test_guided_masks_in_the_results_folder_are_copied_and_linked(small_store, tmp_path):
    (small_store / "small" / "masks-drconv.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    report = build_report([small_store], tmp_path / "report")
    assert [p.name for p in report.mask_files] == ["masks-drconv.png"]
    assert "![guided masks](masks/masks-drconv.png)" in report.index_md.read_text()


def test_default_folder_is_named_after_the_suite(small_store, tmp_path):
    config = load_config(overrides={"paths.reports_dir": str(tmp_path / "reports")})
    report = build_report([small_store], config=config)
    assert report.out_dir == tmp_path / "reports" / "handmade"  # the records' suite, not the folder's name


def test_cli_writes_the_report_and_rejects_missing_paths(small_store, tmp_path):
    result = cli.invoke(app, ["report", str(small_store), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "index.html" in result.output
    assert (tmp_path / "report" / "index.html").is_file()

    missing = cli.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert "nowhere: no such results file or folder" in missing.output

    (tmp_path / "empty").mkdir()
    empty = cli.invoke(app, ["report", str(tmp_path / "empty")])
    assert empty.exit_code == 2
    assert "no results records" in empty.output


@pytest.mark.slow
def test_report_of_a_real_run(tmp_path):
    """The runner's own records (not hand-made ones) make a report with the measured numbers."""
    suite_file = tmp_path / "tiny.yaml"
    suite_file.write_text(
        "name: tiny\n"
        "description: two cells\n"
        "fixed: {input_size: 32, small_input: true, num_classes: 10, device: cpu}\n"
        "axes: {model: [shufflenetv2], width: [0.5], op: [conv, drconv], regions: [4]}\n"
        "metrics: {macs: {}, params: {}, latency: {budget_s: 0.05, warmup: 1, min_blocks: 3}}\n"
    )
    config = load_config(overrides={"paths.results_dir": str(tmp_path / "results")})
    summary = run_suite(load_suite(suite_file, config), config)
    assert summary.ok == 2
    report = build_report([tmp_path / "results" / "tiny"], tmp_path / "report")
    cells = pd.read_csv(report.csv_files[1]).set_index("op")
    assert cells.loc["drconv", "macs_m"] > cells.loc["conv", "macs_m"] > 0
    assert cells.loc["conv", "latency_ms"] > 0
    markdown = report.index_md.read_text()
    assert f"{cells.loc['conv', 'macs_m']:.2f}"[:3] in markdown
    assert plot_names(report) == {"pareto.png", "pareto.svg"}


def test_a_region_sweep_with_a_default_cell_plots_the_counts_and_tables_the_default(tmp_path):
    write_store(tmp_path / "results" / "sweep", [
        record(op="conv", macs=1_000_000, latency=[0.001] * 5),
        *(record(op="drconv", macs=1_000_000 + m * 100_000, latency=[0.002] * 5, regions=m) for m in (2, 4)),
        record(op="drconv", macs=1_900_000, latency=[0.003] * 5),  # regions left at the operator's default
    ])
    report = build_report([tmp_path / "results"], tmp_path / "report")
    assert {"vs_regions.png", "pareto.png"} <= plot_names(report)
    assert "| shufflenetv2 | 0.5 | default | 1.00 | 1.90 | +90.0% |" in report.index_md.read_text()


def test_accuracy_trained_under_different_protocols_is_flagged(tmp_path):
    five, eight = {"epochs": 5, "clip_grad_norm": 2.0}, {"epochs": 8, "clip_grad_norm": 0.0, "agc_factor": 0.1}
    write_store(tmp_path / "same", [record(op="conv", top1=[70.0, 72.0], recipe=five),
                                    record(op="drconv", top1=[60.0, 61.0], recipe=five, regions=4)])
    assert not [n for n in build_report([tmp_path / "same"], tmp_path / "r1").notices if "protocols" in n.message]
    write_store(tmp_path / "mixed", [record(op="conv", top1=[90.0, 91.0], recipe=eight),
                                     record(op="drconv", top1=[60.0, 61.0], recipe=five, regions=4)])
    notice = next(n for n in build_report([tmp_path / "mixed"], tmp_path / "r2").notices if "protocols" in n.message)
    assert "2 different protocols" in notice.message
    assert notice.details == ("agc_factor=0.1, clip_grad_norm=0.0, epochs=8: shufflenetv2 0.5x conv",
                              "agc_factor=unset, clip_grad_norm=2.0, epochs=5: shufflenetv2 0.5x drconv")
