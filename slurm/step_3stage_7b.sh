#!/bin/bash
#SBATCH --job-name=step-7b-3stage
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#
# STEP, 3 stages, LLaMA-2-7B shape on 4 nodes x 8 H100 80GB (examples/step_7b_3stage.yaml:
# TP=1 PP=1 DP=32, distributed optimizer, FP8 through Transformer Engine, 23 -> 30 -> 32 layers).
#
# Submit from the repository root (the log directory must exist):
#   mkdir -p logs && sbatch slurm/step_3stage_7b.sh
#   CONFIG=examples/step_1b_3stage.yaml sbatch --nodes=1 slurm/step_3stage_7b.sh
#   DRY_RUN=1 NODES=8 bash slurm/step_3stage_7b.sh     # print every node's command, launch nothing
#   slurm/submit_chain.sh                              # one job per stage + growth jobs
# Arguments after the script go to the trainer (e.g. --until-stage 2, --set train.seed=3).
#
# Expected time (an estimate, not a measurement: 6 x params x tokens for trained layers,
# 4 x for frozen ones, plus attention, at ~400 TFLOP/s per H100): stage 1 42B tokens ~24 h,
# stage 2 34B ~23 h, stage 3 29B ~22 h; about 3 days in all. 180 s before --time runs out SLURM
# sends USR1: the trainers save a checkpoint, the job requeues itself and continues from it, so
# a 48 h limit (or a site's shorter one) only costs the restarts.
#
# Knobs (environment, exported to the job by sbatch; details in slurm/common.sh):
#   CONFIG=examples/step_7b_3stage.yaml  run config (data under /data, out_dir /checkpoints/...)
#   OUT_DIR=/lustre/me/step7b            checkpoints, metrics, summary (default: config out_dir)
#   EXTRA_ARGS="--set train.seed=3"      extra trainer arguments
#   NODES=4 GPUS_PER_NODE=8              launch size (default: the allocation's)
#   CONTAINER_IMAGE=nvcr.io#nvidia/pytorch:25.01-py3 CONTAINER_MOUNTS=/lustre/data:/data,...
#                                        run inside a pyxis container (image needs requirements.txt)
#   PYTHON=/path/to/venv/bin/python      interpreter (default python3)
#   MASTER_PORT, DRY_RUN=1               rendezvous port; print the plan only
# Resume: resubmitting the same command continues from the newest complete checkpoint in out_dir.
set -euo pipefail

# sbatch runs a copy of this file from the spool directory: find the checkout from the submit dir.
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[ -f "$REPO/slurm/common.sh" ] || REPO=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=SCRIPTDIR/common.sh
source "$REPO/slurm/common.sh"

CONFIG=${CONFIG:-examples/step_7b_3stage.yaml}
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-4}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-8}}

launch "$CONFIG" "$@"
