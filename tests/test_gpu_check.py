"""The prepared GPU check (bench/gpu_check.sh) stays runnable without a GPU: its direct CUDA-path checks run
with their CPU counterparts and pass, and its summary renders what they wrote."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_the_cuda_path_checks_pass_with_their_cpu_counterparts_and_the_summary_renders_them(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH / "gpu_paths.py"), "--device", "cpu", "--out",
                          str(tmp_path / "paths.jsonl")], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {r["check"]: r for r in map(json.loads, (tmp_path / "paths.jsonl").read_text().splitlines())}
    assert set(rows) == {"fused_adamw", "bf16_step", "checkpoint_round_trip", "device_moves", "collectives"}
    assert all(r["ok"] for r in rows.values())
    assert rows["fused_adamw"]["fused"] is False  # fused AdamW is CUDA's only
    assert rows["checkpoint_round_trip"]["resumed_from"] == 10 and rows["checkpoint_round_trip"]["bit_exact"]
    assert rows["collectives"] == {**rows["collectives"], "backend": "gloo", "sum": 3.0, "streams": 1}
    (tmp_path / "throughput.jsonl").write_text(json.dumps({
        "what": "pretrain", "model": "base", "precision": "bf16", "batch": 64, "seq": 512, "bucketing": None,
        "tokens_per_second": 123456.7, "achieved_tflops": 321.0, "mfu": 0.4062, "device": "NVIDIA H200"}) + "\n")
    summary = subprocess.run([sys.executable, str(BENCH / "gpu_summary.py"), str(tmp_path)], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    assert summary.count("| yes |") == 5 and "**NO**" not in summary
    assert "| pretrain | base | bf16 | 64 × 512 | — | 123,457 | 321.0 | 40.6% | NVIDIA H200 |" in summary
    assert "(no status: the study did not run)" in summary
    assert "bf16 masked-LM MFU: 40.6% on NVIDIA H200 (goal ≥ 45%: **not met**)" in summary
    assert "GPU utilisation during the study: not sampled" in summary
    (tmp_path / "gpu_util.csv").write_text("0, 100\n80, 2000\n90, 2000\n100, 2100\n")
    summary = subprocess.run([sys.executable, str(BENCH / "gpu_summary.py"), str(tmp_path)], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    assert "GPU utilisation during the study: mean 68%, median 90%, idle in 25% of 4 samples" in summary
