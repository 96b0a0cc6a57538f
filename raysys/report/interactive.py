"""The report's figures as interactive Plotly figures for report.html (the PNGs of raysys.report.figures are the
same data for report.md): hovering a point shows its series, its values and the seeds or cells it averages, and
clicking a legend entry hides or shows its series. Each function returns None when its table holds nothing."""

from __future__ import annotations

import functools
from collections import defaultdict

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from raysys.config import RECYCLING_METHODS, TRANSFER_METHODS
from raysys.report import figures
from raysys.report.scope import StudyRows
from raysys.report.tables import method_knobs, method_setting

PAIR_STYLES = {"continual": "solid", "control": "dash", "same_plm": "dot"}


def _seeds(rows: list[dict]) -> str:
    return ", ".join(str(s) for s in sorted({r["seed"] for r in rows if r.get("seed") is not None}))


def pretrain_curves(scope: StudyRows) -> go.Figure | None:
    rows = scope.ok_rows("pretrain_curves")
    if not rows:
        return None
    fig = go.Figure()
    by_plm = defaultdict(list)
    for r in rows:
        by_plm[(r["chain"], r["link"], r["domain"])].append(r)
    for (chain, link, domain), points in sorted(by_plm.items()):
        points.sort(key=lambda r: r["step"])
        name = f"{'M' if chain == 'main' else 'C'}{link} ({domain})"
        fig.add_trace(go.Scatter(
            x=[r["step"] for r in points], y=[r["loss"] for r in points], name=name, mode="lines",
            line={"dash": "solid" if chain == "main" else "dash"}, customdata=[[r["cell_hash"][:12]] for r in points],
            hovertemplate=f"{name}<br>step %{{x}}<br>masked-LM loss %{{y:.4f}}<br>cell %{{customdata[0]}}<extra></extra>"))
    fig.update_layout(title="Continual pre-training", xaxis_title="step within the link", yaxis_title="masked-LM loss")
    return fig


def compatibility_heatmaps(scope: StudyRows) -> go.Figure | None:
    """Per (task, type): Δ_i applied to M_j (i < j), the model tuned on M_j on the diagonal."""
    compat = scope.ok_rows("compatibility")
    if not compat:
        return None
    tuned = [r for r in scope.ok_rows("tuning_runs") if r["chain"] == "main"]
    applied = figures.grouped_means(compat, lambda r: (r["task"], r["tuning_type"], r["source_plm_index"],
                                                       r["target_plm_index"]), "test_accuracy")
    own = figures.grouped_means(tuned, lambda r: (r["task"], r["tuning_type"], r["plm_index"]), "test_accuracy")
    settings = sorted({k[:2] for k in applied})
    n = 1 + max(max(k[2], k[3]) for k in applied)
    columns = min(3, len(settings))
    lines = (len(settings) + columns - 1) // columns
    fig = make_subplots(lines, columns, subplot_titles=[f"{t} · {k}" for t, k in settings])
    for index, (task, kind) in enumerate(settings):
        z, text = [], []
        for i in range(n):
            found = [own.get((task, kind, j)) if i == j else applied.get((task, kind, i, j)) for j in range(n)]
            z.append([None if f is None else 100 * f[0] for f in found])
            text.append(["" if f is None else f"seeds {_seeds(f[1])}" for f in found])
        fig.add_trace(go.Heatmap(
            z=z, text=text, zmin=0, zmax=100, colorscale="Viridis", showscale=index == 0,
            colorbar={"title": "test acc %"}, x=[f"M{j}" for j in range(n)], y=[f"M{i}" for i in range(n)],
            hovertemplate=f"{task} · {kind}<br>tuned on %{{y}}, applied to %{{x}}<br>test accuracy %{{z:.1f}}%"
                          "<br>%{text}<extra></extra>"), index // columns + 1, index % columns + 1)
    fig.update_layout(title="Compatibility: Δ_i on M_j (diagonal: tuned on M_j)", height=320 * lines)
    fig.update_yaxes(autorange="reversed")  # M0 on top, as in the PNG
    return fig


def interpolation_curves(scope: StudyRows) -> go.Figure | None:
    rows = scope.ok_rows("interpolation")
    if not rows:
        return None
    types = sorted({r["tuning_type"] for r in rows})
    fig = make_subplots(1, len(types), subplot_titles=types, shared_yaxes=True)
    for b, kind in enumerate(types):
        for pair, dash in PAIR_STYLES.items():
            curve = sorted(figures.grouped_means(
                [r for r in rows if r["tuning_type"] == kind and r["pair_kind"] == pair], lambda r: r["alpha"],
                "test_accuracy").items())
            if not curve:
                continue
            fig.add_trace(go.Scatter(
                x=[a for a, _ in curve], y=[m for _, (m, _) in curve], name=f"{kind} · {pair}", mode="lines+markers",
                line={"dash": dash}, customdata=[[len(v), _seeds(v)] for _, (_, v) in curve],
                hovertemplate=f"{kind} · {pair}<br>α %{{x}}<br>test accuracy %{{y:.3f}}<br>%{{customdata[0]}} paths, "
                              "seeds %{customdata[1]}<extra></extra>"), 1, b + 1)
    fig.update_layout(title="Linear mode connectivity: test accuracy along θ(α), mean over paths")
    fig.update_xaxes(title_text="α (0 = tuned M_i, 1 = tuned M_i+h)")
    return fig


def transfer_hops(scope: StudyRows) -> go.Figure | None:
    rows = figures.transfer_rows(scope)
    if not rows:
        return None
    types = sorted({r["tuning_type"] for r in rows})
    fig = make_subplots(1, len(types), subplot_titles=types, shared_yaxes=True)
    for b, kind in enumerate(types):
        for method in TRANSFER_METHODS:
            curve = sorted(figures.grouped_means([r for r in rows if r["tuning_type"] == kind and r["method"] == method],
                                                 lambda r: r["hops"], "test_accuracy").items())
            if not curve:
                continue
            fig.add_trace(go.Scatter(
                x=[h for h, _ in curve], y=[m for _, (m, _) in curve], name=f"{kind} · {method}", mode="lines+markers",
                customdata=[[len(v), _seeds(v)] for _, (_, v) in curve],
                hovertemplate=f"{kind} · {method}<br>hops %{{x}}<br>test accuracy %{{y:.3f}}<br>%{{customdata[0]}} "
                              "pairs, seeds %{customdata[1]}<extra></extra>"), 1, b + 1)
    fig.update_layout(title="Transfer methods: test accuracy of the dev-chosen setting against the hop count")
    fig.update_xaxes(title_text="hops (j − i)", dtick=1)
    return fig


def head_similarity_heatmaps(scope: StudyRows) -> go.Figure | None:
    rows = scope.ok_rows("head_similarity")
    if not rows:
        return None
    settings = sorted({(r["pair_kind"], r["tuning_type"]) for r in rows})
    layers, heads = 1 + max(r["layer"] for r in rows), 1 + max(r["head"] for r in rows)
    columns = min(3, len(settings))
    lines = (len(settings) + columns - 1) // columns
    fig = make_subplots(lines, columns, subplot_titles=[f"{p} · {t}" for p, t in settings])
    for index, (pair, kind) in enumerate(settings):
        means = figures.grouped_means([r for r in rows if r["pair_kind"] == pair and r["tuning_type"] == kind],
                                      lambda r: (r["layer"], r["head"]), "similarity_corresponding")
        z = [[means[(layer, head)][0] if (layer, head) in means else None for head in range(heads)]
             for layer in range(layers)]
        fig.add_trace(go.Heatmap(
            z=z, zmin=0, zmax=1, colorscale="Magma", showscale=index == 0, colorbar={"title": "similarity"},
            hovertemplate=f"{pair} · {kind}<br>layer %{{y}}, head %{{x}}<br>1 − JS/ln2 %{{z:.3f}}<extra></extra>"),
            index // columns + 1, index % columns + 1)
    fig.update_layout(title="Similarity of corresponding attention heads", height=260 * lines)
    fig.update_yaxes(autorange="reversed")  # layer 0 on top, as in the PNG
    return fig


def convergence_curves(scope: StudyRows, best_knobs: dict) -> go.Figure | None:
    """Dev accuracy against step per method and setting, distillation at its chosen (T, a, β); a dropdown picks
    the setting."""
    rows = scope.ok_rows("methods_curves")
    if not rows:
        return None
    settings = sorted({method_setting(r) for r in rows})
    fig, visible = go.Figure(), []
    for s in settings:
        for method in RECYCLING_METHODS:
            knobs = best_knobs.get((*s, method))
            chosen = [r for r in rows if method_setting(r) == s and r["method"] == method and method_knobs(r) == knobs]
            curve = sorted(figures.grouped_means(chosen, lambda r: r["step"], "dev_accuracy").items())
            if not curve:
                continue
            fig.add_trace(go.Scatter(
                x=[step for step, _ in curve], y=[m for _, (m, _) in curve], name=method, mode="lines",
                visible=s == settings[0], customdata=[[_seeds(v)] for _, (_, v) in curve],
                hovertemplate=f"{method} · {' · '.join(s)}<br>step %{{x}}<br>dev accuracy %{{y:.3f}}"
                              "<br>seeds %{customdata[0]}<extra></extra>"))
            visible.append(s)
    buttons = [{"label": " · ".join(s), "method": "update",
                "args": [{"visible": [v == s for v in visible]}, {"title": f"Convergence: {' · '.join(s)}"}]}
               for s in settings]
    fig.update_layout(title=f"Convergence: {' · '.join(settings[0])}", xaxis_title="step", yaxis_title="dev accuracy",
                      updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right", "y": 1.15}])
    return fig


def report_figures(best_knobs: dict) -> list[tuple]:
    """Every figure of the report, in its order: (title, its PNG for report.md — `(scope, folder)` -> path —, its
    interactive form for report.html — `(scope)` -> figure); each gives None when its table holds nothing.
    `best_knobs`: the convergence figure's chosen (T, a, β) per setting."""
    return [
        ("Continual pre-training", figures.pretrain_curves, pretrain_curves),
        ("Compatibility matrix", figures.compatibility_heatmaps, compatibility_heatmaps),
        ("Interpolation paths", figures.interpolation_curves, interpolation_curves),
        ("Head similarity", figures.head_similarity_heatmaps, head_similarity_heatmaps),
        ("Convergence of the recycling methods", functools.partial(figures.convergence_curves, best_knobs=best_knobs),
         functools.partial(convergence_curves, best_knobs=best_knobs)),
        ("Transfer methods across hops", figures.transfer_hops, transfer_hops),
    ]
