"""The study's summary: on the console at the end of a sweep, and as `report/report.md` with its figures — every
number regenerated from the Parquet tables alone (`raysys report` rebuilds it from a storage), over the rows of one
study (raysys.report.scope): its head says which."""

from __future__ import annotations

from pathlib import Path

from raysys.report import findings, html, interactive, regimes, replication
from raysys.report.scope import StudyRows
from raysys.report.tables import methods_table, table_sections
from raysys.storage.store import atomic_write_bytes
from raysys.storage.study import current_version

REGIMES_TITLE = "The findings under each regime of forgetting (this study's versions that differ in pretrain.replay)"
REPLICATION_TITLE = "PLM-seed replication: the findings of each main chain (pretrain.seed, replicate_seeds)"


def summary(scope: StudyRows) -> str:
    """The console summary: which rows, the findings (beside the other regime's, when the storage holds it), and
    the report's tables by title and size — the tables themselves are report.md's and report.html's (at the paper's
    scale they run to hundreds of lines)."""
    claims = findings.findings(scope, methods_table(scope))
    title = "Findings: the paper's claims against this study's data"
    parts = ["\n".join(scope.describe()), f"{title}\n{findings.text(claims)}"]
    chains = replication.judged(scope, claims)
    if len(chains) > 1:
        parts.append(f"{REPLICATION_TITLE}\n{replication.text(chains)}")
    judged = regimes.judged(scope, claims)
    if len(judged) > 1:
        parts.append(f"{REGIMES_TITLE}\n{regimes.text(judged)}")
    sections = table_sections(scope)
    width = max((len(section.title) for section in sections), default=0)
    index = [f"  {section.title:<{width}}  {len(section.rows):>5} rows" for section in sections]
    return "\n\n".join(parts + ["The report's tables (in full: report.md and report.html below; `raysys results "
                                 "STORAGE` lists the result tables)\n" + "\n".join(index)])


def write_report(scope: StudyRows, out_dir) -> Path:
    """`<out_dir>/report.md` and its PNG figures under `<out_dir>/figures/`, and `<out_dir>/report.html` (the same,
    browsable: raysys.report.html): every summary table and figure, regenerated from the Parquet tables alone."""
    out_dir = Path(out_dir)
    table = methods_table(scope)
    best = {(r["task"], r["tuning_type"], r["upgrade"], r["regime"], r["method"]): r["knobs"] for r in table}
    drawn = {title: draw(scope, out_dir / "figures") for title, draw, _ in interactive.report_figures(best)}
    claims = findings.findings(scope, table)
    body = [f"# raysys report: study '{scope.study.name}'", "", *scope.describe(), "",
            f"Regenerated from the Parquet tables in `{scope.store.uri('results')}` (schemas: docs/results.md).", "",
            "## Findings: the paper's claims against this study's data", "", findings.markdown(claims)]
    chains = replication.judged(scope, claims)
    if len(chains) > 1:
        body += ["", f"## {REPLICATION_TITLE}", "", replication.markdown(chains)]
    judged = regimes.judged(scope, claims)
    if len(judged) > 1:
        body += ["", f"## {REGIMES_TITLE}", "", regimes.markdown(judged)]
    body += ["", "## Figures"]
    for title, path in drawn.items():
        if path is not None:
            body += ["", f"### {title}", "", f"![{title}](figures/{path.name})"]
    sections = table_sections(scope)
    for section in sections:
        body += ["", f"## {section.title}", "", section.markdown()]
    html.write_html(scope, out_dir, claims, sections, best)
    path = out_dir / "report.md"
    atomic_write_bytes(path, ("\n".join(body) + "\n").encode())
    return path


def report_folder(scope: StudyRows) -> str:
    """Where in the storage a report goes: `report/` for the current study; `report-all/` (--all) and
    `report-v<N>/` (another version) beside it, so that neither replaces the current study's report."""
    if scope.everything:
        return "report-all"
    if scope.version is None or scope.version == current_version(scope.store):
        return "report"
    return f"report-v{scope.version.number}"


def publish_report(scope: StudyRows) -> str:
    """The report in `<storage>/<report_folder>/`: written in place for a local store; for a URI written in the
    local cache, then uploaded (replacing the previous report there). Returns where it is."""
    store, folder = scope.store, report_folder(scope)
    path = write_report(scope, store.local / folder)
    return f"{store.publish_dir(path.parent, folder)}/{path.name}" if store.remote else str(path)
