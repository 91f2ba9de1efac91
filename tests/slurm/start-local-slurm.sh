#!/usr/bin/env bash
# Start a single-node SLURM on this host (munged, slurmctld, slurmd) for the job-script tests.
# Needs root and Debian's packages; installs slurm-wlm and munge with apt-get when missing.
# Safe to run twice: running daemons are left as they are.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "start-local-slurm: needs root (it installs packages and starts daemons)" >&2; exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "start-local-slurm: installing slurm-wlm and munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

mem=$(awk '/MemTotal/ {print int($2 / 1024) - 1024}' /proc/meminfo)
# 4 CPUs declared on a 2-core machine (config_overrides) so that 4-rank jobs fit, oversubscribed.
cpus=$(( $(nproc) > 4 ? $(nproc) : 4 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=${host}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
JobRequeue=1
MinJobAge=3600
KillWait=30
NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=local Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  state=$(sinfo -h -N -o %t 2>/dev/null | head -1)
  case "$state" in idle*|mix*|alloc*) echo "start-local-slurm: node ${host} is ${state}"; exit 0;;
  esac
  sleep 1
done
echo "start-local-slurm: the node did not come up; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
