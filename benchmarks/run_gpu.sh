#!/usr/bin/env bash
# One prepared GPU benchmark run (about 3-5 minutes on an H200; each step has a hard timeout, in all < 10 min):
#   1. fused sampler kernels vs PyTorch references, GB/s against the peak bandwidth (bench_kernels.py), then
#      measured vs predicted time (the roofline + launch-overhead model of compile_kernels.py, benchmarks/RESULTS.md);
#   2. pipeline latency at batch 1/16/256: diffusers vs our standard pipeline vs the fast path, eager and with
#      CUDA-graph capture (bench_sampling.py).
# Usage:  bash benchmarks/run_gpu.sh            (env: PEAK_BW=4.8e12  PRESET=cifar10|imagenet64  OUT=dir)
# Results go to $OUT (default benchmarks/out/) as .md tables and .json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/out}"
PEAK_BW="${PEAK_BW:-4.8e12}"
PRESET="${PRESET:-cifar10}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1

python - <<'PY' 2>&1 | tee "$OUT_DIR/env.txt"
import torch, diffusers
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import triton; print("triton", triton.__version__)
except Exception as exc:  # the kernels fall back to PyTorch
    print("triton unavailable:", exc)
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null | tee -a "$OUT_DIR/env.txt"

status=0
echo "== kernels (fp32 state) =="
timeout 150 python benchmarks/bench_kernels.py --device cuda --peak-bw "$PEAK_BW" \
    --json "$OUT_DIR/kernels_fp32.json" | tee "$OUT_DIR/kernels_fp32.md" || status=1
python benchmarks/compile_kernels.py --compare "$OUT_DIR/kernels_fp32.json" \
    | tee "$OUT_DIR/kernels_fp32_vs_predicted.md" || status=1
echo "== kernels (fp32 state, bf16 network) =="
timeout 90 python benchmarks/bench_kernels.py --device cuda --peak-bw "$PEAK_BW" --net-dtype bfloat16 \
    --numel 786432 3145728 67108864 --json "$OUT_DIR/kernels_bf16net.json" | tee "$OUT_DIR/kernels_bf16net.md" || status=1
python benchmarks/compile_kernels.py --compare "$OUT_DIR/kernels_bf16net.json" \
    | tee "$OUT_DIR/kernels_bf16net_vs_predicted.md" || status=1
echo "== CUDA-only tests (graph capture/replay, kernels in a graph, inductor, channels_last + bf16) =="
timeout 240 python -m pytest -q tests/test_fast_sampling_cpu.py tests/test_kernels.py -k "cuda" \
    | tee "$OUT_DIR/cuda_tests.txt" || status=1
echo "== pipelines ($PRESET) =="
timeout 300 python benchmarks/bench_sampling.py --device cuda --preset "$PRESET" --batch-sizes 1 16 256 \
    --steps 1 2 4 --repeats 10 --json "$OUT_DIR/sampling.json" | tee "$OUT_DIR/sampling.md" || status=1
exit $status
