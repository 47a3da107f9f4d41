"""run.json: written at the start, updated at the end, kept across resumes; and the
profiler trace window that `--config.profile_steps` asks for."""

import json
import os

import pytest

from configs import default
from research.errors import UserError
from research.run import profiling, run_info

REQUIRED = {"workdir", "status", "config", "seed", "code", "versions", "devices", "dataset",
            "start_time", "end_time", "sessions", "final_metrics", "best_metrics"}


def _write_metrics(workdir, records):
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")


def test_run_json_running_then_finished_with_final_and_best_metrics(tmp_path):
  workdir = str(tmp_path)
  config = default.get_config()
  with run_info.RunRecord(workdir, config, start_step=0) as record:
    started = run_info.read(workdir)
    assert REQUIRED <= set(started)
    assert started["status"] == "running" and started["end_time"] is None
    _write_metrics(workdir, [
        {"step": 10, "split": "train", "loss": 1.0, "accuracy": 0.5, "elapsed": 1.0},
        {"step": 10, "split": "test", "loss": 0.9, "accuracy": 0.6, "elapsed": 1.5},
        {"step": 20, "split": "train", "loss": 0.8, "accuracy": 0.7, "elapsed": 2.0},
        {"step": 20, "split": "test", "loss": 1.1, "accuracy": 0.55, "elapsed": 2.5},
    ])
    record.step = 20
  info = run_info.read(workdir)
  assert info["status"] == "finished" and info["end_time"] >= info["start_time"]
  assert info["config"]["optimizer"]["name"] == "adam_keras" and info["seed"] == 0
  assert set(info["code"]) == {"package_version", "git_commit", "git_dirty"}
  assert {"jax", "flax", "optax", "orbax-checkpoint",
          "tensorflow-datasets"} <= set(info["versions"])
  assert info["devices"]["count"] >= 1 and info["devices"]["process_count"] == 1
  assert info["final_metrics"]["test"]["accuracy"] == 0.55
  assert info["final_metrics"]["train"]["loss"] == 0.8
  assert info["best_metrics"]["step"] == 10 and info["best_metrics"]["accuracy"] == 0.6
  assert info["sessions"][0]["end_step"] == 20


def test_run_json_records_preemption_failure_and_keeps_history_on_resume(tmp_path):
  workdir = str(tmp_path)
  config = default.get_config()
  with pytest.raises(SystemExit):
    with run_info.RunRecord(workdir, config, start_step=0) as record:
      record.step = 40
      raise SystemExit(143)
  first = run_info.read(workdir)
  assert first["status"] == "preempted" and first["sessions"][0]["end_step"] == 40

  with pytest.raises(ValueError):
    with run_info.RunRecord(workdir, config, start_step=40):
      raise ValueError("boom")
  second = run_info.read(workdir)
  assert second["status"] == "failed" and "ValueError: boom" in second["sessions"][1]["error"]
  assert second["start_time"] == first["start_time"]
  assert [s["status"] for s in second["sessions"]] == ["preempted", "failed"]


def test_profile_steps_parse_and_window_clipping():
  assert profiling.parse("") is None
  assert profiling.parse("100,20") == (100, 20)
  for bad in ("100", "a,b", "-1,5", "5,0", "1,2,3"):
    with pytest.raises(UserError, match="profile_steps"):
      profiling.parse(bad)
  window = profiling.TraceWindow("100,20", "/unused")
  assert window.clip(50, 125) == 100  # a call stops where the trace starts
  assert window.clip(100, 125) == 120  # ... and where it ends
  assert window.clip(120, 200) == 200
  assert profiling.TraceWindow("", "/unused").clip(0, 125) == 125


@pytest.mark.slow
def test_real_run_writes_run_json_and_profile(trained_workdir):
  info = run_info.read(trained_workdir)
  assert REQUIRED <= set(info)
  assert info["status"] == "finished"
  assert info["config"]["num_train_steps"] == 300
  assert info["dataset"]["class_names"][0] == "T-shirt/top"
  assert info["dataset"]["image_shape"] == [28, 28, 1]
  final = info["final_metrics"]["test[:1000]"]  # the smoke preset's eval split
  assert final["step"] == 300 and info["best_metrics"]["accuracy"] >= final["accuracy"] - 1e-9
  assert info["code"]["git_commit"] and isinstance(info["code"]["git_dirty"], bool)
  assert len(info["sessions"]) == 1 and info["sessions"][0]["end_step"] == 300
  traces = [os.path.join(folder, name)
            for folder, _, names in os.walk(os.path.join(trained_workdir, "profile"))
            for name in names]
  assert any(t.endswith(".xplane.pb") for t in traces)  # TensorBoard's profile plugin
  assert any(t.endswith("perfetto_trace.json.gz") for t in traces)  # ui.perfetto.dev


def test_damaged_metrics_lines_are_dropped_and_the_records_kept(tmp_path):
  """Random bytes in metrics.jsonl (a flaky disk) cost those lines only: readers skip them,
  and a resumed RunLog keeps every good record up to its step."""
  from research.run import run_log

  good = [{"step": step, "epoch": 0.1, "split": "train", "loss": 1.0 / step} for step in (1, 2, 3)]
  with open(tmp_path / "metrics.jsonl", "wb") as f:
    f.write((json.dumps(good[0]) + "\n").encode())
    f.write(os.urandom(300).replace(b"\n", b"x") + b"\n")
    f.write(b'"not a record"\n{"step": "2"}\n')
    f.writelines((json.dumps(record) + "\n").encode() for record in good[1:])
  assert run_info.read_metrics(str(tmp_path)) == good
  run_log.RunLog(str(tmp_path), resume_step=2).close()
  assert run_info.read_metrics(str(tmp_path)) == good[:2]
  assert len((tmp_path / "metrics.jsonl").read_bytes().splitlines()) == 2
