"""S4-Tuning (Xu et al.): few-shot adaptation of a source-trained task model to target languages.

1. theta0 = base + the source-trained task delta (its head included).
2. Per target language t: importance `|dL_t/dh * h|` of every base parameter h on t's few-shot data
   (`taylor_importance`), and the mask M_t of the top fraction p of the base parameters (one global
   top-K, K = round(p * N), the same p for every language; `language_masks`).
3. Training (`S4Trainer`): batches of one language each, forward through the FULL network, the
   gradient of every base parameter multiplied by the batch's language mask. The trainer's support
   is the union of the masks: a base parameter entry outside every mask never moves. The head
   (outside the base model, no mask) trains densely, as in the package's other task training.
4. Output (`train_s4`): a NEW task delta relative to the base, `theta_final - base` over the union
   of the source task delta's support and the masks' union (= the source task delta plus the S4
   update), carrying the trained head and the per-language masks (`delta.subnetworks`, saved as
   `sft_masks.safetensors`), so it composes like any task delta and `sft overlap --masks` reads it.

Ablations and baselines (sections 4.3 and 4.5 of the paper), `mask=`:
- "random": K entries per language drawn uniformly (seeded), instead of by importance;
- "full": every base parameter in every mask (the Full Model baseline, one-language batches);
- "fc" / "fc-pooler": no base parameter (the classifier only), or the pooler only (with the classifier).
`pruning=True`: forward and backward through the batch's language sub-network only (the entries
outside its mask are zero during the batch). Each language then has its own network:
`pruned_delta(delta, base, language)` turns the trained delta into that network's delta.

Choices and limits:
- Importance is computed with the model in eval mode (dropout off: deterministic scores), the
  gradients of the language's batches summed (the loss of a batch is its mean token/sentence loss),
  then `|G * h|`.
- With Adam, an entry whose gradient is zeroed can still move from the momentum of an earlier step
  of another language. By default (`exact_updates=True`) every step therefore restores the union
  entries outside the step's language mask(s) after the optimizer step, so a step for language A
  changes only A's entries (and the head); `exact_updates=False` gives plain gradient
  multiplication.
- With gradient accumulation (one process), gradients are masked on their way into `.grad`, so a
  window mixing languages masks each micro-batch with its own language; the step's "current"
  entries are then the union of the window's languages.
- With pruning, a dev set cannot pick the checkpoint (each language has its own network): the last
  step is kept.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..compose import check_base
from ..config import measured
from ..delta import SparseDelta
from ..modeling import base_parameters, fingerprint, load_model, load_tokenizer
from ..settings import base_key
from ..subnetworks import SubnetworkMasks
from .data import describe_files
from .evaluate import TASK_METRICS, sequence_metrics, token_metrics
from .lt_sft import sparse_difference
from .masks import jaccard, mask_nnz, masks_union, parse_budget, random_mask, top_k_mask
from .multi_source import LanguageTaggedDataset, MultiSourceTrainer
from .options import TrainingOptions
from .sparse_trainer import Support
from .task import TASK_TYPES, TaskData, collator_for

Masks = dict[str, torch.Tensor]
MASK_KINDS = ("importance", "random", "full", "fc", "fc-pooler")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def taylor_importance(model: nn.Module, dataset: Dataset, collator, batch_size: int) -> dict[str, torch.Tensor]:
    """`|dL/dh * h|` for every base parameter h, L summed over `dataset` (one language's examples).

    The model runs in eval mode (no dropout) and is put back in its previous mode; its `.grad`s
    are left as they were found (None afterwards). Scores are float32, on the parameters' device.
    """
    params = base_parameters(model)
    was_training = model.training
    flags = {name: p.requires_grad for name, p in params.items()}
    model.eval()
    model.zero_grad(set_to_none=True)
    for param in params.values():
        param.requires_grad_(True)
    device = _model_device(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            loss = model(**batch).loss
            loss.backward()
        scores = {}
        for name, param in params.items():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            scores[name] = (grad.detach().float() * param.detach().float()).abs()
    finally:
        model.zero_grad(set_to_none=True)
        for name, param in params.items():
            param.requires_grad_(flags[name])
        model.train(was_training)
    return scores


def language_masks(
    model: nn.Module,
    datasets_by_language: Mapping[str, Dataset],
    collator,
    density: float,
    *,
    random: bool = False,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, Masks]:
    """Per language, the mask of the top fraction `density` of the base parameters by importance.

    One global top-K over all base parameters, K = round(density * N) (the same for every
    language). `random=True`: the Random ablation, K entries drawn uniformly with seed `seed + i`
    for the i-th language (in the order given).
    """
    params = base_parameters(model)
    total = sum(p.numel() for p in params.values())
    k = parse_budget(None, density, total)
    result = {}
    for position, (language, dataset) in enumerate(datasets_by_language.items()):
        if random:
            result[language] = random_mask({n: p.detach() for n, p in params.items()}, k, seed=seed + position)
        else:
            scores = taylor_importance(model, dataset, collator, batch_size)
            result[language] = top_k_mask(scores, k)
            del scores
    return result


def fixed_masks(model: nn.Module, kind: str, languages: Sequence[str]) -> dict[str, Masks]:
    """The baselines' masks, the same for every language: "full" (every base parameter), "fc"
    (none: the classifier head trains alone) or "fc-pooler" (the pooler's parameters)."""
    if kind not in ("full", "fc", "fc-pooler"):
        raise ValueError(f"unknown baseline {kind!r}: expected 'full', 'fc' or 'fc-pooler'")
    params = base_parameters(model)
    masks = {n: torch.full(p.shape, kind == "full" or (kind == "fc-pooler" and n.startswith("pooler.")),
                           dtype=torch.bool, device=p.device) for n, p in params.items()}
    return {language: masks for language in languages}


class S4Trainer(MultiSourceTrainer):
    """Batches of one language each (`LanguageTaggedDataset` + `OneLanguageBatches`), no language
    delta, base gradients multiplied by the batch's language mask.

    `language_supports[i]`: the `Support` of the i-th language's mask (the language index of
    `LanguageTaggedDataset`); `support` must be the union of the masks. `prune_with[i]`: the i-th
    language's boolean masks, to run each batch through its language's sub-network only (the
    Pruning ablation; the pruned entries are restored before every optimizer step). Needs
    `remove_unused_columns=False`.
    """

    def __init__(self, *args, language_supports: Sequence[Support], exact_updates: bool = True,
                 prune_with: Sequence[Masks] | None = None, **kwargs) -> None:
        # set before the parent registers its gradient hooks (they read these through _indices)
        self.language_supports = list(language_supports)
        self.exact_updates = exact_updates
        self.prune_with = list(prune_with) if prune_with is not None else None
        self._pruned_for: int | None = None
        self._unpruned: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.current_language: int | None = None
        self._step_languages: set[int] = set()
        self._empty: dict[torch.device, torch.Tensor] = {}
        self._others: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
        self._saved: dict[str, torch.Tensor] = {}
        super().__init__(*args, language_deltas=[], **kwargs)
        if self.prune_with is not None:  # per language, the entries to zero, on the model's device
            device = _model_device(self.model)
            self._prunable = [{n: ~m.to(device) for n, m in masks.items() if not bool(m.all())}
                              for masks in self.prune_with]
        union = self.support.indices if self.support is not None else {}
        for support in self.language_supports:
            for name, indices in support.indices.items():
                if name not in union or bool(torch.isin(indices, union[name].to(indices.device), invert=True).any()):
                    raise ValueError(f"a language mask selects entries of '{name}' outside the trainer's support")
        if self.args.world_size == 1 and self.args.gradient_accumulation_steps > 1:
            # post-accumulate masking would re-mask earlier micro-batches with a later batch's language
            for hook in self._hooks:
                hook.remove()
            self._hooks = [p.register_hook(self._masked_copy(n)) for n, p in self._supported.items()]

    # ---- the current language's entries ---------------------------------------------------------

    def use_language(self, language: int) -> None:
        """No delta to apply: remember whose mask the next backward uses (and prune to it)."""
        self.current_language = language
        if self.model.training:
            self._step_languages.add(language)
        if self.prune_with is not None and self._pruned_for != language:
            self._unprune()
            self._prune(language)

    def revert_language(self) -> None:
        self._unprune()
        super().revert_language()

    @torch.no_grad()
    def _prune(self, language: int) -> None:
        """Zero every base entry outside `language`'s masks, keeping their values to restore."""
        params = base_parameters(self.model)
        for name, pruned in self._prunable[language].items():
            pruned = pruned.to(params[name].device)
            self._unpruned[name] = (pruned, params[name][pruned])  # boolean indexing copies
            params[name].masked_fill_(pruned, 0)
        self._pruned_for = language

    @torch.no_grad()
    def _unprune(self) -> None:
        params = base_parameters(self.model)
        for name, (pruned, values) in self._unpruned.items():
            params[name].masked_scatter_(pruned, values)
        self._unpruned = {}
        self._pruned_for = None

    def _indices(self, name: str, device: torch.device) -> torch.Tensor:
        if self.current_language is None:
            raise RuntimeError("S4 gradient before any batch chose a language")
        indices = self.language_supports[self.current_language].indices.get(name)
        if indices is None:
            if device not in self._empty:
                self._empty[device] = torch.empty(0, dtype=torch.long, device=device)
            return self._empty[device]
        return indices

    def _masked_copy(self, name: str):
        def keep_language(grad: torch.Tensor) -> torch.Tensor:
            indices = self._indices(name, grad.device)
            masked = torch.zeros_like(grad)
            masked.view(-1).index_copy_(0, indices, grad.reshape(-1).index_select(0, indices))
            return masked

        return keep_language

    def _mask_in_place(self, name: str):
        def keep_language(param: nn.Parameter) -> None:
            indices = self._indices(name, param.device)
            flat = param.grad.view(-1)
            kept = flat.index_select(0, indices)
            flat.zero_()
            flat.index_copy_(0, indices, kept)

        return keep_language

    def _step_indices(self) -> dict[str, torch.Tensor]:
        """The entries of the languages of this optimizer step, per supported parameter."""
        result = {}
        for name in self.support.indices:
            parts = [self.language_supports[i].indices[name] for i in sorted(self._step_languages)
                     if name in self.language_supports[i].indices]
            if len(parts) == 1:
                result[name] = parts[0]
            elif parts:
                result[name] = torch.unique(torch.cat(parts))
        return result

    def _other_indices(self) -> dict[str, torch.Tensor]:
        """Union entries outside this step's languages (cached per set of languages)."""
        key = tuple(sorted(self._step_languages))
        if key not in self._others:
            current = self._step_indices()
            others = {}
            for name, indices in self.support.indices.items():
                keep = indices if name not in current else indices[torch.isin(indices, current[name], invert=True)]
                if keep.numel():
                    others[name] = keep
            self._others[key] = others
        return self._others[key]

    # ---- optimizer: decay inside the step's languages only, exact freezing of the others --------

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step())
        return optimizer

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        union = self.support
        if self._step_languages:
            current = self._step_indices()
            step_support = Support.__new__(Support)
            step_support.indices = {n: current.get(n, union.indices[n][:0]) for n in union.indices}
            step_support.start_values = union.start_values
            self.support = step_support  # weight decay only inside the step's language masks
        try:
            super()._before_step(optimizer)
        finally:
            self.support = union
        if self.exact_updates and self._step_languages:
            params = base_parameters(self.model)
            self._saved = {name: params[name].data.view(-1).index_select(0, indices)
                           for name, indices in self._other_indices().items()}

    @torch.no_grad()
    def _after_step(self) -> None:
        if self._saved:
            params = base_parameters(self.model)
            for name, indices in self._other_indices().items():
                params[name].data.view(-1).index_copy_(0, indices, self._saved[name])
        self._saved = {}
        self._step_languages = set()


def _as_factory(base, task_type: str, labels: Sequence[str], revision: str | None) -> Callable[[], nn.Module]:
    if callable(base):
        return base
    return lambda: load_model(base, task_type, labels, revision)


def train_s4(
    base: str | os.PathLike | Callable[[], nn.Module],
    languages: Mapping[str, TaskData],
    dev: TaskData | None,
    task_delta: SparseDelta,
    density: float,
    options: TrainingOptions,
    output_dir: str | os.PathLike,
    *,
    mask: str = "importance",
    pruning: bool = False,
    tokenizer=None,
    revision: str | None = None,
    name: str | None = None,
    exact_updates: bool = True,
    force: bool = False,
) -> SparseDelta:
    """S4-Tuning of `task_delta` on few-shot data of the target `languages`; returns the new task
    delta (relative to the base: source task delta + S4 update), its per-language masks in
    `delta.subnetworks`.

    `base`: a Hub id / local directory (the tokenizer then comes from it), or a zero-argument
    callable returning a fresh base model with the task's head (then give `tokenizer`). `dev`: a
    dev set scored every `options.eval_steps` to keep the best checkpoint (None: keep the last).
    `mask`: one of `MASK_KINDS` (see the module's docstring); the random masks' seed is
    `options.seed`; `density` is ignored by the fixed masks (full, fc, fc-pooler). `pruning`: the Pruning ablation; use `pruned_delta` for each language's network.
    """
    started = time.time()
    if not languages:
        raise ValueError("S4-Tuning needs few-shot data of at least one target language")
    if mask not in MASK_KINDS:
        raise ValueError(f"unknown mask {mask!r}: expected one of {', '.join(MASK_KINDS)}")
    if pruning and dev is not None:
        raise ValueError("with pruning each language has its own network, so one dev set cannot pick the checkpoint; "
                         "leave dev out")
    if pruning and mask not in ("importance", "random"):
        raise ValueError(f"pruning needs sub-network masks: mask {mask!r} would prune nothing (full) or every base "
                         "parameter (fc, fc-pooler)")
    if task_delta.kind != "task":
        raise ValueError(f"S4-Tuning adapts a task delta, got a {task_delta.kind} delta")
    tasks = {data.task for data in languages.values()} | ({dev.task} if dev is not None else set())
    if len(tasks) != 1:
        raise ValueError(f"all few-shot data must be of one task, got {sorted(tasks)}")
    task = tasks.pop()
    task_type = task_delta.config.task_type or TASK_TYPES[task]
    if task_type != TASK_TYPES[task]:
        raise ValueError(f"task delta is {task_type!r} but {task!r} data needs {TASK_TYPES[task]!r}")
    labels = list(task_delta.config.labels or [])
    if not labels:
        raise ValueError("the task delta records no labels")
    if tokenizer is None:
        if callable(base):
            raise ValueError("give `tokenizer` when `base` is a model factory")
        tokenizer = load_tokenizer(base, revision)
    if not callable(base):
        options = options.fitted_to(base, revision)
    factory = _as_factory(base, task_type, labels, revision)
    base_id = task_delta.config.base_model.id if callable(base) else base_key(base)

    # theta0: base + source-trained task delta (head included)
    model = factory()
    if not force:
        check_base(task_delta, base_id, fingerprint(model))
    task_delta.apply(model)
    names = list(languages)
    collator = collator_for(task, tokenizer)
    train_sets = [languages[lang].dataset(tokenizer, labels, options.max_length) for lang in names]
    metric = TASK_METRICS[task]
    args = options.training_arguments(str(output_dir), metric=metric, greater_is_better=True)
    args = dataclasses.replace(args, remove_unused_columns=False)
    model.to(args.device)  # before the masks and supports, whose tensors live on the parameters' device
    if mask in ("importance", "random"):
        masks = language_masks(model, dict(zip(names, train_sets)), collator, density, random=mask == "random",
                               seed=options.seed, batch_size=options.batch_size)
    else:
        masks = fixed_masks(model, mask, names)
    union = masks_union(*masks.values())
    union_support = Support(model, union)
    supports = [Support(model, masks[lang]) for lang in names]
    model.train()

    data = {"train_dataset": LanguageTaggedDataset(train_sets)}
    if dev is not None:
        data["eval_dataset"] = LanguageTaggedDataset([dev.dataset(tokenizer, labels, options.max_length)])
        data["compute_metrics"] = sequence_metrics if task == "nli" else token_metrics(task, dict(enumerate(labels)))
    else:
        args = dataclasses.replace(args, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    trainer = S4Trainer(model=model, args=args, support=union_support, language_supports=supports,
                        exact_updates=exact_updates, prune_with=[masks[lang] for lang in names] if pruning else None,
                        data_collator=collator, **data,
                        **options.trainer_kwargs(label=f"task/{name or task_delta.config.task or task}"))
    try:
        result = trainer.train()
    finally:
        trainer.revert_language()  # never leave the model pruned, even when training fails
        trainer.remove_hooks()
    tuned = trainer.model
    update = sparse_difference(tuned, None, union_support)

    # the new task delta: theta_final - base over (task delta's support) | (masks' union)
    base_model = factory()
    task_support = {n: torch.zeros(e.shape, dtype=torch.bool) for n, e in task_delta.params.items()}
    for n, e in task_delta.params.items():
        task_support[n].view(-1)[e.indices.long()] = True
    output_masks = masks_union(task_support, {n: m.cpu() for n, m in union.items()})
    overlap = {f"{a}|{b}": jaccard(masks[a], masks[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    delta = SparseDelta.from_models(
        base_model, tuned, masks=output_masks, base_id=base_id,
        base_revision=revision or task_delta.config.base_model.revision,
        kind="task", task=name or task_delta.config.task or task, task_type=task_type, labels=labels,
        method={"name": "s4", "density": density if mask in ("importance", "random") else None, "languages": names, "mask": mask, "pruning": pruning,
                "exact_updates": exact_updates, "seed": options.seed},
        training={
            "data": {"train": {lang: describe_files(languages[lang].files) for lang in names},
                     "dev": describe_files(dev.files) if dev is not None else None},
            "examples": {"train": {lang: len(languages[lang].examples) for lang in names},
                         "dev": len(dev.examples) if dev is not None else 0},
            "options": options.record(),
            "log": {"steps": result.global_step, "train_loss": result.training_loss,
                    "best_metric": trainer.state.best_metric, "k": mask_nnz(masks[names[0]]),
                    "union_nnz": union_support.nnz,
                    "update_nnz": sum(int(p.values.count_nonzero()) for p in update.values()),  # entries that moved
                    "mask_jaccard": overlap},
            "wall_seconds": round(time.time() - started, 1),
            "library": f"sftstore {__version__}",
        },
        metrics={f"dev_{metric}": measured(trainer.state.best_metric)} if dev is not None and trainer.state.best_metric is not None else {},
        lineage={"adapted_from": {"kind": task_delta.kind, "name": task_delta.name,
                                  "created_at": task_delta.config.created_at, "nnz": task_delta.nnz},
                 "target_languages": names},
    )
    delta.subnetworks = SubnetworkMasks.from_bool(masks)
    return delta


@torch.no_grad()
def pruned_delta(delta: SparseDelta, base: nn.Module, language: str, name: str | None = None) -> SparseDelta:
    """One language's network of a delta trained with `pruning=True`, as a task delta of its own:
    the trained weights inside `language`'s masks, zero outside (`-base` in the delta).

    `base`: the base model with the task's head (weights as pretrained). The result is named
    `name` (default `TASK-LANGUAGE`) and keeps only `language`'s masks.
    """
    if not delta.config.method.get("pruning"):
        raise ValueError(f"delta {delta.name!r} was not trained with pruning: it is one network for every language")
    if delta.subnetworks is None or language not in delta.subnetworks:
        have = ", ".join(delta.subnetworks or []) or "none"
        raise ValueError(f"delta {delta.name!r} has no sub-network mask for {language!r} (it has: {have})")
    network = copy.deepcopy(base)
    delta.apply(network)
    params = base_parameters(network)
    for param_name, keep in delta.subnetworks[language].items():
        params[param_name].masked_fill_(~keep.to(params[param_name].device), 0)
    config = delta.config
    result = SparseDelta.from_models(
        base, network, base_id=config.base_model.id, base_revision=config.base_model.revision, kind="task",
        task=name or f"{config.task}-{language}", task_type=config.task_type, labels=config.labels,
        method={**config.method, "network_of": language}, training=copy.deepcopy(config.training),
        metrics=dict(config.metrics),
        lineage={**config.lineage, "pruned_from": {"name": delta.name, "created_at": config.created_at}},
        license=config.license,
    )
    result.subnetworks = delta.subnetworks.select([language])
    return result
