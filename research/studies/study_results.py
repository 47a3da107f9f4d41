"""The results of a study, written into its folder (STUDY_DIR):

  results.csv, results.md   one row per trial, best first; every number names its split
  results_curves.png        learning curves of the top trials (research/tools/report.py)
  optimization_history.png  Optuna's objective against trials
  param_importances.png     Optuna's parameter importances (fANOVA), once two trials finished
  hparams/                  TensorBoard's HParams dashboard: `tensorboard --logdir STUDY_DIR`

A trial retried after its worker died (or was stopped) shares its workdir with the
retry; the table shows the latest attempt and counts the retries.
"""

import os
import shutil
import warnings

from research import metrics
from research.config import command_line
from research.run import run_info, run_log
from research.studies.study import OBJECTIVES, SLOT_ATTR, TEST_ATTR
from research.tools import report

TOP_CURVES = 5


def latest_attempts(study) -> list:
  """The newest trial of each of the study's slots (a retry replaces what it retried)."""
  latest, attempts = {}, {}
  for trial in study.storage.get_all_trials(study.study_id):
    slot = trial.user_attrs.get(SLOT_ATTR, trial.number)
    attempts[slot] = attempts.get(slot, 0) + 1
    if slot not in latest or trial.number > latest[slot].number:
      latest[slot] = trial
  return [(latest[slot], attempts[slot] - 1) for slot in sorted(latest)]


def rows(study) -> list[dict]:
  """Best first: complete trials by the objective, then pruned ones, then the rest."""
  plan = study.plan
  test = study.storage.get_study_user_attrs(study.study_id).get(TEST_ATTR) or {}
  objective_column = f"{plan.objective} ({plan.select_split})"
  test_column = f"test {plan.objective} ({test.get('split', plan.test_split)})"
  found = []
  for trial, retries in latest_attempts(study):
    workdir = os.path.join(plan.root, trial.user_attrs.get("workdir", ""))
    summary = report.summary_row(workdir) if trial.user_attrs.get("workdir") else {}
    last = (run_log.final_evaluation(run_info.read_metrics(workdir))
            if trial.user_attrs.get("workdir") else {})
    intermediate = trial.intermediate_values
    value = trial.value if trial.value is not None else (
        intermediate[max(intermediate)] if intermediate else None)
    row = {"trial": trial.number, "state": trial.state.name.lower(),
           **{p.key: command_line.flag_value(trial.params[p.key]) if p.key in trial.params
              else "" for p in plan.params},
           objective_column: value,
           # every other registered metric, at the trial's last evaluation
           **{f"{name} ({plan.select_split})": last.get(name)
              for name in metrics.METRICS if name != plan.objective},
           test_column: test.get(plan.objective) if test.get("trial") == trial.number else None,
           "evaluations": len(intermediate), "step": summary.get("step"),
           "wall_sec": summary.get("wall_sec"), "retries": retries,
           "workdir": trial.user_attrs.get("workdir", ""),
           "reason": trial.user_attrs.get("failure", "") if trial.state.name == "FAIL" else ""}
    found.append(row)
  sign = -1 if OBJECTIVES[plan.objective] == "maximize" else 1
  order = {"complete": 0, "pruned": 1, "running": 2, "fail": 3, "waiting": 4}
  return sorted(found, key=lambda r: (order.get(r["state"], 5), r[objective_column] is None,
                                      sign * (r[objective_column] or 0), r["trial"]))


def write(study) -> list[dict]:
  """Every results file; returns the table's rows."""
  plan = study.plan
  table = rows(study)
  title = (f"Study {plan.study_name}: {plan.search} search over "
           f"{', '.join(p.describe() for p in plan.params)}; best first by {plan.objective} "
           f"on {plan.select_split} (trials train on {plan.train_split})")
  md_path = os.path.join(plan.root, "results.md")
  report.write_table(table, os.path.join(plan.root, "results.csv"), md_path, title)
  with open(md_path, "a") as f:
    f.write("\n" + summary_text(study, table) + "\n")
  _write_curves(plan, table)
  _write_optuna_plots(study)
  _write_hparams(plan, table)
  return table


def summary_text(study, table: list[dict]) -> str:
  plan = study.plan
  states = {}
  for row in table:
    states[row["state"]] = states.get(row["state"], 0) + 1
  counts = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
  lines = [f"{len(table)} trials: {counts}."]
  test = study.storage.get_study_user_attrs(study.study_id).get(TEST_ATTR)
  if test:
    lines.append(f"Chosen: trial {test['trial']}, evaluated once on {test['split']}: "
                 f"accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f} "
                 f"({test['num_examples']} examples).")
  elif plan.select_split == plan.test_split:
    lines.append(f"Selected on {plan.test_split} itself: the best number is not an unbiased "
                 "estimate of test performance.")
  else:
    lines.append(f"No trial has been evaluated on {plan.test_split} yet (the study is not done).")
  return "\n".join(lines)


def _write_curves(plan, table: list[dict]) -> None:
  top = [row for row in table if row["state"] in ("complete", "pruned")][:TOP_CURVES]
  curves = {}
  for row in top:
    records = run_info.read_metrics(os.path.join(plan.root, row["workdir"]))
    if records:
      curves[f"trial {row['trial']}"] = report.with_wall_time(records)
  if curves:
    report.plot_learning_curves(curves, os.path.join(plan.root, "results_curves.png"))


def _write_optuna_plots(study) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import optuna

  finished = study.count(optuna.trial.TrialState.COMPLETE)
  plots = [("optimization_history.png", optuna.visualization.matplotlib.plot_optimization_history,
            1)]
  # PED-ANOVA: Optuna's own importance measure, without fANOVA's scikit-learn.
  evaluator = optuna.importance.PedAnovaImportanceEvaluator()
  plots.append(("param_importances.png", lambda s: optuna.visualization.matplotlib
                .plot_param_importances(s, evaluator=evaluator), 2))
  for name, plot, needed in plots:
    if finished < needed:
      continue
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # "experimental" notices of optuna.visualization
      try:
        axes = plot(study.optuna)
      except (ValueError, RuntimeError, ImportError) as e:  # e.g. too few finished trials
        print(f"{name} not written: {e}", flush=True)
        continue
    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    figure.set_size_inches(9, 5)
    figure.tight_layout()
    figure.savefig(os.path.join(study.plan.root, name), dpi=100)
    plt.close(figure)


def _write_hparams(plan, table: list[dict]) -> None:
  """One HParams session per trial: its parameters, state and final metrics."""
  from tensorboardX import SummaryWriter

  folder = os.path.join(plan.root, "hparams")
  shutil.rmtree(folder, ignore_errors=True)  # rewritten whole: one session per trial
  metric_columns = [c for c in table[0] if "(" in c] if table else []
  with SummaryWriter(folder) as writer:
    for row in table:
      hparams = {p.key: _hparam_value(row[p.key]) for p in plan.params}
      hparams["state"] = row["state"]
      metrics = {f"hparam/{_tag(column)}": float(row[column]) for column in metric_columns
                 if row[column] is not None}
      if row["state"] not in ("waiting", "running") and metrics:
        writer.add_hparams(hparams, metrics, name=f"trial-{row['trial']:04d}")


def _hparam_value(text: str):
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def _tag(column: str) -> str:
  """'accuracy (train[90%:])' -> 'accuracy_train_90pct_'."""
  return "".join(ch if ch.isalnum() else "_" for ch in column.replace("%", "pct")).strip("_")
