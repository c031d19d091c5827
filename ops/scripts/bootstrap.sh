#!/usr/bin/env bash
# Make ./.venv ready: Python packages (the project with its dev extra) and, when we
# are root on Debian/Ubuntu, the system tools the node worker and the netns tests use.
# Safe to run again: it only installs what is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

# dnsutils: dig for the resolver tests; containernetworking-plugins, iptables: the CNI peers and
# chaining tests; podman, runc, busybox-static: a real runtime (runc: crun refuses hybrid cgroups)
# running a busybox rootfs through vnet-cni
want_apt="nftables iproute2 iputils-ping wireguard-tools wireguard-go tcpdump dnsutils containernetworking-plugins iptables podman runc busybox-static"
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

# Python packages: exactly what uv.lock says (the lock is the truth; pyproject.toml only
# states ranges). `uv sync --locked` refuses to run when pyproject.toml changed without
# `uv lock`, so a stale lock fails here, loudly, instead of drifting. To update the lock:
#   .venv/bin/uv lock                      # after editing pyproject.toml's dependencies
#   .venv/bin/uv lock --upgrade-package X  # to move one package forward
py=${PYTHON:-python3}
# the uv the lock pins (it is a dev dependency, so the exact sync keeps it)
uv_version=$(awk '/^name = "uv"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' uv.lock)
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($py --version 2>&1)"
  "$py" -m venv .venv
fi
if [ ! -x .venv/bin/uv ]; then
  # quiet unless it fails (pip's notes about configured find-links are noise here)
  out=$(.venv/bin/python -m pip install -q --disable-pip-version-check "uv==$uv_version" 2>&1) \
    || { printf '%s\n' "$out" >&2; exit 1; }
fi
stamp=.venv/.vnet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ uv.lock -nt "$stamp" ]; then
  echo "bootstrap: installing vnet and its dev tools into .venv from uv.lock"
  UV_PROJECT_ENVIRONMENT=.venv .venv/bin/uv sync --locked --quiet --extra dev --python .venv/bin/python
  .venv/bin/python -c "import vnet, nats, msgspec"
  touch "$stamp"
fi
