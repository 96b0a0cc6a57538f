"""raysys against its anchors, side by side: every ratio the speed issue sets a goal for, each measured as A B A B …
in one process (or one Ray cluster), so that the machine's drift hits both sides alike. Prints each ratio (median
over the pairs, and their spread) against its goal and appends the run to bench/RESULTS.md.

    python bench/compare.py                          # the loops and Ray's cost per cell (~5 min on 2 cores)
    python bench/compare.py --storage STORE          # + sweep efficiency per stage from a finished study's rows,
                                                     #   the study's wall time from its rows, the no-op rerun timed
    python bench/compare.py --run-study DIR          # + the tiny study run first into DIR (fresh), timed whole

Goals (bench/RESULTS.md says which are met): masked-LM step ≥ 3× HF's default head at the tiny preset's shape;
raysys's tuning loop ≥ 0.95× a bare PyTorch loop; a distillation step (teacher cache) ≤ 1.15× a vanilla step;
Ray's fixed cost ≤ 0.2 s a cell; sweep efficiency ≥ 0.85 for every stage; the tiny study ≤ 480 s, its no-op rerun
≤ 10 s.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from throughput import SyntheticTokenizer, _sequences

from raysys.config import ModelConfig, PretrainConfig, TuningConfig
from raysys.core import compute, data, masked_lm_loop, models
from raysys.core.classifier_loop import train_classifier
from raysys.core.objectives import CrossEntropyObjective, DistillationObjective, teacher_outputs

TINY = ModelConfig(vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                   max_positions=64, dropout=0.1)
BASE = ModelConfig(vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                   max_positions=514, dropout=0.1)


@dataclass
class Ratio:
    """One comparison: `ratio` is the median over the A/B pairs of (b / a) — both sides' seconds per unit of work —
    `spread` the smallest and largest pair's ratio; `higher_is_better` says how the goal reads."""

    name: str
    a: str
    b: str
    a_seconds: list[float]
    b_seconds: list[float]
    goal: float | None
    higher_is_better: bool = True
    unit: str = "×"
    a_goal_seconds: float | None = None  # a goal on A's own seconds per unit (Ray's cost per cell), not the ratio

    @property
    def ratios(self) -> list[float]:
        return [b / a for a, b in zip(self.a_seconds, self.b_seconds)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def met(self) -> bool | None:
        if self.a_goal_seconds is not None:
            return statistics.median(self.a_seconds) <= self.a_goal_seconds
        if self.goal is None:
            return None
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal

    def row(self) -> str:
        spread = f"{min(self.ratios):.2f}–{max(self.ratios):.2f}"
        if self.a_goal_seconds is not None:
            goal = f"{self.a} ≤ {self.a_goal_seconds:g} s"
        else:
            goal = "" if self.goal is None else f"{'≥' if self.higher_is_better else '≤'} {self.goal:g}{self.unit}"
        verdict = {True: "met", False: "**not met**", None: ""}[self.met]
        return (f"| {self.name} | {self.a}: {_seconds(self.a_seconds)} | {self.b}: {_seconds(self.b_seconds)} | "
                f"{self.ratio:.2f}{self.unit} ({spread}, {len(self.ratios)} pairs) | {goal} | {verdict} |")


def _seconds(samples: list[float]) -> str:
    median = statistics.median(samples)
    return f"{median * 1e3:.1f} ms" if median < 1 else f"{median:.2f} s"


def side_by_side(a, b, pairs: int) -> tuple[list[float], list[float]]:
    """Alternate the two measurements (each returns seconds per unit of work), one warm-up of each first."""
    a(), b()
    a_seconds, b_seconds = [], []
    for _ in range(pairs):
        a_seconds.append(a())
        b_seconds.append(b())
    return a_seconds, b_seconds


# ------------------------------------------------------------------------------------------- masked-LM step


def hf_masked_lm_steps(model, sequences, tokenizer, cfg: PretrainConfig, steps: int) -> None:
    """raysys's masked-LM loop with HF's own loss instead (`RobertaForMaskedLM(labels=...)`: vocabulary logits
    at every position): the same sampling, masking, clipping, optimizer and schedule."""
    optimizer = compute.adamw(list(model.parameters()), cfg.lr, cfg.weight_decay, "cpu")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: compute.linear_schedule(s, steps, 0))
    generator = torch.Generator().manual_seed(0)
    regular, special = models.regular_token_ids(tokenizer), set(tokenizer.all_special_ids)
    model.train()
    for step in range(steps):
        batch = masked_lm_loop.sample_batch(sequences, step, cfg.batch_size, rank=0, world_size=1, seed=cfg.seed)
        input_ids, attention_mask = data.pad_batch(batch, tokenizer.pad_token_id)
        special_mask = sum((input_ids == s) for s in special).bool()
        corrupted, labels = data.mask_tokens(input_ids, special_mask, tokenizer.mask_token_id, regular,
                                             cfg.mask_prob, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=corrupted, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss.item()


def masked_lm_ratio(name: str, shape: ModelConfig, batch: int, seq: int, steps: int, pairs: int,
                    goal: float | None, precision: str = "fp32") -> Ratio:
    """raysys's loop (in `precision`) against HF's head in fp32, on copies of one model."""
    tokenizer = SyntheticTokenizer(shape.vocab_size)
    sequences = _sequences(batch * 50, seq, seq, shape.vocab_size, 0)
    cfg = PretrainConfig(batch_size=batch, sequence_length=seq, log_every_steps=steps, num_workers=1)
    ours_cfg = dataclasses.replace(cfg, precision=precision)
    ours = models.new_masked_lm(shape, tokenizer, seed=0)
    theirs = copy.deepcopy(ours)

    def raysys_step() -> float:
        started = time.perf_counter()
        masked_lm_loop.train_masked_lm(ours, sequences, tokenizer, ours_cfg, masked_lm_loop.LinkPlan(steps, 1e-4))
        return (time.perf_counter() - started) / steps

    def hf_step() -> float:
        started = time.perf_counter()
        hf_masked_lm_steps(theirs, sequences, tokenizer, cfg, steps)
        return (time.perf_counter() - started) / steps

    return Ratio(name, f"raysys ({precision})", "HF head (fp32)", *side_by_side(raysys_step, hf_step, pairs), goal)


# ------------------------------------------------------------------------------------- tuning and distillation


def tiny_task(n: int, seed: int) -> tuple[list[list[int]], torch.Tensor]:
    """Examples as long as the tiny world's (8–24 tokens), labels from their second token."""
    ids = _sequences(n, 8, 24, TINY.vocab_size, seed)
    return ids, torch.tensor([x[1] % 4 for x in ids])


def tuning_config(steps: int) -> TuningConfig:
    return TuningConfig(max_steps=steps, eval_every_steps=steps, batch_size=16, max_length=64, lr=1e-3)


def bare_loop(model, encoded: dict, cfg: TuningConfig, seed: int, pad_id: int) -> None:
    """Plain PyTorch tuning: the same batches (order and padding), optimizer, schedule and clipping as
    `train_classifier`, nothing else."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = compute.adamw(params, cfg.lr, cfg.weight_decay, "cpu")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: compute.linear_schedule(s, cfg.max_steps, 0))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    while step < cfg.max_steps:
        for input_ids, mask, y in data.iterate_batches(*encoded["train"], cfg.batch_size, pad_id, generator):
            loss = F.cross_entropy(model(input_ids=input_ids, attention_mask=mask).logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            loss.item()
            step += 1
            if step >= cfg.max_steps:
                break


def tuning_ratios(steps: int, pairs: int) -> list[Ratio]:
    """raysys's tuning loop against a bare loop, and a distillation step (cached teacher, the tiny preset's
    T = 10, a = 0.9, β = 10: hidden states on) against a vanilla one — each on its own copy of one model."""
    tokenizer = SyntheticTokenizer(TINY.vocab_size)
    small = tiny_task(8, 2)  # the loop evaluates once at the end: keep that small next to the steps
    encoded = {"train": tiny_task(128, 1), "dev": small, "test": small}
    cfg = tuning_config(steps)
    model = models.random_classifier(TINY, tokenizer, num_labels=4, seed=0)
    copies = {k: copy.deepcopy(model) for k in ("raysys", "bare", "vanilla", "distill")}
    pad = tokenizer.pad_token_id
    cache = teacher_outputs(copy.deepcopy(model), encoded["train"][0], 256, pad, with_hidden=True)
    objectives = {"vanilla": CrossEntropyObjective(), "distill": DistillationObjective(10.0, 0.9, 10.0, cache)}

    def timed(fn):
        def run() -> float:
            started = time.perf_counter()
            fn()
            return (time.perf_counter() - started) / steps
        return run

    def ours(key: str, objective=None):
        return timed(lambda: train_classifier(copies[key], encoded, cfg, 0, pad, objective=objective))

    loop = Ratio("tuning loop: bare PyTorch ÷ raysys (throughput ratio)", "raysys", "bare",
                 *side_by_side(ours("raysys"), timed(lambda: bare_loop(copies["bare"], encoded, cfg, 0, pad)), pairs), 0.95)
    distill = Ratio("distillation step (teacher cache) ÷ vanilla step", "vanilla", "distill",
                    *side_by_side(ours("vanilla", objectives["vanilla"]), ours("distill", objectives["distill"]),
                                  pairs), 1.15, higher_is_better=False)
    return [loop, distill]


# ------------------------------------------------------------------------------------------- Ray per cell


def ray_cost(cells: int, pairs: int) -> Ratio:
    """Seconds per no-op cell through raysys's grid launcher (its Tune settings, its trial wrapper) against the same
    number of no-op trials through a plain `Tuner` with Tune's defaults, on this machine's Ray cluster."""
    import noop_stage
    import ray
    from ray import tune

    from raysys.config import load_study
    from raysys.storage.store import Store
    from raysys.sweep import launchers

    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'bench'}"}})
    study = load_study("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        def ours() -> float:
            store = Store(tempfile.mkdtemp(dir=tmp))
            stage = noop_stage.STAGE
            groups = launchers.trial_groups(stage, stage.groups([noop_stage.NoopCell(f"{time.time_ns()}-{i}")
                                                                 for i in range(cells)]), study)
            return launchers.launch(stage, groups, study, store, [], log=lambda *_: None)[0] / cells

        def plain() -> float:
            started = time.time()
            tune.Tuner(noop_stage.plain_trial, param_space={"i": tune.grid_search(list(range(cells)))},
                       run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(dir=tmp), verbose=0)).fit()
            return (time.time() - started) / cells

        measured = side_by_side(ours, plain, pairs)
    ray.shutdown()
    return Ratio(f"Ray's cost per no-op cell ({cells} cells a stage): plain Tuner ÷ raysys launcher", "raysys",
                 "plain Tuner", *measured, None, a_goal_seconds=0.2)


# ------------------------------------------------------------------------------------- a study's own timings


def stage_spans(storage: str) -> dict[str, dict]:
    """Per stage of the study in `storage` (its study.json): the wall time its cells' rows span, the compute they
    took (Σ per cell of its rows' span, × the CPUs a cell holds) and their count, from the rows' own
    `started_at` and `seconds` — only the rows of this study's planned cells."""
    from raysys.config import StudyConfig, build
    from raysys.stages.chain import plan_chain, planned_cells
    from raysys.stages.registry import STAGES
    from raysys.storage import results
    from raysys.storage.store import Store

    store = Store(storage)
    study = build(StudyConfig, json.loads(Path(storage, "study.json").read_text()))
    chain = plan_chain(study)
    spans = {}
    for stage in STAGES:
        cells = {c.cell_hash for c in planned_cells(stage, study, chain)}
        per_cell: dict[str, list[float]] = {}
        for table in stage.tables:
            rows = results.read_table(store, table).to_pylist()
            for row in rows:
                if row.get("cell_hash") in cells and row.get("started_at") and row.get("seconds") is not None:
                    start = row["started_at"].timestamp()
                    lo, hi = per_cell.get(row["cell_hash"], (start, start))
                    per_cell[row["cell_hash"]] = (min(lo, start), max(hi, start + row["seconds"]))
        if per_cell:
            res = stage.resources(study)
            cpus = res.cpus * max(1, res.workers)
            spans[stage.name] = {"cells": len(per_cell), "start": min(lo for lo, _ in per_cell.values()),
                                 "end": max(hi for _, hi in per_cell.values()),
                                 "compute": sum(hi - lo for lo, hi in per_cell.values()) * cpus}
    return spans


def efficiency(spans: dict[str, dict], cpus: float) -> dict[str, float]:
    """Σ trial compute / (wall × CPUs) per stage: 1.0 means every CPU ran a cell for the stage's whole span."""
    return {name: s["compute"] / (max(s["end"] - s["start"], 1e-9) * cpus) for name, s in spans.items()}


def timed_command(command: list[str]) -> float:
    started = time.time()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.time() - started


# ----------------------------------------------------------------------------------------------- report


def machine() -> str:
    import ray
    import transformers

    cpu = platform.processor() or platform.machine()
    return (f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, ray {ray.__version__}, Python {platform.python_version()}")


def markdown(ratios: list[Ratio], study_lines: list[str], commit: str) -> str:
    lines = [f"### `bench/compare.py` at {commit}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"Machine: {machine()}.", "",
             "| comparison | A | B | B ÷ A (median, spread) | goal | |", "|---|---|---|---|---|---|"]
    lines += [r.row() for r in ratios]
    return "\n".join(lines + [""] + study_lines + [""])


def study_section(storage: str, cpus: float, wall: float | None) -> list[str]:
    spans = stage_spans(storage)
    eff = efficiency(spans, cpus)
    lines = [f"Study in `{storage}` ({cpus:g} CPUs), from its rows:", "",
             "| stage | cells | wall (rows' span) | Σ compute × CPUs held | efficiency (goal ≥ 0.85) |",
             "|---|---:|---:|---:|---|"]
    for name, s in spans.items():
        ok = "met" if eff[name] >= 0.85 else "**not met**"
        lines.append(f"| {name} | {s['cells']} | {s['end'] - s['start']:.1f} s | {s['compute']:.1f} s | "
                     f"{eff[name]:.2f} {ok} |")
    lines.append("")
    if wall is not None:
        lines.append(f"- the study from a fresh storage, Ray's start included: {wall:.0f} s (goal ≤ 480 s: "
                     f"{'met' if wall <= 480 else '**not met**'})")
    rerun = timed_command([sys.executable, "sweeps/full_paper.py", "--preset", "tiny", "--storage", storage])
    lines.append(f"- the no-op rerun (`python sweeps/full_paper.py --preset tiny --storage {storage}`): {rerun:.1f} s "
                 f"(goal ≤ 10 s: {'met' if rerun <= 10 else '**not met**'})")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5, help="A/B pairs per comparison")
    parser.add_argument("--storage", default=None, help="a finished tiny study: efficiency, wall, no-op rerun")
    parser.add_argument("--run-study", default=None, metavar="DIR", help="run the tiny study into DIR first")
    parser.add_argument("--skip", nargs="*", default=(), choices=("mlm", "base", "tuning", "ray"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.run_study and Path(args.run_study).exists() and any(Path(args.run_study).iterdir()):
        parser.error(f"--run-study {args.run_study}: not empty; the study's wall time is measured from a fresh storage")
    torch.set_num_threads(os.cpu_count() or 1)
    ratios = []
    if "mlm" not in args.skip:
        ratios.append(masked_lm_ratio("masked-LM step, tiny shape (h128, 2 layers, V 2048, 128 × 16): HF ÷ raysys",
                                      TINY, 128, 16, 10, args.pairs, 3.0))
        ratios.append(masked_lm_ratio("the same, raysys under bf16 autocast (a precision the tiny preset does not use)",
                                      TINY, 128, 16, 10, args.pairs, None, precision="bf16"))
    if "base" not in args.skip:
        ratios.append(masked_lm_ratio("masked-LM step, base shape (h768, 12 layers, V 50265, 4 × 128): HF ÷ raysys",
                                      BASE, 4, 128, 1, max(2, args.pairs // 2), None))
    if "tuning" not in args.skip:
        torch.set_num_threads(1)  # a tuning cell holds one CPU in the tiny preset
        ratios += tuning_ratios(150, args.pairs)  # 150 steps: the loop's one closing evaluation weighs little
        torch.set_num_threads(os.cpu_count() or 1)
    if "ray" not in args.skip:
        ratios.append(ray_cost(24, max(2, args.pairs // 2)))
    wall = None
    if args.run_study:
        wall = timed_command([sys.executable, "sweeps/full_paper.py", "--preset", "tiny", "--storage", args.run_study])
    storage = args.run_study or args.storage
    study_lines = study_section(storage, float(os.cpu_count() or 1), wall) if storage else []
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], check=False, cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown commit"
    text = markdown(ratios, study_lines, commit)
    print(text)
    with args.out.open("a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
