#!/usr/bin/env bash
# Best effort: a single-node SLURM (slurmctld + slurmd on this machine) for the SLURM tests.
# Needs root and apt-get (Debian's slurm-wlm and munge). Never fails the caller: every problem
# only means the SLURM tests skip, with their reason.
set -u
log() { echo "slurm_setup: $*"; }
if [ "$(id -u)" != "0" ]; then log "not root: SLURM tests will skip"; exit 0; fi
if ! command -v slurmctld >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then log "no apt-get: SLURM tests will skip"; exit 0; fi
    log "installing slurm-wlm and munge"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) \
        >/dev/null 2>&1 || { log "install failed: SLURM tests will skip"; exit 0; }
fi
if sinfo -h >/dev/null 2>&1; then log "SLURM already running"; exit 0; fi

host="$(hostname -s)"
cpus="$(nproc)"
mem_mb="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
conf=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
cat > "$conf" <<CONF
# written by anisoctf .ci/slurm_setup.sh: one node, no cgroups, for tests
ClusterName=anisoctf-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged" \
    || /usr/sbin/munged --force || { log "munged did not start: SLURM tests will skip"; exit 0; }
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld || { log "slurmctld did not start"; exit 0; }
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd || { log "slurmd did not start"; exit 0; }
for _ in $(seq 1 30); do
    if sinfo -h -o '%T' 2>/dev/null | grep -Eq 'idle|mix|alloc'; then
        log "SLURM is up: $(sinfo -h -o '%P %D %T %c')"; exit 0
    fi
    sleep 1
done
log "SLURM did not become ready: $(sinfo 2>&1 | tail -1); SLURM tests will skip"
exit 0
