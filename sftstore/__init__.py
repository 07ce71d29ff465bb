"""sftstore: composable sparse fine-tuning for multilingual transformers.

The `SparseDelta` is the one object everything passes around; the `DeltaStore` versions deltas
locally; `compose` sums deltas onto a base model for zero-shot inference.
"""

from .config import BaseModelInfo, DeltaConfig
from .delta import AppliedDelta, ParameterDelta, SparseDelta
from .errors import (
    BaseModelMismatchError,
    DeltaFormatError,
    InvalidNameError,
    RefNotFoundError,
    SftError,
    StoreError,
)

__version__ = "0.1.0"

__all__ = [
    "AppliedDelta",
    "BaseModelInfo",
    "BaseModelMismatchError",
    "DeltaConfig",
    "DeltaFormatError",
    "InvalidNameError",
    "ParameterDelta",
    "RefNotFoundError",
    "SftError",
    "SparseDelta",
    "StoreError",
    "__version__",
]
