#!/usr/bin/env bash
# Download the wheels a GPU image with torch, transformers, accelerate, onnx, onnxruntime (CPU),
# pyarrow, scikit-image, opencv-python-headless, timm and pytest (but nothing of this project's
# own stack) needs for bench/gpu_check.sh: Python 3.12, manylinux x86_64, no dependencies
# resolved (each one is named). Versions are the lock file's. Usage: bench/fetch_gpu_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-bench-out/gpu/wheels}
LIMIT_MB=48 # the check travels with the working tree and a dataset: 64 MiB per device call

WHEELS=(
  onnx2torch==1.5.15 # the InsightFace models in torch
  insightface==2.1
  facexlib==0.3.0 filterpy==2.0.0 # BiSeNet; facexlib imports its tracker (filterpy) at import
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  webdataset==1.0.2 braceexpand==0.1.7 # training reads the shards through webdataset
  diffusers==0.42.1 # ConsistentID's UNet, VAE and scheduler
  open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 # CLIP's BPE vocabulary for the tokenizer
)

python3 -m pip --version >/dev/null 2>&1 || { echo "needs pip" >&2; exit 1; }
mkdir -p "$DIR"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DIR" "${WHEELS[@]}"
ls -l "$DIR"
total=$(du -sm "$DIR" | cut -f1)
echo "$(ls "$DIR"/*.whl | wc -l) wheels, ${total} MiB in $DIR (limit ${LIMIT_MB} MiB)"
[ "$total" -le "$LIMIT_MB" ] || { echo "over ${LIMIT_MB} MiB" >&2; exit 1; }
