"""A metric defined in one file (metric_plugin.py) appears with its unit in show, report and compare, judged by its
own rule, with no other module touched."""

from __future__ import annotations

import metric_plugin
from typer.testing import CliRunner

from drbench.cli import app
from report_records import record, write_store

runner = CliRunner()


def energy_record(joules: float, **fields) -> dict:
    stored = record(macs=1_000_000, **fields)
    stored["metrics"]["energy"] = {"value": joules, "samples": [joules] * 3}
    return stored


def test_a_plugin_metric_is_shown_reported_and_compared_in_its_unit_by_its_own_rule(tmp_path):
    base = write_store(tmp_path / "results" / "base", [energy_record(0.002)])
    current = write_store(tmp_path / "results" / "current", [energy_record(0.0021)])  # +5%: below the threshold

    shown = runner.invoke(app, ["show", str(base)])
    assert shown.exit_code == 0 and "energy" in shown.output and "2 mJ" in shown.output

    compared = runner.invoke(app, ["compare", str(base), str(current), "--format", "markdown"])
    assert compared.exit_code == 1, compared.output  # the plugin's rule: any rise regresses
    assert "| energy | 2 mJ | 2.1 mJ | 1.050x | - | **regressed** | " + metric_plugin.RULE + " |" in compared.output

    reported = runner.invoke(app, ["report", str(base), "--out", str(tmp_path / "report")])
    assert reported.exit_code == 0, reported.output
    page = (tmp_path / "report" / "index.md").read_text()
    assert "### energy (mJ)" in page and "| 2.00 |" in page
    header, row = (tmp_path / "report" / "cells.csv").read_text().splitlines()
    assert header.endswith(",energy.shown") and row.endswith(",2.0")
