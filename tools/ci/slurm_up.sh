#!/usr/bin/env bash
# slurm_up.sh — start a real Slurm cluster (Debian's Slurm 22.05 + munge) on this machine, for CI and development.
#
#   bash tools/ci/slurm_up.sh          # install what is missing, start what is not running, wait for the node(s)
#   bash tools/ci/slurm_down.sh        # stop exactly what this script started
#
# Idempotent and fast when the cluster is already up (~0.1 s). Needs root and a Debian-like system without systemd
# running Slurm (the daemons are started directly). Everything this script starts is recorded as a PID file under
# $SLURM_CI_DIR/pids/; slurm_down.sh stops those PIDs and nothing else. Every address used is loopback.
#
# If a Slurm controller that this script did not start already answers `scontrol ping`, it is used as it is and
# nothing is installed, written or started. An /etc/slurm/slurm.conf that this script did not write is never
# overwritten.
#
# Environment:
#   SLURM_CI_DIR      state, logs and PID files                               (default /tmp/nemo-dppo-slurm)
#   SLURM_CI_NODES    Slurm nodes to emulate on this host (one slurmd each)   (default 1)
#   SLURM_CI_CPUS     CPUs per node                                           (default: nproc)
#   SLURM_CI_GPUS     fake `gpu` GRES per node, backed by /dev/null clones    (default 0)
#   SLURM_CI_PYXIS    1 = build a no-op SPANK plugin that accepts pyxis' --container-* flags, so templates with
#                     CONTAINER set run on the host environment (needs gcc + libslurm-dev)  (default 0)
#   SLURM_CI_TIMEOUT  seconds to wait for the node(s) to respond              (default 60)
set -euo pipefail

DIR=${SLURM_CI_DIR:-/tmp/nemo-dppo-slurm}
NODES_N=${SLURM_CI_NODES:-1}
CPUS=${SLURM_CI_CPUS:-$(nproc)}
GPUS=${SLURM_CI_GPUS:-0}
PYXIS=${SLURM_CI_PYXIS:-0}
TIMEOUT=${SLURM_CI_TIMEOUT:-60}
PIDS=$DIR/pids
LOGS=$DIR/log
STATE=$DIR/state
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by nemo-dppo tools/ci/slurm_up.sh"
HOSTS_MARK="# nemo-dppo-slurm-ci"
ADDR=127.0.0.1

T0=$(date +%s%N)
say() { echo "[slurm_up +$((($(date +%s%N) - T0) / 1000000))ms] $*"; }
die() {
  echo "slurm_up: error: $*" >&2
  exit 1
}
running() { [[ -s $1 ]] && kill -0 "$(<"$1")" 2>/dev/null; }

[[ $(id -u) == 0 ]] || die "needs root (it installs packages and starts daemons)"
[[ $NODES_N =~ ^[1-9][0-9]*$ && $CPUS =~ ^[1-9][0-9]*$ && $GPUS =~ ^[0-9]+$ ]] ||
  die "SLURM_CI_NODES / SLURM_CI_CPUS / SLURM_CI_GPUS must be positive integers"

# A cluster that is not ours: use it, touch nothing.
if [[ ! -s $PIDS/slurmctld.pid ]] && command -v scontrol >/dev/null && timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"; then
  say "a Slurm controller not started by this script answers; using it as it is"
  exit 0
fi
if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
  die "$CONF exists and was not written by this script; refusing to overwrite it"
fi
mkdir -p "$PIDS" "$LOGS" "$STATE/ctld"

# ------------------------------------------------------------------------------------------------ packages
packages=(slurmctld slurmd slurm-client munge)
[[ $PYXIS == 1 ]] && packages+=(gcc libc6-dev libslurm-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  # The packages' maintainer scripts must not start the daemons (with the stock config, through invoke-rc.d).
  policy=/usr/sbin/policy-rc.d made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt_install() { apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOGS/apt.log" 2>&1; }
  ok=1
  if ! apt_install; then # a fresh machine has no package lists yet
    apt-get update -q >>"$LOGS/apt.log" 2>&1 && apt_install || ok=0
  fi
  ((made_policy)) && rm -f "$policy"
  ((ok)) || {
    tail -n 20 "$LOGS/apt.log" >&2
    die "apt-get install failed (log: $LOGS/apt.log)"
  }
  say "installed"
fi

# ------------------------------------------------------------------------------------------------ config
HOST=$(hostname -s)
# Node names must resolve (slurmd and the templates look them up); map them to loopback if they do not.
node_names=()
if ((NODES_N == 1)); then
  node_names=("$HOST")
  node_line="NodeName=$HOST NodeAddr=$ADDR CPUs=$CPUS"
else
  for ((i = 1; i <= NODES_N; i++)); do node_names+=("$HOST-n$i"); done
  # Several slurmd on one host, one port each (Debian's slurmd supports this).
  node_line="NodeName=$HOST-n[1-$NODES_N] NodeHostname=$HOST NodeAddr=$ADDR Port=[17001-$((17000 + NODES_N))] CPUs=$CPUS"
fi
for n in "$HOST" "${node_names[@]}"; do
  getent hosts "$n" >/dev/null || echo "$ADDR $n $HOSTS_MARK" >>/etc/hosts
done
mem_mb=$(awk -v n="$NODES_N" '/MemTotal/ { print int($2 / 1024 * 0.8 / n) }' /proc/meminfo)
node_line+=" RealMemory=$mem_mb"
gres_lines=""
if ((GPUS > 0)); then
  node_line+=" Gres=gpu:$GPUS"
  gres_lines="GresTypes=gpu"
  # Slurm drops GPU GRES without device files; character devices cloned from /dev/null stand in for them.
  mkdir -p "$DIR/fake_gpus"
  for ((g = 0; g < GPUS; g++)); do
    [[ -e $DIR/fake_gpus/nvidia$g ]] || mknod "$DIR/fake_gpus/nvidia$g" c 1 3
  done
fi

# proctrack/cgroup puts every process of a job step in the step's cgroup, so daemonised children (Ray's raylet,
# gcs_server) are reaped with the step; linuxproc loses them. Needs a writable cgroup-v1 freezer.
proctrack=linuxproc
if [[ -d /sys/fs/cgroup/freezer ]] && mkdir /sys/fs/cgroup/freezer/.nemo_dppo_probe 2>/dev/null; then
  rmdir /sys/fs/cgroup/freezer/.nemo_dppo_probe
  proctrack=cgroup
fi

new=$DIR/slurm.conf.new
cat >"$new" <<EOF
$MARK
# A one-host cluster for CI: daemons run as root without systemd, no accounting (read job states with scontrol).
ClusterName=nemo-dppo-ci
SlurmctldHost=$HOST($ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Credentials live 20 s instead of 120: this is also how long a requeued job waits before it may start again.
AuthInfo=cred_expire=20
MpiDefault=none
ProctrackType=proctrack/$proctrack
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# a pending job whose hold ended (a requeue) is started within seconds, not at the next 30-60 s scheduling cycle
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
# finished jobs stay visible to scontrol show job for 10 minutes
MinJobAge=600
KillWait=10
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd-%n.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
TmpFS=$STATE/tmp-%n
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
$gres_lines
$node_line
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# Side files: cgroup.conf (process tracking only, no limits), gres.conf, the pyxis stand-in in plugstack.conf.d.
declare -A side=()
[[ $proctrack == cgroup ]] &&
  side[cgroup.conf]=$'CgroupPlugin=cgroup/v1\nConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n'
((GPUS > 0)) && side[gres.conf]="Name=gpu File=$DIR/fake_gpus/nvidia[0-$((GPUS - 1))]"$'\n'
if [[ $PYXIS == 1 ]]; then
  shim=$DIR/pyxis_shim
  mkdir -p "$shim"
  cat >"$shim/shim.c.new" <<'EOF'
/* CI stand-in for pyxis: registers its --container-* options and ignores them (jobs run on the host). */
#include <stddef.h>
#include <slurm/spank.h>
SPANK_PLUGIN(pyxis, 1);
static int ignore(int val, const char *arg, int remote) { (void)val; (void)arg; (void)remote; return 0; }
#define WITH_ARG(name) { (char *)name, (char *)"ARG", (char *)"ignored in CI", 1, 0, ignore }
#define FLAG(name) { (char *)name, NULL, (char *)"ignored in CI", 0, 0, ignore }
static struct spank_option options[] = {
	WITH_ARG("container-image"), WITH_ARG("container-mounts"), WITH_ARG("container-workdir"),
	WITH_ARG("container-name"), WITH_ARG("container-save"), WITH_ARG("container-env"),
	FLAG("container-mount-home"), FLAG("no-container-mount-home"), FLAG("container-remap-root"),
	FLAG("no-container-remap-root"), FLAG("container-entrypoint"), FLAG("no-container-entrypoint"),
	FLAG("container-writable"), FLAG("container-readonly"), SPANK_OPTIONS_TABLE_END
};
int slurm_spank_init(spank_t sp, int ac, char **av)
{
	(void)ac; (void)av;
	for (struct spank_option *o = options; o->name; o++)
		if (spank_option_register(sp, o) != ESPANK_SUCCESS) return -1;
	return 0;
}
EOF
  if ! cmp -s "$shim/shim.c.new" "$shim/shim.c" || [[ ! -e $shim/pyxis_shim.so ]]; then
    mv "$shim/shim.c.new" "$shim/shim.c"
    gcc -shared -fPIC -O2 -o "$shim/pyxis_shim.so" "$shim/shim.c" || die "cannot build the pyxis stand-in"
  else
    rm -f "$shim/shim.c.new"
  fi
  side[plugstack.conf.d/nemo-dppo-pyxis-shim.conf]="required $shim/pyxis_shim.so"$'\n'
fi

changed=0
install_if_changed() { # FILE NEW-CONTENT-FILE
  if ! cmp -s "$2" "$1"; then
    mv "$2" "$1"
    changed=1
  else
    rm -f "$2"
  fi
}
mkdir -p "$CONF_DIR/plugstack.conf.d"
install_if_changed "$CONF" "$new"
# Side files are written only when absent or ours (listed in $DIR/side_files), and removed only when ours.
touch "$DIR/side_files"
for f in cgroup.conf gres.conf plugstack.conf.d/nemo-dppo-pyxis-shim.conf; do
  ours=0
  grep -qxF "$f" "$DIR/side_files" && ours=1
  if [[ -v side[$f] ]]; then
    [[ -e $CONF_DIR/$f ]] && ((!ours)) && die "$CONF_DIR/$f exists and was not written by this script"
    printf '%s' "${side[$f]}" >"$DIR/side.new"
    install_if_changed "$CONF_DIR/$f" "$DIR/side.new"
    ((ours)) || echo "$f" >>"$DIR/side_files"
  elif ((ours)); then
    rm -f "$CONF_DIR/$f"
    grep -vxF "$f" "$DIR/side_files" >"$DIR/side_files.new" || true
    mv "$DIR/side_files.new" "$DIR/side_files"
    changed=1
  fi
done
printf '%s\n' "${node_names[@]}" >"$DIR/nodes"

stop_pid() { # PIDFILE: SIGTERM, wait up to 10 s, SIGKILL
  local pid
  running "$1" || {
    rm -f "$1"
    return 0
  }
  pid=$(<"$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}
if ((changed)); then
  for f in "$PIDS"/slurmd-*.pid "$PIDS"/slurmctld.pid; do
    [[ -e $f ]] && running "$f" && say "configuration changed: restarting $(basename "$f" .pid)"
    [[ -e $f ]] && stop_pid "$f"
  done
fi
for f in "$PIDS"/slurmd-*.pid; do # a slurmd of a node that is no longer configured
  [[ -e $f ]] || continue
  n=${f##*/slurmd-}
  [[ " ${node_names[*]} " == *" ${n%.pid} "* ]] || stop_pid "$f"
done

# ------------------------------------------------------------------------------------------------ munge
if running "$PIDS/munged.pid"; then
  :
elif munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged is running (not started by this script)"
else
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
  done
  munge -n </dev/null | unmunge >/dev/null || die "munged did not start (log: /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$PIDS/munged.pid"
  say "munged started (pid $(<"$PIDS/munged.pid"))"
fi

# ------------------------------------------------------------------------------------------------ daemons
if ! running "$PIDS/slurmctld.pid"; then
  /usr/sbin/slurmctld || die "slurmctld did not start (log: $LOGS/slurmctld.log)"
  for _ in $(seq 100); do
    scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.1
  done
  scontrol ping 2>/dev/null | grep -q "is UP" || die "slurmctld does not answer (log: $LOGS/slurmctld.log)"
  say "slurmctld started (pid $(<"$PIDS/slurmctld.pid"))"
fi
for n in "${node_names[@]}"; do
  running "$PIDS/slurmd-$n.pid" && continue
  mkdir -p "$STATE/spool-$n" "$STATE/tmp-$n"
  /usr/sbin/slurmd -N "$n" || die "slurmd $n did not start (log: $LOGS/slurmd-$n.log)"
  for _ in $(seq 50); do
    [[ -s $PIDS/slurmd-$n.pid ]] && break
    sleep 0.1
  done
  say "slurmd $n started (pid $(<"$PIDS/slurmd-$n.pid"))"
done

# ------------------------------------------------------------------------------------------------ wait
# Ready when every node responds and is not down/drained (it may be running jobs left from before).
deadline=$(($(date +%s) + TIMEOUT))
resumed=0
while :; do
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u)
  ready=$(awk '$2 ~ /^(idle|mixed|allocated|completing)$/' <<<"$states" | wc -l)
  ((ready == NODES_N)) && break
  down=$(awk '$2 ~ /^(down|drained|draining|drain)$/ { print $1 }' <<<"$states" | paste -sd,)
  if [[ -n $down ]] && ((!resumed)); then # left down by an earlier run of this cluster
    scontrol update NodeName="$down" State=RESUME 2>/dev/null || true
    resumed=1
  fi
  if (($(date +%s) > deadline)); then
    sinfo -N -l >&2 || true
    die "node(s) not ready after ${TIMEOUT}s (logs: $LOGS)"
  fi
  sleep 0.2
done
say "ready: $(sinfo -V), ${NODES_N} node(s) x ${CPUS} CPUs$( ((GPUS)) && echo " x $GPUS fake GPUs"), proctrack/$proctrack"
