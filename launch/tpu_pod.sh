#!/usr/bin/env bash
# Cloud TPU pod slice: copies this checkout to every worker, installs it with the TPU extra, and runs the
# same `jaxlab train` on all workers; jax.distributed.initialize auto-detects the pod from TPU metadata.
#   bash launch/tpu_pod.sh my-tpu us-central2-b --config configs/ecg_cnn.py:paper --workdir gs://bucket/runs/ecg
set -euo pipefail
tpu_name="$1"; zone="$2"; shift 2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gcloud compute tpus tpu-vm scp --recurse "$root" "$tpu_name":~/jaxlab --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" --worker=all --command "
  set -e; cd ~/jaxlab
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -e . 'jax[tpu]'
  .venv/bin/jaxlab train $*
"
