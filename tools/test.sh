#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up .venv, install Debian's chromium (the browser test) and
# dataset-fashion-mnist (the tests on real data) when they are missing, start the local SLURM cluster the slurm tests
# submit to (installing it with apt when missing), run pytest with any arguments given, stop the cluster.
# pytest's exit status is the script's (5, no test collected, counts as a failure).
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh || exit 1
missing=()
command -v chromium >/dev/null || missing+=(chromium)
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null || exit 1
fi
bash tools/slurm/start-local.sh >/dev/null || exit 1
.venv/bin/python -m pytest "$@"
status=$?
bash tools/slurm/stop-local.sh 2>/dev/null
exit $status
