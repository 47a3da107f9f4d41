"""Scaling out: one device, eight devices and two processes train alike; launchers.

Every run is a real `research.main` process on real Fashion-MNIST. Several
devices are CPU devices (`--xla_force_host_platform_device_count`); several
processes are started by `launch/multiprocess.sh` and joined by
`jax.distributed` on 127.0.0.1, the code path a cluster uses.

Why the losses agree only to a tolerance, not bit for bit: with one device the
gradient of a batch is one sum over 32 examples; with eight devices each device
sums its 4 examples and an all-reduce adds the eight partial sums (across
processes, through gloo over TCP). Float32 addition is not associative, so the
parameters differ in their last bits after the first step, and training
amplifies the difference slowly. Measured (relative, per-step train loss): on an AMD
Zen 5 (AVX-512) at most 1e-6 by step 40 and 2e-5 by step 60; on a Zen 3 (AVX2 only)
1.9e-3 by step 55. RTOL = 5e-3 leaves room for other CPUs and XLA versions and
still catches a real mismatch: a wrong, missing or
duplicated shard of a batch means other examples, and the losses part by
percents within a few steps.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import REPO, run_main

RTOL = 5e-3
TEST_EXAMPLES = 10000
# 96 divides by 1, 4 and 8 devices but not into 10000: the last eval batch is padded.
COMMON = ["--config=configs/default.py:smoke", "--config.log_every_steps=1",
          "--config.eval_every_steps=20", "--config.eval_batch_size=96"]
STEPS = 40


def _env(devices_per_process: int) -> dict:
  return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
          "JAX_PLATFORMS": "cpu"}


def _multiprocess(num_processes: int, workdir, *flags, devices_per_process=2, timeout=300):
  command = [os.path.join(REPO, "launch", "multiprocess.sh"), str(num_processes),
             f"--workdir={workdir}", *flags]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **_env(devices_per_process), "PYTHON": sys.executable})


def _records(workdir, split):
  """metrics.jsonl's records of `split`: "train", or "eval" for the evaluations (named by
  their split, e.g. test[:1000])."""
  from research.run.run_log import is_evaluation

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f)
            if (is_evaluation(r) if split == "eval" else r["split"] == split)]


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in _records(workdir, "train")}


def _assert_same_training(workdir, reference, steps):
  losses, expected = _losses(workdir), _losses(reference)
  assert sorted(losses) == list(steps), "one train line per step, written once (process 0 only)"
  np.testing.assert_allclose([losses[s] for s in steps], [expected[s] for s in steps], rtol=RTOL)
  tests, expected_tests = _records(workdir, "eval"), {r["step"]: r for r in _records(reference, "eval")}
  assert tests
  for record in tests:
    assert record["num_examples"] == TEST_EXAMPLES  # every example once, padding masked out
    np.testing.assert_allclose(record["loss"], expected_tests[record["step"]]["loss"], rtol=RTOL)
    # A float flip may turn an example's argmax (5 of the 10000 seen with shard_params and
    # a preemption); allow ten.
    assert abs(record["accuracy"] - expected_tests[record["step"]]["accuracy"]) <= 1e-3


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The reference: 60 steps on one device, evaluated in unpadded batches of 1000."""
  workdir = str(tmp_path_factory.mktemp("one_device") / "run")
  result = run_main(workdir, *COMMON, "--config.num_train_steps=60",
                    "--config.eval_batch_size=1000", env=_env(1))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "1 device(s)" in result.stderr
  return workdir


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eight_devices") / "run")
  result = run_main(workdir, *COMMON, f"--config.num_train_steps={STEPS}", env=_env(8))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "8 device(s)" in result.stderr
  return workdir


def test_eight_devices_train_like_one(one_device, eight_devices):
  _assert_same_training(eight_devices, one_device, range(1, STEPS + 1))


@pytest.mark.slow
def test_two_processes_of_two_devices_train_like_one(one_device, tmp_path):
  workdir = str(tmp_path / "run")
  result = _multiprocess(2, workdir, *COMMON, f"--config.num_train_steps={STEPS}")
  assert result.returncode == 0, result.stderr[-5000:]
  assert "JAX process 1 of 2" in result.stderr and "4 device(s)" in result.stderr
  _assert_same_training(workdir, one_device, range(1, STEPS + 1))
  # Only process 0 writes logs: one TensorBoard event file, one config.
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
  assert json.load(open(os.path.join(workdir, "config.json")))["num_train_steps"] == STEPS
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]


def _pid_of(workdir, process_id: int) -> int:
  """The pid of `research.main --workdir=WORKDIR --process_id=I` (from /proc)."""
  wanted = {"research.main", f"--workdir={workdir}", f"--process_id={process_id}"}
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        arguments = set(f.read().decode(errors="replace").split("\0"))
    except OSError:
      continue
    if entry.isdigit() and wanted <= arguments:
      return int(entry)
  raise AssertionError(f"no process {process_id} of a run in {workdir}")


@pytest.mark.slow
def test_sharded_params_over_two_processes_train_like_replicated_through_a_preemption(
    one_device, tmp_path):
  """FSDP-style: params and Adam moments split over 4 devices in 2 processes. A
  SIGTERM to process 1 alone stops both at the same step with a checkpoint
  written by both; the rerun restores the split state and trains on to step 40
  with the same losses as one device."""
  workdir = str(tmp_path / "run")
  flags = [*COMMON, "--config.shard_params=True"]
  with open(tmp_path / "first.log", "w") as log:
    first = subprocess.Popen(
        [os.path.join(REPO, "launch", "multiprocess.sh"), "2", f"--workdir={workdir}", *flags,
         "--config.num_train_steps=1000"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **_env(2), "PYTHON": sys.executable})
    deadline = time.monotonic() + 180
    while not (os.path.exists(os.path.join(workdir, "metrics.jsonl"))
               and len(_records(workdir, "train")) >= 3):
      assert first.poll() is None and time.monotonic() < deadline, "training never got going"
      time.sleep(0.05)
    os.kill(_pid_of(workdir, 1), signal.SIGTERM)
    assert first.wait(timeout=120) == 128 + signal.SIGTERM
  output = (tmp_path / "first.log").read_text()
  assert "Preempted (SIGTERM)" in output, output[-3000:]
  stopped_at = max(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")))
  assert 3 <= stopped_at < STEPS

  result = _multiprocess(2, workdir, *flags, f"--config.num_train_steps={STEPS}",
                         "--allow_config_change")
  assert result.returncode == 0, result.stderr[-5000:]
  assert f"Resumed from checkpoint step {stopped_at}" in result.stderr
  _assert_same_training(workdir, one_device, range(1, STEPS + 1))
  assert sorted(map(int, os.listdir(os.path.join(workdir, "checkpoints"))))[-2:] == [20, STEPS]


def test_shard_params_splits_params_and_optimizer_state_over_the_devices():
  """Which leaves config.shard_params splits, on 8 devices (a fresh process: the
  device count is fixed when JAX starts)."""
  program = textwrap.dedent("""\
      import functools, jax
      from configs.default import get_config
      from research import mesh, models
      from research.run import optim, train
      config = get_config()
      make_state = functools.partial(train.create_state, models.build(config.model, 10),
                                     optim.build_optimizer(config.optimizer), (28, 28, 1))
      abstract = jax.eval_shape(make_state, 0)
      for shard_params in (False, True):
        shardings = mesh.state_shardings(abstract, mesh.make_mesh(), shard_params)
        for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]:
          print(shard_params, jax.tree_util.keystr(path), tuple(sharding.spec), sep="|")
      """)
  result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **_env(8)})
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line.split("|") for line in result.stdout.splitlines()]
  assert all(spec == "()" for shard_params, _, spec in lines if shard_params == "False")
  specs = {path: spec for shard_params, path, spec in lines if shard_params == "True"}
  # Largest axis that divides by 8; an axis of 10 cannot, so that bias stays whole.
  assert specs[".params['Dense_0']['kernel']"] == "('data', None)"  # (1600, 64)
  assert specs[".params['Conv_1']['kernel']"] == "(None, None, None, 'data')"  # (3, 3, 32, 64)
  assert specs[".params['Dense_1']['bias']"] == "()"  # (10,)
  assert specs[".opt_state[0].mu['Dense_0']['kernel']"] == "('data', None)"
  assert specs[".opt_state[0].count"] == specs[".step"] == specs[".rng"] == "()"


def test_eight_device_checkpoint_resumes_on_one_device(one_device, eight_devices, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(eight_devices, workdir)
  result = run_main(workdir, *COMMON, "--config.num_train_steps=60", "--allow_config_change",
                    env=_env(1))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from checkpoint step {STEPS}" in result.stderr
  assert "1 device(s)" in result.stderr
  # Steps 41-60 continue the 8-device run as the uninterrupted 1-device run went on.
  _assert_same_training(workdir, one_device, range(1, 61))
  assert [r["step"] for r in _records(workdir, "eval")] == [20, 40, 60]


# ---- Restore and init_from across device counts -------------------------------
# A checkpoint holds global arrays; restore reads them onto the current run's mesh.
# Each move below resumes a copy of a finished source run (same config: it restores,
# logs the parameters' fingerprint and stops) and starts a fresh one-step run from
# it with init_from; both must show the source's final fingerprint.

FOUR_DEVICE_SOURCE = ["--config=configs/default.py:smoke", "--config.num_train_steps=4",
                      "--config.log_every_steps=2", "--config.eval_every_steps=4",
                      "--config.dataset.eval_split=test[:1000]", "--config.eval_batch_size=250"]
FINE_TUNE = ["--config=configs/default.py:smoke", "--config.num_train_steps=1",
             "--config.log_every_steps=1", "--config.dataset.eval_split=test[:200]",
             "--config.eval_batch_size=100"]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("four_devices") / "run")
  result = run_main(workdir, *FOUR_DEVICE_SOURCE, env=_env(4))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _run_on(devices: int, processes: int = 1):
  """Runs research.main on `devices` CPU devices per process, in `processes` processes."""
  if processes == 1:
    return lambda workdir, *flags: run_main(workdir, *flags, env=_env(devices))
  return lambda workdir, *flags: _multiprocess(processes, workdir, *flags,
                                               devices_per_process=devices)


def _check_move(source, source_flags, tmp_path, run, devices: int, *fine_tune_flags):
  """The source's final parameters arrive unchanged on the target layout, by resume
  and by init_from."""
  fingerprint = _records(source, "eval")[-1]["params_fingerprint"]
  step = _records(source, "eval")[-1]["step"]
  resumed = str(tmp_path / "resumed")
  shutil.copytree(source, resumed)
  result = run(resumed, *source_flags)
  assert result.returncode == 0, result.stderr[-5000:]
  assert f"Resumed from checkpoint step {step} in" in result.stderr
  assert f"(params {fingerprint})" in result.stderr
  assert f"already finished at step {step}" in result.stderr
  assert f"{devices} device(s)" not in result.stderr  # nothing trained
  fine_tuned = str(tmp_path / "fine_tuned")
  result = run(fine_tuned, *FINE_TUNE, *fine_tune_flags, f"--config.init_from={source}")
  assert result.returncode == 0, result.stderr[-5000:]
  assert f"Initialized from {source} (params {fingerprint})" in result.stderr
  assert f"{devices} device(s)" in result.stderr
  assert _records(fine_tuned, "eval")[-1]["num_examples"] == 200


def test_four_device_checkpoint_restores_and_initializes_on_one_device(four_devices, tmp_path):
  _check_move(four_devices, FOUR_DEVICE_SOURCE, tmp_path, _run_on(1), 1)


def test_one_device_checkpoint_restores_and_initializes_on_eight_devices(one_device, tmp_path):
  _check_move(one_device, [*COMMON, "--config.num_train_steps=60", "--config.eval_batch_size=1000"],
              tmp_path, _run_on(8), 8)


@pytest.mark.slow
def test_eight_device_checkpoint_restores_and_initializes_on_two_processes(eight_devices,
                                                                          tmp_path):
  """2 processes x 2 devices; init_from into parameters split over both processes."""
  _check_move(eight_devices, [*COMMON, f"--config.num_train_steps={STEPS}"], tmp_path,
              _run_on(2, processes=2), 4, "--config.shard_params=True")


def test_batch_not_divisible_by_devices_is_refused(tmp_path):
  workdir = tmp_path / "run"
  result = run_main(str(workdir), *COMMON, "--config.batch_size=36", env=_env(8))
  assert result.returncode == 2
  assert "--config.batch_size=36 is not accepted" in result.stderr
  assert "multiple of 8, e.g. 32 or 40" in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


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
          **_env(2)}


def test_slurm_job_joins_processes_and_every_process_refuses_a_bad_batch(tmp_path):
  """slurm.sbatch in a (one-machine) SLURM job: the two tasks find each other by
  JAX's SLURM detection alone (4 devices in all) and both refuse batch 30."""
  result = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "slurm.sbatch"), *COMMON, "--config.batch_size=30",
       f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
      timeout=120, env={**os.environ, **_fake_slurm(tmp_path)})
  assert result.returncode == 2, result.stderr[-3000:]
  assert "2 processes of research.main" in result.stderr
  assert result.stderr.count("multiple of 4, e.g. 28 or 32") == 2  # both processes say why
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


def test_partial_distributed_flags_are_refused(tmp_path):
  result = run_main(str(tmp_path / "run"), *COMMON, "--num_processes=2", env=_env(1))
  assert result.returncode == 2
  assert "--coordinator_address, --process_id" in result.stderr
  assert "Traceback" not in result.stderr


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


def test_tpu_vm_launcher_creates_copies_runs_on_all_workers_and_deletes(tmp_path):
  """The order of gcloud calls, with a gcloud that records them; the slice is
  deleted although the training command fails."""
  bin_dir = tmp_path / "gcloud_bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls"
  (bin_dir / "gcloud").write_text(textwrap.dedent(f"""\
      #!/usr/bin/env bash
      args="$*"
      echo "${{args//$'\\n'/ }}" >> {calls}
      [[ "$4" == describe ]] && exit 1  # no such TPU yet
      [[ "$*" == *research.main* ]] && exit 5  # the training fails
      exit 0
      """))
  (bin_dir / "gcloud").chmod(0o755)
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
  bin_dir = tmp_path / "gcloud_bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls"
  (bin_dir / "gcloud").write_text(textwrap.dedent(f"""\
      #!/usr/bin/env bash
      args="$*"
      echo "${{args//$'\\n'/ }}" >> {calls}
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
      """))
  (bin_dir / "gcloud").chmod(0o755)
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
