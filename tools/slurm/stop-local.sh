#!/usr/bin/env bash
# Stop the local cluster that start-local.sh started, by its PID files, daemons in the reverse order.
# A zombie counts as stopped: PID 1 here reaps orphans only now and then.
set -uo pipefail

DIR=${RESIDUAL_SLURM_DIR:-/tmp/residual-slurm}

running() { [[ -d /proc/$1 ]] && ! grep -q '^[^)]*) Z' "/proc/$1/stat" 2>/dev/null; }

for name in slurmd slurmctld slurmdbd mariadbd munged; do
    file=$DIR/run/$name.pid
    [[ -f $file ]] || continue
    pid=$(cat "$file")
    if running "$pid"; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
        running "$pid" && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$file"
done
echo "stop-local: stopped the cluster in $DIR" >&2
