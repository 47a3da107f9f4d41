"""Exact, preemption-safe resume with real processes and real signals."""

import os
import signal

import numpy as np
import pytest

from conftest import interrupt_at_step, last_train_step, records, run_here, run_main

# Evaluations on a tenth of the test split: a run's records (evaluations included) are
# compared whole, and 10,000 examples would triple each evaluation's share of the run.
RUN = ["--config=configs/default.py:smoke", "--config.num_train_steps=240",
       "--config.log_every_steps=10", "--config.eval_every_steps=80",
       "--config.checkpoint_every_steps=30", "--config.dataset.eval_split=test[:1000]"]


def _final_params(workdir):
  import orbax.checkpoint as ocp

  directory = os.path.join(workdir, "checkpoints", "240", "state")
  state = ocp.StandardCheckpointer().restore(directory)
  return state["params"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run, in this process (the runs compared with it have their own)."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = run_here(workdir, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


# Each signal lands mid-run, well before step 240 (a run that finished first would test
# nothing): SIGKILL just after the checkpoint at 120, SIGTERM between checkpoints, SIGINT
# after the evaluation at 80 and the checkpoint at 150.
@pytest.mark.slow
@pytest.mark.parametrize("sig, at_step", [(signal.SIGKILL, 128), (signal.SIGTERM, 63),
                                          (signal.SIGINT, 155)],
                         ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_interrupted_run_ends_bit_identical_to_uninterrupted(reference, tmp_path, sig, at_step):
  workdir = str(tmp_path / "run")
  code, stderr = interrupt_at_step(workdir, RUN, sig, at_step)
  assert code != 0, "the run finished before the signal: nothing was interrupted"
  if sig == signal.SIGKILL:
    assert code == -signal.SIGKILL
  else:
    assert code == 128 + sig, stderr[-3000:]
    assert "Preempted" in stderr and "checkpoint at step" in stderr
  stopped = last_train_step(workdir)
  assert at_step <= stopped < 240, stopped
  resumed = run_here(workdir, *RUN)  # the resume is the subject, not its process
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from checkpoint step" in resumed.stderr
  assert records(workdir) == records(reference)
  for a, b in zip(_final_params(workdir).values(), _final_params(reference).values()):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.slow
def test_two_fresh_runs_are_bitwise_equal(reference, tmp_path):
  workdir = str(tmp_path / "again")
  assert run_main(workdir, *RUN).returncode == 0
  assert records(workdir) == records(reference)
