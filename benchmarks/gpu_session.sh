#!/usr/bin/env bash
# Every GPU measurement of issue 17 on a lent GPU machine, in two calls of the device tool (plan it
# here, run it there; a lease is 15 minutes, so the part that matters most runs first, and the
# second call can be dropped or rerun on its own):
#
#   bash benchmarks/gpu_session.sh measure    # ~4-5 min
#     1. the `gpu` tests of the fused kernel (correctness on CUDA, both kernel forms);
#     2. benchmarks/bench_e2e_gpu.py: dmd2-1step at 1024x1024 fp16, prompt to image, plain vs GAG,
#        the project's sampler, the chain on the GPU eager and as one CUDA graph;
#     3. benchmarks/bench_gpu.py without compiles: the attention core vs SDPA (launch and graph
#        replayed, tile sweep), FLUX joint attention at 1024x1024, the SDXL UNet step eager and as
#        a replayed CUDA graph (plain, GAG fused, GAG bisect).
#   bash benchmarks/gpu_session.sh compile    # ~7 min
#     4. benchmarks/bench_gpu.py compiles only: the SDXL UNet under torch.compile, each variant cold
#        in a fresh process with empty caches (plain, GAG fused, GAG bisect in the compile region).
#
# Results go to $OUT (the device tool's folder) or the second argument: at most 5 files per part
# (the tool brings back 8). The device machine lacks some packages: wheels in .whl/ (diffusers,
# importlib_metadata, lazy_importer, entmax, polygraphy, onnxslim: see benchmarks/README.md);
# the device call carries it: carry [".whl"].
set -u
PART=${1:-measure}
OUT=${2:-${OUT:-/tmp/gag_gpu_out}}
mkdir -p "$OUT"
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }

export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"; nproc; } 2>&1

case "$PART" in
measure)
  echo "== 1. gpu tests"
  timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$? ($(elapsed) s)"; tail -n 15 "$OUT/gpu_tests.log"

  echo "== 2. bench_e2e_gpu.py: dmd2-1step prompt to image ($(elapsed) s)"
  timeout 280 python3 benchmarks/bench_e2e_gpu.py --iters 20 --warmup 3 --json "$OUT/bench_e2e.json" > "$OUT/bench_e2e.log" 2>&1
  echo "bench_e2e rc=$? ($(elapsed) s)"; grep -v "should be kept in float32\|^\[transformers\]" "$OUT/bench_e2e.log" | tail -n 25

  echo "== 3. bench_gpu.py core, joint, eager ($(elapsed) s)"
  timeout 170 python3 benchmarks/bench_gpu.py --compile-variants none --budget-s 160 \
    --json "$OUT/bench_gpu.json" > /dev/null 2> "$OUT/bench_gpu.log"  # stdout repeats the JSON
  echo "bench_gpu rc=$? ($(elapsed) s)"; grep "bench_gpu\|rror" "$OUT/bench_gpu.log" | tail -n 20
  ;;
compile)
  echo "== 4. bench_gpu.py compiles"
  budget=${BUDGET_S:-420}
  timeout $((budget + 15)) python3 benchmarks/bench_gpu.py --variants none --core-shapes none --joint-shapes none \
    --compile-variants plain,gag-fused,gag-bisect --compile-timeout 150 --budget-s "$budget" \
    --json "$OUT/bench_gpu_compiled.json" > /dev/null 2> "$OUT/bench_gpu_compiled.log"
  echo "bench_gpu rc=$? ($(elapsed) s)"; grep "bench_gpu\|rror" "$OUT/bench_gpu_compiled.log" | tail -n 20
  ;;
*)
  echo "usage: bash benchmarks/gpu_session.sh measure|compile [OUT]" >&2; exit 2 ;;
esac
echo "== done in $(elapsed) s"
