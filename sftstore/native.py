"""The optional C extension `_sparse_kernel`: fused CPU passes for compose, revert and gap decoding.

It is built at install time where a C compiler is available (`ext-modules` in pyproject.toml, optional).
Everything it does has a pure numpy/PyTorch fallback, used where it was not built and inside `disabled()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

try:
    from . import _sparse_kernel as _module
except ImportError:  # installed without a C compiler
    _module = None

_enabled = _module is not None


def kernel() -> ModuleType | None:
    """The extension module, or None where it was not built or is disabled."""
    return _module if _enabled else None


def available() -> bool:
    """Whether the extension was built and is in use."""
    return kernel() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Use the pure numpy/PyTorch passes inside the block, even where the extension is built (benchmarks,
    tests). The switch is process-wide: it holds for every thread while the block runs."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved
