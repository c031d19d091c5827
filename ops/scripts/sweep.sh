#!/usr/bin/env bash
# Safety net after a test run: remove anything that still carries the run prefix
# (namespaces, processes, temp dirs) and say so, so the test that leaked it gets fixed.
set -u
prefix=${1:?usage: sweep.sh RUN_PREFIX}
left=0
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${prefix}" || true); do
  echo "sweep: leftover namespace $ns (a test did not clean up)" >&2
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
  ip netns del "$ns" 2>/dev/null; left=1
done
for pid in $(pgrep -f -- "${prefix}" 2>/dev/null || true); do
  [ "$pid" = "$$" ] && continue
  cmd=$( (tr '\0' ' ' <"/proc/$pid/cmdline") 2>/dev/null) || continue
  case "$cmd" in *sweep.sh*|*pytest*|*test.sh*) continue ;; esac
  echo "sweep: leftover process $pid: $cmd" >&2
  kill -9 "$pid" 2>/dev/null; left=1
done
for d in "${TMPDIR:-/tmp}/${prefix}"* /var/run/wireguard/"${prefix}"*.sock; do
  [ -e "$d" ] || continue
  echo "sweep: leftover temp path $d" >&2
  rm -rf "$d"; left=1
done
exit $left
