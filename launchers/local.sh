#!/usr/bin/env bash
# Local launcher: a token-authenticated Ray head on 127.0.0.1, `ray job submit` of the training with
# this repository as the runtime_env working_dir, logs followed, head stopped on exit.
#
#   launchers/local.sh configs/sample.yaml [key=value ...]
#
# Environment: VPD_NUM_CPUS (2), VPD_RAY_PORT (6390), VPD_DASHBOARD_PORT (8266), VPD_RAY_START_ARGS
# (more `ray start` flags, e.g. other ports), VPD_ENTRYPOINT (default "python -m vpd_ray.train"). The token is ~/.ray/auth_token (`ray get-auth-token --generate`
# creates it once). Only the head this script starts is stopped (never `ray stop`, which would stop
# every Ray instance of this user on the machine).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG [key=value ...]" >&2
  exit 2
fi

export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN="$(ray get-auth-token --generate 2>/dev/null)"
export RAY_AUTH_TOKEN RAY_USAGE_STATS_ENABLED=0
port="${VPD_RAY_PORT:-6390}"
dashboard_port="${VPD_DASHBOARD_PORT:-8266}"
address="http://127.0.0.1:${dashboard_port}"

ray start --head --block --node-ip-address=127.0.0.1 --port="$port" --num-cpus="${VPD_NUM_CPUS:-2}" \
  --num-gpus=0 --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" \
  --disable-usage-stats ${VPD_RAY_START_ARGS:-} > /tmp/vpd_ray_head_$$.log 2>&1 &
head_pid=$!
trap 'kill "$head_pid" 2>/dev/null; wait "$head_pid" 2>/dev/null || true' EXIT

for _ in $(seq 60); do  # the job API answers once the dashboard is up
  ray job list --address "$address" > /dev/null 2>&1 && break
  kill -0 "$head_pid" 2>/dev/null || { cat /tmp/vpd_ray_head_$$.log >&2; exit 1; }
  sleep 2
done

# The venv and VCS data stay out of the upload; the head's Python (this venv) runs the job.
runtime_env='{"excludes": [".venv", ".git", "**/__pycache__", "runs", "*.egg-info"]}'
read -r -a entrypoint <<< "${VPD_ENTRYPOINT:-python -m vpd_ray.train}"
job_id="vpd-$(date +%Y%m%d-%H%M%S)-$$"
ray job submit --address "$address" --submission-id "$job_id" --working-dir . \
  --runtime-env-json "$runtime_env" --no-wait -- "${entrypoint[@]}" "$@"
ray job logs --address "$address" --follow "$job_id" || true
status="$(python -c 'import sys; from ray.job_submission import JobSubmissionClient as C
print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)' "$address" "$job_id")"
echo "job $job_id: $status"
[[ "$status" == SUCCEEDED ]]
