"""The launch scripts (launch/): what they refuse, the gcloud calls of a TPU VM slice, a
failing or SIGTERMed process among several, and which devices each process is given.
Stand-in gcloud, srun, nvidia-smi and Python record what the scripts do."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import REPO


def _fake_slurm(tmp_path) -> dict:
  """`srun` and `scontrol` for one machine, and the variables sbatch sets: srun
  starts SLURM_NTASKS local tasks with the variables a real job step has."""
  bin_dir = tmp_path / "slurm_bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(textwrap.dedent(f"""\
      #!/usr/bin/env bash
      printf '%s\\n' "$@" > {str(tmp_path / 'srun_arguments')!r}
      while [[ "$1" == --* ]]; do shift; done
      pids=()
      for ((i = 0; i < SLURM_NTASKS; i++)); do  # tasks fill "nodes" of SLURM_NTASKS_PER_NODE
        SLURM_PROCID=$i SLURM_LOCALID=$((i % ${{SLURM_NTASKS_PER_NODE:-SLURM_NTASKS}})) \
          SLURM_STEP_NODELIST=127.0.0.1 "$@" &
        pids+=("$!")
      done
      status=0
      for pid in "${{pids[@]}}"; do wait "$pid" || status=$?; done
      exit "$status"
      """))
  (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\n")
  for tool in ("srun", "scontrol"):
    (bin_dir / tool).chmod(0o755)
  # JAX's SLURM detection puts the coordinator on port 61440 + job id % 4096.
  for port in np.random.default_rng().permutation(np.arange(61440, 65536)):
    with socket.socket() as probe:
      try:
        probe.bind(("127.0.0.1", int(port)))
      except OSError:
        continue
    break
  return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": str(port - 61440),
          "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_SUBMIT_DIR": REPO,
          "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}", "PYTHON": sys.executable,
          "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}



# ---- Launchers ---------------------------------------------------------------


def _path_without(tmp_path, *tools) -> str:
  """A PATH with every program of the current PATH except `tools`."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for directory in os.environ["PATH"].split(os.pathsep):
    if not os.path.isdir(directory):
      continue
    for name in os.listdir(directory):
      target = os.path.join(directory, name)
      if name not in tools and not (bin_dir / name).exists() and os.access(target, os.X_OK):
        (bin_dir / name).symlink_to(target)
  return str(bin_dir)


def _run_script(script, *args, env=None, timeout=60):
  return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env={k: v for k, v in {**os.environ, **(env or {})}.items()
                             if not k.startswith("SLURM_")})


def test_tpu_vm_launcher_refuses_without_gcloud(tmp_path):
  result = _run_script("tpu_vm.sh", "--workdir=x", env={"PATH": _path_without(tmp_path, "gcloud"),
                                                        "TPU_NAME": "t", "ZONE": "z",
                                                        "ACCELERATOR_TYPE": "v4-8"})
  assert result.returncode == 2
  assert "'gcloud' is not on PATH" in result.stderr and "Install it" in result.stderr


def _recording_gcloud(tmp_path, body: str):
  """A stand-in `gcloud` that appends each call's arguments to a file, then runs the bash
  `body`; returns (its folder, the file of calls)."""
  bin_dir = tmp_path / "gcloud_bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls"
  (bin_dir / "gcloud").write_text(textwrap.dedent(f"""\
      #!/usr/bin/env bash
      args="$*"
      echo "${{args//$'\\n'/ }}" >> {calls}
      """) + textwrap.dedent(body))
  (bin_dir / "gcloud").chmod(0o755)
  return bin_dir, calls


def test_tpu_vm_launcher_creates_copies_runs_on_all_workers_and_deletes(tmp_path):
  """The order of gcloud calls, with a gcloud that records them; the slice is
  deleted although the training command fails."""
  bin_dir, calls = _recording_gcloud(tmp_path, """\
      [[ "$4" == describe ]] && exit 1  # no such TPU yet
      [[ "$*" == *research.main* ]] && exit 5  # the training fails
      exit 0
      """)
  result = _run_script("tpu_vm.sh", "--config=configs/default.py", "--workdir=/mnt/shared/r 1",
                       env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                            "TPU_NAME": "slice", "ZONE": "zone-a", "ACCELERATOR_TYPE": "v4-32"})
  assert result.returncode == 5, result.stderr
  steps = [line.split()[3] for line in calls.read_text().splitlines()]
  assert steps == ["describe", "create", "scp", "ssh", "ssh", "scp", "delete"]
  lines = calls.read_text().splitlines()
  assert "--accelerator-type=v4-32" in lines[1] and "--worker=all" in lines[2]
  assert "--worker=all" in lines[4] and "research.main --config=configs/default.py" in lines[4]
  assert "--workdir=/mnt/shared/r\\ 1" in lines[4]  # quoted for the remote shell
  assert lines[6].endswith("--quiet")


def test_slurm_launcher_refuses_without_sbatch(tmp_path):
  result = _run_script("slurm.sbatch", "--workdir=x",
                       env={"PATH": _path_without(tmp_path, "sbatch", "srun", "scontrol")})
  assert result.returncode == 2
  assert "'sbatch' is not on PATH" in result.stderr
  assert "sbatch --nodes=2 launch/slurm.sbatch" in result.stderr


def test_slurm_launcher_refuses_inside_a_job_without_srun(tmp_path):
  env = {"PATH": _path_without(tmp_path, "sbatch", "srun", "scontrol")}
  result = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm.sbatch")], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env, "SLURM_JOB_ID": "7"})
  assert result.returncode == 2
  assert "inside SLURM job 7 but 'srun' is not on PATH" in result.stderr


def test_multiprocess_launcher_refuses_a_bad_count():
  result = _run_script("multiprocess.sh", "two", "--workdir=x")
  assert result.returncode == 2
  assert "number of processes (a positive integer)" in result.stderr


def test_local_launcher_refuses_without_python():
  result = _run_script("local.sh", "--workdir=x", env={"PYTHON": "no-such-python"})
  assert result.returncode == 2
  assert "'no-such-python' was not found" in result.stderr


def _fake_python(tmp_path) -> str:
  """Stands in for Python under multiprocess.sh: runs `-c` snippets (the port
  finder) with the real Python; as `-m research.main` process 1 fails after a
  moment while process 0 waits, as a process blocked in a collective would,
  and records a SIGTERM before exiting."""
  script = tmp_path / "python"
  script.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import os, signal, sys, time
      if sys.argv[1] == "-c":
        os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
      process_id = int(next(a for a in sys.argv if a.startswith("--process_id=")).split("=")[1])
      marks = {str(tmp_path)!r}
      def on_term(signum, frame):
        open(os.path.join(marks, f"terminated{{process_id}}"), "w").close()
        sys.exit(128 + signum)
      signal.signal(signal.SIGTERM, on_term)
      open(os.path.join(marks, f"started{{process_id}}"), "w").close()
      if process_id == 1 and os.environ.get("FAKE_FAIL") == "1":
        time.sleep(0.5)
        sys.exit(3)
      time.sleep(60)
      """))
  script.chmod(0o755)
  return str(script)


def test_multiprocess_launcher_fails_when_one_process_fails_and_stops_the_rest(tmp_path):
  started = time.monotonic()
  result = _run_script("multiprocess.sh", "2", "--workdir=x",
                       env={"PYTHON": _fake_python(tmp_path), "FAKE_FAIL": "1"})
  assert result.returncode == 3
  assert "process 1 exited with status 3; stopping the others" in result.stderr
  assert (tmp_path / "terminated0").exists()
  assert time.monotonic() - started < 30


def test_multiprocess_launcher_forwards_sigterm_to_every_process(tmp_path):
  process = subprocess.Popen(
      ["bash", os.path.join(REPO, "launch", "multiprocess.sh"), "2", "--workdir=x"], cwd=REPO,
      stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHON": _fake_python(tmp_path)})
  deadline = time.monotonic() + 30
  while not all((tmp_path / f"started{i}").exists() for i in range(2)):
    assert time.monotonic() < deadline, "the processes never started"
    time.sleep(0.1)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=30)
  assert process.returncode == 128 + signal.SIGTERM
  assert "asking all 2 processes to checkpoint" in stderr
  assert all((tmp_path / f"terminated{i}").exists() for i in range(2))


# ---- Which devices and environment each process is given ----------------------


def _recording_python(tmp_path) -> str:
  """Stands in for Python under the launchers: runs `-c` snippets (the port finder)
  with the real Python; as any other command (research.main, pip) it records its
  arguments and device environment in process<rank>.json (rank: --process_id, else
  SLURM_PROCID) and exits 0."""
  script = tmp_path / "python"
  script.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      if sys.argv[1] == "-c":
        os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
      rank = next((a.split("=")[1] for a in sys.argv if a.startswith("--process_id=")),
                  os.environ.get("SLURM_PROCID", "0"))
      names = ("CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS", "SLURM_LOCALID")
      with open(os.path.join({str(tmp_path)!r}, f"process{{rank}}.json"), "w") as f:
        json.dump({{"argv": sys.argv[1:], **{{n: os.environ.get(n) for n in names}}}}, f)
      """))
  script.chmod(0o755)
  return str(script)


def _nvidia_smi(tmp_path, count: int) -> str:
  """A bin folder whose `nvidia-smi -L` lists `count` GPUs, for PATH."""
  bin_dir = tmp_path / "gpu_bin"
  bin_dir.mkdir(exist_ok=True)
  lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})\\n" for i in range(count))
  (bin_dir / "nvidia-smi").write_text(f"#!/usr/bin/env bash\nprintf '{lines}'\n")
  (bin_dir / "nvidia-smi").chmod(0o755)
  return str(bin_dir)


def _processes(tmp_path, count: int) -> list[dict]:
  records = [json.load(open(tmp_path / f"process{i}.json")) for i in range(count)]
  for path in tmp_path.glob("process*.json"):
    path.unlink()
  return records


def _devices(records) -> list[tuple]:
  return [(r["CUDA_VISIBLE_DEVICES"], r["JAX_LOCAL_DEVICE_IDS"]) for r in records]


@pytest.mark.slow
def test_multiprocess_launcher_gives_each_process_its_own_gpus(tmp_path):
  """JAX_PLATFORMS=cuda stands for a machine where JAX runs on its GPUs."""
  base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
  env = {**base, "PYTHON": _recording_python(tmp_path), "JAX_PLATFORMS": "cuda",
         "PATH": f"{_nvidia_smi(tmp_path, 4)}{os.pathsep}{os.environ['PATH']}"}
  run = lambda count, **extra: subprocess.run(
      ["bash", os.path.join(REPO, "launch", "multiprocess.sh"), str(count), "--workdir=x"],
      cwd=REPO, capture_output=True, text=True, timeout=60, env={**env, **extra})

  result = run(2)  # nvidia-smi lists 4 GPUs: two each
  assert result.returncode == 0, result.stderr
  records = _processes(tmp_path, 2)
  assert _devices(records) == [("0,1", "0,1"), ("2,3", "0,1")]
  assert records[1]["argv"][:3] == ["-m", "research.main", "--workdir=x"]
  assert records[1]["argv"][-2:] == ["--num_processes=2", "--process_id=1"]
  assert "process 1 gets GPU(s) 2,3" in result.stderr
  result = run(4, CUDA_VISIBLE_DEVICES="4,5,6,7")  # a share given to the script: within it
  assert result.returncode == 0, result.stderr
  assert _devices(_processes(tmp_path, 4)) == [(g, "0") for g in ("4", "5", "6", "7")]
  result = run(2, GPUS="1,3")
  assert _devices(_processes(tmp_path, 2)) == [("1", "0"), ("3", "0")]
  result = run(3)
  assert result.returncode == 2
  assert "3 processes cannot share 4 GPUs (0 1 2 3) evenly" in result.stderr
  assert not list(tmp_path.glob("process*.json"))  # nothing started
  # JAX on the CPU, on this GPU machine (nvidia-smi lists 4): nothing split, any count,
  # every process with the environment it was given; the same without a CUDA plugin.
  for platform in ("cpu", ""):
    result = run(3, JAX_PLATFORMS=platform)
    assert result.returncode == 0, result.stderr
    assert _devices(_processes(tmp_path, 3)) == [(None, None)] * 3
    assert "gets GPU" not in result.stderr


def test_slurm_launcher_gives_each_task_its_gpus_in_both_modes(tmp_path):
  """Stand-in srun and nvidia-smi; SLURM's CUDA_VISIBLE_DEVICES where it sets one."""
  slurm = {**_fake_slurm(tmp_path), "PYTHON": _recording_python(tmp_path),
           "JAX_PLATFORMS": "cuda", "SLURM_CPUS_PER_TASK": "6", "SLURM_GPUS_PER_NODE": "h100:4"}
  srun_arguments = lambda: (tmp_path / "srun_arguments").read_text().split("\n")[:4]
  slurm["PATH"] = f"{_nvidia_smi(tmp_path, 4)}{os.pathsep}{slurm['PATH']}"
  base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}

  def submit(tasks: int, per_node: int, **extra):
    return subprocess.run(
        ["bash", os.path.join(REPO, "launch", "slurm.sbatch"), "--config=configs/default.py",
         "--workdir=runs/x y"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**base, **slurm, "SLURM_NTASKS": str(tasks), "SLURM_NTASKS_PER_NODE": str(per_node),
             **extra})

  # A process per GPU: 4 tasks on a node of 4 GPUs (nvidia-smi), one GPU each.
  result = submit(4, 4)
  assert result.returncode == 0, result.stderr
  records = _processes(tmp_path, 4)
  assert _devices(records) == [(str(i), "0") for i in range(4)]
  assert [r["SLURM_LOCALID"] for r in records] == ["0", "1", "2", "3"]
  assert records[0]["argv"] == ["-m", "research.main", "--config=configs/default.py",
                                "--workdir=runs/x y"]
  assert "task 3 on" in result.stderr and "gets GPU(s) 3" in result.stderr
  # srun is told each task's cores and GPUs, and leaves the GPU split to the tasks.
  assert srun_arguments() == ["--kill-on-bad-exit=1", "--cpus-per-task=6", "--gpus-per-task=1",
                              "--gpu-bind=none"]
  # A process per node: 2 nodes of one task, each owning the 4 GPUs SLURM gave the job.
  result = submit(2, 1, CUDA_VISIBLE_DEVICES="4,5,6,7")
  assert result.returncode == 0, result.stderr
  assert _devices(_processes(tmp_path, 2)) == [("4,5,6,7", "0,1,2,3")] * 2
  assert srun_arguments() == ["--kill-on-bad-exit=1", "--cpus-per-task=6", "bash", "-c"]
  # Two tasks per node share them; a task SLURM bound to one GPU keeps it.
  result = submit(2, 2, CUDA_VISIBLE_DEVICES="4,5,6,7")
  assert _devices(_processes(tmp_path, 2)) == [("4,5", "0,1"), ("6,7", "0,1")]
  result = submit(2, 2, CUDA_VISIBLE_DEVICES="6")
  assert _devices(_processes(tmp_path, 2)) == [("6", "0")] * 2
  result = submit(3, 3)
  assert result.returncode == 2
  assert "3 tasks per node cannot share the 4 GPUs" in result.stderr
  # JAX on the CPU of this GPU node: no task is given GPUs, only its cores.
  result = submit(4, 4, JAX_PLATFORMS="cpu")
  assert result.returncode == 0, result.stderr
  assert _devices(_processes(tmp_path, 4)) == [(None, None)] * 4
  assert srun_arguments() == ["--kill-on-bad-exit=1", "--cpus-per-task=6", "bash", "-c"]


def test_tpu_vm_launcher_sets_up_python_on_its_image_and_runs_on_every_worker(tmp_path):
  """A stand-in gcloud runs each `ssh --worker=all` command in a folder per worker
  (two workers) with bash, on a PATH like the image's: no python3.11 and no make
  until `sudo apt-get install` installs them (stand-ins for sudo and apt, Python and
  make; the Python records how it is run)."""
  root, stubs = tmp_path / "workers", tmp_path / "image_bin"
  root.mkdir()
  stubs.mkdir()
  image_path = f"{stubs}{os.pathsep}{_path_without(tmp_path, 'python3.11', 'make')}"
  (stubs / "sudo").write_text(textwrap.dedent(f"""\
      #!/usr/bin/env bash
      echo "$*" >> "$PWD/sudo.log"
      [[ "$*" == *"apt-get install"* ]] || exit 0
      for package in "$@"; do
        case "$package" in
          make) printf '#!/usr/bin/env bash\\necho "make $*" >> make.log\\n%s\\n' \\
                  'mkdir -p .venv/bin && cp {tmp_path}/python .venv/bin/python' > "$IMAGE_BIN/make";;
          python3.11) printf '#!/usr/bin/env bash\\nexec %s "$@"\\n' {sys.executable} \\
                        > "$IMAGE_BIN/python3.11";;
        esac
        chmod +x "$IMAGE_BIN"/* 2>/dev/null
      done
      """))
  (stubs / "sudo").chmod(0o755)
  recorder = _recording_python(tmp_path)
  (tmp_path / "python").write_text(open(recorder).read().replace(
      'f"process{rank}.json"', 'os.path.basename(os.path.dirname(os.getcwd())) + "-" + '
      'sys.argv[2].split(".")[0] + ".json"'))  # <worker>-<module>.json
  (tmp_path / "python").chmod(0o755)
  bin_dir, calls = _recording_gcloud(tmp_path, f"""\
      case "$4" in
        describe) exit 1;;  # no such TPU yet
        scp) [[ "$5" == *code.tar.gz ]] || exit 1  # copying runs/ back: none written
             for worker in 0 1; do mkdir -p {root}/$worker && cp "$5" {root}/$worker/; done;;
        ssh) for argument in "$@"; do [[ "$argument" == --command=* ]] && command="${{argument#--command=}}"; done
             for worker in 0 1; do
               mkdir -p {root}/$worker/bin  # what apt-get installs on this worker
               (cd {root}/$worker && IMAGE_BIN={root}/$worker/bin \\
                PATH={root}/$worker/bin:{image_path} bash -c "$command") || exit $?
             done;;
      esac
      """)
  result = _run_script("tpu_vm.sh", "--config=configs/default.py", "--workdir=/mnt/shared/r 1",
                       env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                            "TPU_NAME": "slice", "ZONE": "zone-a", "ACCELERATOR_TYPE": "v4-32"},
                       timeout=120)
  assert result.returncode == 0, result.stderr
  lines = calls.read_text().splitlines()
  assert [line.split()[3] for line in lines] == ["describe", "create", "scp", "ssh", "ssh", "scp",
                                                 "delete"]
  assert "--version=tpu-ubuntu2204-base" in lines[1]
  for worker in ("0", "1"):
    sudo = (root / worker / "sudo.log").read_text()
    assert "add-apt-repository -y ppa:deadsnakes/ppa" in sudo
    assert "apt-get install -y -q python3.11 python3.11-venv" in sudo
    assert ((root / worker / "research" / "make.log").read_text()
            == "make data PYTHON=python3.11 ACCEL=tpu\n")
    assert (root / worker / "research" / "research" / "main.py").exists()  # the code arrived
    run = json.load(open(tmp_path / f"{worker}-research.json"))
    assert run["argv"] == ["-m", "research.main", "--config=configs/default.py",
                           "--workdir=/mnt/shared/r 1"]
