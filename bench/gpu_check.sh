#!/usr/bin/env bash
# A GPU session's checks as one script, most needed first, so that a lease cut short still
# brings back the earlier ones: versions, a smoke run, the GPU tests, then the benchmark table
# (written after every size). Run on the GPU machine, in the repository's root:
#
#     bash bench/gpu_check.sh OUT_DIR [BENCH_SECONDS]
#
# lark, if that machine lacks it, travels as a wheel in .whl/ (git-ignored; see the device
# tool's README): `pip download --no-deps -d .whl lark==1.3.1`.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [BENCH_SECONDS]}
bench_s=${2:-330}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import lark" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0])"
    date -u
} 2>&1 | tee "$out/env.txt"
timeout 90 python3 - <<'PY' 2>&1 | tee "$out/smoke.log" || exit 1
import torch, specc
m = specc.load("lstm", I=8, H=16, backend="triton").cuda()
y, _ = m(torch.randn(3, 2, 8, device="cuda"))
y.sum().backward()
torch.cuda.synchronize()
print("smoke ok", tuple(y.shape), float(m.W_hh.grad.abs().sum()))
PY
par=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 200 python3 -m pytest -q $par -p no:cacheprovider tests/test_triton_gpu.py 2>&1 | tee "$out/tests.log"
# Linear recurrences as scans against the same cells forced sequential (issue 15's GPU target:
# >= 10x at T = 4096).
timeout 150 python3 bench/scan.py --device cuda --sizes 1024x8x256,4096x8x256,4096x64x1024 --passes fwd,fb \
    --min-time 0.3 --markdown "$out/scan.md" 2>&1 | tee "$out/scan.log"
# The time loop as one kernel a pass (PERSISTENT): up to 128 features a program; wider rows in slices
# with a barrier across the grid, where the programs fit the GPU at once (issue 17). The fastrnns
# size (100x64x512x512: 4 batch tiles x 4 slices = 16 programs) is the one cuDNN is compared at.
timeout 150 python3 bench/gpu.py --cells lstm,gru,multihead_lstm --sizes 100x64x128x128,200x8x64x64,100x64x512x512 \
    --persistent --skip torch.compile --out "$out/persistent.md" 2>&1 | tee "$out/persistent.log"
# Multi-head LSTM at FlashRNN's size, heads of 16, 32 and 64 features: a persistent program a head
# and batch tile (the heads are independent), against FlashRNN's Triton figures (issue 17).
for d in 16 32 64; do
    timeout 75 python3 bench/gpu.py --cells multihead_lstm --sizes 1024x16x768x768 --head "$d" --persistent \
        --skip torch.compile --reps 5 --out "$out/heads-$d.md" 2>&1 | tee "$out/heads-$d.log"
done
timeout "$bench_s" python3 bench/gpu.py --tf32 --warps 2,8 --tune --skip torch.compile --out "$out/gpu.md" 2>&1 \
    | tee "$out/bench.log"
exit 0
