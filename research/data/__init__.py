"""Datasets and input: from TFDS's files to uint8 batches on the devices.

  data_source.py      the data source chosen once from config.dataset (memory or stream):
                      info, training feed, evaluation batches, normalization
  datasets.py         dataset metadata, the order of training examples, the in-memory form,
                      padded evaluation batches
  stream_input.py     the streamed form: batches decoded in worker processes while training
  stream_examples.py  what one input worker computes: a step's batch or an evaluation batch
  host_buffers.py     host memory of finished batches, handed to the devices with no copy
  image_crops.py      one stored image decoded into the crop the model sees (Inception, centre)
  augment.py          on-device augmentation and normalization inside the train step
  memory_fit.py       whether a dataset fits memory mode, checked before anything is decoded
  prepare_data.py     getting a TFDS dataset prepared, offline sources first
"""
