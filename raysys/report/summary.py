"""The study's summary: on the console at the end of a sweep, and as `report/report.md` with its figures — every
number regenerated from the Parquet tables alone (`raysys report` rebuilds it from a storage)."""

from __future__ import annotations

from pathlib import Path

from raysys.config import StudyConfig
from raysys.report import figures, findings
from raysys.report.tables import methods_table, table_sections
from raysys.storage.store import Store, atomic_write_bytes


def summary(study: StudyConfig, store: Store) -> str:
    """The console summary: the findings, then every table."""
    claims = findings.findings(store, methods_table(store))
    title = "Findings: the paper's claims against this study's data"
    return "\n\n".join([f"{title}\n{findings.text(claims)}"] + table_sections(study, store))


def write_report(study: StudyConfig, store: Store, out_dir) -> Path:
    """`<out_dir>/report.md` and its PNG figures under `<out_dir>/figures/`: every summary table and figure,
    regenerated from the Parquet tables alone."""
    out_dir = Path(out_dir)
    table = methods_table(store)
    best = {(r["task"], r["tuning_type"], r["upgrade"], r["regime"], r["method"]): r["knobs"] for r in table}
    drawn = {
        "Continual pre-training": figures.pretrain_curves(store, out_dir / "figures"),
        "Compatibility matrix": figures.compatibility_heatmaps(store, out_dir / "figures"),
        "Interpolation paths": figures.interpolation_curves(store, out_dir / "figures"),
        "Head similarity": figures.head_similarity_heatmaps(store, out_dir / "figures"),
        "Convergence of the recycling methods": figures.convergence_curves(store, out_dir / "figures", best),
    }
    body = [f"# raysys report: study '{study.name}'", "",
            f"Regenerated from the Parquet tables in `{store.uri('results')}` (schemas: docs/results.md).", "",
            "## Findings: the paper's claims against this study's data", "",
            findings.markdown(findings.findings(store, table)), "", "## Figures"]
    for title, path in drawn.items():
        if path is not None:
            body += ["", f"### {title}", "", f"![{title}](figures/{path.name})"]
    for section in table_sections(study, store):
        title, _, table = section.partition("\n")
        body += ["", f"## {title}", "", "```", table, "```"]
    path = out_dir / "report.md"
    atomic_write_bytes(path, ("\n".join(body) + "\n").encode())
    return path


def publish_report(study: StudyConfig, store: Store) -> str:
    """The report in `<storage>/report/`: written in place for a local store; for a URI written in the local
    cache, then uploaded (replacing the previous report). Returns where it is."""
    path = write_report(study, store, store.local / "report")
    return f"{store.publish_dir(path.parent, 'report')}/{path.name}" if store.remote else str(path)
