"""Keras throughput of the seed model at several batch sizes (run by the Keras environment).

The reference script ../shared/bench/keras_seed.py trains at batch 32 only; this measures
the same Sequential model and optimizer at other batch sizes, the way torch_seed.py's
`--bench` does: warm-up steps, then timed steps, images per second.

  python keras_throughput.py --batches=32,256,1024 --steps=100
Prints one 'RESULT {json}' line per batch size.
"""

import argparse
import gzip
import json
import os
import time

import numpy as np

DATA = "/usr/share/datasets/fashion-mnist"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", default="32,256,1024")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--warmup", type=int, default=10)
  args = parser.parse_args()

  import keras
  from keras import layers

  with gzip.open(os.path.join(DATA, "train-images-idx3-ubyte.gz"), "rb") as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
  with gzip.open(os.path.join(DATA, "train-labels-idx1-ubyte.gz"), "rb") as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  x = images.astype("float32") / 255.0
  y = keras.utils.to_categorical(labels, 10)
  for batch in [int(b) for b in args.batches.split(",")]:
    model = keras.Sequential([
        keras.Input((28, 28, 1)), layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(), layers.Flatten(),
        layers.Dense(64, activation="relu"), layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    count = min(len(x) // batch, args.warmup) * batch
    model.fit(x[:count], y[:count], batch_size=batch, epochs=1, verbose=0)
    count = args.steps * batch
    repeats = -(-count // len(x))
    xs, ys = np.concatenate([x] * repeats)[:count], np.concatenate([y] * repeats)[:count]
    start = time.perf_counter()
    model.fit(xs, ys, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({"impl": f"keras-{keras.__version__}", "batch": batch,
                                  "images_per_sec": round(count / seconds, 1)}), flush=True)


if __name__ == "__main__":
  main()
