#!/usr/bin/env bash
# Start a local multi-process Ray cluster for development: one head and N worker
# nodes (default 1), each a separate raylet with its own resources, so jobs exercise
# real multi-node scheduling on one machine. Prints the Jobs API / dashboard address.
#
#   infra/start-local-cluster.sh [--dir DIR] [--dashboard-port PORT] [--workers N]
#                                [--num-gpus N] [--cpus-per-node N]
#   infra/stop-local-cluster.sh  [--dir DIR]
#
# Every port is chosen free (the dashboard tries 8265 first), and all state lives in
# DIR (default /tmp/tokenmill-ray-$UID): Ray's --temp-dir and cluster.env (addresses,
# read by the stop script). Nothing is written to /tmp/ray, so a plain `ray.init()`
# elsewhere on the machine still starts its own instance instead of joining this one.
# Never use `ray stop` to end this cluster: it kills every Ray process of every user
# session on the machine; infra/stop-local-cluster.sh stops only this one.
#
# Token authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or
# RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token) before starting; they pass through to every
# node. With RAY_AUTH_MODE unset, Ray 2.60 enables it anyway if ~/.ray/auth_token exists
# (any `ray.init()` writes one); RAY_AUTH_MODE=disabled turns it off. Clients then need
# the same token (tokenmill submit looks where Ray does).
#
# The worker node carries the custom resource {"worker_node": 1} so a test can pin
# work to it; --num-gpus gives it logical GPUs (scheduling only, no device needed).
# RAY_BIN selects the ray executable (default: the project's .venv, then PATH).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
dir="/tmp/tokenmill-ray-$(id -u)"
dashboard_port=8265
workers=1
num_gpus=0
cpus_per_node=1

usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --dashboard-port) dashboard_port=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --num-gpus) num_gpus=$2; shift 2 ;;
    --cpus-per-node) cpus_per_node=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done

if [ -z "${RAY_BIN:-}" ]; then
  if [ -x "$repo/.venv/bin/ray" ]; then RAY_BIN="$repo/.venv/bin/ray"; else RAY_BIN=$(command -v ray || true); fi
fi
[ -n "$RAY_BIN" ] && [ -x "$RAY_BIN" ] || { echo "ray not found: install ray[default] or set RAY_BIN" >&2; exit 1; }
bindir=$(dirname "$RAY_BIN")
python="$bindir/python"
# Job entrypoints run `python ...` through the raylet's PATH: make it this environment's.
export PATH="$bindir:$PATH"

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# Unix socket paths (DIR/session_<date>_<pid>/sockets/plasma_store) must stay < 108 bytes.
[ ${#dir} -le 50 ] || { echo "--dir $dir is too long for Ray's socket paths (keep it under 50 characters)" >&2; exit 1; }
state="$dir/cluster.env"
if [ -f "$state" ]; then
  echo "a cluster is already recorded in $state; stop it first: $here/stop-local-cluster.sh --dir $dir" >&2
  exit 1
fi

# Ray 2.60 turns token auth on when RAY_AUTH_MODE=token, and also when RAY_AUTH_MODE is
# unset but a token exists; ~/.ray/auth_token does, once any `ray.init()` ran here.
has_token=0
{ [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] || [ -s "$HOME/.ray/auth_token" ]; } && has_token=1
case "${RAY_AUTH_MODE-unset}" in
  token) auth=on ;;
  unset) if [ "$has_token" = 1 ]; then auth=on; else auth=off; fi ;;
  *) auth=off ;;
esac
if [ "$auth" = on ] && [ "$has_token" = 0 ]; then
  echo "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, or run '$RAY_BIN get-auth-token --generate'" >&2
  exit 1
fi
# Explicit for every node: a joining `ray start --address` does not turn token auth on by
# itself the way the head does, and then fails with InvalidAuthToken (seen with 2.60.0).
if [ "$auth" = on ]; then export RAY_AUTH_MODE=token; else export RAY_AUTH_MODE=disabled; fi

# n free loopback ports, held open together so they are distinct.
free_ports() {
  "$python" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
port_is_free() {
  "$python" -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}

# Ports every raylet needs; with defaults, a second raylet on the host collides with the
# first on the dashboard agent's 52365.
node_port_flags() {
  local p; read -r -a p <<< "$(free_ports 6)"
  echo "--object-manager-port ${p[0]} --node-manager-port ${p[1]}" \
       "--dashboard-agent-listen-port ${p[2]} --dashboard-agent-grpc-port ${p[3]}" \
       "--runtime-env-agent-port ${p[4]} --metrics-export-port ${p[5]}"
}

cleanup_on_error() {
  echo "start failed; stopping what was started (logs under $dir)" >&2
  bash "$here/stop-local-cluster.sh" --dir "$dir" >&2 || true
}

read -r gcs_port client_port <<< "$(free_ports 2)"
port_is_free "$dashboard_port" || dashboard_port=$(free_ports 1)

# Record the cluster before starting it, so a failed start can still be stopped.
cat > "$state" <<EOF
GCS_PORT=$gcs_port
DASHBOARD_URL=http://127.0.0.1:$dashboard_port
EOF
trap cleanup_on_error ERR

common=(--temp-dir "$dir" --num-cpus "$cpus_per_node" --disable-usage-stats)
# shellcheck disable=SC2046  # node_port_flags is a list of flags
"$RAY_BIN" start --head --port "$gcs_port" --ray-client-server-port "$client_port" \
  --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
  $(node_port_flags) "${common[@]}" > "$dir/start-head.log" 2>&1 \
  || { tail -n 20 "$dir/start-head.log" >&2; false; }

# Ray does not bind the node to loopback (it resolves 127.0.0.1 to the host's address),
# so read the GCS address back from the address file `ray start` wrote in DIR.
gcs_address=$(cat "$dir/ray_current_cluster")
echo "GCS_ADDRESS=$gcs_address" >> "$state"

for ((i = 1; i <= workers; i++)); do
  # shellcheck disable=SC2046
  "$RAY_BIN" start --address "$gcs_address" --num-gpus "$num_gpus" --resources '{"worker_node": 1}' \
    $(node_port_flags) "${common[@]}" > "$dir/start-worker-$i.log" 2>&1 \
    || { tail -n 20 "$dir/start-worker-$i.log" >&2; false; }
done
trap - ERR

auth_note=""
[ "$auth" = on ] && auth_note="
  token auth is on: clients need the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token;
  the ray CLI also RAY_AUTH_MODE=token). RAY_AUTH_MODE=disabled starts without."
cat <<EOF
Local Ray cluster: head + $workers worker node(s), $cpus_per_node CPU each, $num_gpus logical GPU(s) per worker$auth_note
  Jobs API / dashboard: http://127.0.0.1:$dashboard_port
  GCS address:          $gcs_address
  state and logs:       $dir
Try:
  $RAY_BIN status --address $gcs_address
  RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port $RAY_BIN job submit -- python -c 'import ray; ray.init(); print(ray.cluster_resources())'
  tokenmill submit --address http://127.0.0.1:$dashboard_port CONFIG
Stop:
  $here/stop-local-cluster.sh --dir $dir
EOF
