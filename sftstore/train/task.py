"""Task deltas: sparse fine-tuning on labelled source-language data, and scoring on target data.

NER reads CoNLL files (entity types the target data lacks map to O: MISC and DATE by default, as
the paper does), POS reads CoNLL-U (UPOS), NLI reads premise/hypothesis/label TSV. The source
language's delta is applied to theta0 during training and is not part of the result (the delta is
`theta - (base + phi_source)`; `lineage` records it). The head trains densely; the dev-set metric
picks the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

from .. import __version__
from ..compose import check_base
from ..config import measured
from ..delta import SparseDelta, config_for_base
from ..modeling import fingerprint, load_model, load_tokenizer
from ..settings import base_key
from .data import (
    NER_DEFAULT_LABELS,
    NER_TARGET_MAP,
    NLI_LABELS,
    SentencePairDataset,
    TokenClassificationDataset,
    describe_files,
    label_list,
    read_conll,
    read_conllu,
    read_nli_tsv,
)
from .evaluate import TASK_METRICS, predict, score_labels, score_tags, sequence_metrics, token_metrics
from .lt_sft import SparseFineTuningArguments, train_sparse
from .multi_source import LanguageTaggedDataset, MultiSourceTrainer
from .options import TrainingOptions, fit_max_length

TASK_TYPES = {"ner": "token-classification", "pos": "token-classification", "nli": "sequence-classification"}


@dataclass
class TaskData:
    """Examples of one task read from files: tagged sentences, or (premise, hypothesis, label) triples."""

    task: str
    examples: list
    files: list[str]

    @classmethod
    def read(cls, task: str, files: Sequence[str | os.PathLike], label_map: Mapping[str, str] | None = None) -> TaskData:
        if task not in TASK_TYPES:
            raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASK_TYPES)}")
        examples = []
        for path in files:
            if task == "ner":
                examples += read_conll(path, label_map=NER_TARGET_MAP if label_map is None else label_map)
            elif task == "pos":
                examples += read_conllu(path)
            else:
                examples += read_nli_tsv(path)
        return cls(task, examples, [os.fspath(f) for f in files])

    def head(self, count: int | None) -> TaskData:
        """The first `count` examples (all when None)."""
        return TaskData(self.task, self.examples[:count], self.files)

    def labels(self) -> list[str]:
        if self.task == "nli":
            return list(NLI_LABELS)
        return label_list(self.examples, NER_DEFAULT_LABELS if self.task == "ner" else None)

    def dataset(self, tokenizer, labels: Sequence[str], max_length: int):
        label2id = {label: i for i, label in enumerate(labels)}
        if self.task == "nli":
            return SentencePairDataset(self.examples, tokenizer, label2id=label2id, max_length=max_length)
        return TokenClassificationDataset(self.examples, tokenizer, label2id, max_length=max_length)


def collator_for(task: str, tokenizer):
    return DataCollatorWithPadding(tokenizer) if task == "nli" else DataCollatorForTokenClassification(tokenizer)


def train_task_delta(
    base: str | os.PathLike,
    task: str,
    train: TaskData | Sequence[TaskData],
    dev: TaskData | Sequence[TaskData],
    output_dir: str | os.PathLike,
    *,
    sft: SparseFineTuningArguments,
    options: TrainingOptions,
    source_deltas: Sequence[SparseDelta] = (),
    lineage: Mapping | None = None,
    name: str | None = None,
    revision: str | None = None,
    resume: bool = False,
) -> SparseDelta:
    """Train a task delta with the source-language deltas applied; return it (not yet stored).

    Multi-source: give one `train` and one `dev` set per source-language delta (same order); each
    batch then comes from one language, with its delta applied for the step. `name` files the
    delta under another task name than `task` (e.g. `ner-conll`).
    """
    started = time.time()
    options = options.fitted_to(base, revision)
    task_type = TASK_TYPES[task]
    trains, devs = ([train], [dev]) if isinstance(train, TaskData) else (list(train), list(dev))
    multi_source = len(trains) > 1
    if multi_source and not len(trains) == len(devs) == len(source_deltas):
        raise ValueError(f"multi-source training needs one train and one dev set per source language delta; got "
                         f"{len(trains)} train, {len(devs)} dev, {len(source_deltas)} deltas")
    tokenizer = load_tokenizer(base, revision)
    labels = TaskData(task, [e for data in trains for e in data.examples], []).labels()
    train_sets = [data.dataset(tokenizer, labels, options.max_length) for data in trains]
    dev_sets = [data.dataset(tokenizer, labels, options.max_length) for data in devs]
    metric = TASK_METRICS[task]
    compute_metrics = sequence_metrics if task == "nli" else token_metrics(task, dict(enumerate(labels)))
    base_id = base_key(base)

    def make_model() -> nn.Module:
        model = load_model(base, task_type, labels, revision)
        digests = fingerprint(model)
        for delta in source_deltas:
            check_base(delta, base_id, digests)
            if not multi_source:  # multi-source: applied per batch by the trainer
                delta.apply(model)
        return model.train()

    args = options.training_arguments(str(output_dir), metric=metric, greater_is_better=True)
    sft.phase1_overrides = {**options.phase1_overrides(), **sft.phase1_overrides}
    data = {"train_dataset": train_sets[0], "eval_dataset": dev_sets[0]}
    if multi_source:
        args = dataclasses.replace(args, remove_unused_columns=False)
        data = {"train_dataset": LanguageTaggedDataset(train_sets), "eval_dataset": LanguageTaggedDataset(dev_sets),
                "trainer_class": MultiSourceTrainer, "language_deltas": list(source_deltas)}
    torch.manual_seed(options.seed)  # the same head initialisation for the same seed
    result = train_sparse(
        make_model, args, sft, resume=resume, data_collator=collator_for(task, tokenizer),
        compute_metrics=compute_metrics, **data, **options.trainer_kwargs(label=f"task/{name or task}"),
    )
    config = config_for_base(
        load_model(base, task_type, labels, revision),
        base_id=base_id,
        base_revision=revision,
        kind="task",
        task=name or task,
        task_type=task_type,
        labels=labels,
        method=sft.record(),
        requested_k=result.log.get("k"),
        training={
            "data": {"train": [describe_files(d.files) for d in trains], "dev": [describe_files(d.files) for d in devs]},
            "examples": {"train": [len(d.examples) for d in trains], "dev": [len(d.examples) for d in devs]},
            "options": options.record(),
            "log": result.log,
            "wall_seconds": round(time.time() - started, 1),
            "library": f"sftstore {__version__}",
        },
        metrics={f"dev_{metric}": measured(result.log["phases"][-1]["best_metric"])},
        lineage=dict(lineage or {}),
    )
    return SparseDelta(result.params, config, result.head)


def evaluate_task(model: nn.Module, tokenizer, data: TaskData, labels: Sequence[str], max_length: int = 256,
                  batch_size: int = 32, bars: bool = False, desc: str = "evaluating") -> dict[str, float]:
    """Score a (composed) model on `data`: seqeval entity F1 for NER, accuracy for POS and NLI.

    `max_length` is clamped to what the model's position embeddings take; `bars`: a bar (`desc`) on stderr."""
    max_length = fit_max_length(model.config, max_length)
    id2label = dict(enumerate(labels))
    # gold labels the model lacks only need ids to tokenise; they are simply never predicted
    eval_labels = list(labels) + [label for label in data.labels() if label not in labels]
    dataset = data.dataset(tokenizer, eval_labels, max_length)
    predictions = predict(model, dataset, collator_for(data.task, tokenizer), batch_size, bars=bars, desc=desc)
    if data.task == "nli":
        return score_labels([label for _, _, label in data.examples], [id2label[p] for p in predictions])
    predicted = [dataset.word_predictions(i, row, id2label) for i, row in enumerate(predictions)]
    return score_tags(data.task, [tags for _, tags in data.examples], predicted)
