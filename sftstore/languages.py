"""Language codes: the ISO 639 codes that name the same language (`ha` and `hau`, `de`, `deu` and `ger`)."""

from __future__ import annotations

from functools import lru_cache

import pycountry

# pycountry's fields for ISO 639-1, 639-3 (= 639-2/T where both exist) and 639-2/B codes.
_CODE_FIELDS = ("alpha_2", "alpha_3", "bibliographic")


@lru_cache(maxsize=None)
def equivalent_codes(code: str) -> tuple[str, ...]:
    """`code` first, then the other ISO 639 codes of its language; `(code,)` when it is no ISO 639 code."""
    language = next(filter(None, (pycountry.languages.get(**{field: code}) for field in _CODE_FIELDS)), None)
    if language is None:
        return (code,)
    others = (getattr(language, field, None) for field in _CODE_FIELDS)
    return (code, *dict.fromkeys(other for other in others if other and other != code))
