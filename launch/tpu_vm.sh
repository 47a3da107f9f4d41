#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice: create, copy, set up, run, tear down.
#
#   TPU_NAME=my-slice ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#     launch/tpu_vm.sh --config=configs/default.py --workdir=/mnt/shared/runs/v4
#
# Steps, each with gcloud (authenticated, with a default project):
#   1. create the TPU VM slice (skipped if TPU_NAME exists; SPOT=1 for a spot slice);
#   2. copy this checkout (git-tracked files) to every worker;
#   3. set up on every worker: Python 3.11 and make where the image lacks them
#      (the default image, tpu-ubuntu2204-base, is Ubuntu 22.04 with python3.10:
#      python3.11 and python3.11-venv come from the deadsnakes PPA), then `make
#      data ACCEL=tpu` with $TPU_PYTHON (default python3.11): the pinned TPU wheels of
#      requirements-tpu.lock (see docs/accelerators.md);
#   4. run `python -m research.main ARGS` on all workers at once: research.run.distributed
#      sees a Cloud TPU VM and calls jax.distributed.initialize(), which reads the
#      slice's workers from the TPU metadata;
#   5. copy runs/ back from worker 0 (if the run wrote there) and delete the slice,
#      also when a step fails (KEEP_TPU=1 keeps it).
# --workdir must be storage every worker shares (an NFS/Filestore or gcsfuse
# mount): checkpoints are written by all workers together.
# Other settings: RUNTIME_VERSION (default tpu-ubuntu2204-base; any Ubuntu-based
# TPU runtime works the same way), TPU_PYTHON (a command name pythonX.Y, 3.11 or
# newer, installed from deadsnakes when missing, or a path to a Python on the image).
if ! command -v gcloud >/dev/null 2>&1; then
  echo "error: launch/tpu_vm.sh needs the Google Cloud CLI, and 'gcloud' is not on PATH." \
       "Install it (https://cloud.google.com/sdk/docs/install), run 'gcloud auth login' and" \
       "'gcloud config set project PROJECT', then try again." >&2
  exit 2
fi
set -euo pipefail

missing=()
for name in TPU_NAME ZONE ACCELERATOR_TYPE; do
  [[ -n "${!name:-}" ]] || missing+=("$name")
done
if ((${#missing[@]})); then
  echo "error: launch/tpu_vm.sh needs ${missing[*]} set, e.g.: TPU_NAME=my-slice" \
       "ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 launch/tpu_vm.sh --config=configs/default.py" \
       "--workdir=/mnt/shared/runs/v4" >&2
  exit 2
fi
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
TPU_PYTHON="${TPU_PYTHON:-python3.11}"
remote_dir=research

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
tpu=(gcloud compute tpus tpu-vm)
on_all_workers() { "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }

teardown() {
  status=$?
  "${tpu[@]}" scp --zone="$ZONE" --worker=0 --recurse "$TPU_NAME:$remote_dir/runs" \
      "runs-$TPU_NAME" >/dev/null 2>&1 && echo "launch/tpu_vm.sh: copied runs/ to runs-$TPU_NAME/" >&2
  if [[ "${KEEP_TPU:-0}" == 1 ]]; then
    echo "launch/tpu_vm.sh: keeping $TPU_NAME (KEEP_TPU=1); delete it with:" \
         "gcloud compute tpus tpu-vm delete $TPU_NAME --zone=$ZONE" >&2
  else
    echo "launch/tpu_vm.sh: deleting $TPU_NAME." >&2
    "${tpu[@]}" delete "$TPU_NAME" --zone="$ZONE" --quiet
  fi
  exit "$status"
}

if "${tpu[@]}" describe "$TPU_NAME" --zone="$ZONE" >/dev/null 2>&1; then
  echo "launch/tpu_vm.sh: reusing the existing TPU VM $TPU_NAME." >&2
else
  echo "launch/tpu_vm.sh: creating $TPU_NAME ($ACCELERATOR_TYPE in $ZONE)." >&2
  "${tpu[@]}" create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" ${SPOT:+--spot}
fi
trap teardown EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

archive="$(mktemp -d)/code.tar.gz"
git ls-files -z | tar --null -T - -czf "$archive"
"${tpu[@]}" scp "$archive" "$TPU_NAME:code.tar.gz" --zone="$ZONE" --worker=all
# Python and make first: Ubuntu 22.04 images have python3.10 and may lack make.
python_q="$(printf '%q' "$TPU_PYTHON")"
install_python=""
if [[ "$TPU_PYTHON" =~ ^python3\.[0-9]+$ ]]; then
  install_python="sudo add-apt-repository -y ppa:deadsnakes/ppa &&
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $TPU_PYTHON $TPU_PYTHON-venv"
fi
on_all_workers "set -e
if ! command -v make >/dev/null 2>&1 || ! command -v $python_q >/dev/null 2>&1 ||
   ! $python_q -c 'import ensurepip, venv' >/dev/null 2>&1; then
  sudo DEBIAN_FRONTEND=noninteractive apt-get update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q make software-properties-common
  ${install_python:-true}
fi
$python_q -c 'import sys; assert sys.version_info >= (3, 11), sys.version' || {
  echo \"error: launch/tpu_vm.sh: $python_q on \$(hostname) is not Python 3.11+; set TPU_PYTHON\" >&2
  exit 2; }
mkdir -p $remote_dir && tar -xzf code.tar.gz -C $remote_dir && cd $remote_dir
make data PYTHON=$python_q ACCEL=tpu"
on_all_workers "cd $remote_dir && .venv/bin/python -m research.main $(printf '%q ' "$@")"
