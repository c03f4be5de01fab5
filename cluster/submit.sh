#!/usr/bin/env bash
# Submit a training run to a Ray cluster.
#   cluster/submit.sh HEAD_DASHBOARD_URL CONFIG RUN_DIR [key=value ...]
#   cluster/submit.sh http://head:8265 configs/experiments/side4video_vit-b16-openai_1x8xb32-f8_k400.yaml /mnt/shared/runs/s4v-b16-k400
# RUN_DIR must be on storage every node mounts (NFS/EFS/Lustre); re-submitting with the same RUN_DIR resumes the run.
set -euo pipefail
address=$1 config=$2 run_dir=$3
shift 3
name=$(basename "$run_dir")
exec ray job submit --address "$address" --working-dir . --runtime-env cluster/runtime_env.yaml \
  --submission-id "i2v-${name}-$(date +%s)" \
  -- python -m i2v.cli train "$config" "$@" --out "$run_dir" --no-progress
