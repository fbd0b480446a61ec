#!/usr/bin/env bash
# Run one Molecule scenario (`molecule test -s NAME`) and keep its whole output in a log. When it
# fails, name the failed tasks and their messages again in a few lines after Molecule's recap: a
# CI log that keeps only its last lines then still says which task failed and why.
set -euo pipefail

scenario="$1"
log_dir="${RAYINFER_MOLECULE_LOGS:-${TMPDIR:-/tmp}/rayinfer-molecule-logs}"
mkdir -p "$log_dir"
log="$log_dir/$scenario.log"

status=0
molecule test -s "$scenario" 2>&1 | tee "$log" || status=$?
if ((status)); then
  python3 - "$log" "$scenario" "$status" <<'PY'
import re
import sys

log, scenario, status = sys.argv[1:]
text = re.sub(r"\x1b\[[0-9;]*m", "", open(log, errors="replace").read())
# Molecule draws a box margin ("  │ ") in front of Ansible's lines and wraps long ones.
lines = [re.sub(r"^\s*[│|]\s?", "", line).rstrip() for line in text.splitlines()]
task, failures = "?", []
for i, line in enumerate(lines):
    if line.startswith("TASK ["):
        task = " ".join([line, lines[i + 1].strip()]) if "]" not in line else line
        task = task.split("]")[0] + "]"
    elif re.match(r"(fatal|failed): \[", line):
        after = " ".join(part.strip() for part in lines[i:i + 40])
        found = re.search(r'"(msg|fail_msg)": "(.*?)(?<!\\)"', after)
        why = found.group(2) if found else after.split("=>", 1)[-1].strip()
        failures.append(f"  {task}\n    {line.split('=>')[0].strip()} {why[:600]}")
print(f"\n=== molecule {scenario}: exit {status}; failed tasks (whole log: {log}) ===")
print("\n".join(failures[-3:]) or "  (no failed task found in the log)")
PY
fi
exit "$status"
