#!/usr/bin/env bash
# The README's first command: set up .venv, get Fashion-MNIST (Debian's package where apt and root are there, else
# `residual data get` from Zalando's source), train configs/fashion-mnist/quickstart.yaml. Where the data cannot be
# had, say so in one line and train the synthetic quickstart (configs/quickstart.yaml) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
if [ ! -d data/fashion-mnist ]; then
    if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            dataset-fashion-mnist; } >/dev/null 2>&1 || true
    fi
    .venv/bin/residual data get fashion-mnist data/fashion-mnist >/dev/null 2>&1 || {
        echo "quickstart: Fashion-MNIST cannot be had here (no Debian package dataset-fashion-mnist, no download from" \
            "Zalando's source): training the synthetic set instead (configs/quickstart.yaml)" >&2
        exec .venv/bin/residual train configs/quickstart.yaml "$@"
    }
fi
exec .venv/bin/residual train configs/fashion-mnist/quickstart.yaml "$@"
