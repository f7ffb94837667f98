#!/usr/bin/env bash
# Every GPU measurement of issues 8 and 9 in one call on a lent GPU machine (one try: plan it
# here, run it once there). In order, most important first, each step under its own time limit:
#   1. the `gpu` tests of the fused kernel (correctness on CUDA);
#   2. `gag-export bench` on tiny-sdxl, torch eager, GAG on/off (the bench tool's CUDA-event
#      path, JSON + Markdown + PNG; full-size compiled rows come from step 3);
#   3. benchmarks/bench_gpu.py: full-size SDXL UNet 1024x1024 fp16, plain vs GAG (bisect PyTorch
#      path, fused Triton kernel), eager / CUDA graph replay / torch.compile, compile times, and
#      the attention core vs SDPA (eager and as CUDA graphs), FLUX joint attention; it gets
#      whatever time is left of TOTAL_S.
# Results go to $OUT (the device tool's folder) or the first argument: 7 files (the tool brings back 8).
#
#   device machine, repository root, wheels of the packages its image lacks in .whl/
#   (diffusers, importlib_metadata, entmax, polygraphy, onnxslim: see benchmarks/README.md):
#   bash benchmarks/gpu_session.sh
set -u
OUT=${1:-${OUT:-/tmp/gag_gpu_out}}
TOTAL_S=${TOTAL_S:-570}
mkdir -p "$OUT"
t0=$(date +%s)
left() { echo $((TOTAL_S - $(date +%s) + t0)); }

export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi

{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"; nproc; } 2>&1 | tee "$OUT/gpu_tests.log"

echo "== 1. gpu tests ($(left) s left)"
timeout 180 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -n 25

echo "== 2. gag-export bench tiny-sdxl ($(left) s left)"
timeout 45 python3 -m gag_export.cli bench --model tiny-sdxl --backends torch --warmup 3 --iters 20 \
  --json "$OUT/bench_tiny_sdxl_gpu.json" --markdown "$OUT/bench_tiny_sdxl_gpu.md" --plot "$OUT/bench_tiny_sdxl_gpu.png" \
  > "$OUT/bench_tiny_sdxl_gpu.log" 2>&1
tail -n 20 "$OUT/bench_tiny_sdxl_gpu.log"

budget=$(( $(left) - 10 ))
echo "== 3. bench_gpu.py, budget ${budget} s"
timeout $((budget + 10)) python3 benchmarks/bench_gpu.py --budget-s "$budget" --compile-timeout 170 \
  --json "$OUT/bench_gpu.json" > /dev/null 2> "$OUT/bench_gpu.log"  # stdout repeats the JSON
echo "bench_gpu rc=$?"
tail -n 40 "$OUT/bench_gpu.log"
echo "== done in $(( $(date +%s) - t0 )) s"
