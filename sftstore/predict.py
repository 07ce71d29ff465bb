"""Readable predictions: a model, its tokenizer and texts in; entities or labels with float scores out.

Token classification: every word (the fast tokenizer's `word_ids`) takes the label its first
sub-token predicts (the sub-token the task delta was trained on) and that label's probability; words
are then merged into entities (`B-X I-X ...`, an `I-X` without `B-X` opens one; labels without a
`B-`/`I-` prefix make one entity per word), each with its character offsets in the input, its text
and the mean of its words' scores. Sequence classification: the most probable label, its probability
and every label's probability. All texts given to `predict` go through one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import SftError
from .modeling import position_limit

PREDICTABLE_TASK_TYPES = ("token-classification", "sequence-classification")
_OUTSIDE = "O"


@dataclass(frozen=True)
class Entity:
    """A span of words sharing one entity label: `text == input[start:end]`."""

    label: str
    score: float
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class TokenPrediction:
    """The entities found in one input (token classification)."""

    entities: list[Entity]

    def to_dict(self) -> dict:
        return {"entities": [asdict(entity) for entity in self.entities]}


@dataclass(frozen=True)
class SequencePrediction:
    """The label of one input (sequence classification), with every label's probability."""

    label: str
    score: float
    scores: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


Prediction = TokenPrediction | SequencePrediction


def task_type_of(deltas) -> str:
    """The task type of the task delta among `deltas`, if it is one `predict` serves; else raise `SftError`."""
    types = [d.config.task_type for d in deltas if d.kind == "task"]
    if not types or types[0] not in PREDICTABLE_TASK_TYPES:
        found = f"task type {types[0]!r}" if types else "no task delta"
        raise SftError(f"predictions need a task delta of type {' or '.join(PREDICTABLE_TASK_TYPES)}; got {found}")
    return types[0]


def max_tokens(model: nn.Module, tokenizer) -> int:
    """The longest input (in tokens) the model's position embeddings and the tokenizer allow."""
    return min(position_limit(model.config) or tokenizer.model_max_length, tokenizer.model_max_length)


@torch.inference_mode()
def predict(model: nn.Module, tokenizer, texts: Sequence[str], task_type: str) -> list[Prediction]:
    """One prediction per text, in order (texts longer than the model's window are cut at its end)."""
    if task_type not in PREDICTABLE_TASK_TYPES:
        raise SftError(f"cannot predict for task type {task_type!r}: expected one of {', '.join(PREDICTABLE_TASK_TYPES)}")
    if not getattr(tokenizer, "is_fast", False):
        raise SftError("predictions need a fast (Rust `tokenizers`) tokenizer for word offsets; "
                       f"got {type(tokenizer).__name__}")
    if not texts:
        return []
    encoding = tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens(model, tokenizer),
                         return_offsets_mapping=True, return_tensors="pt")
    offsets = encoding.pop("offset_mapping").tolist()
    device = next(model.parameters()).device
    logits = model(**{name: tensor.to(device) for name, tensor in encoding.items()}).logits
    scores = logits.float().softmax(-1).cpu()
    labels = [model.config.id2label[i] for i in range(scores.shape[-1])]
    if task_type == "sequence-classification":
        return [_classification(row.tolist(), labels) for row in scores]
    return [TokenPrediction(_entities(text, encoding.word_ids(i), offsets[i], scores[i], labels))
            for i, text in enumerate(texts)]


def _classification(probabilities: list[float], labels: list[str]) -> SequencePrediction:
    best = max(range(len(labels)), key=probabilities.__getitem__)
    return SequencePrediction(labels[best], probabilities[best], dict(zip(labels, probabilities)))


def _split_tag(label: str) -> tuple[str, str]:
    """`B-PER` -> (`B`, `PER`); a label without a prefix is its own entity type (`""`, label)."""
    prefix, dash, rest = label.partition("-")
    return (prefix, rest) if dash and prefix in ("B", "I") else ("", label)


def _entities(text: str, word_ids: list[int | None], offsets: list[list[int]], scores: torch.Tensor,
              labels: list[str]) -> list[Entity]:
    words: dict[int, list[int]] = {}  # word -> [first token, last token]
    for token, word in enumerate(word_ids):
        if word is not None:
            words.setdefault(word, [token, token])[1] = token
    entities: list[Entity] = []
    current: tuple[str, int, int, list[float]] | None = None  # (type, start, end, word scores)

    def close() -> None:
        if current is not None:
            kind, start, end, word_scores = current
            entities.append(Entity(kind, sum(word_scores) / len(word_scores), start, end, text[start:end]))

    for first, last in words.values():
        probability, index = scores[first].max(-1)
        prefix, kind = _split_tag(labels[int(index)])
        start, end = offsets[first][0], offsets[last][1]
        if labels[int(index)] == _OUTSIDE:
            close()
            current = None
        elif prefix == "I" and current is not None and current[0] == kind:
            current[3].append(float(probability))
            current = (kind, current[1], end, current[3])
        else:
            close()
            current = (kind, start, end, [float(probability)])
    close()
    return entities
