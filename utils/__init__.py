"""Logic of the LoRA comparison repo: data preparation, training, evaluation, reports.

Notebooks in ``notebooks/`` are thin fronts for these modules; the dashboard and tests use
the same functions.
"""
import os as _os

# Nothing here needs the model hub (every model comes from a PyPI package or a local folder), but some
# library code looks things up there when it is not told otherwise (PEFT, saving an adapter, asks the hub
# for the base model's config). Offline unless the environment says differently; `make` sets these too.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    _os.environ.setdefault(_name, "1")
