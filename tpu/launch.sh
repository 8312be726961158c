#!/usr/bin/env bash
# Run a step on every host of a TPU VM slice (all hosts must run the same program).
#
#   export TPU_NAME=autotraj-v5e ZONE=us-west4-a        # PROJECT=... optional
#   tpu/launch.sh sync                                  # copy this checkout to each host
#   tpu/launch.sh setup                                 # tpu/setup.sh on each host
#   CONFIG=experiments/configs/demo.py tpu/launch.sh run --config.workdir=/tmp/run1
#
# Extra arguments after `run` are passed to experiments/main.py (config overrides). Every host runs
# with --config.distributed=True, so JAX joins the hosts into one set of devices before any stage.
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME to the TPU VM name}
ZONE=${ZONE:?set ZONE to the TPU VM zone}
PROJECT=${PROJECT:-}
CONFIG=${CONFIG:-}                   # an experiments/configs/*.py file, for `run`
REMOTE_DIR=${REMOTE_DIR:-autotraj}   # relative to the remote home directory

ACTION=${1:-run}
shift || true

gcloud_tpu() {
  local sub=$1
  shift
  gcloud compute tpus tpu-vm "$sub" ${PROJECT:+--project="$PROJECT"} --zone="$ZONE" --worker=all "$@"
}

on_all_hosts() {
  gcloud_tpu ssh "$TPU_NAME" --command="$1"
}

case "$ACTION" in
  sync)
    # Tracked and untracked-but-not-ignored files: no .git, venvs or run outputs.
    archive="${TMPDIR:-/tmp}/autotraj-$$.tgz"
    (cd "$(dirname "$0")/.." && git ls-files -co --exclude-standard -z | tar czf "$archive" --null -T -)
    gcloud_tpu scp "$archive" "$TPU_NAME:/tmp/autotraj.tgz"
    rm -f "$archive"
    on_all_hosts "mkdir -p $REMOTE_DIR && tar xzf /tmp/autotraj.tgz -C $REMOTE_DIR && rm /tmp/autotraj.tgz"
    ;;
  setup)
    on_all_hosts "cd $REMOTE_DIR && bash tpu/setup.sh"
    ;;
  run)
    [ -n "$CONFIG" ] || { echo "set CONFIG to an experiments/configs/*.py file" >&2; exit 2; }
    extra=""
    if [ $# -gt 0 ]; then extra=$(printf ' %q' "$@"); fi
    on_all_hosts "cd $REMOTE_DIR && source .venv/bin/activate && python experiments/main.py --config=$CONFIG --config.distributed=True$extra"
    ;;
  *)
    echo "usage: $0 sync|setup|run [main.py args...]" >&2
    exit 2
    ;;
esac
