"""Experiments over many runs: ``excite sweep`` trains a grid of ordinary run directories (:mod:`.sweep`, the
grid itself in :mod:`.grid`) and says, with paired confidence intervals over seeds, which options made a
difference (:mod:`.stats`); ``excite compare`` sets runs side by side (:mod:`.compare`).

Kept free of imports: the CLI reads the sweep's options from :mod:`.grid` without importing torch or Optuna.
"""
