#!/usr/bin/env bash
# Proves the GPU path in one command and prints ONE JSON object on stdout (logs go to stderr).
#
#   benchmarks/gpu_check.sh [--smoke] [--shared PATH] [--only fp_parity,dobi,dqc_speed,pipeline]
#
# Full mode is sized for one H100 (<= 8 min from a cold start, no network): FP parity at
# matmul_precision highest/default, DOBI bounds GPU vs CPU, DQC steps/s at batch 32 with
# dqc.microbatch=auto + peak GPU memory, and the full x4 W2 pipeline on standin_x4.pth
# (DOBI 32 patches, DQC 3000 steps at batch 32, eval Set5/Set14/B100) with per-stage times.
# --smoke is CPU-sized (seconds to a minute): what tests/test_gpu_check.py runs in CI.
#
# Data: the read-only shared folder is found from --shared, else $TWODQUANT_SHARED, else
# <repo>/shared, else <repo>/../shared. On the GPU machine the repo is copied WITHOUT ../shared:
# copy (not link) the needed files into <repo>/shared (git-ignored; the device tool carries a
# checkout's shared/ folder), or pass --shared to wherever they were put. Needed:
#   reference/{parity_x4_random.npz,calib_x4.npz,swinir_light_x4_random.pth,standin_x4.pth}
#   data/calib/  data/benchmarks/{Set5,Set14,B100}/
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$(command -v python || command -v python3)" benchmarks/gpu_check.py "$@"
