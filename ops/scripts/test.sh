#!/usr/bin/env bash
# The one test command: installs what is missing, runs every gate, cleans up.
#   bash ops/scripts/test.sh            # everything
#   bash ops/scripts/test.sh -k ipam    # extra args go to pytest
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
bash ops/scripts/bootstrap.sh

# Every namespace, process and temp file the tests make carries this prefix.
export VNET_RUN_PREFIX=${VNET_RUN_PREFIX:-vt$(head -c 3 /dev/urandom | od -An -tx1 | tr -d ' \n')}
# pytest's own temporary directories too (tmp_path), instead of /tmp/pytest-of-<user>
basetemp="${TMPDIR:-/tmp}/$VNET_RUN_PREFIX-pytest"
cleanup() { rm -rf "$basetemp"; bash ops/scripts/sweep.sh "$VNET_RUN_PREFIX" || true; }
trap cleanup EXIT

echo "== ruff";          .venv/bin/ruff check shared services tests
echo "== mypy";          .venv/bin/mypy shared/vnet services/vnet
echo "== import-linter"; .venv/bin/lint-imports --no-cache
echo "== pytest (run prefix $VNET_RUN_PREFIX)"
.venv/bin/pytest -q -p no:cacheprovider --basetemp="$basetemp" "$@"
