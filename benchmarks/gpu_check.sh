#!/usr/bin/env bash
# Proves the GPU path in one command and prints ONE JSON object on stdout (logs go to stderr).
#
#   benchmarks/gpu_check.sh [--smoke] [--shared PATH]
#       [--only fp_parity,dobi,dqc_speed,compiler_options,pipeline] [--json_out FILE]
#
# Sections: FP parity at matmul_precision highest/default, DOBI bounds GPU vs CPU, DQC steps/s at
# batch 32 with dqc.microbatch=auto + peak GPU memory, compile seconds and step / call times
# with GEMM autotuning on and off (DQC step, FP and fake-quant evaluation), and the full x4 W2
# 2DQuant pipeline on standin_x4.pth (DOBI 32 patches, DQC 3000 steps at batch 32, eval
# Set5/Set14/B100) from a cold compilation cache, with per-stage times (target <= 8 min).
# --smoke is CPU-sized (a few minutes): what tests/test_gpu_check.py runs, every section.
#
# On a lent GPU machine (10 minutes a call; the tree travels with shared/, 64 MiB in all), the
# pipeline is ONE call of its own, prepared here first (copies its data, data/calib cut to fit):
#   python benchmarks/gpu_check.py --only pipeline --shared ../shared --prepare_shared shared
#   run: benchmarks/gpu_check.sh --only pipeline --json_out $OUT/pipeline.json   (timeout 600)
# and the compiler options another (after `rm -rf shared` and --prepare_shared for it):
#   run: benchmarks/gpu_check.sh --only compiler_options --json_out $OUT/options.json
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
