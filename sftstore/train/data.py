"""Training data: readers for the offline datasets, tokenised datasets for the trainers, and digests.

Readers (plain Python, no tokenizer needed):

* :func:`read_conll` -- NER files in CoNLL layout (CoNLL-2003's 4 columns, MasakhaNER's 2), with an
  entity-type map (:data:`NER_TARGET_MAP` turns ``MISC`` and ``DATE`` into ``O``);
* :func:`read_conllu` -- Universal Dependencies CoNLL-U, giving (FORM, UPOS) per sentence;
* :func:`read_nli_tsv` -- NLI pairs in TSV (XNLI without header, AmericasNLI with one);
* :func:`read_text_lines` -- raw text for masked-language-model training.

Every reader raises :class:`DataFormatError` naming the file and the 1-based line number at fault.

Tokenised datasets (``torch.utils.data.Dataset`` whose items are dicts of lists, padded later by
the usual ``transformers`` collators):

* :class:`TokenClassificationDataset` + ``DataCollatorForTokenClassification``;
* :class:`SentencePairDataset` + ``DataCollatorWithPadding``;
* :class:`MlmDataset` + ``DataCollatorForLanguageModeling(mlm_probability=0.15)``.

Small slices of the offline datasets ship with the package under ``sftstore/data/`` (see its
``README.md`` for sources and licences; all of it is research-use data): :func:`shipped_data`
returns their paths.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch.utils.data

from ..errors import SftError

__all__ = [
    "DataFormatError",
    "NER_DEFAULT_LABELS",
    "NER_TARGET_MAP",
    "NLI_LABELS",
    "read_conll",
    "map_entity_types",
    "label_list",
    "read_conllu",
    "read_nli_tsv",
    "read_text_lines",
    "split_held_out",
    "TokenClassificationDataset",
    "SentencePairDataset",
    "MlmDataset",
    "sha256_of_files",
    "describe_files",
    "shipped_data",
    "shipped_files",
]

PathLike = Union[str, "os.PathLike[str]"]
Sentence = tuple[list[str], list[str]]


class DataFormatError(SftError, ValueError):
    """A data file (or data given in memory) is malformed. The message names the file and line."""


#: The 7 NER labels shared by CoNLL-2003 English (after dropping MISC) and MasakhaNER 1.0 (after
#: dropping DATE): what the LT-SFT paper and ``cambridgeltl/composable-sft`` train and evaluate with.
NER_DEFAULT_LABELS: list[str] = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]

#: Entity-type map for CoNLL-2003 -> MasakhaNER transfer: both MISC (CoNLL only) and DATE
#: (MasakhaNER only) become ``O``, as in the reference implementation.
NER_TARGET_MAP: dict[str, str] = {"MISC": "O", "DATE": "O"}

#: NLI labels in the order used for label ids (XNLI / MultiNLI order).
NLI_LABELS: list[str] = ["entailment", "neutral", "contradiction"]

# Invisible characters removed from CoNLL tokens: zero-width space, LRM/RLM, bidi embeddings and
# overrides, word joiner, bidi isolates, BOM / zero-width no-break space. ZWNJ and ZWJ (U+200C/D)
# are kept: they are meaningful in several scripts.
_INVISIBLE = re.compile("[\u200b\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]")
_IOB = re.compile(r"^([BI])-(\S+)$")


def _where(path: PathLike, lineno: int) -> str:
    return f"{os.fspath(path)}:{lineno}"


def _read_lines(path: PathLike) -> list[str]:
    """Lines of a UTF-8 file (a BOM is dropped), without their line ends (LF or CRLF)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{os.fspath(path)}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


# --------------------------------------------------------------------------------------------- NER


def _check_type_map(label_map: Mapping[str, str]) -> None:
    for key, value in label_map.items():
        if not isinstance(key, str) or not key or key == "O" or _IOB.match(key) or re.search(r"\s", key):
            raise ValueError(
                f"label_map key {key!r} is not an entity type: keys are types such as 'MISC', "
                "without a 'B-'/'I-' prefix"
            )
        if not isinstance(value, str) or not value or _IOB.match(value) or re.search(r"\s", value):
            raise ValueError(
                f"label_map[{key!r}] = {value!r}: expected an entity type such as 'PER', or 'O' to drop the entity"
            )


def _map_tag(tag: str, label_map: Mapping[str, str] | None) -> str:
    if not label_map or tag == "O":
        return tag
    prefix, entity_type = tag.split("-", 1)
    target = label_map.get(entity_type, entity_type)
    return "O" if target == "O" else f"{prefix}-{target}"


def map_entity_types(tags: Sequence[str], label_map: Mapping[str, str]) -> list[str]:
    """Apply an entity-type map to IOB tags (see :func:`read_conll`): ``B-MISC`` -> ``O`` etc."""
    _check_type_map(label_map)
    for tag in tags:
        if tag != "O" and not _IOB.match(tag):
            raise DataFormatError(f"tag {tag!r} is not an IOB2 tag ('O', 'B-TYPE' or 'I-TYPE')")
    return [_map_tag(tag, label_map) for tag in tags]


def read_conll(
    path: PathLike,
    *,
    label_column: int = -1,
    label_map: Mapping[str, str] | None = None,
    iob: bool = True,
) -> list[Sentence]:
    """Read a CoNLL-style token-per-line file into sentences of ``(tokens, tags)``.

    Format: one token per line, whitespace-separated columns, the token in the first column and
    the tag in column ``label_column`` (default: the last); sentences are separated by blank lines.
    Every token line of a file must have the same number of columns (at least 2). This reads
    CoNLL-2003 (``TOKEN POS CHUNK NER``) and MasakhaNER (``TOKEN TAG``) alike.

    * ``-DOCSTART-`` lines (document boundaries) are skipped; they never start or join a sentence.
    * The file is read as ``utf-8-sig`` (a leading BOM is dropped) and invisible characters
      (zero-width space, bidi marks, word joiner, U+FEFF) are removed from tokens. A line whose
      token is nothing but such characters is dropped when its tag is ``O`` (an error otherwise).
    * With ``iob=True`` (the default) every tag must be ``O``, ``B-TYPE`` or ``I-TYPE`` (IOB2 as
      in CoNLL-2003 and MasakhaNER). Irregular sequences (``I-X`` after ``O``) are kept as they are.
    * ``label_map`` maps entity **types** to replacement types and applies to both ``B-`` and
      ``I-`` tags: ``{"PERSON": "PER"}`` renames ``B-PERSON``/``I-PERSON`` to ``B-PER``/``I-PER``;
      the value ``"O"`` drops the entity, so ``{"MISC": "O", "DATE": "O"}``
      (:data:`NER_TARGET_MAP`) turns every ``B-MISC``/``I-MISC``/``B-DATE``/``I-DATE`` into ``O``.
      Types not in the map are kept. It needs ``iob=True``.

    With ``iob=False`` tags are returned verbatim (any column, e.g. POS tags).

    Raises :class:`DataFormatError` naming the file and line for a wrong number of columns or a
    malformed tag, and ``ValueError`` for a malformed ``label_map``.
    """
    if label_map is not None:
        if not iob:
            raise ValueError("label_map maps IOB entity types; it cannot be used with iob=False")
        _check_type_map(label_map)
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    n_columns: int | None = None
    n_columns_line = 0

    def flush() -> None:
        nonlocal tokens, tags
        if tokens:
            sentences.append((tokens, tags))
        tokens, tags = [], []

    for lineno, line in enumerate(_read_lines(path), start=1):
        fields = line.split()
        if not fields:
            flush()
            continue
        if fields[0] == "-DOCSTART-":
            flush()
            continue
        if n_columns is None:
            if len(fields) < 2:
                raise DataFormatError(
                    f"{_where(path, lineno)}: {len(fields)} column; expected a token and a tag "
                    "(at least 2 whitespace-separated columns)"
                )
            n_columns, n_columns_line = len(fields), lineno
            if not -n_columns <= label_column < n_columns:
                raise DataFormatError(
                    f"{_where(path, lineno)}: label_column={label_column} but the file has {n_columns} columns"
                )
        elif len(fields) != n_columns:
            raise DataFormatError(
                f"{_where(path, lineno)}: {len(fields)} columns; expected {n_columns} "
                f"as on line {n_columns_line} (line: {line.strip()[:80]!r})"
            )
        tag = fields[label_column]
        if iob and tag != "O" and not _IOB.match(tag):
            raise DataFormatError(
                f"{_where(path, lineno)}: tag {tag!r} is not an IOB2 tag ('O', 'B-TYPE' or 'I-TYPE')"
            )
        token = _INVISIBLE.sub("", fields[0])
        if not token:
            if tag == "O":
                continue
            raise DataFormatError(
                f"{_where(path, lineno)}: the token is only invisible characters but is tagged {tag!r}"
            )
        tokens.append(token)
        tags.append(_map_tag(tag, label_map) if iob else tag)
    flush()
    return sentences


def _tag_sort_key(tag: str) -> tuple:
    match = _IOB.match(tag)
    if tag == "O":
        return (0, "", "")
    if match:
        return (1, match.group(2), match.group(1))
    return (2, tag, "")


def label_list(
    sentences: Iterable[tuple[Sequence[str], Sequence[str]]],
    preferred: Sequence[str] | None = None,
    *,
    strict: bool = False,
) -> list[str]:
    """The ordered label list for a model head: all of ``preferred`` in its order, then any other
    label found in ``sentences`` sorted (``O`` first, then by entity type, ``B-`` before ``I-``).

    With ``strict=True`` a label in the data that is not in ``preferred`` raises
    :class:`DataFormatError` (e.g. a forgotten ``B-MISC`` when training with
    :data:`NER_DEFAULT_LABELS`).
    """
    preferred = list(preferred or [])
    if len(set(preferred)) != len(preferred):
        raise ValueError(f"preferred labels contain duplicates: {preferred}")
    seen: set[str] = set()
    for _, tags in sentences:
        seen.update(tags)
    extra = sorted(seen - set(preferred), key=_tag_sort_key)
    if strict and extra:
        raise DataFormatError(
            f"the data has labels outside the label set {preferred}: {extra} "
            "(map them with label_map, e.g. NER_TARGET_MAP, or extend the label set)"
        )
    return preferred + extra


# ------------------------------------------------------------------------------------------ CoNLL-U

_CONLLU_ID = re.compile(r"^(?:[1-9]\d*|(?P<range>[1-9]\d*-[1-9]\d*)|(?P<empty>\d+\.[1-9]\d*))$")


def read_conllu(path: PathLike) -> list[Sentence]:
    """Read a CoNLL-U file into sentences of ``(FORMs, UPOS tags)``.

    Lines are split on tabs only (a FORM may contain a space) and must have 10 columns. Comment
    lines (``#``), multiword-token ranges (ID ``1-2``: the surface token; its syntactic words
    follow as their own lines) and empty nodes (ID ``8.1``) are skipped, so the result is the
    syntactic words, as UD's POS evaluation counts them. Raises :class:`DataFormatError` naming
    the file and line for a wrong column count, a malformed ID, or an empty FORM/UPOS.
    """
    sentences: list[Sentence] = []
    forms: list[str] = []
    tags: list[str] = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            if forms:
                sentences.append((forms, tags))
            forms, tags = [], []
            continue
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 10:
            raise DataFormatError(
                f"{_where(path, lineno)}: {len(fields)} tab-separated columns; CoNLL-U has 10 "
                f"(line: {line[:80]!r})"
            )
        match = _CONLLU_ID.match(fields[0])
        if not match:
            raise DataFormatError(
                f"{_where(path, lineno)}: ID {fields[0]!r} is not a word index (1), a multiword range (1-2) "
                "or an empty node (8.1)"
            )
        if match.group("range") or match.group("empty"):
            continue
        form, upos = fields[1], fields[3]
        if not form or not upos.strip() or upos == "_":
            raise DataFormatError(f"{_where(path, lineno)}: empty FORM or UPOS (line: {line[:80]!r})")
        forms.append(form)
        tags.append(upos)
    if forms:
        sentences.append((forms, tags))
    return sentences


# -------------------------------------------------------------------------------------------- NLI

_NLI_HEADERS = (["language", "premise", "hypothesis", "label"], ["premise", "hypothesis", "label"])


def read_nli_tsv(path: PathLike) -> list[tuple[str, str, str]]:
    """Read NLI pairs ``(premise, hypothesis, label)`` from a TSV file.

    Accepted layouts: a header ``language<TAB>premise<TAB>hypothesis<TAB>label`` (AmericasNLI) or
    ``premise<TAB>hypothesis<TAB>label``, or no header and 3 columns (XTREME's XNLI). Fields are
    split on tabs only; there is no CSV quoting, so ``"`` characters are kept verbatim. Blank lines
    are skipped. ``label`` must be one of :data:`NLI_LABELS`. An empty premise or hypothesis is
    kept (AmericasNLI ``test/nah.tsv`` line 520 has one). Raises :class:`DataFormatError` naming
    the file and line for a wrong column count or an unknown label.
    """
    lines = _read_lines(path)
    columns = ["premise", "hypothesis", "label"]
    start = 0
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        fields = [field.strip().lower() for field in line.split("\t")]
        if fields in _NLI_HEADERS:
            columns, start = fields, index + 1
        break
    where = {name: position for position, name in enumerate(columns)}
    pairs: list[tuple[str, str, str]] = []
    for lineno, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise DataFormatError(
                f"{_where(path, lineno)}: {len(fields)} tab-separated columns; expected {len(columns)} "
                f"({', '.join(columns)})"
            )
        premise = fields[where["premise"]].strip()
        hypothesis = fields[where["hypothesis"]].strip()
        label = fields[where["label"]].strip()
        if label not in NLI_LABELS:
            raise DataFormatError(f"{_where(path, lineno)}: label {label!r} is not one of {NLI_LABELS}")
        pairs.append((premise, hypothesis, label))
    return pairs


# ------------------------------------------------------------------------------------------- text


def read_text_lines(path: PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped of surrounding whitespace."""
    return [stripped for stripped in (line.strip() for line in _read_lines(path)) if stripped]


def split_held_out(lines: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split lines into ``(train, held_out)`` deterministically (same lines, fraction, seed -> same split).

    ``round(len(lines) * fraction)`` lines are held out, chosen at random with ``seed``; at least
    one when ``fraction > 0`` and there are at least 2 lines, and never all of them. Both parts
    keep the original line order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1); got {fraction}")
    lines = list(lines)
    n_held = round(len(lines) * fraction)
    if fraction > 0 and len(lines) >= 2:
        n_held = min(max(n_held, 1), len(lines) - 1)
    else:
        n_held = 0 if len(lines) < 2 else n_held
    held = set(random.Random(seed).sample(range(len(lines)), n_held))
    train = [line for index, line in enumerate(lines) if index not in held]
    held_out = [line for index, line in enumerate(lines) if index in held]
    return train, held_out


# ----------------------------------------------------------------------------------- tokenisation


def _require_fast(tokenizer: Any, what: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{what} needs a fast (Rust `tokenizers`) tokenizer for word_ids(); got "
            f"{type(tokenizer).__name__}. Load it with AutoTokenizer.from_pretrained(..., use_fast=True) "
            "from a directory with a tokenizer.json (or one convertible to it)."
        )


def _model_inputs(encoding: Mapping[str, Any], index: int | None = None) -> dict[str, list[int]]:
    item = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in encoding:
            value = encoding[key] if index is None else encoding[key][index]
            item[key] = list(value)
    return item


class TokenClassificationDataset(torch.utils.data.Dataset):
    """Word-level tagged sentences tokenised for token classification (NER, POS).

    Each sentence is tokenised with ``tokenizer(words, is_split_into_words=True, truncation=True,
    max_length=max_length)``. The first sub-token of each word gets the word's label id; the other
    sub-tokens, special tokens and padding get -100 (ignored by the loss). Words cut off by
    truncation, or that tokenise to nothing, have no labelled position. Items are dicts of lists
    (``input_ids``, ``attention_mask``, ``labels`` and ``token_type_ids`` when the tokenizer makes
    them) for ``transformers.DataCollatorForTokenClassification(tokenizer)``.

    Needs a fast tokenizer (``word_ids()``); a label missing from ``label2id`` raises
    :class:`DataFormatError`. :meth:`word_predictions` maps token-level predictions back to words.
    """

    def __init__(
        self,
        sentences: Sequence[tuple[Sequence[str], Sequence[str]]],
        tokenizer: Any,
        label2id: Mapping[str, int],
        max_length: int = 256,
    ) -> None:
        _require_fast(tokenizer, "TokenClassificationDataset")
        self.sentences = [(list(words), list(tags)) for words, tags in sentences]
        self.label2id = dict(label2id)
        self.max_length = max_length
        for index, (words, tags) in enumerate(self.sentences):
            if len(words) != len(tags):
                raise DataFormatError(f"sentence {index}: {len(words)} words but {len(tags)} tags")
            unknown = sorted(set(tags) - self.label2id.keys())
            if unknown:
                raise DataFormatError(
                    f"sentence {index} ({' '.join(words[:8])!r}...): labels {unknown} are not in "
                    f"label2id {list(self.label2id)}"
                )
        self._items: list[dict[str, list[int]]] = []
        self._word_ids: list[list[int | None]] = []
        if not self.sentences:
            return
        encoding = tokenizer(
            [words for words, _ in self.sentences],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
        )
        for index, (_, tags) in enumerate(self.sentences):
            word_ids = encoding.word_ids(index)
            labels, previous = [], None
            for word_id in word_ids:
                if word_id is None or word_id == previous:
                    labels.append(-100)
                else:
                    labels.append(self.label2id[tags[word_id]])
                previous = word_id
            item = _model_inputs(encoding, index)
            item["labels"] = labels
            self._items.append(item)
            self._word_ids.append(list(word_ids))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self._items[index]

    def word_ids(self, index: int) -> list[int | None]:
        """The word index of each token of item ``index`` (``None`` for special tokens)."""
        return self._word_ids[index]

    def word_predictions(
        self, index: int, token_predictions: Sequence[int], id2label: Mapping[int, str], fill: str = "O"
    ) -> list[str]:
        """One predicted label per word of sentence ``index``, read at its first sub-token.

        ``token_predictions`` are label ids per token position (padding beyond the item's length is
        ignored). Words without a labelled position (truncated away) get ``fill``. The result lines
        up with ``sentences[index][0]``, ready for seqeval against the gold tags.
        """
        words = self.sentences[index][0]
        result = [fill] * len(words)
        previous = None
        for position, word_id in enumerate(self._word_ids[index]):
            if word_id is not None and word_id != previous:
                result[word_id] = id2label[int(token_predictions[position])]
            previous = word_id
        return result


class SentencePairDataset(torch.utils.data.Dataset):
    """Premise/hypothesis pairs tokenised for sequence classification (NLI).

    Each pair is ``tokenizer(premise, hypothesis, truncation=True, max_length=max_length)``; items
    are dicts (``input_ids``, ``attention_mask``, ``token_type_ids`` when made, ``labels``: an int)
    for ``transformers.DataCollatorWithPadding(tokenizer)``. ``label2id`` defaults to
    :data:`NLI_LABELS` in order.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str, str]],
        tokenizer: Any,
        label2id: Mapping[str, int] | None = None,
        max_length: int = 128,
    ) -> None:
        self.pairs = [tuple(pair) for pair in pairs]
        self.label2id = dict(label2id) if label2id is not None else {label: i for i, label in enumerate(NLI_LABELS)}
        self.max_length = max_length
        for index, pair in enumerate(self.pairs):
            if len(pair) != 3:
                raise DataFormatError(f"pair {index}: expected (premise, hypothesis, label); got {len(pair)} fields")
            if pair[2] not in self.label2id:
                raise DataFormatError(f"pair {index}: label {pair[2]!r} is not in label2id {list(self.label2id)}")
        self._items: list[dict[str, Any]] = []
        if not self.pairs:
            return
        encoding = tokenizer(
            [pair[0] for pair in self.pairs],
            [pair[1] for pair in self.pairs],
            truncation=True,
            max_length=max_length,
        )
        for index, pair in enumerate(self.pairs):
            item: dict[str, Any] = _model_inputs(encoding, index)
            item["labels"] = self.label2id[pair[2]]
            self._items.append(item)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._items[index]


def _special_token_template(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single sequence ([CLS] ... [SEP], <s> ... </s>)."""
    sep, cls = getattr(tokenizer, "sep_token_id", None), getattr(tokenizer, "cls_token_id", None)
    probe = "hello world"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    # Fall back on the BERT / XLM-R layout when the probe is not found verbatim.
    if cls is None or sep is None:
        raise ValueError(f"cannot tell which special tokens {type(tokenizer).__name__} adds to a sequence")
    return [cls], [sep]


class MlmDataset(torch.utils.data.Dataset):
    """Raw text lines as fixed-length blocks for masked language modelling.

    All lines are tokenised (without special tokens) and concatenated, with the tokenizer's separator
    token between consecutive lines; the stream is cut into chunks of ``max_length - n_special``
    tokens, and each chunk gets the tokenizer's single-sequence special tokens (``[CLS] ... [SEP]``
    for BERT, ``<s> ... </s>`` for XLM-R). Every block is exactly ``max_length`` long except
    possibly the last (dropped with ``drop_last=True``). Items hold ``input_ids``,
    ``attention_mask`` and ``special_tokens_mask`` (1 on the added tokens and on the separators
    between lines, which are therefore never masked) for
    ``transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)``; masking is
    dynamic, done by the collator at each batch.
    """

    def __init__(self, lines: Sequence[str], tokenizer: Any, max_length: int = 256, drop_last: bool = False) -> None:
        sep = getattr(tokenizer, "sep_token_id", None)
        if sep is None:
            sep = getattr(tokenizer, "eos_token_id", None)
        if sep is None:
            raise ValueError(f"{type(tokenizer).__name__} has no sep (or eos) token to put between lines")
        prefix, suffix = _special_token_template(tokenizer)
        self.n_special = len(prefix) + len(suffix)
        content = max_length - self.n_special
        if content < 1:
            raise ValueError(f"max_length={max_length} leaves no room beside {self.n_special} special tokens")
        self.max_length = max_length
        stream: list[int] = []
        is_sep: list[int] = []
        lines = [line for line in lines if line.strip()]
        if lines:
            # verbose=False: lines longer than the model's maximum are fine here (they are cut into blocks).
            encoded = tokenizer(lines, add_special_tokens=False, verbose=False)["input_ids"]
            for index, ids in enumerate(encoded):
                if index:
                    stream.append(sep)
                    is_sep.append(1)
                stream.extend(ids)
                is_sep.extend([0] * len(ids))
        self.n_tokens = len(stream)
        self._items: list[dict[str, list[int]]] = []
        for start in range(0, len(stream), content):
            chunk = stream[start : start + content]
            if drop_last and len(chunk) < content:
                break
            input_ids = prefix + chunk + suffix
            self._items.append(
                {
                    "input_ids": input_ids,
                    "attention_mask": [1] * len(input_ids),
                    "special_tokens_mask": [1] * len(prefix) + is_sep[start : start + content] + [1] * len(suffix),
                }
            )

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self._items[index]


# ---------------------------------------------------------------------------------------- digests


def _file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of_files(*paths: PathLike) -> str:
    """A content digest of data files, for a manifest's ``training.data`` record.

    One file: the SHA-256 of its bytes (what ``sha256sum`` prints). Several: the SHA-256 of their
    per-file hex digests joined by newlines, in the order given (file names do not enter it).
    """
    if not paths:
        raise ValueError("sha256_of_files needs at least one path")
    digests = [_file_sha256(path) for path in paths]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


def describe_files(paths: Iterable[PathLike], root: PathLike | None = None) -> list[dict[str, Any]]:
    """``{"name", "sha256", "size", "lines"}`` for each file, for a manifest's data record.

    ``name`` is the file name, or the POSIX path relative to ``root`` when given (so that
    ``en/train.txt`` and ``hau/train.txt`` stay distinct); absolute local paths are not recorded.
    ``lines`` counts line ends, plus one for a final line without one.
    """
    records = []
    for path in paths:
        path = Path(path)
        name = path.resolve().relative_to(Path(root).resolve()).as_posix() if root is not None else path.name
        size, lines, last = 0, 0, b"\n"
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                size += len(block)
                lines += block.count(b"\n")
                last = block[-1:]
        if size and last != b"\n":
            lines += 1
        records.append({"name": name, "sha256": _file_sha256(path), "size": size, "lines": lines})
    return records


# ----------------------------------------------------------------------------------- shipped data

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def shipped_files() -> list[str]:
    """Names (POSIX paths under ``sftstore/data``) of the data files shipped with the package."""
    if not _DATA_DIR.is_dir():
        return []
    return sorted(path.relative_to(_DATA_DIR).as_posix() for path in _DATA_DIR.rglob("*") if path.is_file())


def shipped_data(name: str) -> Path:
    """The path of a data file shipped with the package, e.g. ``shipped_data("ner/en/train.txt")``.

    Shipped: ``mlm/{en,hau}.txt``, ``ner/en/{train,dev}.txt`` (CoNLL-2003 slices),
    ``ner/hau/{dev,test}.txt`` (MasakhaNER 1.0) and ``README.md`` (sources and licences).
    Raises ``FileNotFoundError`` listing what is shipped when ``name`` is not one of them.
    """
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        raise ValueError(f"shipped data name {name!r} must be a relative path such as 'ner/en/train.txt'")
    path = _DATA_DIR.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"no shipped data file {name!r} in {_DATA_DIR}; shipped: {shipped_files()}")
    return path
