"""ISO 639 language codes: the two- and three-letter codes of one language name the same deltas."""

from __future__ import annotations

import pytest

from sftstore.languages import equivalent_codes


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("ha", ("ha", "hau")),
        ("hau", ("hau", "ha")),
        ("sw", ("sw", "swa")),
        ("swa", ("swa", "sw")),
        ("en", ("en", "eng")),
        ("eng", ("eng", "en")),
        ("de", ("de", "deu", "ger")),  # 639-2/B where it differs from 639-3
        ("ger", ("ger", "de", "deu")),
        ("zho", ("zho", "zh", "chi")),
        ("yue", ("yue",)),  # 639-3 only: no two-letter code
        ("wol", ("wol", "wo")),
    ],
)
def test_equivalent_codes_both_ways(code, expected):
    assert equivalent_codes(code) == expected


@pytest.mark.parametrize("code", ["xx", "zz", "nah", "Hausa", "German", "ha-Latn", ""])
def test_non_codes_only_name_themselves(code):
    # Language names never count, only codes ('Ha' and 'En' are also the names of haq and enc).
    assert equivalent_codes(code) == (code,)


def test_upper_case_codes_keep_the_given_spelling_first():
    assert equivalent_codes("HA") == ("HA", "ha", "hau")
