"""The report in a real browser (headless Chromium): nothing is wider than a printed A4 page, and it prints.

Skipped, saying so, where Chromium is not installed (Debian: `apt-get install chromium`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from perceptcore import report
from test_report import fit_table, make_study, make_tables

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")

# A4 (210 mm) less the report's 12 mm print margins, in CSS pixels (96 per inch).
PAGE_WIDTH = round((210 - 2 * 12) / 25.4 * 96)
# Opens every <details>, then lists every element reaching past the viewport's right edge.
PROBE = """<script>window.addEventListener('load', () => {
  document.querySelectorAll('details').forEach(d => d.open = true);
  const width = document.documentElement.clientWidth, wide = [];
  for (const el of document.body.querySelectorAll('*')) {
    const right = el.getBoundingClientRect().right;
    if (right > width + 1) wide.push(el.tagName + ' ' + Math.round(right) + ' ' + el.textContent.slice(0, 40));
  }
  document.body.setAttribute('data-probe', JSON.stringify({width: width, wide: wide}));
});</script>"""


def chromium(*args):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args], capture_output=True,
                          text=True, timeout=120)


def overflowing(page_path, tmp_path) -> dict:
    probe = tmp_path / "probe.html"
    probe.write_text(page_path.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(f"--window-size={PAGE_WIDTH},1000", "--dump-dom", probe.as_uri()).stdout
    found = re.search(r"data-probe=\"([^\"]*)\"", dom)
    assert found, dom[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture(scope="module")
def wide_report(tmp_path_factory):
    """A report with six observer groups, long names and long fit notes: what could widen a table."""
    folder = tmp_path_factory.mktemp("browser")
    observers = ("radiologists", "dnn", "gmic_trained_unperturbed_images",
                 "gmic_trained_filtered_images_at_each_severity", "dmv_trained_unperturbed", "dmv_trained_filtered")
    study = make_study(observers=observers, converged=False)
    fits = fit_table(study).assign(convergence="Laplace approximation " * 40, pareto_k=0.93, importance_ess=12.5,
                                   log_evidence=-12345.678)
    report.write(study, make_tables(observers=observers, observed_p=0.01), fits, folder)
    return folder / "report.html"


def test_no_element_is_wider_than_a_printed_page(wide_report, tmp_path):
    probe = overflowing(wide_report, tmp_path)
    assert probe["width"] <= PAGE_WIDTH and probe["wide"] == []


def test_the_probe_sees_a_wide_table(wide_report, tmp_path):
    # the check above can fail: a table that cannot shrink is caught
    widened = tmp_path / "widened.html"
    widened.write_text(wide_report.read_text().replace("<h1>", "<table><tr><td><div style='width:900px'>x</div>"
                                                       "</td></tr></table><h1>", 1))
    assert any(item.startswith("TABLE") for item in overflowing(widened, tmp_path)["wide"])


def test_it_prints_to_pdf(wide_report, tmp_path):
    pdf = tmp_path / "report.pdf"
    chromium("--no-pdf-header-footer", f"--print-to-pdf={pdf}", wide_report.as_uri())
    data = pdf.read_bytes()
    pages = len(re.findall(rb"/Type\s*/Page(?!s)", data))
    assert data.startswith(b"%PDF") and pages >= 2, pages


def assert_fits_a_page_with_its_summary(report_html, tmp_path, observers):
    """A real run's report: the summary matrix has a row per observer group, and nothing is wider than A4."""
    page = report_html.read_text()
    matrix = page.split("id='summary-matrix'")[1].split("</table>")[0]
    assert all(f"data-observer='{name}'" in matrix for name in observers)
    probe = overflowing(report_html, tmp_path)
    assert probe["width"] <= PAGE_WIDTH and probe["wide"] == [], probe["wide"][:5]
