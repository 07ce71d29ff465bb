"""sftstore: composable sparse fine-tuning for multilingual transformers.

The `SparseDelta` is the one object everything passes around; the `DeltaStore` versions deltas
locally; `compose` sums deltas onto a base model for zero-shot inference.
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    BaseModelMismatchError,
    DeltaFormatError,
    InvalidNameError,
    RefNotFoundError,
    SftError,
    StoreError,
)

__version__ = "0.1.0"

# The torch-dependent classes load on first use, so `import sftstore.store` (and the CLI's listing
# commands) start without torch.
_LAZY = {"BaseModelInfo": "config", "DeltaConfig": "config", "AppliedDelta": "delta", "ParameterDelta": "delta",
         "SparseDelta": "delta"}

if TYPE_CHECKING:
    from .config import BaseModelInfo, DeltaConfig
    from .delta import AppliedDelta, ParameterDelta, SparseDelta


def __getattr__(name: str) -> Any:
    """`sftstore.SparseDelta` and the other torch-dependent names, imported on first access."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
