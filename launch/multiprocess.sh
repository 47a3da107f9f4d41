#!/usr/bin/env bash
# N processes of research.main on this machine, joined by jax.distributed on 127.0.0.1.
#
#   launch/multiprocess.sh N --config=configs/default.py --workdir=runs/mp [ARGS...]
#
# Each process gets ARGS plus --coordinator_address=127.0.0.1:PORT (a free port)
# --num_processes=N --process_id=I: the code path a cluster uses, on one machine.
# Devices: when JAX will run on GPUs (JAX_PLATFORMS names cuda/gpu, or is unset and
# JAX's CUDA plugin is installed: research.backend.planned_platform) the GPUs are
# split evenly, each process seeing only its own share (CUDA_VISIBLE_DEVICES;
# process I takes the I-th share). The GPUs are those listed in $GPUS (e.g.
# GPUS=0,1,2,3), else in $CUDA_VISIBLE_DEVICES, else every GPU `nvidia-smi -L`
# lists; N must divide their number. On the CPU (JAX_PLATFORMS=cpu, or no CUDA
# plugin, as with --allow_cpu) nothing is split, nvidia-smi or not. On a TPU VM one
# process drives all of the host's chips: use launch/local.sh (launch/tpu_vm.sh
# for a slice). On CPU, give each process several devices with
#   XLA_FLAGS=--xla_force_host_platform_device_count=2 launch/multiprocess.sh 2 ...
# It waits for all of them and exits 0 only if all exit 0. When one fails, the
# others (which would wait for it forever in a collective) get SIGTERM, then
# SIGKILL after $KILL_GRACE_SECONDS (default 10), and the script exits with the
# first failure's status. SIGTERM or SIGINT to this script reaches every process
# as SIGTERM: each writes a checkpoint and exits (rerun the command to resume).
set -uo pipefail

fail() { echo "error: launch/multiprocess.sh: $*" >&2; exit 2; }

[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] ||
  fail "the first argument is the number of processes (a positive integer), then the" \
       "arguments for research.main, e.g.: launch/multiprocess.sh 2 --workdir=runs/mp"
num_processes="$1"
shift

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 ||
  fail "it needs Python: '$PYTHON' was not found. Run 'make test' once to create .venv," \
       "or set PYTHON=/path/to/python."

# A port the kernel just handed out on the loopback interface (free a moment ago).
port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" ||
  fail "could not find a free port on 127.0.0.1"
# Process 0 serves the coordinator on loopback only, not on every interface.
export JAX_COORDINATOR_BIND_ADDRESS="127.0.0.1:$port"

# The platform JAX will use decides, not whether nvidia-smi exists.
platform="$("$PYTHON" -c 'from research import backend; print(backend.planned_platform())')" ||
  fail "could not ask $PYTHON which platform JAX will use (is the research package importable?)"
# The GPUs to split among the processes (none: CPU, or a TPU host below).
gpus=()
if [[ "$platform" == gpu ]]; then
  if [[ -n "${GPUS:-}" ]]; then
    IFS=, read -r -a gpus <<< "$GPUS"
  elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then  # set, even empty: exactly those
    IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    gpu_count="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')"
    for ((g = 0; g < gpu_count; g++)); do gpus+=("$g"); done
  fi
fi
if ((${#gpus[@]})); then
  ((${#gpus[@]} % num_processes == 0)) ||
    fail "$num_processes processes cannot share ${#gpus[@]} GPUs (${gpus[*]}) evenly: give a" \
         "process count that divides ${#gpus[@]}, or name the GPUs to use, e.g. GPUS=0,1."
  per_process=$((${#gpus[@]} / num_processes))
elif ((num_processes > 1)) && [[ "$platform" == tpu ]] && compgen -G '/dev/accel*' >/dev/null; then
  fail "this host has TPU chips, and one process drives all of them: run launch/local.sh" \
       "here (or launch/tpu_vm.sh, one process per host of a slice)."
fi

pids=()
for ((i = 0; i < num_processes; i++)); do
  if ((${#gpus[@]})); then
    # Only its own GPUs are visible to process I; JAX numbers them from 0.
    own="$(IFS=,; echo "${gpus[*]:i*per_process:per_process}")"
    echo "launch/multiprocess.sh: process $i gets GPU(s) $own" >&2
    CUDA_VISIBLE_DEVICES="$own" JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((per_process - 1)))" \
      "$PYTHON" -m research.main "$@" --coordinator_address="127.0.0.1:$port" \
        --num_processes="$num_processes" --process_id="$i" &
  else
    "$PYTHON" -m research.main "$@" --coordinator_address="127.0.0.1:$port" \
        --num_processes="$num_processes" --process_id="$i" &
  fi
  pids+=("$!")
done

forward() {  # SIGTERM, not SIGINT: a terminal's Ctrl-C already reached them once
  echo "launch/multiprocess.sh: $1 received, asking all $num_processes processes to checkpoint and stop." >&2
  kill -TERM "${pids[@]}" 2>/dev/null
}
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT

stop_the_rest() {
  kill -TERM "${pids[@]}" 2>/dev/null
  for ((waited = 0; waited < ${KILL_GRACE_SECONDS:-10} * 10; waited++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  kill -KILL "${pids[@]}" 2>/dev/null
}

# Poll rather than `wait -n`, which older bash on cluster nodes lacks; wait on a
# short sleep so that a forwarded signal is handled at once.
status=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  still=()
  for index in "${!remaining[@]}"; do
    pid="${remaining[$index]}"
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    wait "$pid"
    code=$?
    if ((code != 0 && status == 0)); then
      status=$code
      for ((i = 0; i < num_processes; i++)); do [[ "${pids[$i]}" == "$pid" ]] && failed=$i; done
      echo "launch/multiprocess.sh: process $failed exited with status $code; stopping the others." >&2
      stop_the_rest
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  ((${#remaining[@]})) && { sleep 0.2 & wait $!; }
done
exit "$status"
