#!/usr/bin/env bash
# Prepare what bench/gpu_check.sh carries to a GPU machine that reaches no registry: the wheels
# its image lacks (bench/fetch_gpu_wheels.sh) and a small lite build for the training benchmark
# (its dlib models are not on that image). Everything lands in bench-out/gpu (ignored by git).
# Usage: bench/prepare_gpu_check.sh [IMAGES]
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=bench-out/gpu
IMAGES=${1:-48}
bench/fetch_gpu_wheels.sh "$CARRY/wheels"
if [ ! -f "$CARRY/dataset/summary.json" ]; then
  rm -rf "$CARRY/dataset" "$CARRY/work"
  python3 -m uv run --frozen python -c "
import shutil, sys
from pathlib import Path
from bench.train_bench import build_dataset
work = Path('$CARRY/work')
shutil.move(str(build_dataset(work, int(sys.argv[1]))), '$CARRY/dataset')
shutil.rmtree(work)" "$IMAGES"
fi
du -sh "$CARRY"/*
total=$(du -sm "$CARRY" | cut -f1)
echo "carry: ${total} MiB in $CARRY (the working tree and this travel together, 64 MiB at most)"
