#!/usr/bin/env bash
# Submit a training run to a Ray cluster (the dashboard address of its head; `ray dashboard` forwards it locally).
#   cluster/submit.sh HEAD_DASHBOARD_URL CONFIG RUN_DIR [key=value ...]
#   cluster/submit.sh http://127.0.0.1:8265 configs/experiments/side4video_vit-b16-openai_1x8xb32-f8_k400.yaml /mnt/efs/runs/s4v-b16-k400 'data.train_shards=/mnt/efs/k400/train/shard-{000000..000239}.tar' 'data.val_shards=/mnt/efs/k400/val/shard-{000000..000019}.tar'
# Quote shard patterns: unquoted, the shell expands shard-{000000..000239}.tar into one override per shard.
# RUN_DIR must be on storage every node mounts (EFS/NFS/Lustre); re-submitting with the same RUN_DIR resumes the run.
# Runs from the repository root: --working-dir . ships the code and configs with cluster/runtime_env.yaml's excludes.
# PYTHON (default: python) is the interpreter the job runs on the head, for clusters where it is not first on PATH.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: cluster/submit.sh HEAD_DASHBOARD_URL CONFIG RUN_DIR [key=value ...]" >&2
  exit 2
fi
address=$1 config=$2 run_dir=$3
shift 3
name=$(basename "$run_dir")
exec ray job submit --address "$address" --working-dir . --runtime-env cluster/runtime_env.yaml \
  --submission-id "i2v-${name}-$(date +%s)" \
  -- "${PYTHON:-python}" -m i2v.cli train "$config" "$@" --out "$run_dir" --no-progress
