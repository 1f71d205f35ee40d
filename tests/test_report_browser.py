"""index.html as a user sees it: rendered by headless Chromium from disk, with no server and no network.

A probe page (a copy of index.html beside it, plus a small script) reports after the page loaded: each image's
natural width (0 when it failed to load), the tables, and the first column after the sort script ran on a click.
A screenshot of the real page is kept under test-artifacts/ for people to look at.

Needs Debian's ``chromium`` (``apt-get install -y chromium``); skipped with that reason when it is absent.
"""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from drbench.report import build_report
from report_records import sweep_records, write_store

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

# Quiet, offline, sandbox-free (CI runs as root) and with a profile of its own.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

PROBE = """
<script>
window.addEventListener("load", function () {
  var widths = Array.prototype.map.call(document.images, function (img) {
    return {src: img.getAttribute("src"), width: img.naturalWidth};
  });
  var tables = document.querySelectorAll("table.sortable");
  var width = tables[0].querySelectorAll("th")[1];
  width.click(); width.click();  /* the second click sorts descending */
  var firstColumn = Array.prototype.map.call(tables[0].tBodies[0].rows, function (row) {
    return row.cells[1].textContent;
  });
  var out = document.createElement("pre");
  out.id = "probe";
  var headings = Array.prototype.map.call(tables, function (table) {
    return table.closest("div").previousElementSibling.textContent;
  });
  out.textContent = JSON.stringify({images: widths, tables: headings, sortedWidths: firstColumn});
  document.body.appendChild(out);
});
</script>
"""


def chromium(*arguments: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *arguments],
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    write_store(folder / "results", sweep_records())
    return build_report([folder / "results"], folder / "report")


def test_every_image_loads_and_the_tables_sort(report, tmp_path):
    probe = report.out_dir / "probe.html"
    probe.write_text(report.index_html.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), profile=tmp_path / "profile").stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run; DOM starts with: {dom[:500]}"
    result = json.loads(html.unescape(found.group(1)))
    pngs = {f"plots/{p.name}" for p in report.plot_files if p.suffix == ".png"}
    assert {image["src"] for image in result["images"]} == pngs
    assert all(image["width"] > 0 for image in result["images"]), result["images"]
    assert result["tables"] == ["MACs (M)", "params (M)", "latency (ms)", "throughput (img/s)", "memory (MiB)",
                                "top-1 (%)"]
    assert result["sortedWidths"] == sorted(result["sortedWidths"], key=float, reverse=True)
    assert result["sortedWidths"][0] == "1.0"


def test_screenshot_is_kept_as_an_artifact(report, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    chromium("--virtual-time-budget=10000", "--window-size=1280,4000", f"--screenshot={shot}",
             report.index_html.as_uri(), profile=tmp_path / "profile")
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
