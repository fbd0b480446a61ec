#!/usr/bin/env bash
# Run one Molecule scenario (`molecule test -s NAME`) and keep its whole output in a log. When it
# fails, print the failed tasks again after Molecule's recap: a CI log that keeps only its tail
# then still names the task that failed and its message, not just the stage.
set -euo pipefail

scenario="$1"
log_dir="${RAYINFER_MOLECULE_LOGS:-${TMPDIR:-/tmp}/rayinfer-molecule-logs}"
mkdir -p "$log_dir"
log="$log_dir/$scenario.log"

status=0
molecule test -s "$scenario" 2>&1 | tee "$log" || status=$?
if ((status)); then
  echo
  echo "=== molecule $scenario failed (exit $status); its failed tasks (whole log: $log) ==="
  # Drop colours and Molecule's box-drawing margin; keep each failure and the lines that follow it
  # (the task's message), not the "FAILED - RETRYING" lines of tasks that were still waiting.
  sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^ *[│|] \{0,1\}//' "$log" \
    | grep -E -B3 -A30 '^(fatal|failed): \[|FAILED! =>' | tail -n 120 || true
fi
exit "$status"
