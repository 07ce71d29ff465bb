"""The manifest of a delta (`sft_config.json`): what it is, which base it belongs to, how it was made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import DeltaFormatError, InvalidNameError
from .modeling import TASK_TYPES, BaseFingerprint
from .naming import KINDS, validate_name

FORMAT_VERSION = 1
# Manifest fields computed from the tensors when an artifact is written (and checked when read).
DERIVED_FIELDS = ("format_version", "nnz", "density", "values_dtype", "tensors_sha256")
OPTIONAL_DERIVED_FIELDS = ("masks_sha256",)  # present when the artifact has sft_masks.safetensors


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
        """Raise `DeltaFormatError` naming the first field that is missing or malformed."""

        def fail(field_name: str, expected: str) -> None:
            value = getattr(self, field_name, None)
            raise DeltaFormatError(f"field '{field_name}' is {value!r}; expected {expected}")

        if self.kind not in KINDS:
            fail("kind", "'language' or 'task'")
        name_field = "language" if self.kind == "language" else "task"
        if not getattr(self, name_field):
            fail(name_field, f"the {name_field} name of a {self.kind} delta")
        try:
            validate_name(getattr(self, name_field), f"field '{name_field}'")
        except InvalidNameError as exc:
            raise DeltaFormatError(str(exc)) from None
        if self.task_type not in TASK_TYPES:
            fail("task_type", f"one of {', '.join(TASK_TYPES)}")
        if self.task_type in ("token-classification", "sequence-classification"):
            if not self.labels or not all(isinstance(x, str) for x in self.labels):
                fail("labels", "the ordered list of label names of a classification task")
            if len(set(self.labels)) != len(self.labels):
                fail("labels", "distinct label names")
        if isinstance(self.num_parameters, bool) or not isinstance(self.num_parameters, int) or self.num_parameters <= 0:
            fail("num_parameters", "a positive integer (the base model's parameter count)")
        if not isinstance(self.method, dict) or not isinstance(self.method.get("name"), str):
            fail("method", "an object with a 'name'")
        for name in ("id", "arch_digest", "weights_digest"):
            if not isinstance(getattr(self.base_model, name), str) or not getattr(self.base_model, name):
                raise DeltaFormatError(f"field 'base_model.{name}' must be a non-empty string")

    def to_dict(self) -> dict[str, Any]:
        """The manifest's descriptive fields, unknown ones (`extra`) included at the top level."""
        data = dataclasses.asdict(self)
        return {**data.pop("extra"), **data}

    @classmethod
    def from_dict(cls, data: Any, source: str = "sft_config.json") -> "DeltaConfig":
        """Build and validate a config from parsed JSON; errors name `source` and the field."""
        try:
            if not isinstance(data, dict):
                raise DeltaFormatError("expected a JSON object")
            missing = [name for name in ("kind", "base_model", "num_parameters") if name not in data]
            if missing:
                raise DeltaFormatError(f"missing required field(s): {', '.join(missing)}")
            base = data["base_model"]
            if not isinstance(base, dict) or not {"id", "arch_digest", "weights_digest"} <= base.keys():
                raise DeltaFormatError("field 'base_model' must hold id, arch_digest and weights_digest")
            known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
            kwargs = {k: v for k, v in data.items() if k in known}
            kwargs["extra"] = {k: v for k, v in data.items() if k not in known and k not in DERIVED_FIELDS + OPTIONAL_DERIVED_FIELDS}
            base_known = {f.name for f in dataclasses.fields(BaseModelInfo)}
            kwargs["base_model"] = BaseModelInfo(**{k: v for k, v in base.items() if k in base_known})
            return cls(**kwargs)
        except (DeltaFormatError, TypeError) as exc:
            raise DeltaFormatError(f"{source}: {exc}") from None
