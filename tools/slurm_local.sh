#!/usr/bin/env bash
# A real single-node Slurm on this machine, for trying and testing examples/slurm/*.sbatch.
#
#   tools/slurm_local.sh install        # Debian's slurm-wlm + munge, when absent (root, apt)
#   tools/slurm_local.sh start DIR      # munged, slurmctld, slurmd on localhost; state in DIR
#   export SLURM_CONF=DIR/slurm.conf    # then sbatch / squeue / scontrol as usual
#   tools/slurm_local.sh stop DIR       # cancel jobs, stop the daemons by their PID files
#
# Everything (config, munge socket, spool, state, logs, PID files) lives in DIR, and the ports are
# free ones picked at start, so it runs beside any other Slurm or munge on the machine. DIR must be
# traversable by the munge user (munged runs as munge): a `mktemp -d` under /tmp, chmod 755.
# Exit codes: 3 = cannot install (not root, or apt unreachable), 1 = any other failure.
set -euo pipefail

die() { echo "slurm_local.sh: $*" >&2; exit "${2:-1}"; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and installing them needs root" 3
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >&2; then
    die "apt-get could not install slurm-wlm and munge (no package repository reachable?)" 3
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq $((seconds * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  die "$what did not come up within ${seconds}s; see the logs in $DIR"
}

start() {
  mkdir -p "$DIR"/{state,spool,munge}
  chmod 755 "$DIR"
  chown munge:munge "$DIR/munge"
  chmod 755 "$DIR/munge"  # munged wants the socket directory world-searchable
  local cpus
  cpus=$(nproc)
  cat >"$DIR/slurm.conf" <<EOF
ClusterName=megalign-local
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$DIR/slurm.conf
  runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
  wait_for 10 munged test -S "$DIR/munge/munge.socket"
  slurmctld
  wait_for 30 slurmctld scontrol ping
  slurmd -N localhost
  wait_for 30 "slurmd (node localhost idle)" sh -c 'sinfo -h -n localhost -o %T | grep -qx idle'
  echo "$SLURM_CONF"
}

stop() {
  export SLURM_CONF=$DIR/slurm.conf
  if [ -f "$SLURM_CONF" ] && [ -f "$DIR/slurmctld.pid" ]; then
    scancel --quiet --user="$(id -un)" >/dev/null 2>&1 || true  # the cluster is ours alone
  fi
  local pidfile pid
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
}

case "${1:-}" in
  install) install ;;
  start) DIR=${2:?usage: slurm_local.sh start DIR}; install; start ;;
  stop) DIR=${2:?usage: slurm_local.sh stop DIR}; stop ;;
  *) die "usage: slurm_local.sh install | start DIR | stop DIR" ;;
esac
