#!/usr/bin/env bash
# Multi-node TopoFlow training on SLURM: one `accelerate launch` per node, torchrun workers per GPU.
#
#   sbatch --nodes=2 --gpus-per-node=4 scripts/slurm_train.sh [train_accelerate.py arguments]
#   ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml sbatch ... scripts/slurm_train.sh ...
#
# The job resumes from the newest complete checkpoint in --output-dir when there is one, so a
# requeued or time-limited job continues where it stopped (pair with --checkpointing-steps and,
# for a hard time limit, --stop-after-steps). The output dir must be on a file system shared by
# all nodes: every rank writes its own RNG and data-position files into each checkpoint.
#SBATCH --job-name=topoflow
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --output=%x-%j.out
#SBATCH --requeue

set -euo pipefail

CONFIG="${ACCELERATE_CONFIG:-configs/accelerate/multi_gpu_ddp.yaml}"
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-1}}"
NUM_NODES="${SLURM_NNODES:-1}"
MAIN_HOST="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
MAIN_PORT="${MAIN_PORT:-29500}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/topoflow-${SLURM_JOB_ID:-local}}"

EXTRA=()
if compgen -G "${OUTPUT_DIR}/checkpoints/checkpoint-*/checkpoint_complete.json" > /dev/null; then
  EXTRA+=(--resume-from-checkpoint latest)
fi

# Single quotes: SLURM_NODEID must expand on each node inside srun, not here.
srun --kill-on-bad-exit=1 bash -c '
  accelerate launch \
    --config_file "$0" \
    --num_machines "$1" \
    --num_processes "$(( $1 * $2 ))" \
    --machine_rank "${SLURM_NODEID}" \
    --main_process_ip "$3" \
    --main_process_port "$4" \
    train_accelerate.py --output-dir "$5" "${@:6}"
' "${CONFIG}" "${NUM_NODES}" "${GPUS_PER_NODE}" "${MAIN_HOST}" "${MAIN_PORT}" "${OUTPUT_DIR}" \
  "${EXTRA[@]}" "$@"
