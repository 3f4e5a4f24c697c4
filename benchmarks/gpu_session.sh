#!/usr/bin/env bash
# The GPU verification that issues 4 to 8 owe, for a session lent a GPU machine
# (the device tool: one command of at most 10 minutes per call, 30 minutes of
# device time per session, no network there). Each stage fits one call with
# room to spare; name several stages in one call where they fit together.
#
# Once, here (the GPU image has torch, jax, cupy, numpy, ml_dtypes, optax,
# pytest and hypothesis, but not optree or array-api-compat, which gradclip
# needs):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl optree array-api-compat
#
# Then through the device tool, with carry [".whl"], for example:
#
#   bash benchmarks/gpu_session.sh env tests-cupy      # ~5 min
#   bash benchmarks/gpu_session.sh tests-jax bench-cupy
#   bash benchmarks/gpu_session.sh bench-torch bench-dp
#   bash benchmarks/gpu_session.sh bench-jax bench-jax-small
#   bash benchmarks/gpu_session.sh probe-jax
#
# Every stage runs even if an earlier one failed; the script exits non-zero if
# any did. One log (session.log) and the JSON results go to $OUT (the device
# tool's folder, whose files come back, at most 8 a call: name few bench
# stages in one call) or, elsewhere, benchmarks/results/gpu.
# Copy the JSONs into benchmarks/results/ and commit them with the GPU model
# (each JSON records it).
set -u -o pipefail
if [ $# -eq 0 ]; then
    sed -n '2,30p' "$0"
    exit 2
fi

OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${GRADCLIP_GPU_PYTHON:-python3}
# Called once the stage names are checked (at the end).
install_wheels() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
}
export PYTHONUNBUFFERED=1
# JAX would otherwise take 75% of the GPU's memory when first imported, and
# CuPy, torch and the 1B-element trees need it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

# pytest-xdist, where installed (the GPU image has it), spreads a test stage
# over the machine's cores; GRADCLIP_GPU_WORKERS=0 runs them in one process.
# (pytest-benchmark, also there, warns under xdist, and warnings are errors.)
WORKERS=${GRADCLIP_GPU_WORKERS:-8}
PAR=()
if [ "$WORKERS" != 0 ] && "$PY" -c 'import xdist' 2>/dev/null; then
    PAR=(-n "$WORKERS" -p no:benchmark)
fi

# One log for every stage: the device tool returns at most 8 files a call,
# and the JSON reports need those.
LOG="$OUT/session.log"
failed=()

# run STAGE LIMIT_S COMMAND...: one step of a stage, logged to $LOG.
run() {
    local stage=$1 limit=$2
    shift 2
    echo "== $stage: $*" | tee -a "$LOG"
    if ! timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; then
        echo "== $stage: FAILED (exit ${PIPESTATUS[0]}): $*" | tee -a "$LOG"
        failed+=("$stage: $*")
    fi
}

bench() {  # bench STAGE NAME ARGS...: one harness run, its report in $OUT/NAME.json
    local stage=$1 name=$2
    shift 2
    run "$stage" 420 "$PY" -m gradclip bench "$@" --json "$OUT/$name.json"
}

stage_env() {
    run env 60 nvidia-smi -L
    run env 120 "$PY" -c '
import importlib
for name in ("numpy", "torch", "jax", "cupy", "optax", "optree", "array_api_compat", "ml_dtypes"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "MISSING", exc)
import torch, jax, cupy
print("torch cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0))
print("jax devices:", jax.devices())
print("cupy devices:", cupy.cuda.runtime.getDeviceCount())
import gradclip
print("gradclip", gradclip.__version__, gradclip.__file__)'
}

stage_tests_cupy() {  # the CuPy kernels, then the whole suite on CuPy arrays and CUDA tensors
    run tests-cupy 300 "$PY" -m pytest "${PAR[@]}" tests/test_cupy_gpu.py -q -rs -p no:cacheprovider
    GRADCLIP_TEST_BACKENDS=cupy,torch_cuda JAX_PLATFORMS=cpu \
        run tests-cupy 420 "$PY" -m pytest "${PAR[@]}" tests src -q -rs -p no:cacheprovider \
        --ignore=tests/test_cupy_gpu.py
}

stage_tests_jax() {  # gradclip.jax, the optax transforms and per-example clipping on the GPU
    GRADCLIP_TEST_BACKENDS=jax,jax64 run tests-jax 480 "$PY" -m pytest "${PAR[@]}" -q -rs -p no:cacheprovider \
        tests/test_clip.py tests/test_norms.py tests/test_jax.py tests/test_jax_fast.py \
        tests/test_optax.py tests/test_per_example.py tests/test_adaptive.py
}

stage_bench_cupy() {  # issue 5's table: llm 1B and huge 2^30 at >= 85% of the floor, small <= 60 us
    bench bench-cupy bench-cupy-gpu --backend cupy --tree all
    bench bench-cupy bench-cupy-gpu-llm-bf16 --backend cupy --tree llm --dtype bfloat16
}

stage_bench_torch() {  # issue 6's comparison on CUDA tensors
    bench bench-torch bench-torch-gpu --backend torch --tree all
    bench bench-torch bench-torch-gpu-llm-bf16 --backend torch --tree llm --dtype bfloat16
}

stage_bench_jax() {  # issue 4: against optax, llm at 1B parameters in float32 and bfloat16
    # One tree per run: a run writes its JSON only at its end, so a slow
    # compile of one tree must not take the others' results with it.
    bench bench-jax bench-jax-gpu-llm --backend jax --tree llm
    bench bench-jax bench-jax-gpu-llm-bf16 --backend jax --tree llm --dtype bfloat16
    bench bench-jax bench-jax-gpu-huge --backend jax --tree huge
}

stage_bench_jax_small() {  # the 2000-leaf tree: XLA compiles optax's clip of it for minutes on a CPU
    bench bench-jax-small bench-jax-gpu-small --backend jax --tree small
}

stage_bench_dp() {  # issue 8: per-example clipping on each GPU backend
    bench bench-dp bench-dp-jax-gpu --backend jax --tree dp
    bench bench-dp bench-dp-cupy-gpu --backend cupy --tree dp
    bench bench-dp bench-dp-torch-gpu --backend torch --tree dp
}

stage_bench_small() {  # the 2000-leaf tree alone, CuPy and the torch drop-in (host cost per call)
    bench bench-small bench-cupy-gpu-small --backend cupy --tree small
    bench bench-small bench-torch-gpu-small --backend torch --tree small
}

stage_profile() {  # where the time goes: cProfile of the small tree, the kernels alone, ncu
    run profile 240 "$PY" benchmarks/gpu_profile.py host
    run profile 240 "$PY" benchmarks/gpu_profile.py kernels
    local ncu
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    if [ -z "$ncu" ]; then  # not a failure of gradclip's: say so, and go on
        echo "== profile: ncu skipped: no ncu on PATH or under /opt/nvidia/nsight-compute" |
            tee -a "$LOG"
        return
    fi
    run profile 240 "$ncu" --kernel-name regex:gc_ --launch-skip 2 --launch-count 3 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis \
        "$PY" -c 'import cupy as cp, gradclip as gc
x = cp.random.standard_normal(1 << 28, dtype=cp.float32)
for _ in range(2):
    gc.clip_by_global_norm([x], 1e-3)
cp.cuda.Device().synchronize()'
}

stage_profile_small() {  # the small tree's clip in parts, and each kernel's own time under ncu
    run profile-small 120 "$PY" benchmarks/gpu_profile.py small
    local ncu
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    if [ -z "$ncu" ]; then
        echo "== profile-small: ncu skipped: no ncu on PATH or under /opt/nvidia/nsight-compute" |
            tee -a "$LOG"
        return
    fi
    run profile-small 240 "$ncu" --kernel-name regex:gc_ --launch-skip 2 --launch-count 8 \
        --metrics gpu__time_duration.sum,dram__bytes.sum,launch__grid_size \
        "$PY" -c 'import cupy as cp, numpy as np, gradclip as gc
from gradclip import _bench
rng = np.random.default_rng(0)
tree = [cp.asarray(rng.standard_normal(n).astype(np.float32)) for n in _bench.tree_sizes("small", gpu=True)]
flat = gc.FlatTree.from_tree(tree)
for _ in range(3):
    gc.clip_by_global_norm_(tree, 1.0)
for _ in range(3):
    gc.clip_by_global_norm_(flat, 1.0)
cp.cuda.Device().synchronize()'
}

stage_probe_jax() {  # gradclip.jax against optax on llm, and its norm fallback three ways (about 70 s)
    local hlo=/tmp/gradclip-jax-hlo
    rm -rf "$hlo" && mkdir -p "$hlo"
    run probe-jax 420 "$PY" benchmarks/gpu_jax_probe.py --tree llm --hlo "$hlo"
    tar -czf "$OUT/jax-probe-hlo.tgz" -C "$hlo" .  # one file: the device tool returns at most 8
}

# Every name checked before any stage runs: a typo in the last one must not
# cost the device time of those before it.
for stage in "$@"; do
    if ! declare -F "stage_${stage//-/_}" >/dev/null; then
        echo "unknown stage $stage; stages: env tests-cupy tests-jax bench-cupy bench-torch bench-jax bench-jax-small bench-dp bench-small profile profile-small probe-jax" >&2
        exit 2
    fi
done
install_wheels
for stage in "$@"; do
    "stage_${stage//-/_}"
done
if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "all stages passed: $*"
