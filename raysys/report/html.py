"""report.html: the report as one self-contained page — the findings and every summary table as sortable,
searchable tables (DataTables, through itables), the figures as interactive Plotly figures. Both libraries are
embedded, so the page works offline, from a file or from a bucket (no CDN)."""

from __future__ import annotations

import html
from pathlib import Path

from raysys.report import interactive
from raysys.report.findings import Finding
from raysys.report.scope import StudyRows
from raysys.report.tables import Section
from raysys.storage.store import atomic_write_bytes

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1280px; margin: 1em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; } h3 { font-size: 1.05em; }
.scope { color: #555; } figure { margin: 1em 0; } section.table { margin-bottom: 2em; }
"""


def _datatable(frame, table_id: str) -> str:
    from itables import to_html_datatable

    # a search box, sorting by any column, and a filter per column (in its footer), whatever the table's size (a
    # layout other than itables' default, which drops the controls of a table that fits one page)
    return to_html_datatable(frame, connected=False, table_id=table_id, classes="display compact",
                             layout={"topStart": "info", "topEnd": "search", "bottomStart": "pageLength",
                                     "bottomEnd": "paging"}, column_filters="footer", lengthMenu=[10, 25, 100],
                             pageLength=25, allow_html=False)


def _frame(header: list[str], rows: list[list]):
    import pandas as pd

    # DataTables needs unique column names; the cells are shown as text, as in report.md
    names = [f"{h} ({i})" if header.count(h) > 1 else h for i, h in enumerate(header)]
    return pd.DataFrame([[str(c) for c in row] for row in rows], columns=names)


def _findings_frame(claims: list[Finding]):
    return _frame(["claim of the paper", "verdict here", "pooled effect [interval], n", "evidence", "rule"],
                  [[f.claim, f.verdict, f.effect, f.evidence, f.rule] for f in claims])


def write_html(scope: StudyRows, out_dir: Path, claims: list[Finding], sections: list[Section],
               best_knobs: dict) -> Path:
    """`<out_dir>/report.html`: what report.md holds, browsable."""
    import plotly.offline
    from itables import options
    from itables.javascript import generate_init_offline_itables_html

    title = f"raysys report: study '{scope.study.name}'"
    body = [f"<h1>{html.escape(title)}</h1>", *(f'<p class="scope">{html.escape(line)}</p>' for line in scope.describe()),
            "<h2>Findings: the paper's claims against this study's data</h2>",
            _datatable(_findings_frame(claims), "findings"), '<h2 id="figures">Figures</h2>']
    for index, (name, _, draw) in enumerate(interactive.report_figures(best_knobs)):
        fig = draw(scope)
        if fig is not None:
            body += [f"<figure><h3>{html.escape(name)}</h3>",
                     fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{index}"), "</figure>"]
    body.append('<h2 id="tables">Tables</h2>')
    for index, section in enumerate(sections):
        body += [f'<section class="table"><h3>{html.escape(section.title)}</h3>',
                 _datatable(_frame(section.header, section.rows), f"table-{index}") if section.rows
                 else "<p><em>no rows</em></p>", "</section>"]
    page = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
            f"<style>{STYLE}</style>", f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>',
            generate_init_offline_itables_html(options.dt_bundle), "</head><body>", *body, "</body></html>"]
    path = Path(out_dir) / "report.html"
    atomic_write_bytes(path, "\n".join(page).encode())
    return path
