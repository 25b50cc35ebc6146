#!/usr/bin/env bash
# The first contact with a lent GPU machine (no network, about 10 minutes): the set-up facts,
# the extensions built in place, every gpu test (not stopping at the first failure), three
# engine steps per precision, the step and kernel benchmarks. Every stage has its own
# timeout, so one hang cannot eat the rest; each stage's exit status goes to OUT/summary.txt
# and the script exits non-zero if any failed, only after running them all.
#   tools/gpu_first_contact.sh OUT [PYTHON]      (make gpu-first-contact OUT=dir)
set -u
OUT=${1:?usage: $0 OUT [PYTHON]}
PY=${2:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export NCCL_DEBUG=WARN
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/summary.txt"
failed=0

# stage NAME SECONDS CMD...: run CMD with a timeout, its output to OUT/NAME.log and the screen.
stage() {
  local name=$1 limit=$2; shift 2
  echo "== $name (timeout ${limit}s): $*" | tee "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)')" | tee -a "$OUT/summary.txt"
  [ "$rc" = 0 ] || failed=1
}

facts() {
  make --version | head -1; gcc --version | head -1
  "$PY" -c "import sysconfig, os; h = sysconfig.get_paths()['include']; print('Python', sysconfig.get_python_version(), 'headers', h, 'present' if os.path.exists(os.path.join(h, 'Python.h')) else 'MISSING')"
  "$PY" -c "import Cython; print('Cython', Cython.__version__)" || echo "Cython: not importable"
  "$PY" -c "from mpi4py import MPI; print('mpi4py loads', MPI.Get_library_version().splitlines()[0])" || echo "mpi4py: no MPI library"
  nvidia-smi --query-gpu=name,driver_version,compute_mode,memory.total --format=csv || echo "nvidia-smi: failed"
  "$PY" -c "import cupy; r = cupy.cuda.runtime; print('CuPy', cupy.__version__, 'CUDA runtime', r.runtimeGetVersion(), 'driver', r.driverGetVersion())" || echo "CuPy: not importable"
  "$PY" -c "from engine import nccl; print('NCCL', nccl.version_tuple(), 'from', nccl.library_path())" 2>/dev/null \
    || "$PY" -c "import cupy.cuda.nccl as n; print('NCCL (CuPy)', n.get_version())" || echo "NCCL: not found"
}
stage facts 60 bash -c "$(declare -f facts); PY='$PY' facts"
if ! "$PY" -m engine.backend > "$OUT/probe.log" 2>&1; then
  echo "gpu-first-contact: refused: $(tail -1 "$OUT/probe.log")" | tee -a "$OUT/summary.txt"
  exit 1
fi
stage build 240 "$PY" setup.py -q build_ext --inplace
stage gpu-tests 300 "$PY" -m pytest -p no:cacheprovider -q -rs -m "gpu and not mpi" \
  --junitxml="$OUT/gpu-tests.xml" tests
for p in fp32 tf32 bf16; do
  stage "train-$p" 120 "$PY" -m engine.train --device gpu --max-steps 3 --precision "$p" --dataset digits \
    --batch-per-rank 32 --eval-every 0 --no-checkpoint --print-every 1 --runs-dir "$OUT/runs"
done
stage train-graph 120 "$PY" -m engine.train --device gpu --max-steps 5 --cuda-graph --dataset digits \
  --batch-per-rank 32 --eval-every 0 --no-checkpoint --print-every 1 --runs-dir "$OUT/runs"
stage train-cudnn 120 "$PY" -m engine.train --device gpu --max-steps 5 --conv cudnn --dataset digits \
  --batch-per-rank 32 --eval-every 0 --no-checkpoint --print-every 1 --runs-dir "$OUT/runs"
stage bench-step 240 "$PY" bench/step.py --device gpu --cuda-graph --json "$OUT/step.json"
stage bench-kernels 120 "$PY" bench/kernels.py --gpu
echo "gpu-first-contact: $(grep -vc ': exit 0$' "$OUT/summary.txt") of $(wc -l < "$OUT/summary.txt") stages failed; see $OUT/summary.txt"
exit $failed
