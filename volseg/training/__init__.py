"""The trainer in parts, put together by :func:`volseg.train.train`.

* :mod:`~volseg.training.run_dir`: the run folder (checks, the case split, the bundle's configs, run information);
* :mod:`~volseg.training.engines`: MONAI's trainer and evaluator built from the run's train.json (single- or
  multi-process), early stopping and CPU bfloat16 autocast;
* :mod:`~volseg.training.metrics`: per-epoch losses, validation metrics (surface metrics included), the summary
  line and the training curves;
* :mod:`~volseg.training.checkpoint`: the resumable last checkpoint, written atomically, and resuming from it;
* :mod:`~volseg.training.budget`: ``train.time_budget_s``, ``max_epochs`` and the schedule fitted to the epoch times
  measured;
* :mod:`~volseg.training.signals`: SIGINT/SIGTERM end a run after a checkpoint;
* :mod:`~volseg.training.result`: what a finished run reached, and the bundle's final weights and metadata.
"""
