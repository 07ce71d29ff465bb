"""The model side: which parameters a delta may touch, base fingerprints, loading a base by task type."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .base_ids import is_hub_id
from .errors import SftError, first_line
from .network import bound_hub_waits, check_endpoint, hub_timeout, network_cause, network_error
from .redaction import redact, redact_logs

# transformers builds the pooler only for some heads (and initialises it randomly when a checkpoint
# lacks it), so it is left out of fingerprints; a delta may still touch it when the model has one.
_UNFINGERPRINTED_PREFIXES = ("pooler.",)
_SAMPLES_PER_PARAMETER = 64

TASK_TYPES = ("masked-lm", "token-classification", "sequence-classification", "feature-extraction")
# Model types whose position ids start after the padding index.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text")


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a sparse delta may touch, named relative to `model.base_model`.

    Only the encoder's own parameters are listed: a masked-LM head whose decoder is tied to the
    word embeddings (listed again as `lm_head.decoder.weight` in transformers 5) is not.
    """
    base = getattr(model, "base_model", model)
    return dict(base.named_parameters())


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters outside the base model (the task head), with their full names in `model`."""
    in_base = {id(p) for p in base_parameters(model).values()}
    return {name: p for name, p in model.named_parameters() if id(p) not in in_base}


def position_limit(config) -> int | None:
    """The longest input (in tokens, special tokens included) a model with this config takes; None: no limit known."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


@dataclass(frozen=True)
class BaseFingerprint:
    """Digests that identify a base model: its architecture and a sample of its weights."""

    arch_digest: str
    weights_digest: str


def _fingerprinted(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    params = base_parameters(model)
    return [(n, params[n]) for n in sorted(params) if not n.startswith(_UNFINGERPRINTED_PREFIXES)]


def sample_positions(numel: int, count: int = _SAMPLES_PER_PARAMETER) -> torch.Tensor:
    """`count` evenly spaced flat positions in [0, numel), first and last included, in exact integer arithmetic."""
    count = min(count, numel)
    return torch.arange(count, dtype=torch.int64) * (numel - 1) // max(count - 1, 1)


@torch.no_grad()
def fingerprint(model: nn.Module) -> BaseFingerprint:
    """Hash the sorted (name, shape, dtype) of the base parameters and a fixed sample of their values.

    Values are sampled at evenly spaced flat positions (integer arithmetic, so the same positions on
    every device and size) and hashed as float32: cheap (64 values per parameter) and device-independent.
    """
    arch, weights = hashlib.sha256(), hashlib.sha256()
    for name, param in _fingerprinted(model):
        arch.update(json.dumps([name, list(param.shape), str(param.dtype)]).encode())
        flat = param.detach().reshape(-1)
        weights.update(name.encode())
        weights.update(flat[sample_positions(flat.numel()).to(flat.device)].float().cpu().numpy().tobytes())
    return BaseFingerprint(arch.hexdigest(), weights.hexdigest())


def model_class_for(task_type: str | None):
    """The `transformers` auto class that serves a task type (`AutoModel` when there is none)."""
    import transformers

    classes = {
        "masked-lm": transformers.AutoModelForMaskedLM,
        "token-classification": transformers.AutoModelForTokenClassification,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "feature-extraction": transformers.AutoModel,
        None: transformers.AutoModel,
    }
    if task_type not in classes:
        raise SftError(f"unknown task_type {task_type!r}: expected one of {', '.join(TASK_TYPES)}")
    return classes[task_type]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide the load report about a head that the task delta is about to overwrite, and the bar of loading
    weights that are already on disk (download bars stay)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


_ANSWERED: set[tuple[str, str | None, str]] = set()  # (base, revision, endpoint) the Hub answered for


def _hub_unreachable(base: str, revision: str | None, endpoint: str) -> BaseException | None:
    """The connection failure that keeps the Hub at `endpoint` from answering for `base`, or None.

    One quick request, so a network failure is reported at once instead of after the download
    client's retries (about 25 s per file); other answers are left to `from_pretrained` to report.
    An answer is remembered for the process; a failure is not (the network may come back).
    """
    from huggingface_hub import HfApi

    if (base, revision, endpoint) in _ANSWERED:
        return None
    try:
        HfApi(endpoint=endpoint).model_info(base, revision=revision, timeout=hub_timeout())
    except Exception as exc:  # anything but a connection failure is for from_pretrained to explain
        cause = network_cause(exc)
        if cause is not None:
            return cause
    _ANSWERED.add((base, revision, endpoint))
    return None


@contextlib.contextmanager
def loading_base(base: str | os.PathLike, revision: str | None = None, offline: bool | None = None) -> Iterator[dict]:
    """Around a `from_pretrained(base)`: yields its extra keyword arguments (the local cache only when
    `offline`, `HF_HUB_OFFLINE` is set or the Hub is unreachable) and turns a failure into one
    `SftError` that says what to do (secrets redacted)."""
    from huggingface_hub import constants

    base = os.fspath(base)
    offline = constants.HF_HUB_OFFLINE if offline is None else offline
    remote = is_hub_id(base) and not offline
    if remote:
        bound_hub_waits()
        redact_logs("huggingface_hub", "transformers")  # their handlers exist once they are imported
    unreachable = _hub_unreachable(base, revision, check_endpoint()) if remote else None
    try:
        yield {"local_files_only": True} if offline or unreachable is not None else {}
    except (OSError, ValueError) as exc:
        cause = unreachable or network_cause(exc)
        if cause is not None:
            raise network_error(f"base model {base!r}", cause) from None
        why = first_line(exc)
        if offline and is_hub_id(base):
            why = "not in the local Hugging Face cache, and offline mode forbids downloading it"
        raise SftError(f"cannot load base model {base!r}: {redact(why)}") from None


def load_model(
    base: str | os.PathLike,
    task_type: str | None = None,
    labels: Sequence[str] = (),
    revision: str | None = None,
    offline: bool | None = None,
) -> nn.Module:
    """Load a base model (Hub id or local directory) in float32 with the head its task type needs
    (`offline`: from the local cache only; default: `HF_HUB_OFFLINE`)."""
    kwargs: dict = {"dtype": torch.float32}
    if revision:
        kwargs["revision"] = revision
    if labels:
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    model_class = model_class_for(task_type)
    with _quiet_transformers(), loading_base(base, revision, offline) as hub_kwargs:
        model = model_class.from_pretrained(os.fspath(base), **kwargs, **hub_kwargs)
    return model.eval()


def load_tokenizer(base: str | os.PathLike, revision: str | None = None):
    """The base model's tokenizer (Hub id or local directory)."""
    from transformers import AutoTokenizer

    with loading_base(base, revision) as hub_kwargs:
        return AutoTokenizer.from_pretrained(os.fspath(base), revision=revision, **hub_kwargs)
