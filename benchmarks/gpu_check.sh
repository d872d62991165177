#!/usr/bin/env bash
# GPU readiness, in one go on a CUDA machine (< 8 minutes on one H100/H200, then the Ray checks): the GPU-marked tests
# (FlexAttention training gradients, the vLLM engine, NCCL DDP with 2 ranks where 2 GPUs exist), then DPO and GRPO side
# by side with TRL on SmolLM2, then the Ray rollout-worker tests and a vLLM worker placed by Ray. Every figure lands
# under $OUT (default runs/gpu_check). Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
{
  date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.device_count(), 'GPUs')"
  $PY -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
} > "$OUT/machine.txt" 2>&1
# 1. The tests that need a GPU (they skip on CPU): FlexAttention gradients, the vLLM engine against the fake's flow,
#    bf16-moment AdamW on the fused CUDA kernel.
$PY -m pytest tests/test_attention.py tests/test_engines.py tests/test_bf16_moments.py -k "cuda or flex or vllm" \
    -p no:cacheprovider \
    > "$OUT/gpu_tests.txt" 2>&1; echo "gpu tests: rc=$?" >> "$OUT/summary.txt"
# 2. NCCL DDP, 2 ranks, where 2 GPUs exist: offline DPO and online GRPO on SmolLM2 under torchrun (the equality
#    tests themselves run on CPU with gloo in CI).
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m alignkit.cli online --method grpo \
      --model smollm2-135m-instruct --prompts src/alignkit/assets/align_prompts.jsonl --rounds 3 \
      --prompts_per_round 8 --num_samples 4 --max_new_tokens 64 --engine hf --output_dir "$OUT/ddp_grpo" \
      --progress false > "$OUT/nccl_ddp.txt" 2>&1; echo "nccl ddp online: rc=$?" >> "$OUT/summary.txt"
fi
# 3. DPO and GRPO against TRL on SmolLM2 (the benchmarks pick CUDA when it is there).
timeout 240 $PY benchmarks/bench_dpo.py --model smollm2 --steps 5 > "$OUT/dpo.txt" 2>&1
echo "dpo bench: rc=$?" >> "$OUT/summary.txt"
timeout 240 $PY benchmarks/bench_grpo.py --steps 4 > "$OUT/grpo.txt" 2>&1
echo "grpo bench: rc=$?" >> "$OUT/summary.txt"
# 3b. Partial rollouts on vLLM: each round in 2 segments, the second continued from the first's tokens after a weight
#     push (online/partial.py); the log shows token_staleness below staleness from round 3.
# vllm_grpo NAME SECONDS LABEL ARGS...: online GRPO on SmolLM2 with the vLLM engine (8 prompts x 4 per round, 64 new
# tokens), its log in $OUT/NAME.txt and its exit code in the summary under LABEL
vllm_grpo() {
  local name=$1 seconds=$2 label=$3
  shift 3
  timeout "$seconds" $PY -m alignkit.cli online --method grpo --model smollm2-135m-instruct \
      --prompts src/alignkit/assets/align_prompts.jsonl --prompts_per_round 8 --num_samples 4 --max_new_tokens 64 \
      --engine vllm "$@" --output_dir "$OUT/$name" --progress false > "$OUT/$name.txt" 2>&1
  echo "$label: rc=$?" >> "$OUT/summary.txt"
}
if $PY -c "import vllm" 2>/dev/null; then
  vllm_grpo vllm_partial 300 "vllm partial rollouts" --rounds 4 --async.max_staleness 2 --async.partial true
fi
# 4. Ray: the rollout-worker tests (CPU, a local Ray of 2 CPUs), then the placement check on the GPU: GRPO on SmolLM2
#    with one Ray rollout worker holding a vLLM engine in a {"CPU": 1, "GPU": 1} bundle, weights pushed through the
#    object store (docs/distributed.md, "Online RL on Ray"). Skipped, and said so, where ray or vllm is missing.
if $PY -c "import ray" 2>/dev/null; then
  $PY -m pytest tests/test_online_ray.py -q -p no:cacheprovider > "$OUT/ray_tests.txt" 2>&1
  echo "ray tests: rc=$?" >> "$OUT/summary.txt"
else
  echo "ray tests: skipped (no ray: pip install 'alignkit[ray]')" >> "$OUT/summary.txt"
fi
if $PY -c "import ray, vllm" 2>/dev/null; then
  vllm_grpo ray_vllm 480 "ray placement + vllm worker online" --rounds 2 --ray.rollout_workers 1 \
      --ray.placement STRICT_PACK
else
  echo "ray placement + vllm worker online: skipped (ray or vllm missing)" >> "$OUT/summary.txt"
fi
cp benchmarks/results/smollm2.* benchmarks/results/grpo.* "$OUT/" 2>/dev/null
cat "$OUT/summary.txt"
