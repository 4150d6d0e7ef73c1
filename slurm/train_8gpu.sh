#!/usr/bin/env bash
# GRPO training on one or more Slurm nodes of 8 GPUs: a Ray head on the first node, a Ray worker on
# each other node, and the driver (`medvlm-r1 train`) on the first node, joined to that Ray cluster.
#
#   sbatch slurm/train_8gpu.sh CONFIG [key=value ...]
#   sbatch --nodes=2 --partition=gpu --account=proj slurm/train_8gpu.sh configs/medvlm_r1_2b.yaml learner.lr=5e-7
#
# Submit from the repository root. sbatch options on the command line override the #SBATCH lines
# below. On nodes without GPUs (e.g. a CPU test cluster):
#   MEDVLM_DEVICE=cpu sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/train_8gpu.sh configs/tiny_cpu.yaml
# (`--gres=none` does not cancel `--gpus-per-node`; `--gpus-per-node=0` does.)
#
# Outputs: the run directory is logging.run_dir when given, else runs/<job name>-<job id>. The job's
# own log is slurm-<job name>-<job id>.out in the submit folder; the Ray log of each node is
# <run dir>/slurm/ray-<node>.log and the driver's exit code is <run dir>/slurm/exit_code.
# The job's exit code is the driver's (143 when the job was cancelled).
#
# Pre-emption and time limits: Slurm sends SIGUSR1 to this script 5 minutes before the time limit
# (--signal=B:USR1@300; change it with sbatch --signal=B:USR1@SECONDS). The driver then finishes its
# step, writes a full checkpoint and stops; this script stops Ray on every node and requeues the job
# (--requeue). The requeued job has the same job id, so the same run directory, and resumes from the
# checkpoint (train.resume=auto). scancel and the time limit itself signal every step of the job, the
# Ray nodes' too: the driver stops at once, keeping the last periodic checkpoint (train.checkpoint_every),
# and the job is not requeued. A SIGTERM sent to this script alone makes the driver checkpoint at its next
# step boundary.
#
# Environment (all optional):
#   MEDVLM_DEVICE              cpu | gpu: passed as cluster.device=...; cpu also gives Ray no GPUs
#   MEDVLM_ROOT                the repository (default: the folder sbatch was called from)
#   MEDVLM_PYTHON              the Python to use (default: <root>/.venv-gpu/bin/python from make setup-gpu unless
#                              MEDVLM_DEVICE=cpu, else <root>/.venv/bin/python from make setup, else python3 on PATH)
#   MEDVLM_RAY_PORT            GCS port of the Ray head (default 6379)
#   MEDVLM_RAY_DASHBOARD_PORT  dashboard and job-submission port of the head (default 8265)
#   MEDVLM_RAY_HEAD_IP         address the other nodes use to reach the head (default: resolved on it)
#   MEDVLM_RAY_START_ARGS      extra flags for every `ray start` (other ports, --temp-dir, ...)
#   MEDVLM_RAY_HEAD_ARGS, MEDVLM_RAY_WORKER_ARGS  extra flags for the head's / the workers' `ray start` only
#   MEDVLM_RAY_WAIT_S          seconds to wait for every node to join Ray (default 300)
#   RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH  Ray token authentication; by default token mode with a fresh
#                              token in <run dir>/slurm/ray_auth_token (`ray job submit` needs both)
#
#SBATCH --job-name=medvlm-r1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

set -uo pipefail

log() { echo "[train_8gpu $(date +%H:%M:%S)] $*"; }
die() { echo "[train_8gpu] error: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || die "usage: sbatch slurm/train_8gpu.sh CONFIG [key=value ...]"
[[ -n ${SLURM_JOB_ID:-} ]] || die "run this script with sbatch (without Slurm, run: medvlm-r1 train CONFIG ...)"
CONFIG=$1
shift

ROOT=${MEDVLM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT" || die "cannot enter $ROOT"
[[ -d launcher ]] || die "$ROOT is not the medvlm-r1 repository: submit from its root or set MEDVLM_ROOT"
if [[ -n ${MEDVLM_PYTHON:-} ]]; then
  PY=$MEDVLM_PYTHON
elif [[ ${MEDVLM_DEVICE:-} != cpu && -x $ROOT/.venv-gpu/bin/python ]]; then
  PY=$ROOT/.venv-gpu/bin/python  # make setup-gpu
elif [[ -x $ROOT/.venv/bin/python ]]; then
  PY=$ROOT/.venv/bin/python
else
  PY=$(command -v python3 || command -v python) || die "no python on PATH"
fi
RAY=("$PY" -m ray.scripts.scripts)
# Runs a command in a Slurm task with its output in <run dir>/slurm/ray-<Slurm node name>.log.
# shellcheck disable=SC2016  # expanded by the task's shell, on its node
NODE_LOG=(bash -c 'exec "$@" >"$MEDVLM_LOG_DIR/ray-$SLURMD_NODENAME.log" 2>&1' ray-node)

# The run directory: the user's logging.run_dir if given, else one named after the job.
OVERRIDES=()
RUN_DIR=
for arg in "$@"; do
  [[ $arg == logging.run_dir=* ]] && RUN_DIR=${arg#logging.run_dir=}
done
if [[ -z $RUN_DIR ]]; then
  RUN_DIR=$ROOT/runs/${SLURM_JOB_NAME:-medvlm-r1}-$SLURM_JOB_ID
  OVERRIDES+=("logging.run_dir=$RUN_DIR")
fi
[[ $RUN_DIR == /* ]] || RUN_DIR=$ROOT/$RUN_DIR
LOG_DIR=$RUN_DIR/slurm
mkdir -p "$LOG_DIR" || die "cannot create $LOG_DIR"
export MEDVLM_LOG_DIR=$LOG_DIR

DEVICE=${MEDVLM_DEVICE:-}
GPU_ARGS=()
if [[ -n $DEVICE ]]; then
  OVERRIDES=("cluster.device=$DEVICE" "${OVERRIDES[@]}")
  [[ $DEVICE == cpu ]] && GPU_ARGS=(--num-gpus=0)
fi

# Before Ray starts, in seconds: the config loads, and a GPU run finds a CUDA torch, a GPU and a new enough
# NVIDIA driver on this node. The check prints the one line that says what to install or load.
if ! "$PY" -m launcher.cli check "$CONFIG" "${OVERRIDES[@]}" "$@"; then
  echo 2 >"$LOG_DIR/exit_code"
  exit 2
fi

# Slurm steps: one task per node holding all of the node's CPUs (and GPUs) for Ray.
CPUS=${SLURM_CPUS_PER_TASK:-1}
STEP_ARGS=(--ntasks-per-node=1 --cpus-per-task="$CPUS")
if [[ -n ${SLURM_GPUS_PER_NODE:-} && ${SLURM_GPUS_PER_NODE##*:} != 0 ]]; then
  STEP_ARGS+=(--gpus-per-node="$SLURM_GPUS_PER_NODE")
fi
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${SLURMD_NODENAME:-${NODES[0]}}
WORKERS=()
for n in "${NODES[@]}"; do [[ $n != "$HEAD" ]] && WORKERS+=("$n"); done
# The address Ray itself picks for this node (the interface of the default route): `hostname --ip-address`
# can answer 127.0.1.1 where /etc/hosts maps the host name to loopback.
HEAD_IP=${MEDVLM_RAY_HEAD_IP:-$("$PY" -c 'import ray.util; print(ray.util.get_node_ip_address())')} ||
  die "cannot find this node's address with $PY (is Ray installed?); set MEDVLM_RAY_HEAD_IP"
PORT=${MEDVLM_RAY_PORT:-6379}
DASH_PORT=${MEDVLM_RAY_DASHBOARD_PORT:-8265}
read -ra HEAD_EXTRA <<<"${MEDVLM_RAY_START_ARGS:-} ${MEDVLM_RAY_HEAD_ARGS:-}"
read -ra WORKER_EXTRA <<<"${MEDVLM_RAY_START_ARGS:-} ${MEDVLM_RAY_WORKER_ARGS:-}"
export RAY_ADDRESS=$HEAD_IP:$PORT
# At the end of the job there is nothing to drain: Ray stops at once on SIGTERM instead of waiting 30 s.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
# Ray token authentication, explicit: the mode must agree between `ray start` and every client, and
# Ray would otherwise switch it on or off depending on whether ~/.ray/auth_token happens to exist.
# Unless the user chose, each job gets its own token, readable by the job's user only and shared by
# every node through the run directory.
if [[ -z ${RAY_AUTH_MODE:-} ]]; then
  export RAY_AUTH_MODE=token
  if [[ -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} ]]; then
    export RAY_AUTH_TOKEN_PATH=$LOG_DIR/ray_auth_token
    (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH") ||
      die "cannot write $RAY_AUTH_TOKEN_PATH"
  fi
fi

SRUN_PIDS=()
DRIVER_PID=
RC=1
REQUEUE=0

# shellcheck disable=SC2317,SC2329  # reached from the traps below
wait_gone() {  # wait_gone HALF_SECONDS PID...: true once none of the PIDs is alive
  local tries=$1 pid alive
  shift
  for _ in $(seq "$tries"); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.5
  done
  return 1
}

# shellcheck disable=SC2317,SC2329  # reached from the traps below
stop_all() {
  trap - EXIT TERM INT
  # Written first (RC does not change below): on scancel, Slurm SIGKILLs this script KillWait seconds after
  # its SIGTERM, maybe before Ray has stopped.
  echo "$RC" >"$LOG_DIR/exit_code"
  if [[ -n $DRIVER_PID ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
    # Slurm's scancel and time limit already signalled the driver (it counts this repeat as the same stop);
    # a SIGTERM sent to this script alone reaches the driver only through this line.
    log "stopping the driver"
    kill -TERM "$DRIVER_PID" 2>/dev/null
    wait "$DRIVER_PID" 2>/dev/null
  fi
  # SIGTERM to the Ray steps' tasks: `ray start --block` then stops every Ray process of its node.
  # (SIGTERM to srun itself would cancel the step with SIGKILL.) srun is killed only as a fallback.
  log "stopping Ray on ${#NODES[@]} node(s)"
  local steps
  mapfile -t steps < <(squeue --steps --jobs="$SLURM_JOB_ID" --noheader --format=%i 2>/dev/null | grep -E '\.[0-9]+$')
  ((${#steps[@]})) && scancel --signal=TERM "${steps[@]}" 2>/dev/null
  wait_gone 60 "${SRUN_PIDS[@]}" || for pid in "${SRUN_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  wait_gone 30 "${SRUN_PIDS[@]}" || for pid in "${SRUN_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  log "exit code $RC"
  if ((REQUEUE)) && ((RC == 143)); then
    # The driver saved a checkpoint and stopped: the requeued job (same id, same run dir) resumes it.
    log "requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})"
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed; resume by resubmitting with logging.run_dir=$RUN_DIR"
  fi
  exit "$RC"
}
# shellcheck disable=SC2317,SC2329  # reached from the trap below
on_usr1() {
  REQUEUE=1
  log "received SIGUSR1: the driver checkpoints and stops, then the job requeues"
  [[ -n $DRIVER_PID ]] && kill -USR1 "$DRIVER_PID" 2>/dev/null
}
trap on_usr1 USR1
trap 'RC=143; log "received SIGTERM"; stop_all' TERM
trap 'RC=130; log "received SIGINT"; stop_all' INT
trap stop_all EXIT

log "job $SLURM_JOB_ID: nodes ${NODES[*]}, head $HEAD ($RAY_ADDRESS), run dir $RUN_DIR, python $PY"
srun --nodes=1 --ntasks=1 -w "$HEAD" "${STEP_ARGS[@]}" \
  "${NODE_LOG[@]}" "${RAY[@]}" start --head --block --node-ip-address="$HEAD_IP" --port="$PORT" \
  --dashboard-port="$DASH_PORT" --num-cpus="$CPUS" "${GPU_ARGS[@]}" --disable-usage-stats "${HEAD_EXTRA[@]}" &
SRUN_PIDS+=($!)

wait_for_nodes() {  # wait_for_nodes COUNT: until COUNT Ray nodes are alive, the head step still running
  "$PY" - "$1" "${MEDVLM_RAY_WAIT_S:-300}" "${SRUN_PIDS[0]}" <<'EOF'
import os, sys, time
import ray
want, timeout, head_pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
deadline, alive = time.monotonic() + timeout, 0
while time.monotonic() < deadline:
    try:
        os.kill(head_pid, 0)
    except OSError:
        sys.exit("the Ray head step exited; see its log")
    try:
        if not ray.is_initialized():
            ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
        alive = sum(n["Alive"] for n in ray.nodes())
        if alive >= want:
            print(f"{alive} Ray node(s) up")
            sys.exit(0)
    except Exception:  # the head's GCS is not listening yet
        pass
    time.sleep(2)
sys.exit(f"only {alive} of {want} Ray node(s) joined within {timeout:.0f}s")
EOF
}

wait_for_nodes 1 || exit 1
if ((${#WORKERS[@]})); then
  srun --nodes="${#WORKERS[@]}" --ntasks="${#WORKERS[@]}" -w "$(IFS=,; echo "${WORKERS[*]}")" "${STEP_ARGS[@]}" \
    "${NODE_LOG[@]}" "${RAY[@]}" start --block --address="$RAY_ADDRESS" --num-cpus="$CPUS" \
    "${GPU_ARGS[@]}" --disable-usage-stats "${WORKER_EXTRA[@]}" &
  SRUN_PIDS+=($!)
  wait_for_nodes "${#NODES[@]}" || exit 1
fi

log "driver: $PY -m launcher.cli train $CONFIG ${OVERRIDES[*]} $*"
"$PY" -m launcher.cli train "$CONFIG" "${OVERRIDES[@]}" "$@" &
DRIVER_PID=$!
# A trapped signal (USR1) interrupts `wait` while the driver goes on: wait again until it has exited.
while :; do
  wait "$DRIVER_PID"
  RC=$?
  kill -0 "$DRIVER_PID" 2>/dev/null || break
done
DRIVER_PID=
exit "$RC"
