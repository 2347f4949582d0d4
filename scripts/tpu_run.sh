#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM or pod slice (neo needs no other launcher).
#
#   scripts/tpu_run.sh NAME --zone ZONE [--project P] [--setup] -- python main.py --model cfg --tpu NAME
#
# --setup first clones neo into ~/neo on every worker and installs it with jax[tpu].
set -euo pipefail
if [ $# -lt 1 ]; then sed -n '2,6p' "$0"; exit 2; fi
name=$1; shift
zone=""; project=""; setup=0; repo="${NEO_REPO:-https://github.com/EleutherAI/neo.git}"
while [ $# -gt 0 ]; do
  case "$1" in
    --zone) zone=$2; shift 2;;
    --project) project=$2; shift 2;;
    --setup) setup=1; shift;;
    --) shift; break;;
    *) echo "unknown option $1 (put the command after --)"; exit 2;;
  esac
done
[ -n "$zone" ] || { echo "--zone is required"; exit 2; }
extra=(); [ -n "$project" ] && extra=(--project "$project")
ssh() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${extra[@]}" --worker=all --command "$1"; }
if [ "$setup" = 1 ]; then
  ssh "test -d ~/neo || git clone $repo ~/neo; cd ~/neo && pip install -q -r requirements.txt 'jax[tpu]' && pip install -q --no-deps -e ."
fi
[ $# -gt 0 ] || exit 0
ssh "cd ~/neo && $(printf '%q ' "$@")"
