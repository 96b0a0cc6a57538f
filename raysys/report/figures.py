"""The report's figures (PNG, matplotlib), drawn from the Parquet tables alone. Each function returns the path it
wrote, or None when its table holds nothing to draw yet (a partial run still gets a report)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster heads and CI
import matplotlib.pyplot as plt

from raysys.config import RECYCLING_METHODS, REFERENCE_METHOD, TRANSFER_METHODS
from raysys.report.scope import StudyRows
from raysys.report.tables import method_knobs, method_setting


def method_colours() -> dict[str, str]:
    """The reference in grey, every other registered method in matplotlib's colour cycle, in registry order."""
    others = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2)
    return {m: "tab:gray" if m == REFERENCE_METHOD else next(others) for m in RECYCLING_METHODS}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".tmp-{path.name}")
    fig.savefig(temp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    temp.replace(path)
    return path


def grouped_means(rows: list[dict], key, value: str) -> dict:
    """key(row) -> (mean of `value` over the rows with one, those rows): the points every figure draws, the PNGs
    and report.html's alike (whose hover names the seeds or cells behind a point)."""
    groups = defaultdict(list)
    for r in rows:
        if r[value] is not None:
            groups[key(r)].append(r)
    return {k: (statistics.mean(r[value] for r in v), v) for k, v in groups.items()}


def _mean_by(rows: list[dict], key, value: str) -> dict:
    """key(row) -> the mean of `value`."""
    return {k: mean for k, (mean, _) in grouped_means(rows, key, value).items()}


def transfer_rows(scope: StudyRows) -> list[dict]:
    """The transfer table's rows of each pair's dev-chosen setting, with its hop count: what the hop figure draws."""
    return [{**r, "hops": r["target_plm_index"] - r["source_plm_index"]} for r in scope.ok_rows("transfer")
            if r["applicable"] and r["selected"]]


def transfer_hops(scope: StudyRows, out: Path) -> Path | None:
    """Test accuracy of each transfer method's dev-chosen setting against the upgrade's hop count, mean over pairs
    (task, seed, source), per tuning type: how far each method carries Δ_i down the chain."""
    rows = transfer_rows(scope)
    if not rows:
        return None
    types = sorted({r["tuning_type"] for r in rows})
    fig, axes = plt.subplots(1, len(types), figsize=(3.6 * len(types), 3.2), squeeze=False, sharey=True,
                             layout="constrained")
    for b, tuning_type in enumerate(types):
        ax = axes[0][b]
        for method in TRANSFER_METHODS:
            curve = sorted(_mean_by([r for r in rows if r["tuning_type"] == tuning_type and r["method"] == method],
                                    lambda r: r["hops"], "test_accuracy").items())
            if curve:
                ax.plot([h for h, _ in curve], [y for _, y in curve], "o-", label=method,
                        color="tab:gray" if method == TRANSFER_METHODS[0] else None)
        ax.set(title=tuning_type, xlabel="hops (j − i)", ylabel="test accuracy")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    return _save(fig, out / "transfer_hops.png")


def pretrain_curves(scope: StudyRows, out: Path) -> Path | None:
    rows = scope.ok_rows("pretrain_curves")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    by_plm = defaultdict(list)
    for r in rows:
        by_plm[(r["chain"], r["link"], r["domain"])].append((r["step"], r["loss"]))
    for (chain, link, domain), points in sorted(by_plm.items()):
        steps, losses = zip(*sorted(points))
        ax.plot(steps, losses, ls="-" if chain == "main" else "--",
                label=f"{'M' if chain == 'main' else 'C'}{link} ({domain})")
    ax.set(xlabel="step within the link", ylabel="masked-LM loss", title="Continual pre-training")
    ax.legend(fontsize=8)
    return _save(fig, out / "pretrain_curves.png")


def compatibility_heatmaps(scope: StudyRows, out: Path) -> Path | None:
    """Per (task, type): test accuracy of Δ_i applied to M_j (i < j), with the model tuned on M_j on the diagonal."""
    compat, tuned = scope.ok_rows("compatibility"), [r for r in scope.ok_rows("tuning_runs") if r["chain"] == "main"]
    if not compat:
        return None
    applied = _mean_by(compat, lambda r: (r["task"], r["tuning_type"], r["source_plm_index"], r["target_plm_index"]),
                       "test_accuracy")
    own = _mean_by(tuned, lambda r: (r["task"], r["tuning_type"], r["plm_index"]), "test_accuracy")
    tasks = sorted({k[0] for k in applied})
    types = sorted({k[1] for k in applied})
    n = 1 + max(max(k[2], k[3]) for k in applied)
    fig, axes = plt.subplots(len(tasks), len(types), figsize=(3.2 * len(types), 3 * len(tasks)), squeeze=False, layout="constrained")
    for a, task in enumerate(tasks):
        for b, tuning_type in enumerate(types):
            grid = [[float("nan")] * n for _ in range(n)]
            for i in range(n):
                for j in range(n):
                    value = own.get((task, tuning_type, j)) if i == j else applied.get((task, tuning_type, i, j))
                    if value is not None:
                        grid[i][j] = 100 * value
            ax = axes[a][b]
            image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
            for i in range(n):
                for j in range(n):
                    if grid[i][j] == grid[i][j]:
                        ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=8, color="w")
            ax.set(title=f"{task} · {tuning_type}", xlabel="applied to M_j", ylabel="tuned on M_i",
                   xticks=range(n), yticks=range(n))
    fig.colorbar(image, ax=axes, shrink=0.6, label="test accuracy % (diagonal: tuned on M_j)")
    return _save(fig, out / "compatibility.png")


def interpolation_curves(scope: StudyRows, out: Path) -> Path | None:
    """Accuracy and loss along θ(α), mean over tasks, seeds and pairs: continual pair vs control and the same-PLM
    reference (two seeds on M_i), per type."""
    rows = scope.ok_rows("interpolation")
    if not rows:
        return None
    types = sorted({r["tuning_type"] for r in rows})
    fig, axes = plt.subplots(2, len(types), figsize=(3.6 * len(types), 6), squeeze=False, sharex=True, layout="constrained")
    for b, tuning_type in enumerate(types):
        for kind, style in (("continual", "-"), ("control", "--"), ("same_plm", ":")):
            selected = [r for r in rows if r["tuning_type"] == tuning_type and r["pair_kind"] == kind]
            if not selected:
                continue
            for a, metric in enumerate(("test_accuracy", "test_loss")):
                curve = sorted(_mean_by(selected, lambda r: r["alpha"], metric).items())
                axes[a][b].plot([x for x, _ in curve], [y for _, y in curve], style, label=kind)
        axes[0][b].set(title=tuning_type, ylabel="test accuracy")
        axes[1][b].set(xlabel="α (0 = tuned M_i, 1 = tuned M_i+h)", ylabel="test loss")
        axes[0][b].legend(fontsize=8)
    return _save(fig, out / "interpolation.png")


def head_similarity_heatmaps(scope: StudyRows, out: Path) -> Path | None:
    """1 − JS/ln2 between corresponding heads (layer × head), mean over tasks, seeds and pairs."""
    rows = scope.ok_rows("head_similarity")
    if not rows:
        return None
    types, kinds = sorted({r["tuning_type"] for r in rows}), sorted({r["pair_kind"] for r in rows})
    layers, heads = 1 + max(r["layer"] for r in rows), 1 + max(r["head"] for r in rows)
    fig, axes = plt.subplots(len(kinds), len(types), figsize=(3.2 * len(types), 2.4 * len(kinds)), squeeze=False, layout="constrained")
    for a, kind in enumerate(kinds):
        for b, tuning_type in enumerate(types):
            means = _mean_by([r for r in rows if r["pair_kind"] == kind and r["tuning_type"] == tuning_type],
                             lambda r: (r["layer"], r["head"]), "similarity_corresponding")
            grid = [[means.get((layer, head), float("nan")) for head in range(heads)] for layer in range(layers)]
            image = axes[a][b].imshow(grid, vmin=0, vmax=1, cmap="magma")
            axes[a][b].set(title=f"{kind} · {tuning_type}", xlabel="head", ylabel="layer",
                           xticks=range(heads), yticks=range(layers))
    fig.colorbar(image, ax=axes, shrink=0.7, label="similarity of corresponding heads")
    return _save(fig, out / "head_similarity.png")


def convergence_curves(scope: StudyRows, out: Path, best_knobs: dict) -> Path | None:
    """Dev accuracy vs step per method (mean over seeds); distill/combined at their best (T, a, β) per setting.
    `best_knobs` maps (task, type, upgrade, regime, method) to the chosen (T, a, β)."""
    rows = scope.ok_rows("methods_curves")
    if not rows:
        return None
    settings = sorted({method_setting(r) for r in rows})
    columns = 4
    lines = (len(settings) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(3.6 * columns, 2.8 * lines), squeeze=False, layout="constrained")
    for index, s in enumerate(settings):
        ax = axes[index // columns][index % columns]
        for method, colour in method_colours().items():
            knobs = best_knobs.get((*s, method))
            chosen = [r for r in rows if method_setting(r) == s and r["method"] == method and method_knobs(r) == knobs]
            if chosen:
                curve = sorted(_mean_by(chosen, lambda r: r["step"], "dev_accuracy").items())
                ax.plot([x for x, _ in curve], [y for _, y in curve], color=colour, label=method)
        ax.set_title(" · ".join(s), fontsize=8)
        ax.set(xlabel="step", ylabel="dev accuracy")
    axes[0][0].legend(fontsize=7)
    for index in range(len(settings), lines * columns):
        axes[index // columns][index % columns].axis("off")
    return _save(fig, out / "convergence.png")
