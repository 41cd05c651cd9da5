"""Run machinery shared by every method: run folders, checkpoints, resume, pre-emption, metrics.

- :mod:`.folders`: where a run writes (``runs/<recipe>[_N]``), cleanup of a run that never started.
- :mod:`.checkpoints`: atomic checkpoint files, when they are written, RNG state, signals.
- :mod:`.resume`: ``--ckpt_path last|FILE`` resolution and compatibility checks.
- :mod:`.preflight`: configurations refused before any process or folder exists.
- :mod:`.loggers`, :mod:`.progress`: metrics files that survive a resume, the progress bar.
- :mod:`.trackers`: MLflow / W&B (``--trainer.logger``) beside those files: config, run id, checkpoint paths.
"""
