#!/usr/bin/env bash
# import-linter reads one directory per package, but `vnet` is split over shared/
# and services/ (joined at install time). Check the joined tree, as the wheel has it.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/vnet-lint-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/vnet"
cp -r "$root/shared/vnet/." "$tmp/vnet/"
cp -r "$root/services/vnet/." "$tmp/vnet/"
cd "$root"
PYTHONPATH="$tmp" "${LINT_IMPORTS:-lint-imports}" --no-cache "$@"
