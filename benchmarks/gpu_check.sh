#!/usr/bin/env bash
# The training engine's GPU check, as one script for a machine with one CUDA GPU:
#   1. benchmarks/train_speed.py --cuda-only: SD 1.5 at 512 and SDXL at 1024, bf16, batch
#      1/4/8, samples/s, peak memory and MFU;
#   2. benchmarks/train_speed.py --compare-only: sdlora against the rebuilt diffusers loop
#      (SD 1.5 architecture at 512, bf16, 32 steps);
#   3. a 200-step SD 1.5-architecture bf16 run at 512 (random weights), its run.json printed.
# Results go to $OUT (or ./gpu-check). Packages the machine lacks can be put as wheels in .whl/
# (pure-Python ones: `pip download --no-deps -d .whl diffusers==0.42.1`); they are installed
# into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

timeout 300 python3 benchmarks/train_speed.py --cuda-only 2>&1 | tee "$out/train_speed.txt"
timeout 150 python3 benchmarks/train_speed.py --compare-only 2>&1 | tee "$out/compare.txt"

data="$(mktemp -d)"
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from train_speed import make_images; make_images(Path('$data/images'), 512)"
: > "$data/empty.toml"
timeout 150 python3 -m sdlora train "$data/empty.toml" model.base=random:sd1 \
    "dataset.path=$data/images" dataset.trigger=zkstripes dataset.resolution=512 \
    train.steps=200 train.mixed_precision=bf16 "output.dir=$data/run" \
    sample.steps=4 sample.report_images=0 --no-progress 2>&1 | tee "$out/run200.txt"
cp "$data/run/run.json" "$out/run200.json"
cat "$out/run200.json"
