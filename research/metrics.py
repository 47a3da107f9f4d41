"""The evaluation metrics: `METRICS` names each one, and each entry is all a metric needs.

An entry says how to compute per-batch sums from the logits, the labels and the
padding mask (`sums`, traced inside the compiled evaluation), and how to turn the
sums over the whole split into the number (`value`, on the host). The evaluation
runs every entry, so a metric added here is in metrics.jsonl, TensorBoard, the
console and reports, and is accepted by `best_metric`, the study's `--objective`
and its results table, with `direction` saying which way is better.
docs/extending.md walks through adding one.

The sums are carried as float32 arrays of any shape (e.g. per-class counts); padded
rows have mask 0 and must not count. `count` (the examples evaluated) is always there.
"""

import collections.abc
import dataclasses
from typing import Callable

import jax.numpy as jnp
import optax

from research import knobs


@dataclasses.dataclass(frozen=True)
class Metric:
  sums: Callable  # (logits [B, C], labels [B], mask [B]) -> {name: summed array}
  value: Callable  # (sums over the split, each a numpy array, and "count") -> float
  direction: str  # "maximize" or "minimize"
  meaning: str


def _loss_sums(logits, labels, mask):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {"loss_sum": jnp.sum(loss * mask)}


def _accuracy_sums(logits, labels, mask):
  return {"correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask)}


METRICS = {
    "loss": Metric(_loss_sums, lambda sums: float(sums["loss_sum"]) / float(sums["count"]),
                   "minimize", "mean cross-entropy (without label smoothing)"),
    "accuracy": Metric(_accuracy_sums,
                       lambda sums: float(sums["correct"]) / float(sums["count"]),
                       "maximize", "share of examples whose top class is the label"),
}


def batch_sums(logits, labels, mask) -> dict:
  """{metric: {sum name: array}} of one padded batch, plus "count"; traced."""
  found = {name: {key: jnp.asarray(value, jnp.float32)
                  for key, value in metric.sums(logits, labels, mask).items()}
           for name, metric in METRICS.items()}
  found["count"] = jnp.sum(mask)
  return found


def values(totals: dict) -> dict:
  """{metric: number} from the sums over a whole split (on the host)."""
  count = totals["count"]
  return {name: metric.value({**totals[name], "count": count})
          for name, metric in METRICS.items()}


class _Directions(collections.abc.Mapping):
  """{metric: "maximize" or "minimize"}, read from METRICS whenever asked (a study's
  objectives: every metric registered, including ones added after this import)."""

  def __getitem__(self, name: str) -> str:
    return METRICS[name].direction

  def __iter__(self):
    return iter(METRICS)

  def __len__(self) -> int:
    return len(METRICS)


DIRECTIONS = _Directions()


def better(name: str) -> str:
  """"max" or "min": which way metric `name` improves."""
  return "max" if METRICS[name].direction == "maximize" else "min"


def best_metric_field() -> knobs.Field:
  return knobs.choice("accuracy", "the metric, on the eval split, that picks the 'best' "
                      "checkpoint", METRICS)
