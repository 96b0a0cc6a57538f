"""How the arithmetic runs: mixed precision, TF32, the optimizer's kernel and schedule, the random streams, and the
model-FLOPs arithmetic used for utilisation figures. Nothing here changes what is computed beyond floating-point
rounding. (Which device a trial gets is the Ray edge's business: `raysys.sweep.launchers.trial_device`.)"""

from __future__ import annotations

import contextlib
import random

import torch

from raysys.config import PRECISIONS


def allow_tf32(device: torch.device) -> None:
    """TF32 tensor cores for the fp32 matmuls that remain on a GPU (evaluation, fp32 runs): its 10-bit mantissa is
    plenty for training and accuracy measurements, at several times fp32's speed."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device | str, precision: str):
    """bf16 autocast on `device` for `precision == "bf16"`, else nothing. Weights, gradients and the optimizer
    stay fp32 (bf16 has fp32's range, so no loss scaling is needed)."""
    device_type = torch.device(device).type
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: '{precision}' is not one of {list(PRECISIONS)}")
    return contextlib.nullcontext()


def seed_all(seed: int) -> None:
    """Seed Python's and torch's global streams: where every cell's model building and training starts."""
    random.seed(seed)
    torch.manual_seed(seed)


def random_state(device: torch.device | str) -> dict:
    """The global random streams a training step draws from (dropout): the CPU's, and the GPU's on CUDA."""
    on_cuda = torch.device(device).type == "cuda"
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if on_cuda else None}


def restore_random_state(saved: dict, device: torch.device | str) -> None:
    """Undo `random_state` (a checkpoint written on a CPU restores no GPU stream)."""
    torch.set_rng_state(saved["torch_rng"])
    if torch.device(device).type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"])


def adamw(params, lr: float, weight_decay: float, device: torch.device | str) -> torch.optim.AdamW:
    """AdamW with the fused (one kernel for all parameters) implementation on CUDA, where it is fastest."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at `step`: linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def encoder_flops_per_token(hidden: int, layers: int, intermediate: int, sequence: int) -> int:
    """Forward FLOPs per token of a transformer encoder's layers: the four attention projections (4·h²), the
    feed-forward (2·h·i), and the attention scores and their weighted sum (2·s·h), each multiply-add 2 FLOPs."""
    per_layer = 2 * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * 2 * sequence * hidden
    return layers * per_layer


def training_flops(tokens: int, hidden: int, layers: int, intermediate: int, sequence: int,
                   vocab: int = 0, predicted_tokens: int = 0) -> float:
    """Training FLOPs (forward + backward = 3 × forward) of `tokens` through the encoder, plus the output
    projection over `vocab` for the `predicted_tokens` (masked positions only: the masked-LM head never runs
    elsewhere)."""
    encoder = encoder_flops_per_token(hidden, layers, intermediate, sequence) * tokens
    head = 2 * hidden * vocab * predicted_tokens
    return 3.0 * (encoder + head)


# Dense bf16 tensor-core peaks from NVIDIA's data sheets; the first name contained in the device's name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L4", 121.0))


def peak_tflops(device: torch.device | str) -> float | None:
    """Dense bf16 peak of a known GPU (for model-FLOPs utilisation); None for CPUs and unknown GPUs."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def device_name(device: torch.device | str) -> str:
    """What a run's device was, for the cost ledger: the GPU's model (e.g. "NVIDIA H200"), or "cpu (N threads)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
