#!/usr/bin/env bash
# One GPU lease: install, run the CUDA tests, then the GPU benchmarks, writing logs and reports under $OUT.
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_session.sh STEP...
# Steps: setup (always first), tests, pararnn, ops, ops_fla, ops_bf16, titans, models, ckpt. Wheels for the packages the
# image lacks (hydra-core, omegaconf, datasets, fla-core, titans-pytorch and their pure-Python needs)
# travel in .whl/ (see the device README).
#
# Durations seen on an H100 lease (2026-11-23, benchmarks/RESULTS.md): setup 15 s; tests about 5 min
# with 8 workers, almost all of it Triton compiles (20-35 s for each heavy delta-rule kernel, once per
# shape and dtype); pararnn about 3 min (the sequential loop at 16384 tokens takes 10-14 s a call).
# Autotuning multiplies compile time by the number of configs: the first lease lost 10 minutes to it.
set -uo pipefail
export MPLBACKEND=Agg MPLCONFIGDIR=/tmp/matplotlib
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
for step in "$@"; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    setup)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
      export PYTHONPATH=/tmp/site
      python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
      git log -1 --format='commit %h %s' 2>/dev/null || true ;;
    tests)
      SEQZOO_AUTOTUNE=0 SEQZOO_GPU_REPORT="$OUT/gpu_test_reports.log" timeout ${TESTS_TIMEOUT:-420} python3 -m pytest -p no:cacheprovider -v -n 8 --durations=25 --timeout 300 tests/gpu -rfE -k "${PYTEST_K:-}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -60 ;;
    pararnn)
      timeout 240 python3 -m seqzoo.eval bench pararnn --device cuda --seq-lens 256 1024 4096 16384 --repeats 3 --out "$OUT/pararnn" 2>&1 | tail -30 ;;
    ops)
      timeout 200 python3 -m seqzoo.eval bench ops --device cuda --seq-lens 1024 4096 16384 --skip-reference-above 1024 --out "$OUT/ops" 2>&1 | tail -40 ;;
    ops_fla)
      timeout 200 python3 -m seqzoo.eval bench ops --device cuda --ops gated_delta_rule simple_gla --seq-lens 4096 16384 --skip-reference-above 0 --out "$OUT/ops_fla" 2>&1 | tail -30 ;;
    ops_bf16)
      timeout 200 python3 -m seqzoo.eval bench ops --device cuda --dtype bfloat16 --seq-lens 4096 16384 --skip-reference-above 0 --out "$OUT/ops_bf16" 2>&1 | tail -40 ;;
    titans)
      timeout 200 python3 -m seqzoo.eval bench titans --device cuda --seq-lens 1024 4096 --out "$OUT/titans" 2>&1 | tail -30 ;;
    models)
      timeout 240 python3 -m seqzoo.eval bench models --device cuda --mixers attention gated_deltanet gla mamba2 titans_lmm pararnn_gru --seq-lens 1024 4096 --out "$OUT/models" 2>&1 | tail -30 ;;
    ckpt)
      # checkpoint_attention (SCOUT/RAT) vs SDPA causal: the Triton and torch backends, L = 10 and 64.
      timeout 300 python3 -m seqzoo.eval bench checkpoint_attention --device cuda --seq-lens 4096 8192 16384 32768 --segment-lens 10 64 --out "$OUT/ckpt" 2>&1 | tail -30 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
