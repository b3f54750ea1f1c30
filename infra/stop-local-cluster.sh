#!/usr/bin/env bash
# Stop the local Ray cluster that infra/start-local-cluster.sh started in DIR, and
# nothing else: `ray stop` would kill every Ray process on the machine, including other
# people's `ray.init()` sessions. Logs stay in DIR for reading; --clean removes DIR.
#
#   infra/stop-local-cluster.sh [--dir DIR] [--clean]
#
# The cluster's processes are the Ray programs (gcs_server, raylet, dashboard,
# monitors, client server) whose command line names DIR or the GCS port, plus all
# their descendants (workers, agents, job drivers). They get SIGTERM, then SIGKILL
# after 5 s. This script and its callers are spared though their arguments name DIR.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
dir="/tmp/tokenmill-ray-$(id -u)"
clean=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --clean) clean=1; shift ;;
    -h|--help) sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

state="$dir/cluster.env"
if [ ! -f "$state" ]; then
  echo "no cluster recorded in $state; nothing to stop"
  exit 0
fi
dir=$(cd "$dir" && pwd)
GCS_PORT=""
# shellcheck disable=SC1090
. "$state"

if [ -z "${RAY_BIN:-}" ]; then
  if [ -x "$repo/.venv/bin/ray" ]; then RAY_BIN="$repo/.venv/bin/ray"; else RAY_BIN=$(command -v ray); fi
fi

# psutil comes with ray.
"$(dirname "$RAY_BIN")/python" - "$dir" "$GCS_PORT" <<'EOF'
import re
import sys

import psutil

temp_dir, gcs_port = sys.argv[1], sys.argv[2]
# DIR as a whole path component (not /tmp/x matching /tmp/x2); the GCS port in an address.
patterns = [re.compile(re.escape(temp_dir) + r"(?=$|[/\s'\"])")]
if gcs_port:
    patterns.append(re.compile(rf":{gcs_port}(?!\d)"))

# A Ray program: a binary or script inside the ray package, or `python -m ray.<module>`.
is_ray_program = re.compile(r"/ray/|-m ray\.|^ray\.")
me = psutil.Process()
spared = {me.pid} | {p.pid for p in me.parents()}
roots = []
for proc in psutil.process_iter(["pid", "cmdline"]):
    argv = proc.info["cmdline"] or []
    cmdline = " ".join(argv)
    if (proc.info["pid"] not in spared and is_ray_program.search(" ".join(argv[:3]))
            and any(p.search(cmdline) for p in patterns)):
        roots.append(proc)
procs = {}
for proc in roots:
    procs[proc.pid] = proc
    try:
        procs.update((child.pid, child) for child in proc.children(recursive=True))
    except psutil.Error:
        pass
for pid in spared:
    procs.pop(pid, None)
for proc in procs.values():
    try:
        proc.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(procs.values(), timeout=5)
for proc in alive:
    try:
        proc.kill()
    except psutil.Error:
        pass
psutil.wait_procs(alive, timeout=5)
print(f"stopped {len(procs)} processes ({len(alive)} needed SIGKILL)")
EOF

rm -f "$state" "$dir/ray_current_cluster"
if [ "$clean" = 1 ]; then
  rm -rf "$dir"
  echo "removed $dir"
else
  echo "logs kept in $dir"
fi
