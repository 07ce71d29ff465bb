"""Scores: entity F1 (seqeval, IOB2) for NER, accuracy for POS and NLI; prediction with a composed model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from seqeval.metrics import f1_score, precision_score, recall_score
from seqeval.scheme import IOB2
from torch import nn
from torch.utils.data import DataLoader

from .progress import bar

# What each task scores, and the metric used to keep the best checkpoint.
TASK_METRICS = {"ner": "f1", "pos": "accuracy", "nli": "accuracy"}


def score_tags(task: str, gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision/recall/F1 (strict IOB2) for NER; token accuracy otherwise."""
    if task == "ner":
        gold, predicted = [list(s) for s in gold], [list(s) for s in predicted]
        kwargs = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
        return {
            "f1": f1_score(gold, predicted, **kwargs),
            "precision": precision_score(gold, predicted, **kwargs),
            "recall": recall_score(gold, predicted, **kwargs),
        }
    pairs = [(g, p) for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps)]
    return {"accuracy": sum(g == p for g, p in pairs) / max(len(pairs), 1)}


def score_labels(gold: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    return {"accuracy": sum(g == p for g, p in zip(gold, predicted)) / max(len(gold), 1)}


def token_metrics(task: str, id2label: dict[int, str]):
    """A `compute_metrics` for the Trainer: word-level tags where labels are not -100."""

    def compute(prediction) -> dict[str, float]:
        logits, labels = prediction.predictions, prediction.label_ids
        best = np.argmax(logits, axis=-1)
        gold, predicted = [], []
        for row_best, row_labels in zip(best, labels):
            keep = row_labels != -100
            gold.append([id2label[int(i)] for i in row_labels[keep]])
            predicted.append([id2label[int(i)] for i in row_best[keep]])
        return score_tags(task, gold, predicted)

    return compute


def sequence_metrics(prediction) -> dict[str, float]:
    """A `compute_metrics` for sentence-pair classification."""
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


@torch.no_grad()
def predict(model: nn.Module, dataset, collator, batch_size: int = 32, bars: bool = False,
            desc: str = "predicting") -> list[list[int]] | list[int]:
    """Arg-max predictions over `dataset`: per-position label ids (token tasks) or one id per item;
    `bars`: a bar (`desc`) on stderr."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    batches = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for batch in bar(batches, bars, desc, total=len(batches)):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        best = model(**batch).logits.argmax(-1).cpu()
        if best.dim() == 1:
            outputs.extend(best.tolist())
        else:
            lengths = batch["attention_mask"].sum(-1).tolist()
            outputs.extend(row[:length].tolist() for row, length in zip(best, lengths))
    return outputs
