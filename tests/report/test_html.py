"""report.html on the micro study's storage: self-contained (nothing fetched from a network), and rendered by a
real headless Chromium (Debian's package, installed with apt when missing): every table a DataTable with its
search box, every figure a Plotly figure, no console message; a screenshot shows it."""

import os
import re
import shutil
import subprocess

import pytest

from raysys import cli
from raysys.report.scope import StudyRows
from raysys.report.tables import table_sections
from raysys.storage.study import load_saved_study, save_study

FIGURES = 6  # the micro study draws all six


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            try:
                done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
            except (OSError, subprocess.TimeoutExpired) as err:
                pytest.skip(f"cannot install chromium with apt: {err}")
            if done.returncode:
                pytest.skip(f"cannot install chromium with apt: {done.stderr.strip()[-500:]}")
        found = shutil.which("chromium")
    return found


@pytest.fixture(scope="module")
def report(micro_run, tmp_path_factory):
    study, store, _ = micro_run
    save_study(study, store)  # other tests run variants of the study on this storage
    out = tmp_path_factory.mktemp("html")
    assert cli.main(["report", str(store.root), "--out", str(out)]) == 0
    sections = table_sections(StudyRows(load_saved_study(store), store))
    return out / "report.html", sections


def _chromium(binary: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                           "--enable-logging=stderr", "--v=1", *args], capture_output=True, text=True, timeout=180,
                          check=False)


def test_the_html_report_is_one_self_contained_page(report):
    path, sections = report
    page = path.read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']?(https?:)?//", page)  # nothing fetched
    assert not re.search(r"import[^;]*from\s*['\"]https?://", page)
    for section in sections:
        assert section.title in page.replace("&#x27;", "'").replace("&amp;", "&")
    assert len(re.findall(r'<div id="figure-\d+"', page)) == FIGURES
    assert "seeds %{customdata" in page and "cell %{customdata[0]}" in page  # hover names seeds and cells


def test_chromium_renders_every_table_and_figure_without_a_console_message(report, chromium, tmp_path):
    path, sections = report
    run = _chromium(chromium, "--dump-dom", path.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    tables = 1 + sum(bool(s.rows) for s in sections)  # the findings, then each summary with rows
    assert dom.count('class="dt-container') == tables and dom.count('class="dt-search"') == tables
    assert len(re.findall(r'class="plot-container plotly"', dom)) == FIGURES
    findings = dom[dom.index('id="findings"'):]
    assert findings[:findings.index("</tbody>")].count("<tr") == 1 + 7  # the header row and the seven claims
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []

    shot = tmp_path / "report.png"
    run = _chromium(chromium, f"--screenshot={shot}", "--window-size=1280,4000", path.as_uri())
    assert run.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1280, 4000)
    low, high = image.getextrema()
    assert high - low > 100  # drawn, not a blank page
