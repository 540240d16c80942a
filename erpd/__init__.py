"""ERPD training core: Extreme Region Policy Distillation on PyTorch + transformers.

Nothing in erpd downloads: the hub is switched off before transformers is imported, so a model
reference can only ever be a local directory.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
