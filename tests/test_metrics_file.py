"""Reading a run's records back (research/run/run_log.py): damaged lines cost nothing, and
"the final evaluation (of a split)" is one function that reports, studies and benchmarks share."""

import json

from research.run import run_log
from research.studies import study_trial
from research.tools import benchmark, report

TRAIN_1 = {"step": 10, "epoch": 0.5, "split": "train", "loss": 0.9, "accuracy": 0.6,
           "train_seconds": 1.0, "elapsed": 1.0}
EVAL_1 = {"step": 20, "epoch": 1.0, "split": "test[:1000]", "kind": "eval", "loss": 0.5,
          "accuracy": 0.8, "num_examples": 1000, "elapsed": 2.0}
TRAIN_2 = {**TRAIN_1, "step": 20, "epoch": 1.0, "train_seconds": 2.0, "elapsed": 2.1}
ON_TRAIN = {**EVAL_1, "split": "train", "accuracy": 0.85, "elapsed": 2.2}  # eval of the train split
EVAL_2 = {**EVAL_1, "step": 40, "epoch": 2.0, "accuracy": 0.9, "elapsed": 4.0}
TRAIN_3 = {**TRAIN_1, "step": 40, "epoch": 2.0, "train_seconds": 4.0, "elapsed": 4.1}


def _write(path, records, damage: bytes = b"", cut: bytes = b""):
  """metrics.jsonl with `damage` after the first record and `cut` (a line a kill cut short)
  at the end."""
  lines = [json.dumps(record).encode() + b"\n" for record in records]
  path.write_bytes(lines[0] + damage + b"".join(lines[1:]) + cut)
  return str(path)


DAMAGE = (b"\xff\xfe not json\n" b"[1, 2]\n" b'{"step": "7", "split": "test", "kind": "eval"}\n'
          b'{"split": "test", "kind": "eval", "accuracy": 1.0}\n' b"\n")
CUT = b'{"step": 60, "epoch": 3.0, "split": "test[:1000]", "kind": "eval", "accura'


def test_damaged_and_cut_lines_are_skipped_and_the_records_around_them_kept(tmp_path):
  records = [TRAIN_1, EVAL_1, TRAIN_2, EVAL_2, TRAIN_3]
  path = _write(tmp_path / "metrics.jsonl", records, DAMAGE, CUT)
  assert run_log.read_records(path) == records
  assert run_log.read_records(str(tmp_path / "none.jsonl")) == []


def test_the_final_evaluation_is_the_last_one_of_the_split_asked_for(tmp_path):
  records = run_log.read_records(_write(tmp_path / "metrics.jsonl",
                                        [TRAIN_1, EVAL_1, TRAIN_2, ON_TRAIN, EVAL_2, TRAIN_3],
                                        DAMAGE, CUT))
  assert run_log.final_evaluation(records) == EVAL_2  # training records come after it
  assert run_log.final_evaluation(records, "test[:1000]") == EVAL_2
  assert run_log.final_evaluation(records, "train") == ON_TRAIN  # an evaluation, not training
  assert run_log.final_evaluation(records, "test") == {}  # named, and never evaluated
  assert run_log.final_evaluation([TRAIN_1, TRAIN_2]) == {}
  assert run_log.final_evaluation([]) == {}


def test_older_workdirs_and_eval_jsonl_lines_are_evaluations_too(tmp_path):
  old = {"step": 20, "epoch": 1.0, "split": "test", "accuracy": 0.7}  # before splits were named
  assert run_log.final_evaluation([TRAIN_1, old, TRAIN_2]) == old
  # --mode=eval appends one line per evaluation to eval.jsonl (no "kind": it names its checkpoint).
  lines = [{"step": 40, "checkpoint": "latest", "split": "test", "accuracy": 0.9},
           {"step": 20, "checkpoint": "best", "split": "train[90%:]", "accuracy": 0.8}]
  path = _write(tmp_path / run_log.EVAL_FILE, lines, cut=b'{"step": 40, "chec')
  records = run_log.read_records(path)
  assert run_log.final_evaluation(records) == lines[1]
  assert run_log.final_evaluation(records, "test") == lines[0]


def test_every_reader_of_a_workdir_sees_the_same_final_evaluation(tmp_path):
  """The report's table, a study trial's pruning reports and the benchmark's accuracy
  all read a damaged metrics.jsonl alike."""
  records = [TRAIN_1, EVAL_1, TRAIN_2, EVAL_2, TRAIN_3]
  _write(tmp_path / "metrics.jsonl", records, DAMAGE, CUT)
  row = report.summary_row(str(tmp_path))
  assert (row["final_test_accuracy"], row["final_test_loss"], row["eval_split"]) == (
      0.9, 0.5, "test[:1000]")
  assert report.eval_split_of([TRAIN_1]) == "test"  # nothing evaluated yet
  assert study_trial.evaluations(str(tmp_path)) == [EVAL_1, EVAL_2]
  assert study_trial.evaluations(str(tmp_path / "not-yet")) == []
  times = benchmark.epoch_times(run_log.read_records(str(tmp_path / "metrics.jsonl")))
  assert times["test_accuracy"] == 0.9 and times["epoch_seconds"] == [2.0, 2.0]
