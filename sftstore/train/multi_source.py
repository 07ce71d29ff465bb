"""Multi-source task training: every batch comes from one source language, whose delta is applied
for that step (Ansell et al., 2022, section 4.4).

The language delta is added in place before the forward pass (`compute_loss`) and reverted,
bit-exactly, before the optimizer step and after each evaluation, so the optimizer only ever
updates theta and the task delta never contains a language delta.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import TrainerCallback

from ..delta import AppliedDelta, SparseDelta
from .sparse_trainer import SparseFineTuningTrainer

LANGUAGE_KEY = "source_language"


class LanguageTaggedDataset(Dataset):
    """The concatenation of one dataset per source language, each item tagged with its language index."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        self.items = [(language, index) for language, data in enumerate(datasets) for index in range(len(data))]
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict:
        language, index = self.items[position]
        return {**self.datasets[language][index], LANGUAGE_KEY: language}

    def languages(self) -> list[int]:
        return [language for language, _ in self.items]


class OneLanguageBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of one language each: indices shuffled within each language, batches shuffled; a new
    order every pass (seeded)."""

    def __init__(self, languages: Sequence[int], batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.languages, self.batch_size, self.seed, self.shuffle = list(languages), batch_size, seed, shuffle
        self.passes = 0

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        batches = []
        for language in sorted(set(self.languages)):
            members = torch.tensor([i for i, lang in enumerate(self.languages) if lang == language])
            if self.shuffle:
                members = members[torch.randperm(len(members), generator=generator)]
            batches += [members[i : i + self.batch_size].tolist() for i in range(0, len(members), self.batch_size)]
        order = torch.randperm(len(batches), generator=generator).tolist() if self.shuffle else range(len(batches))
        return [batches[i] for i in order]

    def __iter__(self):
        batches = self._batches()
        self.passes += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self._batches())


class _RevertLanguage(TrainerCallback):
    def __init__(self, trainer: "MultiSourceTrainer") -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.revert_language()

    def on_evaluate(self, args, state, control, **kwargs):
        self.trainer.revert_language()

    def on_predict(self, args, state, control, **kwargs):
        self.trainer.revert_language()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.revert_language()


class MultiSourceTrainer(SparseFineTuningTrainer):
    """`SparseFineTuningTrainer` whose batches each apply their source language's delta.

    Needs `remove_unused_columns=False` (the language tag must reach `compute_loss`).
    """

    def __init__(self, *args, language_deltas: Sequence[SparseDelta], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("multi-source training needs TrainingArguments(remove_unused_columns=False)")
        self.language_deltas = list(language_deltas)
        self._applied: tuple[int, AppliedDelta] | None = None
        self.add_callback(_RevertLanguage(self))

    def revert_language(self) -> None:
        if self._applied is not None:
            self._applied[1].revert()
            self._applied = None

    def use_language(self, language: int) -> None:
        if self._applied is not None and self._applied[0] == language:
            return
        self.revert_language()
        self._applied = (language, self.language_deltas[language].apply(self.model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        languages = inputs.pop(LANGUAGE_KEY)
        if len(set(languages.tolist())) != 1:
            raise RuntimeError("a multi-source batch mixes source languages")
        self.use_language(int(languages[0]))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _one_language_loader(self, dataset: LanguageTaggedDataset, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = OneLanguageBatches(dataset.languages(), batch_size, self.args.seed, shuffle)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)
        return self.accelerator.prepare(loader)

    def get_train_dataloader(self) -> DataLoader:
        return self._one_language_loader(self.train_dataset, self._train_batch_size, shuffle=True)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = eval_dataset if isinstance(eval_dataset, Dataset) else self.eval_dataset
        return self._one_language_loader(dataset, self.args.eval_batch_size, shuffle=False)
