#!/usr/bin/env bash
# slurm_down.sh — stop what tools/ci/slurm_up.sh started, by the PIDs it recorded; nothing else is touched.
#
#   bash tools/ci/slurm_down.sh            # cancel remaining jobs, stop slurmd(s), slurmctld, munged
#   SLURM_CI_PURGE=1 bash tools/ci/slurm_down.sh   # also delete the cluster's state and logs, and its config files
#
# Environment: SLURM_CI_DIR (the same as slurm_up.sh's, default /tmp/nemo-dppo-slurm), SLURM_CI_PURGE (default 0).
# Never kills by process name, never uses a host-wide command: only the PIDs in $SLURM_CI_DIR/pids/. Safe to run
# when nothing is up (exits 0).
set -uo pipefail

DIR=${SLURM_CI_DIR:-/tmp/nemo-dppo-slurm}
PIDS=$DIR/pids
HOSTS_MARK="# nemo-dppo-slurm-ci"
MARK="# written by nemo-dppo tools/ci/slurm_up.sh"
say() { echo "[slurm_down $(date +%T)] $*"; }
running() { [[ -s $1 ]] && kill -0 "$(<"$1")" 2>/dev/null; }

stop_pid() { # PIDFILE: SIGTERM, wait up to 15 s, SIGKILL
  local f=$1 pid name
  name=$(basename "$f" .pid)
  if running "$f"; then
    pid=$(<"$f")
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 150); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null
      say "killed $name (pid $pid) after 15 s"
    else
      say "stopped $name (pid $pid)"
    fi
  fi
  rm -f "$f"
}

if [[ ! -d $PIDS ]]; then
  say "nothing was started from $DIR"
  exit 0
fi

# 1. While our controller is up: cancel the jobs left, so that Slurm itself tears their processes down.
if running "$PIDS/slurmctld.pid"; then
  left=$(squeue -h -o %i 2>/dev/null | paste -sd' ')
  if [[ -n $left ]]; then
    say "cancelling jobs: $left"
    # shellcheck disable=SC2086
    scancel $left 2>/dev/null
    for _ in $(seq 60); do
      [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
      sleep 0.5
    done
  fi
fi

# 2. The daemons, node daemons first; munged only if slurm_up.sh started it (it then has a PID file).
for f in "$PIDS"/slurmd-*.pid; do [[ -e $f ]] && stop_pid "$f"; done
stop_pid "$PIDS/slurmctld.pid"
stop_pid "$PIDS/munged.pid"

# 3. Empty cgroups that proctrack/cgroup left for our node(s) (slurm_<node> under each v1 controller).
if [[ -s $DIR/nodes ]]; then
  while read -r node; do
    for d in /sys/fs/cgroup/*/slurm_"$node"; do
      [[ -d $d ]] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
    done
  done <"$DIR/nodes"
fi

# 4. The /etc/hosts lines slurm_up.sh added.
if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
  # /etc/hosts may be a bind mount: rewrite it in place rather than replacing the file
  grep -vF "$HOSTS_MARK" /etc/hosts >"$DIR/hosts.new" && cat "$DIR/hosts.new" >/etc/hosts && rm -f "$DIR/hosts.new"
fi

if [[ ${SLURM_CI_PURGE:-0} == 1 ]]; then
  if [[ -f /etc/slurm/slurm.conf ]] && grep -qF "$MARK" /etc/slurm/slurm.conf; then
    rm -f /etc/slurm/slurm.conf
    while read -r f; do rm -f "/etc/slurm/$f"; done <"$DIR/side_files" 2>/dev/null
  fi
  rm -rf "${DIR:?}"
  say "purged $DIR and the configuration files slurm_up.sh wrote"
fi
say "done"
