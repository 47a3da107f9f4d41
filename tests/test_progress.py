"""The console progress: a bar per phase in a terminal, log lines elsewhere, and the
input-wait time kept apart from compute time."""

import io

from research.run.run_log import Progress
from research.run.step_schedule import Schedule

PLAN = Schedule(steps_per_epoch=100, total_steps=300, log_every=50, eval_every=100,
                checkpoint_every=0)


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_terminal_gets_one_bar_per_phase_with_speed_loss_input_share_and_eta(monkeypatch):
  monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: the bar's text is not cut
  stream = _Terminal()
  progress = Progress(PLAN, batch_size=32, start_step=0, stream=stream)
  assert progress.bars
  progress.chunk_done(50, input_sec=0.01, compute_sec=0.09, loss=1.5, accuracy=0.4)
  progress.chunk_done(100, input_sec=0.09, compute_sec=0.01, loss=0.9, accuracy=0.7)
  progress.chunk_done(150, input_sec=0.0, compute_sec=0.1, loss=0.8, accuracy=0.75)
  progress.end_phase()
  text = stream.getvalue()
  assert "epoch 1/3" in text and "epoch 2/3" in text
  assert "100/100" in text  # the first phase's bar was completed and closed
  assert "loss 0.9000 acc 0.7000" in text and "steps/s" in text and "img/s" in text
  assert "input 90%" in text  # the second chunk waited 0.09 s of 0.1 s for its input
  assert "ETA" in text
  speed = progress.update(150)
  assert abs(speed["input_sec"] - 0.10) < 1e-9 and abs(speed["compute_sec"] - 0.20) < 1e-9
  assert progress.update(150)["input_sec"] == 0.0  # reset after each log step


def test_no_terminal_draws_no_bar():
  stream = io.StringIO()
  progress = Progress(PLAN, batch_size=32, start_step=0, stream=stream)
  assert not progress.bars
  progress.chunk_done(50, input_sec=0.01, compute_sec=0.09, loss=1.5, accuracy=0.4)
  progress.end_phase()
  assert stream.getvalue() == ""
