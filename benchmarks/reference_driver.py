"""Runs composable-sft's own trainer for `benchmarks/reference.py`, inside the reference's virtual environment.

Not part of sftstore: it imports `sft` (cambridgeltl/composable-sft, from the clone on PYTHONPATH) and
the transformers 4.x that the reference needs, so it runs with the reference venv's python only:

    python reference_driver.py SPEC.json

SPEC names the model directory, the data file (tensors already in training order), the hyper-parameters
and the output file. `method` is `lt-sft` (its `LotteryTicketSparseFineTuner`, unmodified) or `masked`
(its `SparseFineTuner` trained inside a support given in `mask_file`: the reference has no Rand-SFT or
BitFit selection, only the masked training they share with LT-SFT's phase 2). `detach_theta0` (optional)
detaches its stored starting weights, the one change made to it, and only on request. The output holds, per
parameter (full names): `mask::NAME` (the reference's selection), `diff::NAME` (its stored differences,
`trainer.sft()`, dense) and `head::NAME` (its stored dense values), plus `theta0::NAME` checksums in a
JSON sidecar so the caller can check both sides started from the same weights.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from sft import LotteryTicketSparseFineTuner, SftArguments, SparseFineTuner
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForTokenClassification,
    Trainer,
    TrainingArguments,
    default_data_collator,
)


class InOrder(Trainer):
    """Reads the training set in its stored order (the caller shuffled it): both sides see the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().float().numpy().tobytes()).hexdigest()


def language_model(path: str) -> nn.Module:
    """As the reference's run_mlm.py does with --freeze_decoder --freeze_layer_norm: the output matrix a
    frozen copy of the input embeddings, every LayerNorm frozen."""
    model = AutoModelForMaskedLM.from_pretrained(path)
    embeddings = model.get_input_embeddings().weight
    model.get_output_embeddings().weight = nn.Parameter(embeddings.detach().clone(), requires_grad=False)
    for name, param in model.named_parameters():
        if "LayerNorm" in name:
            param.requires_grad = False
    return model


def main(spec_path: str) -> None:
    transformers.logging.set_verbosity_error()
    with open(spec_path, encoding="utf-8") as file:
        spec = json.load(file)
    torch.manual_seed(spec["seed"])
    if spec["kind"] == "language":
        model = language_model(spec["model"])
    else:
        model = AutoModelForTokenClassification.from_pretrained(spec["model"])
    prefix = model.base_model_prefix
    maskable = [n for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]
    theta0 = {n: digest(p) for n, p in model.named_parameters() if n.startswith(prefix)}
    data = load_file(spec["data"])
    rows = [{key: data[key][i] for key in data} for i in range(len(data["input_ids"]))]
    args = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["learning_rate"], lr_scheduler_type="linear", weight_decay=spec["weight_decay"],
        optim="adamw_torch", seed=spec["seed"], save_strategy="no", evaluation_strategy="no",
        logging_steps=10**6, report_to=[], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        max_steps=spec["phase2_steps"],
    )
    sft_args = SftArguments(
        ft_params_num=spec["k"], full_l1_reg=spec["l1"], sparse_l1_reg=spec["l1"],
        apply_reg_to_sparse_only=spec["l1_maskable_only"],
        full_ft_max_steps_per_iteration=spec["phase1_steps"], sparse_ft_max_steps_per_iteration=spec["phase2_steps"],
    )
    kwargs = {"model": model, "args": args, "train_dataset": rows, "data_collator": default_data_collator,
              "sft_args": sft_args, "maskable_params": maskable}
    if spec["method"] == "lt-sft":
        trainer = LotteryTicketSparseFineTuner(InOrder)(**kwargs)
    else:
        trainer = SparseFineTuner(InOrder)(**kwargs)
        given = load_file(spec["mask_file"])
        trainer.freeze()
        for name, mask in given.items():
            trainer._mask[name] |= mask.bool().reshape(trainer._mask[name].shape)
        trainer.enable_masking()
    if spec.get("detach_theta0"):
        # its __init__ copies theta0 with `zeros_like(p).copy_(p)` outside no_grad, so the copy keeps autograd
        # history back to p and d|p - theta0|/dp cancels to exactly 0: detached, its L1 term reaches `.grad`
        trainer._original_params = {n: t.detach() for n, t in trainer._original_params.items()}
    trainer.train()
    result = trainer.sft()
    tensors = {f"mask::{n}": m.to(torch.uint8).contiguous() for n, m in trainer._mask.items()}
    tensors.update({f"diff::{n}": d.to_dense().contiguous() for n, d in result.diffs.items()})
    tensors.update({f"head::{n}": v.contiguous() for n, v in result.abs.items()})
    save_file(tensors, spec["output"])
    with open(spec["output"] + ".json", "w", encoding="utf-8") as sidecar:
        json.dump({"theta0": theta0, "base_model_prefix": prefix}, sidecar)


if __name__ == "__main__":
    main(sys.argv[1])
