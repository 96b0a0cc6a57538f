#!/usr/bin/env bash
# One node's setup, the same on every cluster: the `setup_commands` of cluster.yaml (AWS), cluster-gcp.yaml (Google
# Cloud) and cluster/local.yaml (machines reached by SSH) are all `bash ~/raysys/cluster/setup-node.sh`, and
# tests/test_ray_up.py runs it through `ray up` on this machine. It builds ~/venv with the node's python3 (3.10 or
# newer), installs torch and then this checkout (which pins Ray), and makes the SSH shells Ray runs its commands in
# use them. `ray up` runs it on every update: a second run only installs what changed.
set -euo pipefail

TORCH=2.13.0  # first, so that pip keeps it: on Linux, PyPI's wheel is the CUDA build
checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$HOME/venv"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup-node.sh: raysys needs Python 3.10 or newer, but this node's python3 is" \
       "'$(python3 --version 2>&1 || echo missing)'. Use a newer machine image (Ubuntu 22.04+, Debian 12+)." >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  # Debian and Ubuntu ship python3 without venv/ensurepip (package python3-venv): installed only when missing.
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    as_root apt-get -qq update && as_root apt-get -qq install -y python3-venv
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -U pip  # an image's own pip can predate editable installs from pyproject.toml
fi

"$venv/bin/pip" install -q "torch==$TORCH"
"$venv/bin/pip" install -q -e "$checkout"

# Ray runs every command in an interactive login shell: these lines give each one (a job's driver included) the
# venv's python and ray, and put clients started on the node (`ray job submit`, a driver) in token mode.
grep -q raysys-env ~/.bashrc 2>/dev/null ||
  printf '%s\n' '# raysys-env' "source $venv/bin/activate" 'export RAY_AUTH_MODE=token' >> ~/.bashrc
