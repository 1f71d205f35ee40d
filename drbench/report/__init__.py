"""``drbench report``: turn results stores into a folder of tables, plots, ``index.md`` and ``index.html``.

The folder (default ``<paths.reports_dir>/<suite name>/``) holds::

    index.md, index.html     the report (the HTML opens from disk: inline styles, images beside it)
    comparison.csv           one row per configuration, "<op> <quantity>" columns, deltas against conv
    cells.csv                one row per measured cell: configuration, status, metrics in display units, environment
    plots/<name>.png, .svg   the figures that apply to the axes present (see drbench.report.plots)
    masks/*.png              guided-mask images (``drbench masks``) found in the results folders, if any

Modules: :mod:`~drbench.report.cells` (reading and normalising), :mod:`~drbench.report.tables`,
:mod:`~drbench.report.plots`, :mod:`~drbench.report.provenance` (header and warnings),
:mod:`~drbench.report.render` (Markdown and HTML).

>>> report = build_report(["results/quick"])
>>> report.index_html, [path.name for path in report.csv_files]
(PosixPath('reports/quick/index.html'), ['comparison.csv', 'cells.csv'])
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import pandas as pd

import drbench
from drbench.config import Config, load_config
from drbench.record import SUITE_NAME_MAX
from drbench.report.cells import Results, format_setting, load_results, other_quantities, shown_column
from drbench.report.plots import make_plots, save_plot
from drbench.report.provenance import Notice, provenance, report_warnings
from drbench.report.render import Figure, Page, render_html, render_markdown
from drbench.report.tables import comparison_table, display_tables, flat_columns
from drbench.textsafe import one_line, spreadsheet_text

PLOTS_DIR = "plots"
MASKS_DIR = "masks"
MASK_PATTERN = "*mask*.png"
"""Guided-mask images in a results folder that the report shows (``drbench masks --out results/<suite>/...``)."""

TABLE_NOTE = ("One row per configuration, one column group per operator. Latency: median (IQR) in ms, * marks a "
              "noisy cell (IQR/median above 10%). Top-1: mean ± std over seeds. \"vs conv\" compares with standard "
              "convolution in the same row: MACs and params in %, latency as a ratio, top-1 in points: the mean of "
              "the per-seed differences (a seed gives every operator the same data order and augmentation), its "
              "95% confidence interval and the verdict (better or worse when the interval excludes 0).")

CELL_COLUMNS = ("status", "error", "macs_m", "params_m", "latency_ms", "latency_iqr_ms", "throughput",
                "train_step_ms", "train_step_iqr_ms", "memory_mib", "top1", "top1_std", "top1_seeds",
                "config_hash", "env.git_commit", "env.git_dirty", "env.machine", "env.device_name", "env.threads",
                "env.torch_version", "env.time")


@dataclass(frozen=True)
class Report:
    """The files of a written report, and the warnings it shows."""

    out_dir: Path
    index_md: Path
    index_html: Path
    csv_files: tuple[Path, ...]
    plot_files: tuple[Path, ...]
    mask_files: tuple[Path, ...]
    notices: tuple[Notice, ...]


def build_report(
    results_paths: Iterable[str | Path], out_dir: str | Path | None = None, *, config: Config | None = None
) -> Report:
    """Read the results files or folders, write the report folder, return what was written.

    ``out_dir`` defaults to ``<paths.reports_dir>/<suite>`` of ``config`` (drbench.toml); results of several
    suites go to ``<suite>+<suite>``. Raises ``ValueError`` when there are no records and ``FileNotFoundError``
    for a path that does not exist.
    """
    results = load_results(results_paths)
    out = Path(out_dir) if out_dir is not None else default_out_dir(results, config or load_config())
    out.mkdir(parents=True, exist_ok=True)
    _clear(out / PLOTS_DIR, "*.png", "*.svg")
    _clear(out / MASKS_DIR, "*.png")

    table = comparison_table(results.cells, results.config_keys)
    csv_files = (out / "comparison.csv", out / "cells.csv")
    write_csv(flat_columns(table) if not table.empty else pd.DataFrame(), csv_files[0])
    write_csv(cells_frame(results), csv_files[1])

    figures, plot_files = [], []
    for plot in make_plots(results.cells, results.config_keys):
        png, svg = save_plot(plot, out / PLOTS_DIR)
        plot_files += [png, svg]
        figures.append(Figure(plot.title, plot.caption, f"{PLOTS_DIR}/{png.name}", f"{PLOTS_DIR}/{svg.name}"))
    mask_files = _copy_masks(results.sources, out / MASKS_DIR)

    notices = report_warnings(results)
    page = Page(
        title=f"drbench report: {' + '.join(results.suites) or 'results'}",
        header=provenance(results).as_items(),
        notices=notices,
        tables=display_tables(table) if not table.empty else {},
        plots=figures,
        masks=[f"{MASKS_DIR}/{m.name}" for m in mask_files],
        files=[f.name for f in csv_files],
        table_note=TABLE_NOTE,
        generated=f"drbench {drbench.__version__}, {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
    )
    index_md, index_html = out / "index.md", out / "index.html"
    index_md.write_text(render_markdown(page), encoding="utf-8")
    index_html.write_text(render_html(page), encoding="utf-8")
    return Report(out, index_md, index_html, csv_files, tuple(plot_files), tuple(mask_files), tuple(notices))


def default_out_dir(results: Results, config: Config) -> Path:
    """``<paths.reports_dir>/<suite>[+<suite>...]``: suite names are plain folder names (every record read was
    validated, :func:`drbench.record.check_suite_name`), so the folder is always inside the reports folder; a
    joined name too long for a file system is ``results``."""
    name = "+".join(results.suites)
    return Path(config.get("paths.reports_dir")) / (name if 0 < len(name) <= SUITE_NAME_MAX else "results")


def cells_frame(results: Results) -> pd.DataFrame:
    """One row per cell for ``cells.csv``: configuration (an (H, W) size as ``HxW``), then CELL_COLUMNS, then the
    headline of each other registered metric measured (``<name>.shown``, in its unit)."""
    keys = [k for k in results.config_keys if k in results.cells]
    others = [shown_column(q) for q in other_quantities()]
    measured = [c for c in others if c in results.cells and results.cells[c].notna().any()]
    frame = results.cells[keys + [c for c in CELL_COLUMNS if c in results.cells] + measured].copy()
    for key in keys:
        frame[key] = pd.Series([format_setting(v) if isinstance(v, tuple) else v for v in frame[key]],
                               index=frame.index, dtype=object)
    return frame


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` as CSV, every text cell and header made safe for spreadsheets (no formulas, one line each)."""
    safe = frame.rename(columns=lambda column: spreadsheet_text(one_line(str(column))))
    text_columns = [c for c in safe.columns if not pd.api.types.is_numeric_dtype(safe[c])]
    for column in text_columns:  # cell by cell: mapping would turn ints beside None to floats
        safe[column] = pd.Series([spreadsheet_text(one_line(v)) if isinstance(v, str) else v for v in safe[column]],
                                 index=safe.index, dtype=object)
    safe.to_csv(path, index=False)


def _copy_masks(sources: Iterable[Path], directory: Path) -> list[Path]:
    """The mask images of the results folders, copied into the report. Only regular files: a results folder that
    travelled (an artifact, an archive) could hold a link named like a mask that points at any file of the user's,
    which the report would then carry."""
    found = {}
    for source in sources:
        folder = source if source.is_dir() else source.parent
        found.update({path.name: path for path in sorted(folder.rglob(MASK_PATTERN))
                      if path.is_file() and not path.is_symlink()})
    if found:
        directory.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(path, directory / name)) for name, path in found.items()]


def _clear(directory: Path, *patterns: str) -> None:
    """Remove a previous report's generated files, so that a plot that no longer applies does not linger."""
    for pattern in patterns:
        for path in directory.glob(pattern):
            path.unlink()


__all__ = ["Report", "build_report", "default_out_dir", "cells_frame"]
