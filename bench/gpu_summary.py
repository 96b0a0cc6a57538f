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


def main(folder: str) -> int:
    root = Path(folder)
    gpu = (root / "gpu.txt").read_text().strip() if (root / "gpu.txt").is_file() else "no nvidia-smi"
    lines = [f"GPU: {gpu}", "", *paths_table(_lines(root / "paths.jsonl")), "",
             *throughput_table(_lines(root / "throughput.jsonl")), ""]
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
