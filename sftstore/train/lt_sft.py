"""Sparse fine-tuning runs: LT-SFT (Ansell et al., 2022, Algorithm 1) and its variants.

- `lt-sft`: phase 1 fine-tunes every trainable base parameter; the K entries that moved most
  (`|theta1 - theta0|`, one global top-K) form the support; the model is reset to theta0 (the head
  to the same initial values as in phase 1) and phase 2 trains the support only. With `rounds=n`,
  each round adds K/n entries: its phase 1 starts from the previous round's sparse solution, its
  selection keeps every entry already chosen, and its phase 2 restarts from theta0 plus the
  previous solution.
- `rand-sft`: K entries drawn uniformly at random, then phase 2 only.
- `bitfit`: every bias entry, then phase 2 only.
- `full`: dense fine-tuning; the delta keeps every entry that changed.

The delta of a sparse method holds its whole support: an entry selected but never moved (no
gradient reached it) is stored with value 0, so the stored nnz is the K that was asked for.

A run needs `make_model()`, which returns a fresh model at theta0 (for task training: the base with
the source-language delta applied, frozen parameters already frozen); theta0 is re-created with it
whenever needed rather than kept resident.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..delta import ParameterDelta, index_dtype_for
from ..modeling import base_parameters, head_parameters
from .masks import bias_mask, lottery_ticket_mask, parse_budget, random_mask, top_k_mask
from .sparse_trainer import SparseFineTuningTrainer, Support

METHODS = ("lt-sft", "rand-sft", "bitfit", "full")


@dataclass
class SparseFineTuningArguments:
    """What to train sparsely, beyond the `TrainingArguments` of the (final) training phase."""

    method: str = "lt-sft"
    num_params: str | int | None = None  # K as a count: 7.6M, 500k, 123456
    density: float | None = None  # or K as a fraction of the base parameters
    phase1_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"num_train_epochs": 3}
    l1_lambda: float = 0.0
    rounds: int = 1
    seed: int = 42

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.rounds < 1 or (self.rounds > 1 and self.method != "lt-sft"):
            raise ValueError("rounds must be >= 1, and more than one round only applies to lt-sft")

    def record(self) -> dict[str, Any]:
        """The manifest's `method` entry."""
        return {"name": self.method, "num_params": self.num_params, "density": self.density,
                "l1_lambda": self.l1_lambda, "rounds": self.rounds, "seed": self.seed}


@dataclass
class SparseFineTuningResult:
    params: dict[str, ParameterDelta]  # theta - theta0 on the support
    head: dict[str, torch.Tensor]
    log: dict[str, Any]
    model: nn.Module  # the trained model (theta)
    support: Support | None  # None for dense runs


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in base_parameters(model).items() if p.requires_grad}


def _copy_head(model: nn.Module, head: Mapping[str, torch.Tensor]) -> None:
    params = head_parameters(model)
    with torch.no_grad():
        for name, tensor in head.items():
            params[name].copy_(tensor)


class _Run:
    """One sparse fine-tuning run; phases checkpoint under `args.output_dir` so `--resume` works."""

    def __init__(self, make_model, args: TrainingArguments, sft: SparseFineTuningArguments, trainer_kwargs, resume,
                 trainer_class: type[SparseFineTuningTrainer]):
        self.make_model = make_model
        self.trainer_class = trainer_class
        self.args = args
        self.sft = sft
        self.trainer_kwargs = trainer_kwargs
        self.resume = resume
        self.root = Path(args.output_dir)
        self.log: dict[str, Any] = {"method": sft.method, "phases": []}

    def fresh_model(self) -> nn.Module:
        model = self.make_model()
        _copy_head(model, self.head_init)
        return model

    def train(self, model: nn.Module, name: str, support: Support | None, overrides: Mapping[str, Any], **l1) -> nn.Module:
        out = self.root / name
        args = dataclasses.replace(self.args, output_dir=str(out), **overrides)
        trainer = self.trainer_class(model=model, args=args, support=support, l1_lambda=self.sft.l1_lambda,
                                     **l1, **self.trainer_kwargs)
        checkpoint = get_last_checkpoint(str(out)) if self.resume and out.is_dir() else None
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.remove_hooks()
        self.log["phases"].append({"phase": name, "steps": result.global_step, "train_loss": result.training_loss,
                                   "best_metric": trainer.state.best_metric, "resumed_from": checkpoint})
        return trainer.model

    def select(self, tuned: nn.Module, theta0: nn.Module, k: int, keep: Mapping[str, torch.Tensor] | None) -> dict:
        """The support: the K entries that moved most, always including the `keep` entries (earlier rounds)."""
        path = self.root / f"mask-{k}.safetensors"
        current, start = _trainable(tuned), base_parameters(theta0)
        if self.resume and path.is_file():
            return {n: m.to(current[n].device) for n, m in load_file(str(path)).items()}
        if keep is None:  # |theta1 - theta0| scored chunk by chunk: no whole score tensor in memory
            masks = lottery_ticket_mask({n: p.detach() for n, p in current.items()},
                                        {n: start[n].detach() for n in current}, k)
        else:  # later rounds: entries chosen before score +inf, so they stay chosen
            def moved(name: str) -> Callable[[], torch.Tensor]:
                def score() -> torch.Tensor:
                    distance = (current[name].detach().float() - start[name].detach().float()).abs()
                    return distance.masked_fill(keep[name], float("inf"))

                return score

            masks = top_k_mask({name: moved(name) for name in current}, k)
        # every rank of a distributed run selects the same entries; one writes them
        if self.args.process_index == 0:
            save_file({n: m.contiguous().cpu() for n, m in masks.items()}, str(path))
        return masks

    def run(self) -> tuple[nn.Module, Support | None]:
        model = self.make_model()
        self.head_init = {n: p.detach().clone() for n, p in head_parameters(model).items()}
        trainable = _trainable(model)
        total = sum(p.numel() for p in trainable.values())
        # N in the paper's lambda / N: every parameter of the model (frozen, head and untied decoder
        # included), as composable-sft counts it, so that lambda = 0.1 pulls as hard as the paper's
        self.l1_count = sum(p.numel() for p in model.parameters())
        # dense phases pull towards theta0, which then has to stay resident (4 bytes per parameter)
        self.dense_l1 = {"l1_count": self.l1_count}
        if self.sft.l1_lambda:
            self.dense_l1["l1_reference"] = {n: p.detach().clone().float() for n, p in trainable.items()}
        sft = self.sft
        if sft.method == "full":
            return self.train(model, "full", None, {}, **self.dense_l1), None
        k = parse_budget(sft.num_params, sft.density, total)
        self.log["k"] = k
        if sft.method == "bitfit":
            masks = bias_mask(trainable)
        elif sft.method == "rand-sft":
            masks = random_mask(trainable, k, seed=sft.seed)
        else:
            return self.lottery_ticket(model, k)
        support = Support(model, masks)
        return self.train(model, "phase2", support, {}, l1_count=self.l1_count), support

    def lottery_ticket(self, model: nn.Module, k: int) -> tuple[nn.Module, Support]:
        masks = support = None
        previous: dict[str, torch.Tensor] = {}
        for round_index in range(1, self.sft.rounds + 1):
            suffix = "" if self.sft.rounds == 1 else f"-round{round_index}"
            tuned = self.train(model, f"phase1{suffix}", None, self.sft.phase1_overrides, **self.dense_l1)
            theta0 = self.fresh_model()
            masks = self.select(tuned, theta0, round(k * round_index / self.sft.rounds), masks)
            del tuned
            support = Support(theta0, masks)
            if round_index > 1:  # restart from theta0 plus the previous round's solution
                _load_supported(theta0, previous)
            model = self.train(theta0, f"phase2{suffix}", support, {}, l1_count=self.l1_count)
            previous = {n: p.detach().clone() for n, p in base_parameters(model).items() if n in support.indices}
        return model, support


@torch.no_grad()
def _load_supported(model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    params = base_parameters(model)
    for name, tensor in values.items():
        params[name].copy_(tensor)


@torch.no_grad()
def sparse_difference(tuned: nn.Module, theta0: nn.Module | None, support: Support | None) -> dict[str, ParameterDelta]:
    """theta - theta0 on the whole support, entries that never moved included (stored as 0, so a run
    asked for K entries stores K), or, for dense runs, wherever the weights changed."""
    params = base_parameters(tuned)
    result = {}
    if support is not None:
        for name, indices in support.indices.items():
            flat = params[name].detach().reshape(-1)
            values = flat.index_select(0, indices).float() - support.start_values[name]
            if indices.numel():
                result[name] = ParameterDelta(indices.to("cpu", index_dtype_for(flat.numel())), values.cpu(),
                                              tuple(params[name].shape))
        return result
    start = base_parameters(theta0)
    for name, param in params.items():
        diff = (param.detach().float() - start[name].detach().float()).reshape(-1)
        indices = diff.nonzero().squeeze(1)
        if indices.numel():
            result[name] = ParameterDelta(indices.to("cpu", index_dtype_for(diff.numel())), diff[indices].cpu(),
                                          tuple(param.shape))
    return result


def train_sparse(
    make_model: Callable[[], nn.Module],
    args: TrainingArguments,
    sft: SparseFineTuningArguments,
    *,
    resume: bool = False,
    keep_head: bool = True,
    trainer_class: type[SparseFineTuningTrainer] = SparseFineTuningTrainer,
    **trainer_kwargs,
) -> SparseFineTuningResult:
    """Run `sft.method` and return the sparse difference from theta0, the trained head and a log.

    `trainer_kwargs` go to each phase's `trainer_class` (datasets, collator, compute_metrics, callbacks).
    """
    run = _Run(make_model, args, sft, trainer_kwargs, resume, trainer_class)
    model, support = run.run()
    theta0 = make_model() if support is None else None
    params = sparse_difference(model, theta0, support)
    head = {n: p.detach().cpu().clone() for n, p in head_parameters(model).items()} if keep_head else {}
    run.log["nnz"] = sum(p.nnz for p in params.values())
    if args.process_index == 0:
        (Path(args.output_dir) / "sft_run.json").write_text(json.dumps(run.log, indent=2, default=str))
    return SparseFineTuningResult(params, head, run.log, model, support)

