#!/bin/bash
#SBATCH --job-name=step-grow
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#
# Offline growth between two chained stage jobs: grows <out_dir>/checkpoints/stage{I}-end into
# stage{I+1}-grown with tools/grow_checkpoint.py, using stage I+1's depth and growth settings and
# the config's TP/PP; the next stage job continues from it. Runs on CPU in one process (a 7B
# checkpoint: minutes, about 2x the checkpoint size in memory). Does nothing when the grown
# checkpoint is already complete, so a re-run chain is safe.
#
# Usage (from the repository root; slurm/submit_chain.sh submits it for you):
#   CONFIG=examples/step_7b_3stage.yaml sbatch slurm/grow_checkpoint.sh I [--dry-run]
# Knobs: CONFIG, OUT_DIR, EXTRA_ARGS (its --set overrides), PYTHON, CONTAINER_IMAGE,
# CONTAINER_MOUNTS, DRY_RUN=1 (as in slurm/step_3stage_7b.sh).
set -euo pipefail

# sbatch runs a copy of this file from the spool directory: find the checkout from the submit dir.
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[ -f "$REPO/slurm/common.sh" ] || REPO=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=SCRIPTDIR/common.sh
source "$REPO/slurm/common.sh"

CONFIG=${CONFIG:-examples/step_7b_3stage.yaml}

grow "$CONFIG" "$@"
