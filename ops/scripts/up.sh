#!/usr/bin/env bash
# The one command to run VNet locally: installs what is missing into ./.venv, then
# starts NATS, Valkey, the five services and a node worker (Ctrl-C stops everything).
#   bash ops/scripts/up.sh [vnetctl up options]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
bash ops/scripts/bootstrap.sh
exec .venv/bin/vnetctl up "$@"
