"""Language deltas: sparse fine-tuning with masked language modelling on raw text of one language.

As in the paper (section 4.2): input and output embeddings are untied and the output matrix is
frozen (otherwise most selected entries land in the embeddings), LayerNorm parameters are frozen,
dynamic masking (15%), a held-out split whose lowest loss picks the checkpoint. The MLM head
trains but is not part of the delta.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch
from torch import nn
from transformers import DataCollatorForLanguageModeling

from .. import __version__
from ..config import measured
from ..delta import SparseDelta, config_for_base
from ..modeling import load_model, load_tokenizer
from ..settings import base_key
from .data import MlmDataset, describe_files, read_text_lines, split_held_out
from .lt_sft import SparseFineTuningArguments, train_sparse
from .options import TrainingOptions


def prepare_mlm_model(base: str | os.PathLike, revision: str | None = None) -> nn.Module:
    """A masked-LM model with its output matrix untied from the input embeddings and frozen,
    and every LayerNorm frozen."""
    model = load_model(base, "masked-lm", revision=revision)
    output = model.get_output_embeddings()
    if output.weight is model.get_input_embeddings().weight:
        output.weight = nn.Parameter(output.weight.detach().clone())
    model.config.tie_word_embeddings = False
    output.weight.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            for param in module.parameters():
                param.requires_grad_(False)
    return model.train()


def train_language_delta(
    base: str | os.PathLike,
    language: str,
    text_files: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    sft: SparseFineTuningArguments,
    options: TrainingOptions,
    held_out_fraction: float = 0.05,
    max_lines: int | None = None,
    held_out_max_lines: int | None = None,
    revision: str | None = None,
    resume: bool = False,
) -> SparseDelta:
    """Train a language delta on `text_files` (the first `max_lines` lines, if given); return it (not stored).

    `held_out_max_lines` caps the held-out lines that pick the checkpoint (they cost an evaluation each time)."""
    started = time.time()
    options = options.fitted_to(base, revision)
    tokenizer = load_tokenizer(base, revision)
    lines = [line for path in text_files for line in read_text_lines(path)][:max_lines]
    train_lines, held_out = split_held_out(lines, held_out_fraction, seed=options.seed)
    held_out = held_out[:held_out_max_lines]
    train_set = MlmDataset(train_lines, tokenizer, options.max_length)
    eval_set = MlmDataset(held_out, tokenizer, options.max_length)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    args = options.training_arguments(str(output_dir), metric="loss", greater_is_better=False)
    sft.phase1_overrides = {**options.phase1_overrides(), **sft.phase1_overrides}
    torch.manual_seed(options.seed)  # reproducible initialisation of a head the checkpoint lacks
    result = train_sparse(
        lambda: prepare_mlm_model(base, revision), args, sft, resume=resume, keep_head=False,
        train_dataset=train_set, eval_dataset=eval_set, data_collator=collator,
        **options.trainer_kwargs(label=f"lang/{language}"),
    )
    best = [phase["best_metric"] for phase in result.log["phases"]][-1]
    config = config_for_base(
        load_model(base, "masked-lm", revision=revision),
        base_id=base_key(base),
        base_revision=revision,
        kind="language",
        language=language,
        method=sft.record(),
        requested_k=result.log.get("k"),
        training={
            "data": describe_files(text_files),
            "lines": {"train": len(train_lines), "held_out": len(held_out)},
            "blocks": {"train": len(train_set), "held_out": len(eval_set)},
            "options": options.record(),
            "log": result.log,
            "wall_seconds": round(time.time() - started, 1),
            "library": f"sftstore {__version__}",
        },
        metrics={"held_out_mlm_loss": measured(best)},
    )
    return SparseDelta(result.params, config)

