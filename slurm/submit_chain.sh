#!/bin/bash
# Submit a STEP run as a chain of jobs, for sites whose time limit is shorter than a run:
#   stage 1 -> grow 1->2 -> stage 2 -> grow 2->3 -> stage 3
# Stage job I is slurm/step_3stage_7b.sh --until-stage I (ends after the stage{I}-end checkpoint);
# growth job I is slurm/grow_checkpoint.sh I-1; each starts only when the previous one succeeded
# (sbatch --dependency=afterok, --kill-on-invalid-dep=yes cancels the rest after a failure).
# A stage job that hits its time limit saves, requeues itself and keeps its job id, so the chain
# simply waits. Prints one line per job and then `chain: ID -> ID -> ...`.
#
# Usage (from the repository root; reads the config with $PYTHON here):
#   CONFIG=examples/step_7b_3stage.yaml slurm/submit_chain.sh [SBATCH_OPTIONS...]
#   DRY_RUN=1 slurm/submit_chain.sh --account=proj      # print the sbatch commands only
# SBATCH_OPTIONS (e.g. --account, --partition, --time) go to every job. The environment
# (CONFIG, OUT_DIR, EXTRA_ARGS, NODES, GPUS_PER_NODE, CONTAINER_*, PYTHON) is exported to the jobs.
set -euo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=SCRIPTDIR/common.sh
source "$REPO/slurm/common.sh"

CONFIG=${CONFIG:-examples/step_7b_3stage.yaml}

submit_chain "$CONFIG" "$@"
