"""Logic of the LoRA comparison repo: data preparation, training, evaluation, reports.

Notebooks in ``notebooks/`` are thin fronts for these modules; the dashboard and tests use
the same functions.
"""
