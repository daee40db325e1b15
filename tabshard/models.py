"""Opening any model the CLI is given: a GGUF or a synthetic model (model/loader.py), or one of
our quantized files (.tsq, tabshard/qmodel.py, which the quantization tools on this floor write)."""
from __future__ import annotations

import os

from model import loader
from tabshard.qmodel import QuantizedModel


def open_model(path: str | os.PathLike | None = None):
    if path is not None and str(path).endswith(loader.QUANTIZED_SUFFIX):
        return QuantizedModel(path)
    return loader.open_model(path)
