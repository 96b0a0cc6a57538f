"""The CUDA code paths of raysys, each checked directly (no Ray): the parts of `bench/gpu_check.sh` that need only
torch and raysys's own loops. On a CPU (`--device cpu`) the same checks run with the CPU's counterparts (gloo for
NCCL, no CUDA random state), so that this script is exercised by the test suite on machines without a GPU.

    python bench/gpu_paths.py --out /tmp/gpu/paths.jsonl            # on a GPU machine
    python bench/gpu_paths.py --device cpu                           # the same checks on a CPU

Each check prints one JSON line {"check", "ok", ...details}; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import SyntheticTokenizer  # this script's folder is on sys.path when it runs

from raysys.config import ModelConfig, PretrainConfig
from raysys.core import compute, masked_lm_loop, models
from raysys.storage.checkpoint import Checkpointer
from raysys.storage.store import Store

MODEL = ModelConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                    max_positions=64)


def _sequences(count: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[0, *torch.randint(5, MODEL.vocab_size, (length - 2,), generator=g).tolist(), 2] for _ in range(count)]


def check_fused_adamw(device: torch.device) -> dict:
    optimizer = compute.adamw(torch.nn.Linear(4, 4).to(device).parameters(), 1e-3, 0.01, device)
    fused = bool(optimizer.defaults.get("fused"))
    return {"ok": fused == (device.type == "cuda"), "fused": fused}


def check_bf16_step(device: torch.device) -> dict:
    tokenizer = SyntheticTokenizer(MODEL.vocab_size)
    model = models.new_masked_lm(MODEL, tokenizer, seed=0).to(device)
    cfg = PretrainConfig(batch_size=16, sequence_length=32, precision="bf16", log_every_steps=5, num_workers=1)
    curve = masked_lm_loop.train_masked_lm(model, _sequences(64, 32), tokenizer, cfg, masked_lm_loop.LinkPlan(10, 1e-3),
                                           device=device)
    fp32 = all(p.dtype == torch.float32 for p in model.parameters())
    return {"ok": fp32 and all(row["loss"] == row["loss"] for row in curve), "weights_fp32": fp32,
            "first_loss": round(curve[0]["loss"], 4), "last_loss": round(curve[-1]["loss"], 4)}


class _Stop(Exception):
    pass


def check_checkpoint_round_trip(device: torch.device) -> dict:
    """Train 20 steps; separately train, stop after the checkpoint at step 10, resume: the checkpoint holds the
    device's random state, and the resumed weights match the uninterrupted ones (exactly on CPU; on CUDA up to
    the nondeterminism of its kernels, reported)."""
    tokenizer = SyntheticTokenizer(MODEL.vocab_size)
    sequences = _sequences(128, 32)
    cfg = PretrainConfig(batch_size=16, sequence_length=32, log_every_steps=5, num_workers=1)
    plan = masked_lm_loop.LinkPlan(20, 1e-3)

    def fresh():
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(0)
        return models.new_masked_lm(MODEL, tokenizer, seed=0).to(device)

    whole = fresh()
    masked_lm_loop.train_masked_lm(whole, sequences, tokenizer, cfg, plan, device=device)

    def stop_at_10(metrics, *_):
        if metrics["step"] == 10:
            raise _Stop

    with tempfile.TemporaryDirectory() as folder:
        try:
            masked_lm_loop.train_masked_lm(fresh(), sequences, tokenizer, cfg, plan, device=device,
                                           checkpointer=Checkpointer(Store(folder), 0, "link", on_save=stop_at_10))
        except _Stop:
            pass
        resumer = Checkpointer(Store(folder), 3600, "link")
        saved = resumer.resume()
        streams = saved["ranks"][0]
        has_cuda_state = streams.get("cuda_rng") is not None
        torch.manual_seed(123)  # whatever the process drew before, the resume must set it back
        resumed = models.new_masked_lm(MODEL, tokenizer, seed=5).to(device)
        masked_lm_loop.train_masked_lm(resumed, sequences, tokenizer, cfg, plan, device=device,
                                       checkpointer=Checkpointer(Store(folder), 3600, "link"))
    diff = max((a.float() - b.float()).abs().max().item()
               for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    exact = diff == 0.0
    ok = has_cuda_state == (device.type == "cuda") and (exact if device.type == "cpu" else diff < 1e-3)
    return {"ok": ok, "resumed_from": saved["step"], "cuda_rng_saved": has_cuda_state, "max_weight_diff": diff,
            "bit_exact": exact}


def check_device_moves(device: torch.device) -> dict:
    """A model on the device, moved to the CPU and saved as safetensors (as a PLM is), loads into a fresh model
    that equals it back on the device."""
    import copy

    from safetensors.torch import load_model, save_model

    tokenizer = SyntheticTokenizer(MODEL.vocab_size)
    model = models.new_masked_lm(MODEL, tokenizer, seed=1).to(device)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        save_model(copy.deepcopy(model).cpu(), path)
        back = models.new_masked_lm(MODEL, tokenizer, seed=9)
        load_model(back, path)
    back = back.to(device)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    return {"ok": same, "tensors": len(model.state_dict())}


def _collective_worker(rank: int, port: int, backend: str, result: str) -> None:
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1)
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    value = torch.tensor([3.0], device=device)
    torch.distributed.all_reduce(value)
    gathered = masked_lm_loop._gather_streams(torch.Generator().manual_seed(1), device, 1)
    Path(result).write_text(json.dumps({"sum": value.item(), "streams": len(gathered)}))
    torch.distributed.destroy_process_group()


def check_collectives(device: torch.device) -> dict:
    """A one-rank process group (NCCL on a GPU, as Ray Train sets up for one worker): all-reduce and the
    gathering of random streams the checkpoints use."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        result = os.path.join(folder, "result.json")
        torch.multiprocessing.spawn(_collective_worker, args=(port, backend, result), nprocs=1)
        got = json.loads(Path(result).read_text())
    return {"ok": got == {"sum": 3.0, "streams": 1}, "backend": backend, **got}


CHECKS = {"fused_adamw": check_fused_adamw, "bf16_step": check_bf16_step,
          "checkpoint_round_trip": check_checkpoint_round_trip, "device_moves": check_device_moves,
          "collectives": check_collectives}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu for the CPU counterparts)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    compute.allow_tf32(device)
    failed = 0
    for name, check in CHECKS.items():
        try:
            row = {"check": name, "device": args.device, **check(device)}
        except Exception as err:  # noqa: BLE001 — a failed check is reported, the others still run
            row = {"check": name, "device": args.device, "ok": False, "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc(limit=3)}
        failed += not row["ok"]
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
