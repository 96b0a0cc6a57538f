"""Training throughput of raysys's own loops: tokens per second and model-FLOPs utilisation (MFU) of masked-LM
pre-training and of task tuning, on this machine's GPU (or CPU), for the tiny model or RoBERTa-base.

The models are randomly initialised from the architecture (no hub access needed) and the data are random token ids
— throughput does not depend on what the tokens say. Tuning examples have random lengths (16 to --max-length), so
that length bucketing has padding to save.

    python bench/throughput.py --model base --what pretrain --precision bf16 --batch 64 --micro-batch 32 --seq 512
    python bench/throughput.py --model base --what tune --precision bf16 --batch 16 --max-length 128 --bucketing

Each run prints one JSON line (append them to a file with --out); RESULTS.md holds the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysys.config import ModelConfig, PretrainConfig, TuningConfig
from raysys.core import compute, models
from raysys.core.classifier_loop import train_classifier
from raysys.core.masked_lm_loop import LinkPlan, train_masked_lm

SIZES = {
    "tiny": ModelConfig(vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256,
                        max_positions=128),
    "base": ModelConfig(vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                        max_positions=512),
}


class SyntheticTokenizer:
    """What the loops need of a tokenizer, RoBERTa's special-token layout (<s>=0, <pad>=1, </s>=2, <unk>=3,
    <mask>=4), for a vocabulary of `size` ids."""

    bos_token_id, pad_token_id, eos_token_id, unk_token_id, mask_token_id = 0, 1, 2, 3, 4
    all_special_ids = (0, 1, 2, 3, 4)

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


class Recorder:
    """A checkpointer that never saves and keeps what the loop reports (tuning's tokens/s per evaluation window)."""

    def __init__(self):
        self.reports = []

    def resume(self):
        return None

    def due(self) -> bool:
        return False

    def report(self, metrics: dict) -> None:
        self.reports.append(metrics)

    def save(self, step, state, metrics) -> None:
        self.reports.append(metrics)


def _sequences(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [[0] + torch.randint(5, vocab, (k - 2,), generator=g).tolist() + [2] for k in lengths]


def bench_pretrain(args, model_cfg: ModelConfig, device) -> dict:
    tokenizer = SyntheticTokenizer(model_cfg.vocab_size)
    sequences = _sequences(args.batch * (args.warmup + args.steps), args.seq, args.seq, model_cfg.vocab_size, 0)
    cfg = PretrainConfig(batch_size=args.batch, sequence_length=args.seq, micro_batch_size=args.micro_batch,
                         precision=args.precision, log_every_steps=args.steps, num_workers=1, use_gpu=device.type == "cuda")
    model = models.new_masked_lm(model_cfg, tokenizer, seed=0).to(device)
    train_masked_lm(model, sequences, tokenizer, cfg, LinkPlan(args.warmup, 1e-4), device=device)
    _sync(device)
    started = time.time()
    curve = train_masked_lm(model, sequences, tokenizer, cfg, LinkPlan(args.steps, 1e-4), device=device)
    _sync(device)
    seconds = time.time() - started
    tokens = curve[-1]["tokens"]
    flops = compute.training_flops(tokens, model_cfg.hidden_size, model_cfg.num_layers, model_cfg.intermediate_size,
                                   args.seq, model_cfg.vocab_size, int(0.15 * tokens))
    return {"tokens": tokens, "seconds": seconds, "flops": flops}


def bench_tune(args, model_cfg: ModelConfig, device) -> dict:
    n = args.batch * args.steps
    train = _sequences(n, 16, args.max_length, model_cfg.vocab_size, 1)
    small = _sequences(8, 16, args.max_length, model_cfg.vocab_size, 2)
    labels = lambda ids: torch.tensor([x[1] % 2 for x in ids])
    encoded = {"train": (train, labels(train)), "dev": (small, labels(small)), "test": (small, labels(small))}
    cfg = TuningConfig(max_steps=args.steps, eval_every_steps=args.steps, batch_size=args.batch,
                       max_length=args.max_length, lr=2e-5, precision=args.precision,
                       length_bucketing=args.bucketing)
    tokenizer = SyntheticTokenizer(model_cfg.vocab_size)
    model = models.random_classifier(model_cfg, tokenizer, num_labels=2, seed=0)
    warm = TuningConfig(**{**cfg.__dict__, "max_steps": args.warmup, "eval_every_steps": args.warmup})
    train_classifier(model, encoded, warm, seed=0, pad_id=1, device=device)
    recorder = Recorder()
    _sync(device)
    train_classifier(model, encoded, cfg, seed=0, pad_id=1, device=device, checkpointer=recorder)
    tokens_per_second = recorder.reports[-1]["tokens_per_second"]
    real_tokens = sum(len(x) for x in train[: args.batch * args.steps])
    seconds = real_tokens / tokens_per_second
    # FLOPs are counted on real (non-padding) tokens: padding the loop computes is waste, not work
    flops = compute.training_flops(real_tokens, model_cfg.hidden_size, model_cfg.num_layers,
                                   model_cfg.intermediate_size, args.max_length)
    return {"tokens": real_tokens, "seconds": seconds, "flops": flops}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--what", choices=("pretrain", "tune"), default="pretrain")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=128, help="pre-training sequence length")
    parser.add_argument("--max-length", type=int, default=128, help="tuning: longest example")
    parser.add_argument("--bucketing", action="store_true", help="tuning: length bucketing")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the JSON line to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    compute.allow_tf32(device)
    model_cfg = SIZES[args.model]
    measured = (bench_pretrain if args.what == "pretrain" else bench_tune)(args, model_cfg, device)
    peak = compute.peak_tflops(device)
    achieved = measured["flops"] / measured["seconds"] / 1e12
    row = {
        "what": args.what, "model": args.model, "precision": args.precision, "batch": args.batch,
        "micro_batch": args.micro_batch, "seq": args.seq if args.what == "pretrain" else args.max_length,
        "bucketing": args.bucketing if args.what == "tune" else None, "steps": args.steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "tokens_per_second": round(measured["tokens"] / measured["seconds"], 1),
        "achieved_tflops": round(achieved, 3), "mfu": round(achieved / peak, 4) if peak else None,
        "torch": torch.__version__,
    }
    line = json.dumps(row)
    print(line)
    if args.out:
        with args.out.open("a") as f:
            f.write(line + "\n")
    return row


if __name__ == "__main__":
    main()
