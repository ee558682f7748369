#!/usr/bin/env bash
# Every GPU check in one call: the kernel tests on the real backend (not interpret mode), the kernel,
# CT and federated benches, and train-step benches with the Pallas and XLA attention paths side by side.
# Made for the lent H200 (the device tool: run `bash launch/gpu_checks.sh` from the repo root); works on
# any machine with jax and pytest installed, without network and without installing jaxlab: it imports
# the tree through an overlay folder (jaxlab/ plus kernels/ as jaxlab.kernels, as the install maps it).
#
#   bash launch/gpu_checks.sh core [--quick]      kernel tests, kernel / CT / federated benches, tiny MAR
#   bash launch/gpu_checks.sh methods [--quick]   the methods' paper-size benches (MAR ViT-B, SwinDRNet, HyperFed)
#   logs and BENCHMARKS.md land in $OUT (default /tmp/jaxlab-gpu). Each part fits one device call (10 min);
#   run `core` first (the kernels' numbers matter most), then `methods` if device time is left.
#
# A step whose imports are missing there (pytest, scikit-image for the CT bench's skimage columns) fails
# alone and says so in its log; the others still run.
# Each step has its own time limit and a failed step does not stop the others; the summary at the end
# lists each step's exit status. Budget per part: under 10 minutes on an H200 (the step limits add up to that).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/jaxlab-gpu}
PART=${1:-core}
QUICK=${2:-}
case $PART in core|methods) ;; *) echo "usage: bash launch/gpu_checks.sh core|methods [--quick]" >&2; exit 2 ;; esac
mkdir -p "$OUT"
overlay=$(mktemp -d)
mkdir "$overlay/jaxlab"  # links to every file of jaxlab/ (so paths resolve into the repo: configs/, BENCHMARKS.md)
for f in "$ROOT"/jaxlab/*; do ln -s "$f" "$overlay/jaxlab/"; done
ln -s "$ROOT/kernels" "$overlay/jaxlab/kernels"
export PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda,cpu} JAXLAB_COMPILE_CACHE=off
export XLA_PYTHON_CLIENT_PREALLOCATE=false
summary=()

step() {  # step <name> <seconds> <command...>: runs it, logs to $OUT/<name>.log, records its status
  local name=$1 seconds=$2
  shift 2
  echo "=== $name: $*"
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 40
  local rc=${PIPESTATUS[0]}
  summary+=("$name rc=$rc")
}

step devices 60 python -c "import jax; print(jax.__version__, jax.devices())"
if [ "$PART" = core ]; then  # about 6 minutes (--quick: about 3)
  step kernel_tests 180 python -m pytest -q -x -p no:cacheprovider "$ROOT/tests/kernels"
  step bench_kernels 240 python -m jaxlab.cli bench kernels $QUICK
  step bench_ct 90 python -m jaxlab.cli bench ct $QUICK
  step bench_federated 180 python -m jaxlab.cli bench federated --quick
  for impl in pallas xla; do
    step "bench_mar_$impl" 90 python -m jaxlab.cli bench --config mar:tiny --config.model.attention=$impl \
      "--config.mar.stages=('finetune',)"  # the MAR fine-tuning step (stage 0 of mar:tiny is pre-training)
  done
else  # about 9 minutes (--quick: about 5)
  # MAR #12 item 8: ViT-B fine-tuning at the paper's input (16x224x224, the paper's 8 clips per GPU), MAR at
  # 50% cell running masking vs full tokens (mask none, no MAE term), Pallas and XLA attention side by side.
  paper_b=(--config mar:k400_b --config.data.batch_size=8 --config.data.eval_batch_size=8
           --config.data.options.train_clips=8 --config.data.options.test_clips=8 --steps 10)
  for impl in pallas xla; do
    step "bench_mar_b_$impl" 80 python -m jaxlab.cli bench "${paper_b[@]}" --config.model.attention=$impl
    step "bench_full_b_$impl" 80 python -m jaxlab.cli bench "${paper_b[@]}" --config.model.attention=$impl \
      --config.mar.mask=none --config.mar.mae_weight=0.0
  done
  step bench_swindrnet 150 python -m jaxlab.cli bench swindrnet $QUICK  # 224x224 frames/s, Pallas vs XLA windows
  step bench_hyperfed 90 python -m jaxlab.cli bench hyperfed $QUICK  # 50-block LEARN, remat on / off
fi
cp "$ROOT/BENCHMARKS.md" "$OUT/BENCHMARKS.md"  # the bench commands rewrote their sections
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
