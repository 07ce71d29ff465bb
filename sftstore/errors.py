"""Exceptions raised by sftstore. Every message names the file, tensor or field at fault."""


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message (`default`, else its type's name, when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else default or type(exc).__name__


class SftError(Exception):
    """Base class of every sftstore error."""


class DeltaFormatError(SftError, ValueError):
    """An artifact (tensors file or manifest) is malformed or does not match its manifest."""


class BaseModelMismatchError(SftError):
    """A delta does not fit the base model it is applied to (fingerprint, missing parameter, shape)."""


class InvalidNameError(SftError, ValueError):
    """A delta name, alias or reference is not well formed."""


class StoreError(SftError):
    """The local store cannot do what was asked (unknown reference, ambiguous base, damage)."""


class RefNotFoundError(StoreError, LookupError):
    """A reference does not resolve to any stored version."""
