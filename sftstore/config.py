"""The manifest of a delta (`sft_config.json`): what it is, which base it belongs to, how it was made.

`FIELD_RULES` and `BASE_MODEL_RULES` are the manifest's schema, the one table of field -> check that both
loading (`DeltaConfig.from_dict`) and building in Python (`DeltaConfig.validate`) apply. Free-form sections
(`method`'s other keys, `training`, `lineage`, unknown fields) must be JSON values nested at most
`MAX_JSON_DEPTH` levels; a whole manifest has at most `MAX_MANIFEST_BYTES`. `metrics` maps names to a finite
number, a string or null (not measured); a NaN or infinite metric is refused, as JSON has no such number.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import repeat
from typing import Any

from .bounded_json import brief, json_problem
from .errors import DeltaFormatError, InvalidNameError
from .modeling import TASK_TYPES, BaseFingerprint
from .naming import KINDS, validate_name

FORMAT_VERSIONS = (1, 2)  # the artifact format versions this sftstore reads and writes (see format.py)
FORMAT_VERSION = 2  # what writers write unless told otherwise
# Manifest fields computed from the tensors when an artifact is written (and checked when read).
DERIVED_FIELDS = ("format_version", "nnz", "density", "values_dtype", "tensors_sha256")
OPTIONAL_DERIVED_FIELDS = ("masks_sha256",)  # present when the artifact has sft_masks.safetensors
CONFIG_REQUIRED = ("kind", "base_model", "num_parameters")  # what a config dict must hold
MANIFEST_REQUIRED = (*CONFIG_REQUIRED, "created_at", *DERIVED_FIELDS)  # what an `sft_config.json` must hold
VALUES_DTYPES = ("float32", "bfloat16", "float16")

MAX_MANIFEST_BYTES = 16 * 2**20
MAX_NAME_CHARS = 256  # names, ids, digests
MAX_PATH_CHARS = 4096  # base_model.id: a Hub id, or the absolute path of a local base
MAX_TEXT_CHARS = 64 * 2**10  # free text
MAX_LIST_ITEMS = 100_000
MAX_INT = 2**63 - 1
_TIMESTAMP_CHARS = 64
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_parse_timestamp = datetime.fromisoformat  # bound once: a clock swapped in for `datetime` need not parse


# ---- the schema ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A manifest field's check, and what it expects (for the error message)."""

    check: Callable[[Any], bool]
    expected: str


def _string(max_chars: int, non_empty: bool = False) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and len(value) <= max_chars and (bool(value) or not non_empty)


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in choices


def _integer(minimum: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= MAX_INT


def _is_finite_number(value: Any) -> bool:
    """An int (any size: never converted to float) or a finite float; not a bool."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and math.isfinite(value))


def _is_names(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) <= MAX_LIST_ITEMS \
        and all(_string(MAX_NAME_CHARS)(item) for item in value)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict) and all(map(isinstance, value, repeat(str)))


def _is_method(value: Any) -> bool:
    return _is_object(value) and _string(MAX_NAME_CHARS)(value.get("name"))


def _is_metrics(value: Any) -> bool:
    return _is_object(value) and all(
        len(name) <= MAX_NAME_CHARS and (metric is None or _is_finite_number(metric) or _string(MAX_TEXT_CHARS)(metric))
        for name, metric in value.items()
    )


def _is_timestamp(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > _TIMESTAMP_CHARS:
        return False
    try:
        _parse_timestamp(value)
    except ValueError:
        return False
    return True


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256_RE.fullmatch(value) is not None


_NAME = f"a string of at most {MAX_NAME_CHARS} characters"
_NAMES = f"a list of at most {MAX_LIST_ITEMS:,} strings of at most {MAX_NAME_CHARS} characters"
_INTEGER = "an integer in 0..2**63-1"
# Every top-level field the manifest knows: its check and what it expects. Unknown fields are kept (`extra`).
FIELD_RULES: dict[str, Rule] = {
    "format_version": Rule(lambda value: type(value) is int and value in FORMAT_VERSIONS,
                           f"one of {', '.join(map(str, FORMAT_VERSIONS))} (the format versions this sftstore reads)"),
    "kind": Rule(_one_of(KINDS), "'language' or 'task'"),
    "language": Rule(_or_null(_string(MAX_NAME_CHARS)), f"{_NAME}, or null"),
    "languages": Rule(_is_names, _NAMES),
    "task": Rule(_or_null(_string(MAX_NAME_CHARS)), f"{_NAME}, or null"),
    "task_type": Rule(_one_of(TASK_TYPES), f"one of {', '.join(TASK_TYPES)}"),
    "labels": Rule(_is_names, _NAMES),
    "base_model": Rule(_is_object, "an object with id, arch_digest and weights_digest (and revision)"),
    "method": Rule(_is_method, f"an object with a 'name' ({_NAME})"),
    "num_parameters": Rule(_integer(1), "a positive integer up to 2**63-1 (the base model's parameter count)"),
    "requested_k": Rule(_or_null(_integer(0)), f"{_INTEGER} (K, the entries training was asked to select), or null"),
    "nnz": Rule(_integer(0), _INTEGER),
    "density": Rule(lambda value: _is_finite_number(value) and 0 <= value <= 1, "a number in [0, 1]"),
    "values_dtype": Rule(_one_of(VALUES_DTYPES), f"one of {', '.join(VALUES_DTYPES)}"),
    "tensors_sha256": Rule(_is_sha256, "a sha256 (64 lowercase hex digits)"),
    "masks_sha256": Rule(_is_sha256, "a sha256 (64 lowercase hex digits)"),
    "training": Rule(_is_object, "a JSON object (string keys)"),
    "metrics": Rule(_is_metrics, f"a JSON object of metric names ({_NAME}) to a finite number, a string or null"),
    "lineage": Rule(_is_object, "a JSON object (string keys)"),
    "license": Rule(_or_null(_string(MAX_NAME_CHARS)), f"{_NAME}, or null"),
    "created_at": Rule(_is_timestamp, "an ISO 8601 timestamp string"),
}
BASE_MODEL_REQUIRED = ("id", "arch_digest", "weights_digest")
BASE_MODEL_RULES: dict[str, Rule] = {
    "id": Rule(_string(MAX_PATH_CHARS, non_empty=True), f"a non-empty string of at most {MAX_PATH_CHARS} characters"),
    "arch_digest": Rule(_string(MAX_NAME_CHARS, non_empty=True), f"a non-empty {_NAME[2:]}"),
    "weights_digest": Rule(_string(MAX_NAME_CHARS, non_empty=True), f"a non-empty {_NAME[2:]}"),
    "revision": Rule(_or_null(_string(MAX_NAME_CHARS)), f"{_NAME}, or null"),
}


def check_fields(data: Mapping[str, Any], rules: Mapping[str, Rule], prefix: str = "") -> None:
    """Raise `DeltaFormatError` naming the first field of `data` that breaks its rule."""
    for name, rule in rules.items():
        if name in data and not rule.check(data[name]):
            raise DeltaFormatError(f"field '{prefix}{name}' is {brief(data[name])}; expected {rule.expected}")


def measured(value: float | None) -> float | None:
    """A metric as the manifest records it: a NaN or infinite score (a diverged run) is null, not measured."""
    return value if value is None or math.isfinite(value) else None


# ---- the config ------------------------------------------------------------------------------------


@dataclass
class BaseModelInfo:
    """The base model a delta was computed against."""

    id: str
    arch_digest: str
    weights_digest: str
    revision: str | None = None

    @property
    def fingerprint(self) -> BaseFingerprint:
        return BaseFingerprint(self.arch_digest, self.weights_digest)


@dataclass
class DeltaConfig:
    """Descriptive fields of the manifest. Fields derived from the tensors (`nnz`, `density`,
    `values_dtype`, `tensors_sha256`) are computed when the artifact is written and checked on load."""

    kind: str
    base_model: BaseModelInfo
    num_parameters: int
    language: str | None = None
    languages: list[str] = field(default_factory=list)
    task: str | None = None
    task_type: str | None = None
    labels: list[str] = field(default_factory=list)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "unknown"})
    requested_k: int | None = None  # K asked of a sparse training run (`nnz` is what was stored); None: not one
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    license: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)  # manifest fields this version does not know: kept

    def __post_init__(self) -> None:
        if self.kind == "language" and self.task_type is None:
            self.task_type = "masked-lm"
        if self.kind == "language" and self.language and not self.languages:
            self.languages = [self.language]
        self.validate()

    @property
    def name(self) -> str:
        """The name the store files this delta under: the language code or the task name."""
        return self.language if self.kind == "language" else self.task

    def validate(self) -> None:
        """Raise `DeltaFormatError` naming the first field that is missing or malformed: the schema's rules,
        the rules between fields, and the JSON bounds (nesting depth, manifest size)."""
        if not isinstance(self.base_model, BaseModelInfo):
            raise DeltaFormatError(f"field 'base_model' is {brief(self.base_model)}; expected a BaseModelInfo")
        check_fields(vars(self.base_model), BASE_MODEL_RULES, "base_model.")
        check_fields({**vars(self), "base_model": vars(self.base_model)}, FIELD_RULES)
        self._check_cross_field_rules()
        self._check_json_bounds()

    def _check_cross_field_rules(self) -> None:
        """The delta's name is valid for its kind; a classification task has distinct labels."""

        def fail(field_name: str, expected: str) -> None:
            raise DeltaFormatError(f"field '{field_name}' is {brief(getattr(self, field_name))}; expected {expected}")

        name_field = "language" if self.kind == "language" else "task"
        if not getattr(self, name_field):
            fail(name_field, f"the {name_field} name of a {self.kind} delta")
        try:
            validate_name(getattr(self, name_field), f"field '{name_field}'")
        except InvalidNameError as exc:
            raise DeltaFormatError(str(exc)) from None
        if self.task_type in ("token-classification", "sequence-classification"):
            if not self.labels:
                fail("labels", "the ordered list of label names of a classification task")
            if len(set(self.labels)) != len(self.labels):
                fail("labels", "distinct label names")

    def _check_json_bounds(self) -> None:
        """Every field a JSON value nested at most `MAX_JSON_DEPTH` levels; the fields at most `MAX_MANIFEST_BYTES`
        as compact JSON (so a config that can be written can be read back, but for indentation)."""
        if not _is_object(self.extra):
            raise DeltaFormatError(f"field 'extra' is {brief(self.extra)}; expected a dict of unknown manifest fields")
        known = {name: value for name, value in vars(self).items() if name != "extra"}
        size = 0
        for name, value in {**self.extra, **known, "base_model": vars(self.base_model)}.items():
            problem = json_problem(value, depth=2)  # the manifest object is level 1
            if problem is not None:
                raise DeltaFormatError(f"field {brief(name)} {problem}")
            try:
                size += len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
            except UnicodeEncodeError:
                raise DeltaFormatError(f"field {brief(name)} holds text that is not valid Unicode (a lone "
                                       "surrogate); expected UTF-8 text") from None
        if size > MAX_MANIFEST_BYTES:
            raise DeltaFormatError(f"the manifest's fields take {size:,} bytes as compact JSON; "
                                   f"at most {MAX_MANIFEST_BYTES:,} are allowed")

    def _as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {**data.pop("extra"), **data}

    def to_dict(self) -> dict[str, Any]:
        """The manifest's descriptive fields, unknown ones (`extra`) included at the top level; validated
        again first, so a config changed after it was built cannot write a manifest that loading refuses."""
        self.validate()
        return self._as_dict()

    @classmethod
    def from_dict(cls, data: Any, source: str = "sft_config.json", required: tuple[str, ...] = CONFIG_REQUIRED
                  ) -> DeltaConfig:
        """Build and validate a config from parsed JSON (every field of `FIELD_RULES` checked, derived ones
        included, before any is used); errors name `source` and the field."""
        try:
            if not isinstance(data, dict):
                raise DeltaFormatError("expected a JSON object")
            missing = [name for name in required if name not in data]
            if missing:
                raise DeltaFormatError(f"missing required field(s): {', '.join(missing)}")
            check_fields(data, FIELD_RULES)
            base = data["base_model"]
            missing = [name for name in BASE_MODEL_REQUIRED if name not in base]
            if missing:
                raise DeltaFormatError(f"field 'base_model' lacks {', '.join(missing)}")
            check_fields(base, BASE_MODEL_RULES, "base_model.")
            known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
            kwargs = {k: v for k, v in data.items() if k in known}
            derived = DERIVED_FIELDS + OPTIONAL_DERIVED_FIELDS
            kwargs["extra"] = {k: v for k, v in data.items() if k not in known and k not in derived}
            base_known = {f.name for f in dataclasses.fields(BaseModelInfo)}
            kwargs["base_model"] = BaseModelInfo(**{k: v for k, v in base.items() if k in base_known})
            return cls(**kwargs)
        except DeltaFormatError as exc:
            raise DeltaFormatError(f"{source}: {exc}") from None
