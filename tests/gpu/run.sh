#!/usr/bin/env bash
# The GPU check in one command (`make test-gpu`), in under ten minutes on a machine with CuPy and
# one or more GPUs; without a GPU it prints "no GPU: skipped" and exits 0.
#
#     tests/gpu/run.sh [WHEEL_DIR]          PYTHON=python3 by default (the Makefile passes its own)
#
# It takes the Python and the packages it finds and installs nothing from the network. WHEEL_DIR
# (default: .whl/ where it exists) holds wheels of what the machine lacks: they are installed
# with `pip --no-index --no-deps --target` into $MPIFED_SITE (default /tmp/mpifed-site), and
# the MPICH wheel's mpiexec and libmpi (which `pip --target` drops) are unpacked beside them.
# Then, each step with its own time limit and a line of its outcome:
#   1. mpifed info (1 and 2 ranks)        4. training on CuPy == NumPy (overlap on/off, NCCL,
#   2. NCCL on one rank, every dtype         Adam, data.test, a resume) and 2 federated rounds
#   3. the collective suite on CuPy        5. bench/gpu_throughput.py and bench/cnn_throughput.py
#                                             against PyTorch CUDA
#      under 1 and 2 ranks (NCCL cases        (if torch with CUDA is there)
#      skipped where GPUs < ranks)
# Each step has a time limit, and all of them GPU_CHECK_SECONDS (560) together, so the summary is
# printed inside a 600 s command. Exit status: 0 when every step passed or was skipped for a
# stated reason, else 1.
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=${1:-}
[ -z "$WHEELS" ] && [ -d .whl ] && WHEELS=.whl
SITE=${MPIFED_SITE:-/tmp/mpifed-site}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1

gpus=$("$PY" - <<'PYEOF' 2>/dev/null
try:
    import cupy
    print(cupy.cuda.runtime.getDeviceCount())
except Exception:
    print(0)
PYEOF
)
if [ "${gpus:-0}" -lt 1 ]; then
    echo "no GPU: skipped (CuPy or a CUDA device is missing for $PY)"
    exit 0
fi

if [ -n "$WHEELS" ]; then
    echo "== installing the wheels of $WHEELS into $SITE (no network, no dependencies)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl || { echo "FAILED: pip install from $WHEELS"; exit 1; }
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH#$PWD}"
    "$PY" - "$WHEELS" "$SITE/mpich" <<'PYEOF' || exit 1
"""Unpack the MPICH wheel's bin/ and lib/ (pip --target keeps neither lib/ nor modes)."""
import glob, os, sys, zipfile
wheels, prefix = sys.argv[1:]
for wheel in glob.glob(os.path.join(wheels, "mpich-*.whl")):
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if len(parts) > 3 and parts[1] == "data" and parts[2] in ("bin", "lib"):
                path = os.path.join(prefix, *parts[2:])
                if info.is_dir():
                    continue
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with zf.open(info) as src, open(path, "wb") as dst:
                    dst.write(src.read())
                os.chmod(path, (info.external_attr >> 16) & 0o777 or 0o644)
    print(f"unpacked {os.path.basename(wheel)} into {prefix}")
PYEOF
fi
if [ -x "$SITE/mpich/bin/mpiexec" ]; then
    export PATH="$SITE/mpich/bin:$PATH" LD_LIBRARY_PATH="$SITE/mpich/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export MPI4PY_LIBMPI="$SITE/mpich/lib/libmpi.so.12"
fi
# conftest and the benchmark look for mpiexec next to Python, then on PATH
MPIEXEC=$(dirname "$(command -v "$PY")")/mpiexec
[ -x "$MPIEXEC" ] || MPIEXEC=$(command -v mpiexec || true)

echo "== what $PY finds"
"$PY" - "$MPIEXEC" <<'PYEOF'
import importlib, importlib.metadata as md, sys
mpiexec = sys.argv[1]
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
need = {"numpy": "numpy", "h5py": "h5py", "mpi4py": "mpi4py", "threadpoolctl": "threadpoolctl",
        "cryptography": "cryptography", "pytest": "pytest", "pytest-timeout": "pytest_timeout",
        "pytest-mpi": "pytest_mpi"}
optional = {"tqdm": "tqdm", "tomli-w": "tomli_w", "torch": "torch"}
missing = []
for table, required in ((need, True), (optional, False)):
    for dist, module in table.items():
        try:
            importlib.import_module(module)
            print(f"  {dist:15} {version(dist) or '?'}")
        except Exception as err:
            print(f"  {dist:15} MISSING{'' if required else ' (optional)'}: {err}")
            if required:
                missing.append(dist)
import cupy
print(f"  {'cupy':15} {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
      f"{cupy.cuda.runtime.getDeviceCount()} GPU(s)")
try:
    from cupy.cuda import nccl
    ok = getattr(nccl, "available", True)
    print(f"  {'NCCL':15} {nccl.get_version() if ok else 'MISSING: NCCL cases will be skipped'}")
except Exception as err:
    print(f"  {'NCCL':15} MISSING ({err}): NCCL cases will be skipped")
try:
    from mpi4py import MPI
    print(f"  {'MPI library':15} {MPI.Get_library_version().splitlines()[0]}")
except Exception as err:
    print(f"  {'MPI library':15} MISSING: {err}".splitlines()[0])
    missing.append("an MPI library (the mpich wheel)")
print(f"  {'mpiexec':15} {mpiexec or 'MISSING'}")
if not mpiexec:
    missing.append("mpiexec (the mpich wheel)")
if missing:
    print("MISSING: " + ", ".join(missing) + ": carry their wheels (tests/gpu/run.sh WHEEL_DIR)")
    sys.exit(1)
PYEOF
[ $? -eq 0 ] || exit 1

failed=()
BUDGET=${GPU_CHECK_SECONDS:-560}  # the whole check ends by then, its summary printed
step() {  # step NAME SECONDS COMMAND...: run with a time limit, report its outcome and time
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ $left -lt 15 ]; then
        echo "-- $name: NOT RUN (the check's $BUDGET s are spent)"
        failed+=("$name (not run)")
        return
    fi
    [ $limit -gt $left ] && limit=$left
    echo "== $name"
    timeout -k 10 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 0 ]; then
        echo "-- $name: passed ($((SECONDS - start)) s)"
    else
        echo "-- $name: FAILED (exit $rc$([ $rc -eq 124 ] && echo ", over ${limit} s"), $((SECONDS - start)) s)"
        failed+=("$name")
    fi
}
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)

step "mpifed info, 1 rank" 60 "$MPIEXEC" -n 1 "$PY" -m mpifed info
step "mpifed info, 2 ranks" 60 "$MPIEXEC" -n 2 "$PY" -m mpifed info
step "NCCL on one rank, every dtype; devices" 120 "${PYTEST[@]}" tests/gpu/test_gpu.py \
    -k "nccl_on_one_rank or own_gpu"
for n in 1 2; do
    step "the collective suite on CuPy, $n rank(s)" 120 "$MPIEXEC" -n $n "${PYTEST[@]}" \
        --with-mpi -m mpi -k cupy tests/mpi/test_collectives_mpi.py
done
step "all collectives on device buffers (NCCL where GPUs >= ranks)" 120 "${PYTEST[@]}" \
    tests/gpu/test_gpu.py -k every_collective
step "training on CuPy == NumPy; resume; federated" 330 "${PYTEST[@]}" tests/gpu/test_gpu.py \
    -k "training or resumed or federated"
step "layers: finite differences on CuPy" 120 "${PYTEST[@]}" tests/unit/test_layers.py -k cupy
step "a convnet and the ZeRO stages on CuPy == NumPy" 200 "${PYTEST[@]}" tests/gpu/test_gpu.py \
    -k convnet
for n in 1 2; do
    step "ZeRO on CuPy: optimisers, stages, gather and scatter, $n rank(s)" 120 \
        "$MPIEXEC" -n $n "$PY" tests/gpu/zero3_check.py
done
if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    step "bench/gpu_throughput.py against PyTorch CUDA (every model and precision)" 300 \
        "$PY" bench/gpu_throughput.py --steps 50
    step "bench/cnn_throughput.py against PyTorch CUDA" 150 "$PY" bench/cnn_throughput.py \
        --backend cupy --steps 30 --repeats 1
else
    echo "-- bench/gpu_throughput.py: skipped (torch with CUDA is not installed)"
    step "bench/gpu_throughput.py (ours only)" 120 "$PY" bench/gpu_throughput.py --steps 100 \
        --no-peer
fi
echo "== GPU check done in $SECONDS s: ${#failed[@]} step(s) failed${failed:+: ${failed[*]}}"
[ ${#failed[@]} -eq 0 ]
