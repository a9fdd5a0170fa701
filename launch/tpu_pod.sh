#!/usr/bin/env bash
# Runs tiktalk_jax on a multi-host Cloud TPU slice (e.g. v5e-16: 4 TPU VM workers x 4 chips):
# one process per worker, all started at once, one log per worker on this machine.
#
#   launch/tpu_pod.sh [OPTIONS] TPU_NAME ZONE CONFIG WORKDIR [-- MAIN_FLAGS...]
#
#   TPU_NAME, ZONE  the TPU VM slice (gcloud compute tpus tpu-vm create ...).
#   CONFIG          a config path relative to the repo, with its argument, e.g.
#                   configs/maria.py:variant=tvak,size=base,data_dir=gs://BUCKET/data
#   WORKDIR         shared by every worker: gs://BUCKET/runs/NAME (checkpoints, summaries).
#   MAIN_FLAGS      more flags for `python -m tiktalk_jax.main`, e.g. --config.mesh.data=16
#
# Options:
#   --setup         first copy this checkout (git archive HEAD) to every worker and create the
#                   environment there (python3 -m venv + pip install -e '.[tpu]'), in parallel
#                   over the workers (--worker=all).
#   --workers=N     the number of TPU VM workers (default: asked from gcloud describe).
#   --mode=MODE     train (default) or eval.
#   --project=P     gcloud project (default: gcloud's configured one).
#   --logs=DIR      where the worker logs go (default: logs/TPU_NAME); worker<i>.log each.
#   --dry-run       print the commands instead of running them (no gcloud needed).
#
# Every worker runs `python -m tiktalk_jax.main --mode=MODE --distributed=on ...`: JAX reads
# the slice's workers from the TPU metadata server and process 0 is worker 0. TPUs need no XLA
# or memory flags for this code (launch/README.md). The script exits non-zero if any worker
# failed, naming it.
set -euo pipefail

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

setup=0 dry_run=0 workers="" mode=train project="" logs=""
positional=()
while (($#)); do
  case "$1" in
    --setup) setup=1 ;;
    --dry-run) dry_run=1 ;;
    --workers=*) workers="${1#*=}" ;;
    --mode=*) mode="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --logs=*) logs="${1#*=}" ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) positional+=("$1") ;;
  esac
  shift
done
((${#positional[@]} == 4)) || { echo "need TPU_NAME ZONE CONFIG WORKDIR" >&2; usage; }
tpu="${positional[0]}" zone="${positional[1]}" config="${positional[2]}" workdir="${positional[3]}"
main_flags=("$@")
case "$mode" in train|eval) ;; *) echo "--mode must be train or eval" >&2; exit 2 ;; esac
logs="${logs:-logs/$tpu}"
# shellcheck disable=SC2088  # the tilde is expanded by the worker's shell, not here
remote_dir='~/tiktalk_jax'
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

# Prints a command as a shell would read it back.
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }
run() { show "$@"; ((dry_run)) || "$@"; }

if [[ -z "$workers" ]]; then
  if ((dry_run)); then
    echo "--dry-run needs --workers=N (the slice's worker count; v5e-16: 4)" >&2
    exit 2
  fi
  workers=$("${gcloud_tpu[@]}" describe "$tpu" "${where[@]}" \
    --format='value(networkEndpoints.len())')
fi
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "bad worker count '$workers'" >&2; exit 2; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
if ((setup)); then
  archive="/tmp/tiktalk_jax-$tpu.tar.gz"
  run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  run "${gcloud_tpu[@]}" scp "$archive" "$tpu:/tmp/tiktalk_jax.tar.gz" "${where[@]}" --worker=all
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="set -e; \
mkdir -p $remote_dir && tar -xzf /tmp/tiktalk_jax.tar.gz -C $remote_dir && cd $remote_dir && \
python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'"
fi

# The command every worker runs (arguments quoted for the remote shell).
remote=(.venv/bin/python -m tiktalk_jax.main --mode="$mode" --config="$config"
        --workdir="$workdir" --distributed=on "${main_flags[@]}")
remote_cmd="cd $remote_dir && exec$(printf ' %q' "${remote[@]}")"

run mkdir -p "$logs"
pids=()
for ((i = 0; i < workers; i++)); do
  cmd=("${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker="$i" --command="$remote_cmd")
  show "${cmd[@]}" ">$logs/worker$i.log"
  if ((!dry_run)); then
    "${cmd[@]}" >"$logs/worker$i.log" 2>&1 &
    pids+=($!)
  fi
done
((dry_run)) && exit 0
failed=()
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || failed+=("$i")
done
if ((${#failed[@]})); then
  echo "workers ${failed[*]} failed; see $logs/worker<i>.log" >&2
  exit 1
fi
echo "all $workers workers finished; logs in $logs/"
