#!/usr/bin/env bash
# Make ./.venv ready: Python packages (the project with its dev extra) and, when we
# are root on Debian/Ubuntu, the system tools the node worker and the netns tests use.
# Safe to run again: it only installs what is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

want_apt="nftables iproute2 iputils-ping wireguard-tools wireguard-go tcpdump"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=""
  for p in $want_apt; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    echo "bootstrap: installing system packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || echo "bootstrap: apt-get update failed; trying the install anyway" >&2
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null \
      || echo "bootstrap: could not install some of:$missing (tests that need them will say so)" >&2
  fi
elif [ "$(id -u)" != 0 ]; then
  echo "bootstrap: not root: skipping system packages ($want_apt); kernel tests will be skipped" >&2
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($py --version 2>&1)"
  "$py" -m venv .venv
fi
stamp=.venv/.vnet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing vnet and its dev tools into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import vnet, nats, msgspec" 
  touch "$stamp"
fi
