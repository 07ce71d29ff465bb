"""A `transformers.Trainer` whose updates stay inside a sparse support, using only public hooks.

- Gradients outside the support are zeroed during backward, so gradient clipping and the optimizer
  only ever see masked gradients: in place once accumulated into `.grad` (one process), or on
  their way into `.grad` (distributed, where DDP reduces them after accumulation).
- Decoupled weight decay is taken out of the optimizer for supported parameters and applied by a
  step pre-hook inside the support only, so it never moves a frozen entry.
- An optional Slow-Fast learning-rate policy (`lr_policy`) scales each weight set's learning rate. Adam's moments of an
  entry whose gradient is always zero stay zero, so its update is exactly zero.
- An optional L1 term `lambda / N * sum |theta - theta0|` pulls the supported entries towards
  their starting values (`compute_loss`).

Memory beyond plain fine-tuning: per supported parameter, its flat indices (int64) and its starting
values there (float32): 12 bytes per selected entry, e.g. 0.34 bytes per parameter at 2.8% density
(distributed runs add a transient masked copy of the largest gradient).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..modeling import base_parameters
from .progress import Progress, TrainingProgress
from .slow_fast import SlowFastPolicy


class Support:
    """The trainable entries of the base parameters: flat indices and their starting values."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        params = base_parameters(model)
        self.indices: dict[str, torch.Tensor] = {}
        self.start_values: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            flat = params[name].detach().reshape(-1)
            indices = mask.reshape(-1).to(flat.device).nonzero().squeeze(1)
            self.indices[name] = indices
            self.start_values[name] = flat.index_select(0, indices).float()

    @property
    def nnz(self) -> int:
        return sum(i.numel() for i in self.indices.values())


class SparseFineTuningTrainer(Trainer):
    """`Trainer` with base-model updates restricted to `support` (None: dense) and an L1 pull.

    `l1_reference`: for dense training with L1, the starting values of every regularised base
    parameter ({name: tensor}); with a support, its own starting values are used.
    `l1_count`: N in `lambda / N` (LT-SFT passes the number of all the model's parameters, as the paper's code does).
    `progress`: how the run reports (bars, log lines); never `transformers`' printer of raw log dicts.
    """

    def __init__(
        self,
        *args,
        support: Support | None = None,
        l1_lambda: float = 0.0,
        l1_reference: Mapping[str, torch.Tensor] | None = None,
        l1_count: int | None = None,
        lr_policy: SlowFastPolicy | None = None,
        progress: Progress | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        self.add_callback(TrainingProgress(progress or Progress()))
        # a fresh policy (phase, loss history) per training run, scaled to the model's depth
        self.lr_policy = None if lr_policy is None else dataclasses.replace(
            lr_policy, num_layers=lr_policy.num_layers or self.model.config.num_hidden_layers)
        self.support = support
        self.l1_lambda = l1_lambda
        self.l1_reference = dict(l1_reference or {})
        self.l1_count = l1_count
        params = base_parameters(self.model)
        self._supported = {name: params[name] for name in (support.indices if support else {})}
        self._names = {id(param): name for name, param in self._supported.items()}
        if self.args.world_size > 1:  # DDP reduces after accumulation: mask the gradient on its way in
            self._hooks = [p.register_hook(self._masked_copy(n)) for n, p in self._supported.items()]
        else:  # one process: mask .grad in place once accumulated, with no second full-size gradient
            self._hooks = [p.register_post_accumulate_grad_hook(self._mask_in_place(n)) for n, p in self._supported.items()]
        # a base parameter with no supported entry does not train at all (until remove_hooks)
        self._frozen = [p for n, p in params.items() if p.requires_grad and support and n not in support.indices]
        for param in self._frozen:
            param.requires_grad_(False)

    def _masked_copy(self, name: str):
        indices = self.support.indices[name]

        def keep_supported(grad: torch.Tensor) -> torch.Tensor:
            masked = torch.zeros_like(grad)
            masked.view(-1).index_copy_(0, indices, grad.reshape(-1).index_select(0, indices))
            return masked

        return keep_supported

    def _mask_in_place(self, name: str):
        indices = self.support.indices[name]

        def keep_supported(param: nn.Parameter) -> None:
            flat = param.grad.view(-1)
            kept = flat.index_select(0, indices)
            flat.zero_()
            flat.index_copy_(0, indices, kept)

        return keep_supported

    def remove_hooks(self) -> None:
        """Undo what this trainer did to the model's parameters (hooks, frozen flags)."""
        for hook in self._hooks:
            hook.remove()
        for param in self._frozen:
            param.requires_grad_(True)
        self._hooks, self._frozen = [], []

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Split the param groups by Slow-Fast weight set and by "decays inside the support", before
        the scheduler is built; one step pre-hook then scales learning rates and applies that decay."""
        optimizer = super().create_optimizer(model)
        names = {id(p): n for n, p in base_parameters(self.model).items()}
        supported = {id(p) for p in self._supported.values()}
        groups = []
        for group in optimizer.param_groups:
            buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
            for param in group["params"]:
                weight_set = self.lr_policy.weight_set(names[id(param)]) if self.lr_policy and id(param) in names else "other"
                inside = id(param) in supported and group.get("weight_decay", 0.0) > 0
                buckets.setdefault((weight_set, inside), []).append(param)
            for (weight_set, inside), params in buckets.items():
                decay = group.get("weight_decay", 0.0)
                groups.append({**group, "params": params, "sft_set": weight_set,
                               "weight_decay": 0.0 if inside else decay, "sft_support_decay": decay if inside else 0.0})
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step(opt))
        return optimizer

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Scale each group's scheduled learning rate (the scheduler resets it after the step), then
        apply decoupled weight decay (`theta -= lr * wd * theta`) to supported entries only."""
        multipliers = self.lr_policy.multipliers() if self.lr_policy else None
        for group in optimizer.param_groups:
            if multipliers is not None:
                group["lr"] = group["lr"] * multipliers[group["sft_set"]]
            if group["sft_support_decay"]:
                for param in group["params"]:
                    indices = self.support.indices[self._names[id(param)]]
                    flat = param.data.view(-1)
                    flat.index_copy_(0, indices, flat.index_select(0, indices) * (1 - group["lr"] * group["sft_support_decay"]))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Training logs also show the Slow-Fast phase and multipliers."""
        if self.lr_policy is not None and "loss" in logs:
            logs["slow_fast_phase"] = 1 if self.lr_policy.in_first_phase else 2
            logs.update({f"lr_x_{name}": value for name, value in self.lr_policy.multipliers().items()})
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cross-entropy summed over the labelled items and divided by their number in the whole
        (global, accumulated) batch, so that N processes compute what one process would; plus L1.

        (transformers scales the model's own loss by the number of processes whenever the model
        accepts loss kwargs, even when, like BERT's heads, it ignores `num_items_in_batch`.)
        """
        if num_items_in_batch is None or "labels" not in inputs:
            outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            loss, rest = outputs
        else:
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            rest = model(**inputs)
            logits = rest["logits"] if isinstance(rest, dict) else rest[0]
            total = nn.functional.cross_entropy(
                logits.flatten(0, -2).float(), labels.flatten().to(logits.device), ignore_index=-100, reduction="sum"
            )
            loss = total / num_items_in_batch * self.accelerator.num_processes  # DDP averages over processes
        if self.lr_policy is not None and model.training:
            self.lr_policy.record(self._global_loss(loss))
        if self.l1_lambda:
            # added once per micro-batch, while the loss above is not divided by the accumulation steps
            l1 = self.l1_lambda / self.l1_count * self._l1_distance()
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            loss = loss + (l1 / steps if num_items_in_batch is not None else l1)
        return (loss, rest) if return_outputs else loss

    def _global_loss(self, loss: torch.Tensor) -> float:
        """The loss every process agrees on (their mean), so Slow-Fast takes the same decisions on all."""
        value = loss.detach().float() / self.accelerator.num_processes
        if self.accelerator.num_processes > 1:
            value = self.accelerator.reduce(value, reduction="sum")
        return float(value)

    def _l1_distance(self) -> torch.Tensor:
        params = base_parameters(self.model)
        total = torch.zeros((), device=self.args.device)
        if self.support is not None:
            for name, indices in self.support.indices.items():
                current = params[name].reshape(-1).index_select(0, indices).float()
                total = total + (current - self.support.start_values[name]).abs().sum()
        else:
            for name, reference in self.l1_reference.items():
                total = total + (params[name].float() - reference).abs().sum()
        return total
