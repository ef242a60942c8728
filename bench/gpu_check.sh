#!/usr/bin/env bash
# The GPU check, one command: installs the carried wheels, runs the gpu-marked tests, the
# build-stage and caption benchmark (real-size random-weight models, both prompts), the training
# benchmark (ConsistentID, 512 px, bf16) and the runtime comparison (onnxruntime vs torch,
# float32 vs float16). Each step has a time limit, so the whole check ends even when a step hangs
# (about 8 minutes at most, a hung step included; a healthy run takes less). Writes
# $OUT/gpu_check.json (every figure, each step's status and seconds) and $OUT/gpu_check.log.
#
#   bench/prepare_gpu_check.sh      # once, where the registry is reachable: wheels + dataset
#   bench/gpu_check.sh              # on the GPU machine, with bench-out/gpu carried along
#   bench/gpu_check.sh --dry-run    # the same steps on the CPU at toy sizes, in this project's
#                                   # environment (CI): a few minutes on two cores
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-bench-out/gpu-check}
CARRY=${FGID_GPU_CARRY:-bench-out/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fgid-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD"
started=$(date +%s)

if [ "$DRY" = 1 ]; then
  PY=(python3 -m uv run --frozen --extra dev python)
  DEVICE=cpu
  # limits in seconds: tests, build+caption, training, runtime comparison
  ENV_LIMIT=60
  LIMITS=(300 300 300 300)
  GPU_BENCH=(--device cpu --models tiny --images 8 --batch-size 4 --caption-images 4 --profile)
  TRAIN=(--device cpu --steps 2 --warmup 1 --images 12)
  RUNTIME=(--device cpu --models tiny --repeats 1)
else
  PY=(python3)
  DEVICE=cuda
  # From the first run on an H200 (cold caches: torch alone takes seconds to import there),
  # with room for compilation; with the setup they add up to about 8 minutes at most.
  # FGID_GPU_LIMITS="tests build training runtime" overrides them for a rerun.
  ENV_LIMIT=20
  read -r -a LIMITS <<<"${FGID_GPU_LIMITS:-120 150 130 60}"
  GPU_BENCH=(--device cuda --models real --images 1024 --cache "$WORK/cache" --profile)
  TRAIN=(--device cuda --steps 20 --warmup 3)
  RUNTIME=(--device cuda --models real --repeats 5 --cache "$WORK/cache")
  # What the image lacks travels as wheels (bench/fetch_gpu_wheels.sh); nothing is fetched.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target \
    "$WORK/site" "$CARRY"/wheels/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="$WORK/site:$PWD"
fi
if [ -d "$CARRY/dataset" ]; then
  TRAIN+=(--dataset "$CARRY/dataset")
  # The training tests' lite build, made where the lite models' weights (dlib) are installed.
  export FGID_BUILT_DATASET="$PWD/$CARRY/dataset"
fi

STEPS="$WORK/steps.jsonl"
step() { # name limit command...: run with a time limit, record status and seconds
  local name=$1 limit=$2 t0 rc
  shift 2
  echo "== $name (limit ${limit}s) =="
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' \
    "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >>"$STEPS"
  echo "== $name: rc $rc after $(($(date +%s) - t0))s =="
}

step environment "$ENV_LIMIT" "${PY[@]}" -c "
import torch, onnxruntime, transformers
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())
print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())
print('transformers', transformers.__version__)
if torch.cuda.is_available(): print(torch.cuda.get_device_name())"
step gpu_tests "${LIMITS[0]}" "${PY[@]}" -m pytest -q -m gpu -p no:cacheprovider \
  tests/backends/test_torch_runtime.py tests/backends/test_scrfd_batch.py \
  tests/training/test_faceclip_train.py --junitxml "$WORK/tests.xml"
step build_and_caption "${LIMITS[1]}" "${PY[@]}" -m bench.gpu_bench "${GPU_BENCH[@]}" \
  --json "$WORK/build_and_caption.json"
step training "${LIMITS[2]}" "${PY[@]}" -m bench.train_bench "${TRAIN[@]}" \
  --json "$WORK/training.json"
step runtime "${LIMITS[3]}" "${PY[@]}" -m bench.runtime_bench "${RUNTIME[@]}" \
  --json "$WORK/runtime.json"

"${PY[@]}" -m bench.gpu_check_report "$WORK" "$OUT/gpu_check.json" \
  --device "$DEVICE" --dry-run "$DRY" --seconds "$(($(date +%s) - started))"
