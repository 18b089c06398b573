#!/usr/bin/env bash
# One pass on a CUDA machine: the CUDA tests, the benchmarks on the GPU, the GPU presets' training
# speed on synthetic RGB folders, and `nfm run --preset digits` end to end. Everything it measures
# lands in OUT (log.txt, a tarball of benchmarks/results/*-cuda.* and the run's report).
#
#   [BUDGET_S=450] benchmarks/gpu_pass.sh OUT [WHEEL_DIR]
#
# WHEEL_DIR: wheels to install first (an offline machine: the nfm wheel and the dependencies its
# image lacks). Each step has its own time limit and none runs past BUDGET_S seconds from the start,
# so one slow step cannot starve the rest and OUT is complete when the machine's time runs out.
set -uo pipefail
OUT=$(realpath -m "${1:?usage: gpu_pass.sh OUT [WHEEL_DIR]}"); WH=${2:-}
mkdir -p "$OUT"; LOG=$OUT/log.txt
cd "$(dirname "$0")/.."
END=$((SECONDS + ${BUDGET_S:-450}))
step() { local t=$1; shift; local left=$((END - SECONDS - 15)); [ "$left" -lt "$t" ] && t=$left
  if [ "$t" -le 5 ]; then echo "== skipped (no time left): $*" >>"$LOG"; return; fi
  echo "== $* (limit ${t}s) $(date +%T)" >>"$LOG"; local s=$SECONDS
  timeout "$t" "$@" >>"$LOG" 2>&1; echo "== rc=$? in $((SECONDS - s)) s" >>"$LOG"; }
if [ -n "$WH" ]; then
  python3 -m pip install --quiet --no-deps --no-index "$WH"/*.whl >>"$LOG" 2>&1
  mv nfm /tmp/nfm-source-shadow  # the installed package, not the source folder, must answer `import nfm`
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1
python3 -c "import torch, nfm; print('torch', torch.__version__, torch.cuda.get_device_name(), nfm.__file__)" >>"$LOG" 2>&1
export NFM_CACHE_DIR=/tmp/nfm-cache
step 120 python3 -m pytest -q -p no:cacheprovider tests/test_house.py -k cuda
step 120 nfm run --preset tiny --run-dir /tmp/runs/tiny
step 90 python3 benchmarks/teacher_bench.py --quick
step 90 python3 benchmarks/decode_bench.py --quick
step 90 python3 benchmarks/student_bench.py
# train.compile and bf16 on the GPU (what train.compile=auto assumes there), and the teacher against
# ml-tarflow when its transformer_flow.py travels along (MLTARFLOW=path)
step 150 python3 benchmarks/compile_bench.py --device cuda --steps 20
[ -n "${MLTARFLOW:-}" ] && step 150 python3 benchmarks/mltarflow_bench.py "$MLTARFLOW" --quick --compile
# the GPU presets' teacher speed (their size, batch and dtype) on synthetic RGB folders
python3 - <<'PY' >>"$LOG" 2>&1
import numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for s in (32, 64):
    d = Path(f"/tmp/rgb{s}"); d.mkdir(exist_ok=True)
    for i in range(512):
        Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
PY
for s in 32 64; do
  step 100 nfm teacher train --preset gpu$s --run-dir /tmp/runs/gpu$s data.name=/tmp/rgb$s \
    train.steps=60 train.log_every=20 train.sample_every=100000 train.ckpt_every=100000
done
# the fashion-mnist-gpu preset's teacher step (its img/s decides whether its 3-seed run fits ten minutes;
# needs Fashion-MNIST on the machine); FASHION_GPU=1 runs the whole preset after the digits run
step 120 nfm teacher train --preset fashion-mnist-gpu --run-dir /tmp/runs/fgpu-teacher \
  train.steps=300 train.log_every=50 train.sample_every=0 train.ckpt_every=0
step 120 python3 benchmarks/pairs_bench.py --reader-gb 1
tar czf "$OUT/bench.tgz" benchmarks/results/*-cuda.* 2>>"$LOG"
step 900 nfm run --preset digits --run-dir /tmp/runs/digits
tar czf "$OUT/runs.tgz" -C /tmp/runs --exclude='*.safetensors' --exclude='*.pt' --exclude='*.npz' --exclude='*.npy' digits tiny/report.md 2>>"$LOG"
[ -n "${FASHION_GPU:-}" ] && step 900 nfm run --preset fashion-mnist-gpu --run-dir /tmp/runs/fashion-gpu \
  && tar czf "$OUT/fashion-gpu.tgz" -C /tmp/runs --exclude='*.safetensors' --exclude='*.pt' fashion-gpu 2>>"$LOG"
