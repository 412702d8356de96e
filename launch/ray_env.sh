#!/usr/bin/env bash
# Per-job Ray settings for Slurm (sourced by launch/slurm.sbatch; testable on one machine).
# Ports and the temp directory derive from SLURM_JOB_ID, so two jobs on one node never collide.
# Token authentication is on: a fresh token per job, readable only by the job's user.
set -euo pipefail

: "${SLURM_JOB_ID:?run inside a Slurm allocation (or export SLURM_JOB_ID for a local test)}"
RAY_PYTHON_BIN="${RAY_PYTHON_BIN:-$(dirname "$(command -v python)")}"
offset=$(( (SLURM_JOB_ID % 500) * 20 ))
export FLAGSTAFF_RAY_PORT=${FLAGSTAFF_RAY_PORT:-$(( 20000 + offset ))}          # GCS
export FLAGSTAFF_NODE_MANAGER_PORT=${FLAGSTAFF_NODE_MANAGER_PORT:-$(( 20001 + offset ))}
export FLAGSTAFF_OBJECT_MANAGER_PORT=${FLAGSTAFF_OBJECT_MANAGER_PORT:-$(( 20002 + offset ))}
export FLAGSTAFF_CLIENT_PORT=${FLAGSTAFF_CLIENT_PORT:-$(( 20003 + offset ))}
export FLAGSTAFF_DASHBOARD_PORT=${FLAGSTAFF_DASHBOARD_PORT:-$(( 20004 + offset ))}
export FLAGSTAFF_MIN_WORKER_PORT=${FLAGSTAFF_MIN_WORKER_PORT:-$(( 20005 + offset ))}
export FLAGSTAFF_MAX_WORKER_PORT=${FLAGSTAFF_MAX_WORKER_PORT:-$(( 20019 + offset ))}
export FLAGSTAFF_RAY_TMP="${FLAGSTAFF_RAY_TMP:-/tmp/ray-flagstaff-${SLURM_JOB_ID}}"
# a predictable name in a shared /tmp: never follow a symlink or use another user's directory there
if [ -L "$FLAGSTAFF_RAY_TMP" ] || { [ -e "$FLAGSTAFF_RAY_TMP" ] && [ ! -O "$FLAGSTAFF_RAY_TMP" ]; }; then
  echo "error: FLAGSTAFF_RAY_TMP=$FLAGSTAFF_RAY_TMP is a symlink or another user's; set" \
    "FLAGSTAFF_RAY_TMP to a new directory of yours" >&2
  exit 2
fi
mkdir -p "$FLAGSTAFF_RAY_TMP"
chmod 700 "$FLAGSTAFF_RAY_TMP"

export RAY_AUTH_MODE=token
# the token lives on the (shared) submit directory so that every node of the job can read it
token_dir="${FLAGSTAFF_TOKEN_DIR:-$PWD/.flagstaff}"
mkdir -p "$token_dir" && chmod 700 "$token_dir"
export RAY_AUTH_TOKEN_PATH="$token_dir/ray-${SLURM_JOB_ID}.token"
if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
  (umask 077; "$RAY_PYTHON_BIN/python" -c "import secrets; print(secrets.token_hex(32), end='')" \
    > "$RAY_AUTH_TOKEN_PATH")
fi

_ports() {
  echo --node-manager-port="$FLAGSTAFF_NODE_MANAGER_PORT" \
       --object-manager-port="$FLAGSTAFF_OBJECT_MANAGER_PORT" \
       --min-worker-port="$FLAGSTAFF_MIN_WORKER_PORT" --max-worker-port="$FLAGSTAFF_MAX_WORKER_PORT"
}

# Every process a `ray start` below starts (GCS, raylet, dashboard, Ray Client server, agents,
# workers) lives in one new session (setsid); the session's ID and the PIDs in it right after the
# start are recorded in $FLAGSTAFF_RAY_TMP/pids.<host>, and stop_ray ends exactly the processes of
# those sessions (the recorded ones and the workers the raylet started since), by PID.
_pidfile() { echo "$FLAGSTAFF_RAY_TMP/pids.$(hostname)"; }

# _session_pids SID...: PIDs of the live processes in these sessions
_session_pids() {
  local sid
  for sid in "$@"; do ps -o pid= -s "$sid" 2>/dev/null || true; done | tr -s ' \n' ' '
}

# _recorded CMD...: run CMD in a new session, record the session and its processes
_recorded() {
  local file rc=0 sid
  file=$(_pidfile)
  setsid -w bash -c 'echo "session $$" >> "$0"; exec "$@"' "$file" "$@" || rc=$?
  sid=$(awk '$1 == "session" {s = $2} END {print s}' "$file")
  echo "pids $sid $(_session_pids "$sid")" >> "$file"
  return "$rc"
}

# start_head IP CPUS GPUS: the head node, dashboard on localhost only
start_head() {
  _recorded "$RAY_PYTHON_BIN/ray" start --head --node-ip-address="$1" --port="$FLAGSTAFF_RAY_PORT" \
    --ray-client-server-port="$FLAGSTAFF_CLIENT_PORT" --dashboard-host=127.0.0.1 \
    --dashboard-port="$FLAGSTAFF_DASHBOARD_PORT" --temp-dir="$FLAGSTAFF_RAY_TMP" \
    --num-cpus="$2" --num-gpus="$3" $(_ports) --disable-usage-stats
}

# start_worker HEAD_IP CPUS GPUS [--block]: a worker joining the head
start_worker() {
  _recorded "$RAY_PYTHON_BIN/ray" start --address="$1:$FLAGSTAFF_RAY_PORT" --num-cpus="$2" \
    --num-gpus="$3" $(_ports) --disable-usage-stats "${@:4}"
}

# stop_ray: stop the Ray processes this job started on this node, and nothing else: SIGTERM, then
# SIGKILL what is left after 5 s (Ray's agents can wait a minute on a GCS that is gone)
stop_ray() {
  local file sids pids i
  file=$(_pidfile)
  [ -f "$file" ] || return 0
  sids=$(awk '$1 == "session" {print $2}' "$file")
  pids=$(_session_pids $sids)
  [ -n "${pids// }" ] && kill -TERM $pids 2>/dev/null || true
  for i in $(seq 25); do
    pids=$(_session_pids $sids)
    [ -z "${pids// }" ] && break
    sleep 0.2
  done
  [ -n "${pids// }" ] && kill -KILL $pids 2>/dev/null || true
  for i in $(seq 25); do
    [ -z "$(_session_pids $sids | tr -d ' ')" ] && break
    sleep 0.2
  done
  rm -f "$file"
}
