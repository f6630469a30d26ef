#!/usr/bin/env bash
# Stop the local cluster that start-local.sh started. Jobs first: cancel them and wait for their steps (slurmstepd,
# srun and the tasks) to end while slurmd can still end them (a daemon stopped under a running job leaves it
# training); then the daemons, by their PID files, in the reverse order of their start.
# A zombie counts as stopped: PID 1 here reaps orphans only now and then.
set -uo pipefail

DIR=${RESIDUAL_SLURM_DIR:-/tmp/residual-slurm}
export SLURM_CONF=$DIR/etc/slurm.conf

say() { echo "stop-local: $*" >&2; }
running() { [[ -d /proc/$1 ]] && ! grep -q '^[^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
steps() { local pid; for pid in $(pgrep -x slurmstepd); do running "$pid" && echo "$pid"; done; }  # one cluster here
tree() { local pid; for pid in "$@"; do echo "$pid"; tree $(pgrep -P "$pid"); done; }  # PIDs and descendants

if [[ -f $SLURM_CONF ]] && scontrol ping >/dev/null 2>&1; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        say "cancelling jobs $jobs"
        scancel $jobs
        for _ in $(seq 600); do [[ -z $(squeue -h -o %i 2>/dev/null)$(steps) ]] && break; sleep 0.1; done
    fi
fi
pids=$(tree $(steps))
if [[ -n $pids ]]; then  # steps that outlived their job, or whose controller was down: ended here, tasks too
    say "ending job steps and their tasks: $(echo $pids)"
    kill -TERM $pids 2>/dev/null
    for _ in $(seq 100); do [[ -z $(for pid in $pids; do running "$pid" && echo "$pid"; done) ]] && break; sleep 0.1; done
    kill -KILL $pids 2>/dev/null
fi

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
say "stopped the cluster in $DIR"
