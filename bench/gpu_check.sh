#!/usr/bin/env bash
# The prepared GPU check (issue 18): one script, under 8 minutes on one GPU, that proves raysys's CUDA paths and
# measures its loops there. Run it whenever a GPU is available and put the summary in bench/RESULTS.md.
#
#   bench/gpu_check.sh [OUT_DIR]          # default: $OUT, else /tmp/raysys-gpu-check
#   GPU_CHECK_SMOKE=1 bench/gpu_check.sh  # the same steps on a CPU at toy sizes (does the script still run?)
#
#   1. bench/gpu_paths.py: fused AdamW, a bf16 masked-LM step, a checkpoint round trip holding the CUDA random
#      state, device moves through safetensors, a one-rank NCCL group (all-reduce, the streams gather)
#   2. bench/throughput.py: RoBERTa-base masked-LM tokens/s and MFU in fp32 and bf16; tuning tokens/s with and
#      without length bucketing
#   3. sweeps/full_paper.py --preset bench/gpu_study.toml: the paper preset's GPU settings on the built-in tiny
#      world, through every stage on CUDA (Ray Train DDP over NCCL, GPU shares per trial), then `raysys status`
#      while nvidia-smi samples the GPU's utilisation (is the GPU kept busy by the packed trials?)
#   4. bench/gpu_summary.py: one table of all of it, bf16 MFU against the 45 % goal
#
# A machine without network (a lent GPU box): carry the missing packages as wheels in .whl/ (ray, optuna, ...);
# they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/raysys-gpu-check}}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
smoke=${GPU_CHECK_SMOKE:-0}
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, remember a failure
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  echo "== $name"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - started)) s (log: $out/$name.log)"
  [ "$rc" -eq 0 ] || { failed+=("$name"); tail -n 15 "$out/$name.log"; }
}

rm -f "$out/paths.jsonl" "$out/throughput.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt" 2>/dev/null || true

if [ "$smoke" = 1 ]; then
  device=cpu; model=tiny; pre=(--batch 16 --seq 64 --steps 3 --warmup 1); micro=(8 16); tune=(--batch 8 --max-length 64 --steps 6 --warmup 1)
  study_sets=(--set pretrain.use_gpu=false --set tuning.gpus_per_trial=0 --set methods.gpus_per_trial=0
              --set pilot.gpus_per_trial=0 --set pretrain.precision=fp32 --set tuning.precision=fp32 --num-cpus 2
              --set pretrain.initial_steps=10 --set pretrain.continual_steps=10 --set model.hidden_size=64
              --set model.intermediate_size=128 --set tuning.cpus_per_trial=1 --set methods.cpus_per_trial=1
              --set pretrain.cpus_per_worker=1)
else
  device=cuda; model=base; pre=(--batch 64 --seq 512 --steps 12 --warmup 3); micro=(16 32); tune=(--batch 32 --max-length 128 --steps 40 --warmup 5)
  study_sets=()
fi

step paths 240 "$py" bench/gpu_paths.py --device "$device" --out "$out/paths.jsonl"
step mlm-fp32 150 "$py" bench/throughput.py --model "$model" --what pretrain --precision fp32 --micro-batch "${micro[0]}" "${pre[@]}" --out "$out/throughput.jsonl"
step mlm-bf16 150 "$py" bench/throughput.py --model "$model" --what pretrain --precision bf16 --micro-batch "${micro[1]}" "${pre[@]}" --out "$out/throughput.jsonl"
step tune-plain 120 "$py" bench/throughput.py --model "$model" --what tune --precision bf16 "${tune[@]}" --out "$out/throughput.jsonl"
step tune-bucketed 120 "$py" bench/throughput.py --model "$model" --what tune --precision bf16 --bucketing "${tune[@]}" --out "$out/throughput.jsonl"
rm -rf "$out/study" "$out/gpu_util.csv"
# how busy the GPU is while the study's packed trials (fractional GPU shares) run: one sample every 500 ms
if [ "$smoke" != 1 ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 >"$out/gpu_util.csv" &
  sampler=$!
fi
step study 420 "$py" sweeps/full_paper.py --preset bench/gpu_study.toml --storage "$out/study" --address local "${study_sets[@]}"
[ -n "${sampler:-}" ] && kill "$sampler" 2>/dev/null
step status 60 "$py" -m raysys.cli status "$out/study"
"$py" bench/gpu_summary.py "$out" | tee "$out/summary.md"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
