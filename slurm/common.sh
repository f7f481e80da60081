# shellcheck shell=bash
# Launch logic shared by the scripts in slurm/ (sourced, never run). REPO must be set first.
#
# One SLURM task per node runs `python -m torch.distributed.run` (torchrun), which starts
# GPUS_PER_NODE trainer processes; torchrun's static rendezvous meets at the first host of the
# allocation (`scontrol show hostnames $SLURM_JOB_NODELIST | head -n1`) and each node's rank is its
# SLURM_NODEID (node ids follow the host list order, so node 0 is the master host).
#
# Pre-emption (--signal=B:USR1@T in the recipe, or `scancel --batch --signal=USR1 JOB`):
#   batch shell traps USR1 -> `scancel --signal=USR1 JOB` signals every process of the training
#   step on every node -> torchrun agents ignore it (see NODE_SCRIPT), the trainers save a
#   checkpoint at the next step boundary, rank 0 writes <out_dir>/PREEMPTED, all exit 75 ->
#   the batch shell sees the marker and runs `scontrol requeue`; the requeued job relaunches the
#   same command, which continues from the newest complete checkpoint.
#
# Knobs (environment; every script echoes the resolved values first):
#   CONFIG           run config YAML, relative to REPO or absolute
#   OUT_DIR          override the config's out_dir (passed as --set out_dir=...)
#   EXTRA_ARGS       more trainer arguments, split on spaces, e.g. "--set train.seed=3"
#   PYTHON           interpreter with megatron_step's requirements (default python3)
#   NODES            nodes to launch on (default: the allocation's)
#   GPUS_PER_NODE    trainer processes per node (default: the allocation's --gpus-per-node)
#   MASTER_PORT      rendezvous port (default 20000 + job id % 20000: jobs sharing a host differ)
#   CONTAINER_IMAGE  run every step in this pyxis/enroot image (srun --container-image)
#   CONTAINER_MOUNTS extra pyxis mounts SRC:DST[,...] (data, checkpoints); REPO is always mounted
#   DRY_RUN=1        print what every node would run, launch nothing (also: --dry-run argument)

PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
PREEMPTED_MARKER=PREEMPTED

# Runs on every node (bash -c, arguments: PYTHON TORCHRUN_ARGS...). SLURM delivers the step's
# signals to every process of the step; torchrun's agent has no SIGUSR1 handler, so the signal
# would kill it and the step would tear the trainers down mid-save. An ignored signal stays
# ignored across exec, so the agent ignores it; the trainers install their own handler.
# shellcheck disable=SC2016  # expanded by the node's bash, not here
NODE_SCRIPT='trap "" USR1; exec "$1" -m torch.distributed.run --node-rank="$SLURM_NODEID" "${@:2}"'

# Reads the resolved config (YAML + --set overrides, validated by megatron_step.config) and
# prints bash assignments: CFG_OUT_DIR, CFG_TP, CFG_PP, CFG_STAGES and, for a stage STAGE that
# has a successor, CFG_GROW_ARGS (tools/grow_checkpoint.py flags for STAGE -> STAGE+1).
# shellcheck disable=SC2016
CONFIG_QUERY='
import argparse, shlex, sys
from megatron_step.config import ConfigError, load_config
parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
parser.add_argument("--set", action="append", default=[])
sets = parser.parse_known_args(sys.argv[3:])[0].set
try:
    config = load_config(sys.argv[1], sets)
except ConfigError as exc:
    sys.exit(f"error: {exc}")
tp = config.parallel.tensor_model_parallel_size
pp = config.parallel.pipeline_model_parallel_size
print(f"CFG_OUT_DIR={shlex.quote(str(config.out_dir))}; CFG_TP={tp}; CFG_PP={pp}; "
      f"CFG_STAGES={len(config.stages)}")
stage = int(sys.argv[2])
if 1 <= stage < len(config.stages):
    nxt = config.stages[stage]
    growth = nxt.growth
    position = growth.position
    if not isinstance(position, str):
        position = ",".join(str(i) for i in position)
    args = ["--num-layers", nxt.num_layers, "--stage", stage + 1, "--operator", growth.operator,
            "--position", position, "--zero-output" if growth.zero_output else "--no-zero-output",
            "--seed", growth.seed, "--tp", tp, "--pp", pp]
    print("CFG_GROW_ARGS=(" + " ".join(shlex.quote(str(a)) for a in args) + ")")
'

die() {
    echo "error: $*" >&2
    exit 2
}

# Prints a command the way a shell would read it back.
show() {
    (($#)) || return 0
    local quoted
    printf -v quoted '%q ' "$@"
    echo "${quoted% }"
}

in_job() {
    [ -n "${SLURM_JOB_ID:-}" ]
}

require_job() {
    [ "$DRY_RUN" = 1 ] || in_job \
        || die "not inside a SLURM job: submit with sbatch (or DRY_RUN=1 to print the plan)"
}

# Common setup: working directory, PYTHONPATH, the environment Megatron needs, knob checks.
step_env() {
    cd "$REPO" || die "cannot cd to REPO=$REPO"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the package without `pip install`
    read -ra EXTRA <<<"${EXTRA_ARGS:-}"
    if [ -n "${OUT_DIR:-}" ]; then
        EXTRA+=(--set "out_dir=$OUT_DIR")
    fi
    # One thread per trainer process (torchrun's default too, set here to silence its banner).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # A dead peer makes NCCL collectives fail instead of hanging until the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    CONTAINER_FLAGS=()
    if [ -n "${CONTAINER_IMAGE:-}" ]; then
        CONTAINER_FLAGS=(--container-image="$CONTAINER_IMAGE"
                         --container-mounts="$REPO:$REPO${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
                         --container-workdir="$REPO")
    fi
    if [ -z "${CONTAINER_IMAGE:-}" ] && ! command -v "$PYTHON" >/dev/null; then
        die "PYTHON=$PYTHON: not found (set PYTHON to the python of megatron_step's venv)"
    fi
}

# Runs a command once, where the trainers run: in the container when one is set (as a one-task
# step of the job), otherwise right here.
in_env() {
    if [ -n "${CONTAINER_IMAGE:-}" ] && in_job && [ "$DRY_RUN" != 1 ]; then
        srun --nodes=1 --ntasks=1 "${CONTAINER_FLAGS[@]}" "$@"
    else
        "$@"
    fi
}

# read_config CONFIG STAGE [TRAINER_ARGS...]: sets the CFG_* variables (see CONFIG_QUERY).
read_config() {
    local assignments
    assignments=$(in_env "$PYTHON" -c "$CONFIG_QUERY" "$@") || exit 2  # it said why
    eval "$assignments"
}

# The allocation's hosts in node-id order (placeholders in a dry run outside an allocation).
node_hosts() {
    HOSTS=()
    if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
        local listing
        listing=$(scontrol show hostnames "$SLURM_JOB_NODELIST") \
            || die "scontrol show hostnames $SLURM_JOB_NODELIST failed"
        mapfile -t HOSTS <<<"$listing"
    else
        local n
        for ((n = 0; n < NODES; n++)); do HOSTS+=("node$n"); done
    fi
    ((${#HOSTS[@]} >= NODES)) \
        || die "NODES=$NODES, but the allocation has ${#HOSTS[@]} node(s): ${HOSTS[*]}"
}

# Forwards a pre-emption warning from the batch shell to every process of the running steps.
forward_preemption() {
    echo "pre-emption signal: asking the trainers to save a checkpoint and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID" || echo "warning: scancel --signal=USR1 failed" >&2
}

# launch CONFIG [TRAINER_ARGS...]: the training step on every node; requeues when pre-empted.
# The recipe sets NODES and GPUS_PER_NODE (its defaults follow its #SBATCH header).
launch() {
    local config=$1
    shift
    if [ "${1:-}" = --dry-run ]; then
        DRY_RUN=1
        shift
    fi
    if [ "$DRY_RUN" != 1 ]; then
        trap forward_preemption USR1  # before anything slow: an untrapped USR1 kills bash
    fi
    require_job
    step_env
    read_config "$config" 0 "${EXTRA[@]}" "$@"
    GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # SLURM_GPUS_PER_NODE may read "h100:8"
    [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "NODES: expected a positive integer, got '$NODES'"
    [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] \
        || die "GPUS_PER_NODE: expected a positive integer, got '$GPUS_PER_NODE'"
    local world=$((NODES * GPUS_PER_NODE)) model=$((CFG_TP * CFG_PP))
    ((world % model == 0)) || die "world size $world (NODES=$NODES x" \
        "GPUS_PER_NODE=$GPUS_PER_NODE) is not divisible by TP x PP = $CFG_TP x $CFG_PP ($config)"
    # Megatron's TP communication must be issued in order on one CUDA stream (its rule for
    # tensor/sequence parallel overlap); with TP=1 several connections keep DP overlap fast.
    if ((CFG_TP > 1)); then
        export CUDA_DEVICE_MAX_CONNECTIONS=1
    fi
    node_hosts
    local master=${HOSTS[0]} port=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-9500} % 20000))}
    local torchrun=(--nnodes="$NODES" --nproc-per-node="$GPUS_PER_NODE" --master-addr="$master"
                    --master-port="$port" -m megatron_step.train "$config" "${EXTRA[@]}" "$@")
    # One task per node gets one CPU unless told otherwise (srun does not inherit sbatch's
    # --cpus-per-task since SLURM 22.05): the task's trainers need the node's CPUs.
    local cpus=()
    if [ -n "${SLURM_CPUS_ON_NODE:-}" ]; then
        cpus=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
    fi
    local step=(srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1
                "${cpus[@]}" "${CONTAINER_FLAGS[@]}" bash -c "$NODE_SCRIPT" bash "$PYTHON"
                "${torchrun[@]}")
    echo "STEP launch: job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0})"
    echo "  config      $config${EXTRA[*]:+ $(show "${EXTRA[@]}")}${*:+ $(show "$@")}"
    echo "  out_dir     $CFG_OUT_DIR"
    echo "  world size  $world = $NODES node(s) x $GPUS_PER_NODE process(es) per node;" \
         "TP $CFG_TP x PP $CFG_PP x DP $((world / model))"
    echo "  master      $master:$port (first host of: ${HOSTS[*]:0:NODES})"
    echo "  container   ${CONTAINER_IMAGE:-none}"
    echo "  env         CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-unset}" \
         "OMP_NUM_THREADS=$OMP_NUM_THREADS NCCL_DEBUG=$NCCL_DEBUG"
    echo "  step        $(show "${step[@]}")"
    if [ "$DRY_RUN" = 1 ]; then
        local rank
        for ((rank = 0; rank < NODES; rank++)); do
            echo "  node $rank (${HOSTS[rank]}): $(show "$PYTHON" -m torch.distributed.run \
                --node-rank="$rank" "${torchrun[@]}")"
        done
        echo "dry run: nothing launched"
        return 0
    fi
    rm -f "$CFG_OUT_DIR/$PREEMPTED_MARKER"  # a stale marker must not requeue a failed run
    "${step[@]}" &
    local pid=$! rc=0
    while kill -0 "$pid" 2>/dev/null; do  # `wait` returns early when the USR1 trap runs
        wait "$pid" || true
    done
    wait "$pid" || rc=$?  # bash keeps the step's exit status for a second wait
    if [ -f "$CFG_OUT_DIR/$PREEMPTED_MARKER" ]; then
        echo "pre-empted: $(cat "$CFG_OUT_DIR/$PREEMPTED_MARKER"); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed (the" \
            "job needs --requeue, the cluster JobRequeue=1); resubmit the job to continue"
        exit 0  # not reached: the requeue ends this run of the job
    fi
    return "$rc"
}

# grow CONFIG STAGE [--dry-run]: offline growth of stage STAGE's end checkpoint for stage STAGE+1.
grow() {
    local config=$1 stage=${2:-}
    if [ "${3:-}" = --dry-run ]; then
        DRY_RUN=1
    fi
    [[ $stage =~ ^[1-9][0-9]*$ ]] || die "STAGE: expected the stage that just finished" \
        "(1, 2, ...), got '$stage'"
    step_env
    read_config "$config" "$stage" "${EXTRA[@]}"
    ((stage < CFG_STAGES)) || die "STAGE: $config has $CFG_STAGES stages; none follows $stage"
    require_job
    local ckpt=$CFG_OUT_DIR/checkpoints
    local cmd=("$PYTHON" tools/grow_checkpoint.py "$ckpt/stage$stage-end"
               "$ckpt/stage$((stage + 1))-grown" "${CFG_GROW_ARGS[@]}" --no-progress)
    echo "STEP growth: job ${SLURM_JOB_ID:-none}, stage $stage -> $((stage + 1)) of $config"
    echo "  out_dir     $CFG_OUT_DIR"
    echo "  container   ${CONTAINER_IMAGE:-none}"
    echo "  command     $(show "${cmd[@]}")"
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: nothing launched"
        return 0
    fi
    if [ -f "$ckpt/stage$((stage + 1))-grown/megatron_step.json" ]; then
        echo "already grown: $ckpt/stage$((stage + 1))-grown is complete; nothing to do"
        return 0
    fi
    srun --nodes=1 --ntasks=1 "${CONTAINER_FLAGS[@]}" "${cmd[@]}"
}

# submit_chain CONFIG [SBATCH_OPTIONS...]: one job per stage, an offline growth job between
# stages, each waiting for the previous one (afterok); prints the chain of job ids.
submit_chain() {
    local config=$1
    shift
    step_env
    read_config "$config" 0 "${EXTRA[@]}"
    local name stage ids=()
    name=$(basename "$config" .yaml)
    CHAIN_ID=""
    if [ "$DRY_RUN" != 1 ]; then
        mkdir -p logs  # the default --output=logs/%x-%j.out must exist before the jobs start
    fi
    for ((stage = 1; stage <= CFG_STAGES; stage++)); do
        if ((stage > 1)); then
            chain_submit "$name-grow$stage" "$@" slurm/grow_checkpoint.sh "$((stage - 1))"
            ids+=("$CHAIN_ID")
        fi
        chain_submit "$name-stage$stage" "$@" slurm/step_3stage_7b.sh --until-stage "$stage"
        ids+=("$CHAIN_ID")
    done
    local joined
    printf -v joined '%s -> ' "${ids[@]}"
    echo "chain: ${joined% -> }"
}

# chain_submit NAME SBATCH_ARGS...: submits job NAME after the previous link (CHAIN_ID) and
# sets CHAIN_ID to its job id (a placeholder in a dry run).
chain_submit() {
    local link=$1
    shift
    local cmd=(sbatch --parsable --job-name="$link")
    if [ -n "$CHAIN_ID" ]; then
        cmd+=(--dependency="afterok:$CHAIN_ID" --kill-on-invalid-dep=yes)
    fi
    cmd+=("$@")
    if [ "$DRY_RUN" = 1 ]; then
        CHAIN_ID="<$link>"
    else
        CHAIN_ID=$("${cmd[@]}") || die "sbatch failed: $(show "${cmd[@]}")"
        CHAIN_ID=${CHAIN_ID%%;*}  # "id;cluster" on federated clusters
    fi
    echo "$link: job $CHAIN_ID: $(show "${cmd[@]}")"
}
