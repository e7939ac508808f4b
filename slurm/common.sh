# shellcheck shell=bash
# slurm/common.sh — shared by slurm/single_node.sbatch and slurm/dppo.sbatch. Sourced by them, never run or
# submitted on its own. The parameters (environment variables) are documented at the top of each template.
#
# Contract with the trainer (README "The main job"): SIGUSR1 / SIGTERM make it finish the current step, write a
# checkpoint and exit 0; `resume=true` continues from RUN_DIR/checkpoints/latest (or starts fresh when there is none).

ND_TEMPLATE=${ND_TEMPLATE:-slurm}
ND_PIDS=()         # background processes this job started (srun clients, the driver), stopped by PID at exit
declare -A ND_NAMES=() # pid → what it is, for the teardown message
ND_STOP_SIGNAL=""  # USR1 / TERM once received
ND_DRIVER_PID=""
ND_CLEANUP_PATHS=() # removed after the teardown (e.g. this job's Ray session directory)

nd_log() { echo "[$ND_TEMPLATE $(date +%T)] $*"; }
# One clear line in the job log, exit status 2 → the job ends FAILED with ExitCode=2:0.
nd_fail() {
  echo "error: $*" >&2
  exit 2
}

# ------------------------------------------------------------------------------------------- signals and teardown
# USR1 (the --signal=B:USR1 preemption notice, or `scancel --signal=USR1 --batch`) reaches this script only: pass
# it on to the driver. TERM (scancel, scontrol requeue, time limit) is sent by Slurm to every process of the job,
# the driver included, so it is only noted here; an srun client that gets TERM kills its step at once, so it is
# never forwarded to one.
nd_on_signal() {
  ND_STOP_SIGNAL=$1
  if [[ -z $ND_DRIVER_PID ]] || ! kill -0 "$ND_DRIVER_PID" 2>/dev/null; then
    nd_log "SIG$1 before the driver started: it will not be started"
  elif [[ $1 == USR1 ]]; then
    nd_log "SIGUSR1: asking the driver to write a checkpoint and exit"
    kill -USR1 "$ND_DRIVER_PID" 2>/dev/null || true
  else
    nd_log "SIG$1: the driver got it from Slurm too; waiting for its checkpoint"
  fi
}

nd_stop_pid() { # PID [GRACE_SECONDS]: SIGTERM, wait, SIGKILL. srun forwards the SIGTERM to its tasks.
  local pid=$1 grace=${2:-20} i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  nd_log "pid $pid still alive after ${grace}s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

nd_teardown() { # stop everything this job started, newest first, by PID only
  local i alive=()
  for i in "${ND_PIDS[@]}"; do
    if kill -0 "$i" 2>/dev/null; then alive+=("${ND_NAMES[$i]:-pid $i}"); fi
  done
  if ((${#alive[@]})); then nd_log "teardown: stopping ${alive[*]} (srun may report the step as killed)"; fi
  for ((i = ${#ND_PIDS[@]} - 1; i >= 0; i--)); do
    nd_stop_pid "${ND_PIDS[i]}"
  done
  ND_PIDS=()
  if ((${#ND_CLEANUP_PATHS[@]})); then rm -rf -- "${ND_CLEANUP_PATHS[@]}"; fi
  ND_CLEANUP_PATHS=()
  # a template's own last step (dppo.sbatch: the Ray session directories on the other nodes), run once
  if declare -F nd_after_teardown >/dev/null; then
    nd_after_teardown || true
    unset -f nd_after_teardown
  fi
}

nd_forget() { # PID: a reaped child is no longer ours to stop (its PID may be reused)
  local keep=() p
  for p in "${ND_PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  ND_PIDS=("${keep[@]}")
}

nd_on_exit() {
  local rc=$?
  trap - USR1 TERM
  nd_teardown
  exit "$rc"
}

# ------------------------------------------------------------------------------------------------- parameters
# nd_setup — read and validate every parameter before anything is started (no srun, no Ray, nothing on other nodes):
# first in bash, then (ENTRY=dppo on the host environment) the whole config and overrides with the project's own
# loader (a few seconds), so that a bad parameter ends the job at once with one `error:` line and FAILED.
# Sets the ND_* globals the templates use.
nd_setup() {
  trap 'nd_on_signal USR1' USR1
  trap 'nd_on_signal TERM' TERM
  trap nd_on_exit EXIT
  [[ -n ${SLURM_JOB_ID:-} ]] || nd_fail "submit this template with sbatch (SLURM_JOB_ID is not set)"

  ENTRY=${ENTRY:-dppo}
  case $ENTRY in
    dppo | nemo_rl) ;;
    *) nd_fail "ENTRY=$ENTRY is not an entry point; choose dppo (nemo-dppo train) or nemo_rl (python -m nemo_dppo.nemo_rl.run)" ;;
  esac
  WORKDIR=${WORKDIR:-$PWD} # the job starts in sbatch's --chdir, by default the submission directory
  [[ -d $WORKDIR ]] || nd_fail "WORKDIR=$WORKDIR is not a directory"
  WORKDIR=$(cd "$WORKDIR" && pwd)
  nd_abs() { if [[ $1 == /* ]]; then echo "$1"; else echo "$WORKDIR/$1"; fi; }

  if [[ -z ${CONFIG:-} ]]; then
    [[ $ENTRY == nemo_rl ]] && nd_fail "ENTRY=nemo_rl needs CONFIG=<NeMo-RL config .yaml>"
    CONFIG=$PROJECT_DIR/conf/tiny_cpu.yaml
  fi
  CONFIG=$(nd_abs "$CONFIG")
  [[ -f $CONFIG ]] || nd_fail "CONFIG=$CONFIG: config file not found (paths are checked on the batch node; with CONTAINER, mount it at the same path)"

  LOSS_MODE=${LOSS_MODE:-}
  if [[ -n $LOSS_MODE ]] && ! { [[ $LOSS_MODE =~ ^[A-Za-z0-9_]+$ ]] && [[ -f $PROJECT_DIR/conf/loss/$LOSS_MODE.yaml ]]; }; then
    local presets="" f
    for f in "$PROJECT_DIR"/conf/loss/*.yaml; do [[ -f $f ]] && presets+="${presets:+ }$(basename "$f" .yaml)"; done
    nd_fail "LOSS_MODE=$LOSS_MODE is not a loss preset; choose one of: ${presets:-(none found in $PROJECT_DIR/conf/loss)}"
  fi

  ND_OVERRIDES=()
  read -r -a ND_OVERRIDES <<<"${OVERRIDES:-}"
  local ov
  for ov in "${ND_OVERRIDES[@]}"; do
    [[ $ov == *=* ]] || nd_fail "OVERRIDES: '$ov' is not key=value"
    [[ $ENTRY == dppo ]] || continue
    case ${ov%%=*} in
      run_dir) nd_fail "OVERRIDES: set RUN_DIR=... instead of run_dir=" ;;
      resume) nd_fail "OVERRIDES: set RESUME=true|false|auto instead of resume=" ;;
      loss) nd_fail "OVERRIDES: set LOSS_MODE=<preset> instead of loss=" ;;
    esac
  done

  # Empty when neither set nor allocated through Slurm (sites without GPU GRES): Ray then detects the GPUs itself.
  GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  [[ -z $GPUS_PER_NODE || $GPUS_PER_NODE =~ ^[0-9]+$ ]] ||
    nd_fail "GPUS_PER_NODE=$GPUS_PER_NODE is not a non-negative integer"
  RESUME=${RESUME:-auto}
  case $RESUME in auto | true | false) ;; *) nd_fail "RESUME=$RESUME: choose auto, true or false" ;; esac
  REQUEUE=${REQUEUE:-1}
  case $REQUEUE in 0 | 1) ;; *) nd_fail "REQUEUE=$REQUEUE: choose 1 or 0" ;; esac

  RUN_DIR_SET=${RUN_DIR:-}
  RUN_DIR=$(nd_abs "${RUN_DIR:-runs/slurm/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID}}")
  LOG_DIR=$(nd_abs "${LOG_DIR:-runs/slurm/logs}")
  ND_LOGS=$LOG_DIR/$SLURM_JOB_ID
  ND_ATTEMPT=${SLURM_RESTART_COUNT:-0}

  # pyxis: every srun step runs in the container when CONTAINER is set, on the host environment otherwise.
  ND_CONTAINER_ARGS=()
  if [[ -n ${CONTAINER:-} ]]; then
    ND_CONTAINER_ARGS=(--container-image="$CONTAINER" --container-workdir="$WORKDIR")
    if [[ -n ${MOUNTS:-} ]]; then ND_CONTAINER_ARGS+=(--container-mounts="$MOUNTS"); fi
  elif [[ -n ${MOUNTS:-} ]]; then
    nd_fail "MOUNTS is set but CONTAINER is not"
  fi
  ND_CPUS=${SLURM_CPUS_ON_NODE:-1}
  read -r -a ND_PYTHON <<<"${PYTHON:-python}" # may be several words: PYTHON="uv run python"

  # The driver command. The loss preset comes first, so that OVERRIDES can refine it (e.g. loss.delta_low=0.1).
  local args=("$CONFIG")
  if [[ $ENTRY == dppo ]]; then
    local resume=false
    if [[ $RESUME == true ]] || { [[ $RESUME == auto ]] && { [[ -f $RUN_DIR/checkpoints/latest ]] || ((ND_ATTEMPT > 0)); }; }; then
      resume=true
    fi
    if [[ -n $LOSS_MODE ]]; then args+=("loss=$LOSS_MODE"); fi
    args+=("${ND_OVERRIDES[@]}" "run_dir=$RUN_DIR" "resume=$resume")
    ND_DRIVER=(nemo-dppo train "${args[@]}")
  else
    # NeMo-RL's recipe keys: the preset's loss: keys go to loss_fn (K of Top-K presets to loss_fn.topk), the
    # cluster section follows the allocation, and NeMo-RL resumes from its checkpoint_dir by itself (RESUME
    # is not used). RUN_DIR, when set, holds checkpoints/ and logs/; otherwise the recipe's directories are kept.
    if [[ -n $LOSS_MODE ]]; then
      mapfile -t -O "${#args[@]}" args < <(awk '
        /^[^ #]/ { section = $1 }
        section == "loss:" && /^  [a-z_]+:/ { key = $1; sub(":", "", key); print "loss_fn." key "=" $2 }
        section == "rollout:" && /^  logprobs_topk:/ { print "loss_fn.topk=" $2 }' "$PROJECT_DIR/conf/loss/$LOSS_MODE.yaml")
    fi
    args+=("cluster.num_nodes=${SLURM_JOB_NUM_NODES:-1}")
    if [[ -n $GPUS_PER_NODE ]]; then args+=("cluster.gpus_per_node=$GPUS_PER_NODE"); fi
    args+=("${ND_OVERRIDES[@]}")
    if [[ -n ${RUN_DIR_SET:-} ]]; then
      args+=("checkpointing.checkpoint_dir=$RUN_DIR/checkpoints" "logger.log_dir=$RUN_DIR/logs")
    fi
    ND_DRIVER=("${ND_PYTHON[@]}" -m nemo_dppo.nemo_rl.run "${args[@]}")
  fi

  # Check the whole config (unknown keys, bad values) on the batch node when it runs on the host environment.
  if [[ $ENTRY == dppo && -z ${CONTAINER:-} ]]; then
    command -v nemo-dppo >/dev/null ||
      nd_fail "nemo-dppo is not on PATH on $(hostname -s); install the project (pip install -e .) or set CONTAINER"
    "${ND_PYTHON[@]}" - "${args[@]}" <<'EOF' || exit 2
import sys

from nemo_dppo.config import load_config
from nemo_dppo.errors import UserError

try:
    load_config(sys.argv[1], sys.argv[2:])
except (UserError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
EOF
  fi

  mkdir -p "$ND_LOGS" || nd_fail "cannot create the log directory $ND_LOGS"
  local out
  out=$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | grep -oP ' StdOut=\K\S+' || true)
  if [[ $out == /* && -e $out ]]; then ln -sfn "$out" "$ND_LOGS/job.out"; fi
  local shown=$RUN_DIR
  if [[ $ENTRY == nemo_rl && -z $RUN_DIR_SET ]]; then shown="the recipe's checkpointing.checkpoint_dir"; fi
  nd_log "job $SLURM_JOB_ID attempt $ND_ATTEMPT on ${SLURM_JOB_NODELIST:-$(hostname -s)}: logs in $ND_LOGS, run dir $shown"
  if [[ -n ${CONTAINER:-} ]]; then nd_log "container: $CONTAINER${MOUNTS:+, mounts $MOUNTS}"; fi
}

# nd_log_header FILE NAME: a separator, so that the attempts of a requeued job read apart in the same file.
nd_log_header() {
  echo "===== $2, job $SLURM_JOB_ID attempt $ND_ATTEMPT, $(date '+%F %T') =====" >>"$1"
}

# nd_srun NODE LOGFILE CMD...: one task on NODE in the background (its PID in ND_LAST_PID, stopped at exit).
# --overlap: the Ray daemons and the driver share the node's CPUs (and GPUs).
nd_srun() {
  local node=$1 log=$2
  shift 2
  nd_log_header "$log" "$(basename "$log" .log)"
  srun --overlap --nodes=1 --ntasks=1 --nodelist="$node" --cpus-per-task="$ND_CPUS" --kill-on-bad-exit=1 \
    --chdir="$WORKDIR" --output="$log" --open-mode=append "${ND_CONTAINER_ARGS[@]}" "$@" &
  ND_LAST_PID=$!
  ND_PIDS+=("$ND_LAST_PID")
  ND_NAMES[$ND_LAST_PID]=$(basename "$log" .log)
}

# nd_run_driver: run the driver on this node (the batch script runs on the job's first node) and wait for it.
# On the host environment it is a child of this script, so it gets Slurm's TERM itself and checkpoints; with
# CONTAINER it runs in an srun step (pyxis), and a USR1 is forwarded through srun. Returns the driver's status.
nd_run_driver() {
  local rc=0 log=$ND_LOGS/driver.log
  if [[ -n $ND_STOP_SIGNAL ]]; then
    return 0
  fi
  # rich (the trainer's console) wraps at 80 columns when writing to a file; long paths read better unwrapped
  export COLUMNS=${COLUMNS:-200}
  nd_log "driver: ${ND_DRIVER[*]}"
  if ((${#ND_CONTAINER_ARGS[@]})); then
    nd_srun "$SLURMD_NODENAME" "$log" "${ND_DRIVER[@]}"
    ND_DRIVER_PID=$ND_LAST_PID
  else
    nd_log_header "$log" driver
    (cd "$WORKDIR" && exec "${ND_DRIVER[@]}") >>"$log" 2>&1 &
    ND_DRIVER_PID=$!
    ND_PIDS+=("$ND_DRIVER_PID")
    ND_NAMES[$ND_DRIVER_PID]=driver
  fi
  while :; do
    rc=0
    wait "$ND_DRIVER_PID" || rc=$?
    # wait returns >128 when a trapped signal interrupts it; the driver is then still running.
    if ((rc > 128)) && kill -0 "$ND_DRIVER_PID" 2>/dev/null; then
      continue
    fi
    if ((rc > 128)); then # the driver ended right after the interruption: fetch its own status
      local rc2=0
      wait "$ND_DRIVER_PID" 2>/dev/null || rc2=$?
      ((rc2 != 127)) && rc=$rc2
    fi
    break
  done
  nd_forget "$ND_DRIVER_PID"
  ND_DRIVER_PID=""
  return "$rc"
}

# nd_finish RC: the end of a job. After a USR1 the driver has written a checkpoint: stop the rest and requeue, the
# next attempt resumes (RESUME=auto). A failed driver fails the job with its status and the end of its log.
nd_finish() {
  local rc=$1
  if [[ $ND_STOP_SIGNAL == USR1 && $REQUEUE == 1 ]]; then
    if ((rc != 0)); then
      nd_log "the driver exited with status $rc after SIGUSR1; requeueing anyway (it resumes from its last checkpoint)"
    fi
    nd_teardown
    nd_log "requeueing job $SLURM_JOB_ID; the next attempt resumes from the latest checkpoint in $RUN_DIR"
    scontrol requeue "$SLURM_JOB_ID" || nd_fail "scontrol requeue $SLURM_JOB_ID failed"
    exit 0
  fi
  if ((rc != 0)); then
    nd_log "driver exited with status $rc; the end of $ND_LOGS/driver.log:"
    tail -n 20 "$ND_LOGS/driver.log" 2>/dev/null | sed 's/^/  | /'
    grep -m1 '^error:' "$ND_LOGS/driver.log" >&2 || echo "error: the driver exited with status $rc" >&2
    nd_teardown
    exit "$rc"
  fi
  nd_teardown
  if [[ -n $ND_STOP_SIGNAL ]]; then
    nd_log "stopped by SIG$ND_STOP_SIGNAL after a checkpoint"
  else
    nd_log "done"
  fi
  exit 0
}
