"""How the findings vary with the PLM seed. A study with `pretrain.replicate_seeds` pre-trains its main chain once
more per seed and tunes and measures everything on each chain again. Each chain is judged alone — its findings
are those the study gives with that `pretrain.seed` — and the chains are set side by side, with the spread of
each pooled effect across chains beside its interval within one: the intervals cover the tuning seeds of one
pre-training run, the spread across chains says whether a finding belongs to the upgrade or to one run of it."""

from __future__ import annotations

import statistics

from raysys.report import findings
from raysys.report.regimes import grid_markdown, grid_text, judged_beside, kept_share
from raysys.report.scope import StudyRows
from raysys.report.tables import fmt


def replica_scopes(scope: StudyRows) -> list[StudyRows]:
    """The main chain's rows (`scope`), then each replicate chain's; just `scope` when the study replicates
    nothing (or the report shows every row, --all)."""
    if scope.everything or not scope.study.pretrain.replicate_seeds:
        return [scope]
    return [scope] + [scope.chain(seed) for seed in scope.study.pretrain.replicate_seeds]


def judged(scope: StudyRows, claims: list) -> list[tuple[StudyRows, list]]:
    """(chain, its findings) for the main chain (`claims`, already judged) and each replicate chain."""
    return judged_beside(scope, claims, replica_scopes(scope))


def spread(column: list[findings.Finding]) -> str:
    """One claim's pooled effect across chains: mean ± standard deviation over the chains, the mean half-width of
    the chains' own intervals, and how many chains give the main chain's verdict."""
    effects = [f.pooled for f in column if f.pooled is not None and f.pooled.mean is not None]
    agree = f"verdict as the main chain's on {sum(f.verdict == column[0].verdict for f in column)}/{len(column)}"
    if len(effects) < 2:
        return f"{'one chain has' if effects else 'no chain has'} an effect; {agree}"
    scale = column[0].scale
    digits = 1 if scale != 1.0 else 3
    means = [e.mean for e in effects]
    widths = [(e.high - e.low) / 2 for e in effects if e.low is not None]
    within = f"; within a chain ±{scale * statistics.mean(widths):.{digits}f}" if widths else ""
    return (f"{scale * statistics.mean(means):+.{digits}f} ± {scale * statistics.stdev(means):.{digits}f} (sd over "
            f"{len(effects)} chains){within}; {agree}")


def side_by_side(chains: list[tuple[StudyRows, list]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per claim, each chain's verdict and pooled effect and their spread; then each chain's
    retention."""
    scopes, claims = [s for s, _ in chains], [c for _, c in chains]
    header = (["claim"] + [f"seed {s.seed}" + (" (main)" if k == 0 else "") for k, s in enumerate(scopes)]
              + ["across PLM seeds"])
    rows = [[claims[0][k].claim] + [f"{c[k].verdict}: {c[k].effect}" for c in claims] +
            [spread([c[k] for c in claims])] for k in range(len(claims[0]))]
    kept = [kept_share(s) for s in scopes]
    known = [v for v in kept if v is not None]
    rows.append(["retention: share of M_k's gain over the floor kept on M_k+1"] +
                [fmt(v, 100, 0) + "%" if v is not None else "—" for v in kept] +
                [f"sd {100 * statistics.stdev(known):.0f} points" if len(known) > 1 else "—"])
    return header, rows


def markdown(chains: list[tuple[StudyRows, list]]) -> str:
    return grid_markdown(*side_by_side(chains))


def text(chains: list[tuple[StudyRows, list]]) -> str:
    return grid_text(*side_by_side(chains))
