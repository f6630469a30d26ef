#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests and for trying `residual submit`: munged, MariaDB,
# slurmdbd (accounting, which sacct and submitit need), slurmctld and slurmd, run as root without systemd.
# Everything lives in one folder ($RESIDUAL_SLURM_DIR, default /tmp/residual-slurm): config, state, spool, logs,
# PID files, the munge key and socket, the database. /etc/slurm and /etc/munge are not touched.
# Idempotent: a running cluster is left as it is. Clients need SLURM_CONF=$RESIDUAL_SLURM_DIR/etc/slurm.conf.
set -euo pipefail

DIR=${RESIDUAL_SLURM_DIR:-/tmp/residual-slurm}
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
HOST=$(hostname -s)
DB_PORT=${RESIDUAL_SLURM_DB_PORT:-16033}
DBD_PORT=${RESIDUAL_SLURM_DBD_PORT:-16819}
CTLD_PORT=${RESIDUAL_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${RESIDUAL_SLURM_SLURMD_PORT:-16818}

say() { echo "start-local: $*" >&2; }

node_idle() { sinfo -h -N -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

alive() {  # a PID file naming a living process (a zombie counts as gone)
    [[ -f $1 ]] && local pid && pid=$(cat "$1") && [[ -d /proc/$pid ]] && ! grep -q '^[^)]*) Z' "/proc/$pid/stat"
}

if [[ -f $CONF ]] && command -v sinfo >/dev/null && node_idle; then
    say "already running ($CONF)"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v mariadbd >/dev/null || ! command -v sbatch >/dev/null; then
    say "installing munge, slurm-wlm and mariadb (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client slurmdbd mariadb-server \
        >/dev/null
fi

"$(dirname "$0")/stop-local.sh" >/dev/null 2>&1 || true
# A clean state: jobs a stopped controller saved would come back as running and hold the node.
rm -rf "$DIR/state" "$DIR/spool"
mkdir -p "$DIR"/{etc,state,spool,log,run,munge/key,munge/run,mysql}
chmod 700 "$DIR/munge/key"
chmod 755 "$DIR" "$DIR/munge" "$DIR/munge/run"

start() {  # NAME COMMAND...: in the foreground of its own session, its PID in run/NAME.pid
    local name=$1
    shift
    setsid "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null &
    echo $! >"$DIR/run/$name.pid"
}

wait_for() {  # SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    say "$what did not come up in $seconds s; logs in $DIR/log"
    tail -n 20 "$DIR"/log/* >&2 || true
    exit 1
}

# munge: the key, the daemon
KEY=$DIR/munge/key/munge.key
SOCKET=$DIR/munge/run/munge.socket
[[ -f $KEY ]] || { dd if=/dev/urandom bs=1 count=1024 of="$KEY" status=none; chmod 400 "$KEY"; }
start munged munged --foreground --force --key-file="$KEY" --socket="$SOCKET" --pid-file="$DIR/run/munged.pid.own" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
wait_for 10 munged test -S "$SOCKET"

# MariaDB on 127.0.0.1 with its own data folder, and the accounting database's user
if [[ ! -d $DIR/mysql/mysql ]]; then
    mariadb-install-db --datadir="$DIR/mysql" --user=root --auth-root-authentication-method=normal >/dev/null
fi
start mariadbd mariadbd --no-defaults --datadir="$DIR/mysql" --socket="$DIR/run/mysql.sock" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --user=root --pid-file="$DIR/run/mariadbd.pid.own" --log-error="$DIR/log/mariadb.log"
wait_for 30 MariaDB mariadb --no-defaults --socket="$DIR/run/mysql.sock" -uroot -e 'select 1'
mariadb --no-defaults --socket="$DIR/run/mysql.sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

# SLURM's configuration: this host as the one node, from `slurmd -C`, with a little memory left to the system
NODE=$(slurmd -C | head -n 1)
MEMORY=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE")
NODE=$(sed "s/RealMemory=[0-9]*/RealMemory=$((MEMORY - 1024))/" <<<"$NODE")
# Job ids restart at FirstJobId with a new state folder: a fresh start far from the last one keeps old submitit
# folders keyed by job id from answering for new jobs.
FIRST_JOB_ID=$(((RANDOM * 32768 + RANDOM) % 1000000 + 1000))
cat >"$CONF" <<EOF
ClusterName=residual
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$SOCKET,cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid.own
SlurmdPidFile=$DIR/run/slurmd.pid.own
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
MinJobAge=3600
FirstJobId=$FIRST_JOB_ID
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$SOCKET
$NODE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCKET
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$DIR/run/slurmdbd.pid.own
LogFile=$DIR/log/slurmdbd.log
EOF
chmod 600 "$DIR/etc/slurmdbd.conf"

start slurmdbd slurmdbd -D
wait_for 30 slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster residual >/dev/null 2>&1 || true
start slurmctld slurmctld -D -i -f "$CONF"
wait_for 30 slurmctld scontrol ping
start slurmd slurmd -D -f "$CONF"
wait_for 30 "the node" node_idle
say "up: $(sinfo -h -o '%P %D %t %c CPUs %m MB')"
echo "export SLURM_CONF=$CONF"
