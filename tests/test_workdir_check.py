"""Every process of a multi-process run must see one workdir (research.run.distributed).

Two real processes joined by jax.distributed on 127.0.0.1, as launch/multiprocess.sh
starts them, but each given its own --workdir, as a node-local path on a cluster would
be: both stop with one line naming the hosts, exit 2, and leave nothing behind.
"""

import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO


def _port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _start(workdirs, command, timeout=120) -> list[subprocess.CompletedProcess]:
  """Process i runs `command(workdirs[i])` with the distributed flags of 2 processes."""
  port = _port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}"}
  processes = [subprocess.Popen(
      [*command(workdir), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={index}"], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE) for index, workdir in enumerate(workdirs)]
  try:
    return [subprocess.CompletedProcess(p.args, p.wait(timeout), *p.communicate())
            for p in processes]
  finally:
    for process in processes:
      process.kill()


@pytest.mark.slow
def test_processes_given_different_workdirs_stop_at_once_and_write_nothing(tmp_path):
  workdirs = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
  results = _start(workdirs, lambda workdir: [
      sys.executable, "-m", "research.main", "--config=configs/default.py:smoke",
      f"--workdir={workdir}"])
  host = socket.gethostname()
  for result in results:
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "is not one folder shared by all 2 processes" in last
    assert f"process 0 on {host} ({workdirs[0]}) sees the token of process 0" in last
    assert f"process 1 on {host} ({workdirs[1]}) sees the token of process 1" in last
    assert "Traceback" not in result.stderr
  assert os.listdir(tmp_path) == []  # not even the folders


@pytest.mark.slow
def test_processes_sharing_a_workdir_pass_and_leave_no_token(tmp_path):
  check = ("import sys; from research.run import distributed; "
           "args = dict(a[2:].split('=') for a in sys.argv[1:]); "
           "distributed.initialize(args['coordinator_address'], int(args['num_processes']), "
           "int(args['process_id'])); distributed.check_shared_workdir(args['workdir']); "
           "print('shared')")
  workdir = tmp_path / "run"
  results = _start([workdir] * 2, lambda workdir: [
      sys.executable, "-c", check, f"--workdir={workdir}"])
  assert [r.stdout.split()[-1:] for r in results] == [["shared"]] * 2, results[1].stderr[-2000:]
  assert not workdir.exists()  # the check leaves nothing: a refused run writes nothing
