"""User-facing training hyper-parameters and their `transformers.TrainingArguments`; the sequence length a
base model can take."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from ..modeling import loading_base, position_limit
from .progress import Progress, bars_wanted, echo
from .slow_fast import SlowFastPolicy

# Architectures whose position ids start after the padding id (RoBERTa's scheme): pad_token_id + 1 fewer usable.


@dataclass
class TrainingOptions:
    """The knobs `sft train-lang` / `sft train-task` expose (paper defaults where it gives them).

    `max_steps` (if set) overrides `epochs`; `phase1_epochs` / `phase1_max_steps` shorten LT-SFT's
    first phase (the paper: 3 of 10 epochs for NER/POS). Checkpoints are evaluated every
    `eval_steps` and the best one (lowest held-out loss, or highest dev metric) is kept.
    `progress`: bars (True), none (False), or bars on a terminal only (None); `log_every`: a log line
    (step, loss, lr, elapsed, ETA) every N steps on stderr, bars or not (0: none).
    `eval_batch_size`: the batch of dev evaluation (None: max(batch_size, 32)).
    """

    learning_rate: float = 5e-5
    batch_size: int = 8
    max_length: int = 256
    epochs: float = 10.0
    max_steps: int = -1
    phase1_epochs: float | None = None
    phase1_max_steps: int | None = None
    eval_steps: int = 250
    weight_decay: float = 0.0
    seed: int = 42
    use_cpu: bool = False
    progress: bool | None = None
    log_every: int = 50
    eval_batch_size: int | None = None
    lr_policy: str | None = None  # "slow-fast": Fine-tuning Slow and Fast's multipliers (paper defaults)
    extra: dict[str, Any] = field(default_factory=dict)

    def training_arguments(self, output_dir: str, metric: str, greater_is_better: bool) -> TrainingArguments:
        return TrainingArguments(
            output_dir=output_dir,
            learning_rate=self.learning_rate,
            lr_scheduler_type="linear",
            weight_decay=self.weight_decay,
            per_device_train_batch_size=self.batch_size,
            per_device_eval_batch_size=self.eval_batch_size or max(self.batch_size, 32),
            num_train_epochs=self.epochs,
            max_steps=self.max_steps,
            eval_strategy="steps",
            eval_steps=self.eval_steps,
            save_strategy="steps",
            save_steps=self.eval_steps,
            save_total_limit=1,
            load_best_model_at_end=True,
            metric_for_best_model=metric,
            greater_is_better=greater_is_better,
            logging_steps=self.log_every or max(1, min(50, self.eval_steps)),
            seed=self.seed,
            data_seed=self.seed,
            report_to=[],
            disable_tqdm=True,  # the trainer's own `TrainingProgress` draws the bars and writes the log lines
            use_cpu=self.use_cpu,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available() and not self.use_cpu,
            **self.extra,
        )

    def trainer_kwargs(self, label: str = "") -> dict[str, Any]:
        """What every phase's trainer takes from these options: how it reports progress (its lines
        start with `label`, e.g. `lang/hau`) and the learning-rate policy."""
        kwargs: dict[str, Any] = {"progress": Progress(bars_wanted(self.progress), self.log_every, label)}
        if self.lr_policy is None:
            return kwargs
        if self.lr_policy != "slow-fast":
            raise ValueError(f"unknown lr_policy {self.lr_policy!r}: expected 'slow-fast'")
        return {**kwargs, "lr_policy": SlowFastPolicy(num_layers=0)}  # depth filled in from the model

    def record(self) -> dict[str, Any]:
        """What the manifest's `training.options` records (not how progress was shown)."""
        return {k: v for k, v in vars(self).items() if k not in ("progress", "log_every")}

    def fitted_to(self, base: str | os.PathLike, revision: str | None = None) -> TrainingOptions:
        """These options with `max_length` clamped to what `base`'s position embeddings take (with a notice)."""
        from transformers import AutoConfig

        with loading_base(base, revision) as hub_kwargs:
            config = AutoConfig.from_pretrained(os.fspath(base), revision=revision, **hub_kwargs)
        return dataclasses.replace(self, max_length=fit_max_length(config, self.max_length))

    def phase1_overrides(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        if self.phase1_epochs is not None:
            overrides["num_train_epochs"] = self.phase1_epochs
        if self.phase1_max_steps is not None:
            overrides["max_steps"] = self.phase1_max_steps
        return overrides


def fit_max_length(config, max_length: int) -> int:
    """`max_length`, or the base's limit when that is smaller (saying so on stderr)."""
    limit = position_limit(config)
    if limit is None or max_length <= limit:
        return max_length
    echo(f"note: max length {max_length} is more than the {limit} positions the base model takes; using {limit}")
    return limit
