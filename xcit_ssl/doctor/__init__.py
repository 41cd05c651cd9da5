"""The planner, library half: ``xcit-ssl doctor --recipe NAME [fit overrides]`` looks at a run before
it starts (its command is :mod:`xcit_ssl.commands.doctor`).

It resolves the config as ``fit`` does and reports, in one table (or ``--json``):

- :mod:`.plan`: the run as configured (world, global batch, peak lr, steps, warm-ups, crops);
- :mod:`.cost`: parameters and multiply-adds per image and step (:mod:`xcit_ssl.models.flops`);
- :mod:`.measure` / :mod:`.memory`: real steps of the method on synthetic batches, timed and
  memory-profiled, extrapolated linearly to batches that do not run here, with the largest
  batch that fits and the MFU;
- :mod:`.data_check`: the data folder and the data pipeline's images/s with the configured workers;
- :mod:`.advice`: the run's time and cost, how to reach the recipe's global batch, and warnings
  that name the setting to change.
"""
