"""Commands that read or measure runs (each also `python -m research.NAME`).

  report.py             curves, confusion matrix and comparisons of workdirs
  predict.py            top-k classes of image files with a trained workdir
  classifier.py         a trained workdir's model as uint8 images -> class probabilities
  benchmark.py          `make bench`: our speed and its fraction of the machine's peak
  bench_compare.py      `make bench-compare`: side by side with the Keras and PyTorch references
  bench_input.py        `make bench-input`: images/s of the streamed input per worker and core
  check_accelerator.py  `make check-accelerator`: a GPU/TPU machine checked end to end
"""
