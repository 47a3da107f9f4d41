"""A trained workdir's model as a function: uint8 images -> class probabilities.

`Classifier(workdir, step)` rebuilds the model from WORKDIR/config.json the way
training does (`train.build_model_and_state`), restores one checkpoint read-only
("latest", "best" or a step) and knows the dataset's shape and class names
(from run.json, else from the TFDS data). `research.tools.predict` classifies files
with it; `research.tools.report` its confusion matrix.
"""

import json
import os

import numpy as np

from research.errors import UserError


class Classifier:
  """A workdir's model with the parameters of one checkpoint: "latest", "best" or a step."""

  def __init__(self, workdir: str, step: str = "latest"):
    import jax

    from research import mesh as mesh_lib
    from research.config import workdir_config
    from research.data import data_source
    from research.run import checkpoint, train

    config_path = os.path.join(workdir, "config.json")
    try:
      with open(config_path) as f:
        stored = json.load(f)
      self.config = workdir_config.read_stored(stored)  # read through today's schema
    except (OSError, ValueError) as e:
      raise UserError(f"Cannot read {config_path} ({e}): --workdir must be a training "
                      "workdir (one that `python -m research.main` wrote).") from e
    self.info = dataset_info(workdir, self.config)
    model, _, _, abstract_state = train.build_model_and_state(self.config, self.info,
                                                              mesh_lib.make_mesh())
    checkpointer = checkpoint.Checkpointer(workdir, best_metric=self.config.get("best_metric", "accuracy"),
                                           read_only=True)
    try:
      self.step = checkpointer.resolve_step(step)
      state, _ = checkpointer.restore(abstract_state, self.step)
    finally:
      checkpointer.close()
    self._variables = {"params": state.params, **state.model_state}
    eval_input = data_source.eval_input(self.config.dataset, self.info)  # as in evaluation
    self._logits = jax.jit(lambda variables, images: model.apply(
        variables, eval_input(images), train=False))

  def probabilities(self, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """uint8 images [N, H, W, C] -> class probabilities [N, num_classes] (float32)."""
    import jax

    if len(images) == 0:
      return np.zeros((0, self.info.num_classes), np.float32)
    # One compiled shape: batches padded to a fixed size (a power of two for few images).
    batch_size = min(batch_size, 1 << (len(images) - 1).bit_length())
    outputs = []
    for start in range(0, len(images), batch_size):
      batch = images[start:start + batch_size]
      padded = np.zeros((batch_size, *batch.shape[1:]), np.uint8)
      padded[:len(batch)] = batch
      logits = self._logits(self._variables, padded)
      outputs.append(np.asarray(jax.device_get(jax.nn.softmax(logits)))[:len(batch)])
    return np.concatenate(outputs)


def dataset_info(workdir: str, config):
  """The dataset's shape and class names: from run.json, else from the TFDS data."""
  from research.data import datasets, data_source
  from research.run import run_info

  recorded = (run_info.read(workdir) or {}).get("dataset")
  if recorded:
    return datasets.DatasetInfo(name=recorded["name"], image_shape=tuple(recorded["image_shape"]),
                            num_classes=recorded["num_classes"],
                            class_names=tuple(recorded["class_names"]))
  return data_source.info(config.dataset)


