#!/usr/bin/env bash
# One prepared device check (run by the `device` tool from the repository root):
#   1. installs the carried wheels of what the accelerator image lacks (dm-haiku, jmp);
#   2. runs the float64 reference tests of the structured path on the accelerator;
#   3. times every benchmark model (benchmarks/gpu_bench.py), results under $OUT.
# Before the call, once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl dm-haiku==0.0.17 jmp==0.0.4
# and name `.whl` in the call's `carry`. Budget: about 8 minutes on an H200.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/jax.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_structured.py \
  -k "full_grid or chunks" 2>&1 | tail -5 | tee "$OUT/tests.txt"
timeout 330 python3 benchmarks/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
