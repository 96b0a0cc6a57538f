"""raysys/core/compute.py: bf16 autocast, the optimizer's kernel choice and schedule, and the FLOP arithmetic behind
utilisation figures (checked against a hand count for RoBERTa-base)."""

import pytest
import torch

from raysys.core import compute


def test_a_cpu_has_no_peak_and_the_schedule_warms_up_then_decays_to_zero():
    assert compute.peak_tflops("cpu") is None
    assert [compute.linear_schedule(s, 10, 2) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_autocast_runs_matmuls_in_bf16_and_fp32_is_untouched():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with compute.autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with compute.autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ValueError, match="precision: 'fp16'"):
        compute.autocast("cpu", "fp16")


def test_adamw_is_fused_only_on_cuda():
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = compute.adamw(params, 1e-3, 0.01, "cpu")
    assert not optimizer.defaults["fused"]
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0.01


def test_training_flops_of_roberta_base_match_a_hand_count():
    h, layers, inter, seq, vocab = 768, 12, 3072, 512, 50265
    per_layer_weights = 4 * h * h + 2 * h * inter  # 7,077,888: the layer's matmul weights
    assert per_layer_weights * layers == 84_934_656
    per_token_forward = 2 * per_layer_weights * layers + layers * 4 * seq * h
    assert compute.encoder_flops_per_token(h, layers, inter, seq) == per_token_forward
    # one 2048 x 512 step with 15% of positions predicted: about 6 · 85M · 1M tokens + the head
    tokens = 2048 * 512
    predicted = int(0.15 * tokens)
    flops = compute.training_flops(tokens, h, layers, inter, seq, vocab, predicted)
    assert flops == pytest.approx(3 * (per_token_forward * tokens + 2 * h * vocab * predicted))
    assert 6.0e14 < flops < 7.0e14


def test_the_throughput_benchmark_measures_both_loops_and_bucketing_saves_padding(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.jsonl"
    common = ["--model", "tiny", "--steps", "4", "--warmup", "1", "--out", str(out)]
    pre = bench.main(["--what", "pretrain", "--batch", "8", "--micro-batch", "4", "--seq", "32", *common])
    assert pre["tokens_per_second"] > 0 and pre["device"].startswith("CPU") and pre["mfu"] is None
    # 4 steps x 8 sequences x 32 tokens, at 3 x the forward FLOPs (encoder + masked-LM head at 15%)
    tokens = 4 * 8 * 32
    flops = compute.training_flops(tokens, 128, 4, 256, 32, 2048, int(0.15 * tokens))
    assert pre["achieved_tflops"] == pytest.approx(flops / (tokens / pre["tokens_per_second"]) / 1e12, rel=0.02,
                                                   abs=1e-3)
    tuned = bench.main(["--what", "tune", "--batch", "8", "--max-length", "64", "--bucketing", *common])
    assert tuned["tokens_per_second"] > 0 and tuned["bucketing"] is True
    assert [json.loads(line)["what"] for line in out.read_text().splitlines()] == ["pretrain", "tune"]
