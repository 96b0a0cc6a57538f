"""Memory and speed of the pre-training data path at the paper's corpus sizes (issue 17).

For each corpus size, side by side in one run:
  1. generate a text corpus of that many bytes (synthetic sentences, one per line, in 64 MB shards);
  2. pack it (raysys.core.packing.write_packed over raysys.core.sources.documents): tokens/s of tokenization and
     packing, and the packing process's peak RSS;
  3. `--workers` processes act as DDP ranks on the packed corpus: each samples its shard of `--steps` steps
     (masked_lm_loop.sample_batch, pad_batch, mask_tokens — everything but the model) and reports its peak RSS;
  4. with `--old-path-up-to GB`, for sizes up to that, the path raysys had before: the whole corpus read into a
     list, tokenized and packed in memory, in every worker (peak RSS of one such worker).

Each measurement runs in a fresh process, so a peak is that step's alone (ru_maxrss of the child).

    python bench/corpus_memory.py --sizes 0.25 1 2 --old-path-up-to 0.25 --workdir /tmp/corpus-bench
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARD_BYTES = 64 * 1024**2


def generate(folder: Path, size_bytes: int, seed: int = 0, distinct_lines: int = 200_000) -> int:
    """Shards of sentences (8-30 words from a Zipf-like vocabulary of 20,000 words), up to `size_bytes`: a pool of
    distinct sentences, each shard a seeded random draw from it (generating every line afresh in Python would take
    longer than tokenizing it)."""
    import numpy as np

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    pool = [" ".join(rng.choices(words, weights, k=rng.randint(8, 30))) + ".\n" for _ in range(distinct_lines)]
    mean = sum(map(len, pool)) / len(pool)
    draw = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written, shard = 0, 0
    while written < size_bytes:
        count = max(1, int(min(SHARD_BYTES, size_bytes - written) / mean))
        text = "".join(pool[i] for i in draw.integers(0, len(pool), count))
        (folder / f"part-{shard:04d}.txt").write_text(text)
        written += len(text)
        shard += 1
    return written


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def _tokenizer(corpus: str, tokenizer_dir: str):
    from raysys.core import models

    if Path(tokenizer_dir, "tokenizer.json").is_file():
        return models.load_tokenizer(tokenizer_dir)
    first = min(Path(corpus).parent.glob("*.txt"))
    with first.open() as f:
        texts = [next(f) for _ in range(20000)]
    tokenizer = models.train_tokenizer(texts, 8192)
    tokenizer.save_pretrained(tokenizer_dir)
    return tokenizer


def child_pack(corpus: str, tokenizer_dir: str, out: str, seq: int) -> dict:
    from raysys.config import CorpusConfig
    from raysys.core import packing, sources

    tokenizer = _tokenizer(corpus, tokenizer_dir)
    started = time.time()
    meta = packing.write_packed(sources.documents(CorpusConfig("bench", source="text", path=corpus)), tokenizer, seq,
                                Path(out))
    return {"seconds": time.time() - started, "tokens": meta["tokens"], "sequences": meta["sequences"],
            "tokens_per_second": meta["tokens"] / (time.time() - started), "mb_per_second":
            meta["characters"] / 1e6 / (time.time() - started), "peak_rss_gb": peak_rss_gb()}


def _sample(sequences, tokenizer, steps: int, batch: int, rank: int, workers: int) -> int:
    import torch

    from raysys.core import data, masked_lm_loop, models

    generator = torch.Generator().manual_seed(rank)
    special = set(tokenizer.all_special_ids)
    regular = models.regular_token_ids(tokenizer)
    seen = 0
    for step in range(steps):
        ids, mask = data.pad_batch(masked_lm_loop.sample_batch(sequences, step, batch, rank, workers, 0),
                                   tokenizer.pad_token_id)
        special_mask = sum((ids == s) for s in special).bool()
        data.mask_tokens(ids, special_mask, tokenizer.mask_token_id, regular, 0.15, generator)
        seen += int(mask.sum())
    return seen


def child_worker(packed: str, tokenizer_dir: str, steps: int, batch: int, rank: int, workers: int) -> dict:
    from raysys.core import models, packing

    tokenizer = models.load_tokenizer(tokenizer_dir)
    started = time.time()
    tokens = _sample(packing.PackedCorpus(Path(packed)), tokenizer, steps, batch, rank, workers)
    return {"rank": rank, "tokens_sampled": tokens, "seconds": time.time() - started, "peak_rss_gb": peak_rss_gb()}


def child_old_path(corpus: str, tokenizer_dir: str, seq: int, steps: int, batch: int) -> dict:
    """raysys before issue 17: every worker loads the corpus into a list and packs it in memory."""
    from raysys.config import CorpusConfig, WorldConfig
    from raysys.core import data, masked_lm_loop, models

    tokenizer = models.load_tokenizer(tokenizer_dir)
    started = time.time()
    texts = data.load_corpus(CorpusConfig("bench", source="text", path=corpus), WorldConfig())
    sequences = masked_lm_loop.pack_corpus(texts, tokenizer, seq)
    _sample(sequences, tokenizer, steps, batch, 0, 1)
    return {"seconds": time.time() - started, "sequences": len(sequences), "peak_rss_gb": peak_rss_gb()}


def run_child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise RuntimeError(f"{args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 2.0], help="corpus sizes in GB")
    parser.add_argument("--workdir", default="/tmp/raysys-corpus-bench")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="sequences per worker per step")
    parser.add_argument("--old-path-up-to", type=float, default=0.0, help="GB; 0 = never")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = json.loads(args.child)
        print(json.dumps({"pack": child_pack, "worker": child_worker, "old": child_old_path}[kind](*rest)))
        return
    work = Path(args.workdir)
    tokenizer_dir = str(work / "tokenizer")
    rows = []
    for size in args.sizes:
        corpus_dir = work / f"corpus-{size:g}GB"
        if not corpus_dir.exists():
            generate(corpus_dir, int(size * 1024**3))
        pattern = str(corpus_dir / "*.txt")
        packed = work / f"packed-{size:g}GB"
        shutil.rmtree(packed, ignore_errors=True)
        pack = run_child("pack", pattern, tokenizer_dir, str(packed), args.seq)
        ranks = [run_child("worker", str(packed), tokenizer_dir, args.steps, args.batch, r, args.workers)
                 for r in range(args.workers)]
        row = {"size_gb": size, "pack": pack, "workers": ranks}
        if size <= args.old_path_up_to:
            row["old_path_worker"] = run_child("old", pattern, tokenizer_dir, args.seq, args.steps, args.batch)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(packed, ignore_errors=True)
    print("\n| corpus | tokens | tokenize+pack tokens/s (MB/s) | packing peak RSS | worker peak RSS (max over ranks) |"
          " old path: one worker's peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        old = row.get("old_path_worker")
        old_rss = f"{old['peak_rss_gb']:.2f} GB" if old else "—"
        print(f"| {row['size_gb']:g} GB | {row['pack']['tokens']:,} | {row['pack']['tokens_per_second']:,.0f} "
              f"({row['pack']['mb_per_second']:.1f}) | {row['pack']['peak_rss_gb']:.2f} GB | "
              f"{max(w['peak_rss_gb'] for w in row['workers']):.2f} GB | "
              f"{old_rss} |")


if __name__ == "__main__":
    main()
