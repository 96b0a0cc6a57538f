"""The findings of one study under two regimes of forgetting, side by side: the same study run with another
`pretrain.replay` into the same storage (its other version) — with replay M_i+1 keeps what M_i knew, as the
paper's PLMs do; without it a small model forgets the earlier domains. No published work measures how the
recycling claims depend on how much an upgrade forgets; a storage holding both regimes shows it."""

from __future__ import annotations

from raysys.identity import study_fields
from raysys.report import findings
from raysys.report.evidence import retention
from raysys.report.scope import StudyRows
from raysys.report.stats import mean
from raysys.report.tables import fmt, methods_table
from raysys.storage.study import load_version


def _apart_from_replay(study) -> dict:
    fields = study_fields(study)
    return {**fields, "pretrain": {k: v for k, v in fields["pretrain"].items() if k != "replay"}}


def regime_scopes(scope: StudyRows) -> list[StudyRows]:
    """This study and every other version of it in the storage that differs from it in `pretrain.replay` alone,
    most replay first; just this study when there is none (or when the report shows every row, --all)."""
    if scope.everything:
        return [scope]
    same, found = _apart_from_replay(scope.study), {scope.study.pretrain.replay: scope}
    for version in scope.versions:
        study = load_version(scope.store, version.number)
        if study.pretrain.replay not in found and _apart_from_replay(study) == same:
            found[study.pretrain.replay] = StudyRows(study, scope.store)
    return [found[r] for r in sorted(found, reverse=True)]


def kept_share(scope: StudyRows) -> float | None:
    """The mean share of M_k's gain over the floor that M_k+1 keeps, over tasks and types."""
    return mean(r["kept"] for r in retention(scope))


def judged(scope: StudyRows, claims: list) -> list[tuple[StudyRows, list]]:
    """(regime, its findings) for this study's regimes (raysys.report.regimes.regime_scopes), most replay first:
    `claims` are this study's own, already judged; the other versions are judged here."""
    return judged_beside(scope, claims, regime_scopes(scope))


def judged_beside(scope: StudyRows, claims: list, scopes: list[StudyRows]) -> list[tuple[StudyRows, list]]:
    """(rows, their findings) for each of `scopes`: `scope`'s are `claims`, already judged."""
    return [(s, claims if s is scope else findings.findings(s, methods_table(s))) for s in scopes]


def side_by_side(regimes: list[tuple[StudyRows, list]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per claim, each regime's verdict and pooled effect; then each regime's retention."""
    scopes, claims = [s for s, _ in regimes], [c for _, c in regimes]
    header = ["claim"] + [f"replay {s.study.pretrain.replay:g}" for s in scopes]
    rows = [[claims[0][k].claim] + [f"{c[k].verdict}: {c[k].effect}" for c in claims] for k in range(len(claims[0]))]
    rows.append(["retention: share of M_k's gain over the floor kept on M_k+1"] +
                [fmt(kept_share(s), 100, 0) + "%" for s in scopes])
    return header, rows


def grid_markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table whose first column names each row."""
    cell = lambda text: text.replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def grid_text(header: list[str], rows: list[list[str]]) -> str:
    """The console form: a line per row, each column named."""
    return "\n".join(f"- {row[0]}: " + "; ".join(f"{h}: {c}" for h, c in zip(header[1:], row[1:])) for row in rows)


def markdown(regimes: list[tuple[StudyRows, list]]) -> str:
    return grid_markdown(*side_by_side(regimes))


def text(regimes: list[tuple[StudyRows, list]]) -> str:
    return grid_text(*side_by_side(regimes))
