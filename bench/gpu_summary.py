"""The summary of a `bench/gpu_check.sh` run: its folder's JSON lines and logs as one Markdown table set, to paste
into bench/RESULTS.md.

    python bench/gpu_summary.py /tmp/raysys-gpu-check
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def paths_table(rows: list[dict]) -> list[str]:
    out = ["| CUDA path | ok | details |", "|---|---|---|"]
    for row in rows:
        details = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("check", "ok", "device", "traceback"))
        out.append(f"| {row['check']} ({row['device']}) | {'yes' if row['ok'] else '**NO**'} | {details} |")
    return out


def throughput_table(rows: list[dict]) -> list[str]:
    out = ["| loop | model | precision | batch × length | bucketing | tokens/s | TFLOP/s | MFU | device |",
           "|---|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "—"
        bucketing = "—" if r["bucketing"] is None else ("yes" if r["bucketing"] else "no")
        out.append(f"| {r['what']} | {r['model']} | {r['precision']} | {r['batch']} × {r['seq']} | {bucketing} | "
                   f"{r['tokens_per_second']:,.0f} | {r['achieved_tflops']:.1f} | {mfu} | {r['device']} |")
    return out


MFU_GOAL = 0.45  # bf16 masked-LM pre-training of RoBERTa-base on an H200 (anchor: 42.6 % for 125M on an A100)


def mfu_verdict(rows: list[dict]) -> list[str]:
    best = max((r for r in rows if r["what"] == "pretrain" and r["precision"] == "bf16" and r.get("mfu") is not None),
               key=lambda r: r["mfu"], default=None)
    if best is None:
        return ["bf16 masked-LM MFU: not measured (no known GPU)"]
    met = "met" if best["mfu"] >= MFU_GOAL else "**not met**"
    return [f"bf16 masked-LM MFU: {100 * best['mfu']:.1f}% on {best['device']} (goal ≥ {100 * MFU_GOAL:.0f}%: {met})"]


def utilisation(path: Path) -> list[str]:
    """The GPU's utilisation over the study (nvidia-smi samples, 500 ms apart): mean, median and the share of
    samples at 0 % (an idle GPU between or beside trials)."""
    if not path.is_file():
        return ["GPU utilisation during the study: not sampled (no nvidia-smi, or a smoke run)"]
    busy = sorted(float(line.split(",")[0]) for line in path.read_text().splitlines() if line.strip())
    if not busy:
        return ["GPU utilisation during the study: no samples"]
    idle, mean, median = sum(b == 0 for b in busy) / len(busy), sum(busy) / len(busy), busy[len(busy) // 2]
    line = f"GPU utilisation during the study: mean {mean:.0f}%, median {median:.0f}%, idle in {100 * idle:.0f}% of "
    return [line + f"{len(busy)} samples"]


def main(folder: str) -> int:
    root = Path(folder)
    gpu = (root / "gpu.txt").read_text().strip() if (root / "gpu.txt").is_file() else "no nvidia-smi"
    lines = [f"GPU: {gpu}", "", *paths_table(_lines(root / "paths.jsonl")), "",
             *throughput_table(_lines(root / "throughput.jsonl")), "", *mfu_verdict(_lines(root / "throughput.jsonl")),
             *utilisation(root / "gpu_util.csv"), ""]
    status = root / "status.log"
    lines += ["The reduced study through every stage (`raysys status`):", "", "```",
              status.read_text().rstrip() if status.is_file() else "(no status: the study did not run)", "```"]
    study_log = root / "study.log"
    if study_log.is_file():
        walls = [line for line in study_log.read_text().splitlines() if line.startswith("total wall time")]
        lines += [walls[-1] if walls else "(the study did not finish)"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/raysys-gpu-check"))
