"""Benchmark: sftstore's LT-SFT against the reference implementation, cambridgeltl/composable-sft.

Both trainers run on the same tiny BERT (built here from a config and a seed, saved to disk, loaded by
both), the same batches in the same order, the same seed and hyper-parameters, for a language (MLM)
delta and a task (NER) delta:

* ours: `sftstore.train.lt_sft.train_sparse` (this environment, transformers 5);
* the reference: its own `LotteryTicketSparseFineTuner`, unmodified, run from the clone given as
  `--reference DIR` by `benchmarks/reference_driver.py` in a virtual environment of its own (transformers
  4.37.2, the last 4.x whose Trainer calls `_maybe_log_save_evaluate` the way the reference overrides it),
  which this script creates (`--venv`) and fills from the package registry on first use.

Reported per delta: Jaccard of the two selected supports (target >= 0.99), the max abs difference of the
stored values after phase 2 over the entries both selected (target <= 1e-5), the same difference between two runs
of ours that differ only in BERT's attention kernel (eager and SDPA: the same arithmetic, rounded
differently), which shows how far rounding alone carries the values, the entries each stored, and the
entity F1 of each side's composed model (base + its language delta + its task delta and head) on the
same test file (MasakhaNER Hausa test; the task delta trains on CoNLL-2003 English, the language delta
on Hausa text, all shipped in `sftstore/data`). The reference has no Rand-SFT or BitFit (its
`sparse_ft_method` option is declared but never read); for those, its `SparseFineTuner` is trained
inside the support our method selected, which compares the masked training (phase 2) they share.

Controlled, so that the comparison isolates the algorithm (see the README, "Equivalence with
composable-sft", for why each is needed):

* data: MLM blocks are masked once here with a seeded generator (80/10/10), every example is padded to
  `--max-length`, and the rows are stored in training order (one seeded permutation per epoch); both
  trainers read them with a sequential sampler;
* dropout: `--dropout` (default 0: the two trainers draw dropout masks from different RNG states in
  phase 2, see the README);
* optimizer: `optim="adamw_torch"` on both sides (transformers 5 defaults to the fused kernel);
* attention: eager on both sides (`--attention`; transformers 5's BERT defaults to SDPA, which rounds
  differently, and 4.37's BERT has only the eager kernel);
* L1 (language delta, lambda 0.1 as in the paper): the reference with `apply_reg_to_sparse_only=True`,
  i.e. the penalty on the maskable entries only, as ours (its default also pulls the MLM head; the
  head is not part of a language delta).

Run (the venv is created once, ~10 minutes; the full table then takes ~8 minutes on 2 cores, mostly the
MLM head's 30,522-word softmax; `--methods lt-sft`: ~4 minutes):

    git clone https://github.com/cambridgeltl/composable-sft /tmp/composable-sft
    python benchmarks/reference.py --reference /tmp/composable-sft
    python benchmarks/reference.py --reference /tmp/composable-sft --markdown
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch.utils.data import SequentialSampler
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForTokenClassification,
    TrainingArguments,
    default_data_collator,
)

from sftstore.modeling import base_parameters, head_parameters
from sftstore.train.data import (
    NER_DEFAULT_LABELS,
    NER_TARGET_MAP,
    MlmDataset,
    TokenClassificationDataset,
    read_conll,
    read_text_lines,
    shipped_data,
)
from sftstore.train.language import prepare_mlm_model
from sftstore.train.lt_sft import SparseFineTuningArguments, train_sparse
from sftstore.train.masks import jaccard
from sftstore.train.sparse_trainer import SparseFineTuningTrainer
from sftstore.train.task import TaskData, evaluate_task
from table import render_table  # benchmarks/table.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "reference_driver.py"
TOKENIZER = ROOT / "tests" / "data" / "minilm-tokenizer"
REFERENCE_PACKAGES = ["transformers==4.37.2", "accelerate==0.34.2", "datasets==2.21.0"]


class InOrder(SparseFineTuningTrainer):
    """Reads the training set in its stored order, as the reference driver's trainer does."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def ensure_venv(path: Path) -> Path:
    """The reference's python: a venv at `path` with the same torch as ours and transformers 4.x."""
    python = path / "bin" / "python"
    marker = path / "sftstore-reference-ready"
    wanted = json.dumps([torch.__version__.split("+")[0], *REFERENCE_PACKAGES])
    if marker.is_file() and marker.read_text() == wanted:
        return python
    print(f"creating the reference environment in {path} (once; a few minutes)", file=sys.stderr)
    venv.create(path, with_pip=True, clear=path.exists())
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)  # first: the same wheel as ours
    subprocess.run([*pip, *REFERENCE_PACKAGES], check=True)
    marker.write_text(wanted)
    return python


def build_base(work: Path, seed: int, hidden: int, layers: int, dropout: float, labels: list[str]) -> tuple[Path, Path]:
    """A tiny BERT masked LM from a config and a seed, and the same body with a seeded NER head (both saved)."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=4 * hidden, max_position_embeddings=128, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    mlm_dir, ner_dir = work / "base", work / "base-ner"
    BertForMaskedLM(config).save_pretrained(mlm_dir)
    tokenizer.save_pretrained(mlm_dir)
    torch.manual_seed(seed + 1)
    ner = BertForTokenClassification.from_pretrained(mlm_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                                     label2id={label: i for i, label in enumerate(labels)})
    ner.save_pretrained(ner_dir)
    tokenizer.save_pretrained(ner_dir)
    return mlm_dir, ner_dir


def padded(items: list[dict], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([item[key] + [value] * (length - len(item[key])) for item in items], dtype=torch.long)

    return {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100)}


def masked_blocks(dataset: MlmDataset, tokenizer, seed: int) -> list[dict]:
    """MLM blocks masked once, with a seeded generator: 15% of the non-special tokens are predicted; of
    those, 80% become [MASK], 10% a random token, 10% stay."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for item in dataset:
        ids = torch.tensor(item["input_ids"])
        chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & (torch.tensor(item["special_tokens_mask"]) == 0)
        roll = torch.rand(ids.shape, generator=generator)
        random_ids = torch.randint(len(tokenizer), ids.shape, generator=generator)
        inputs = torch.where(chosen & (roll < 0.8), tokenizer.mask_token_id, ids)
        inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
        items.append({"input_ids": inputs.tolist(), "attention_mask": item["attention_mask"],
                      "labels": torch.where(chosen, ids, -100).tolist()})
    return items


def in_training_order(items: list[dict], rows: int, seed: int) -> list[dict]:
    """`rows` examples: one seeded permutation of `items` per epoch, concatenated."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < rows:
        order += torch.randperm(len(items), generator=generator).tolist()
    return [items[i] for i in order[:rows]]


def write_data(work: Path, opts, labels: list[str]) -> dict[str, Path]:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = max(opts.phase1_steps, opts.phase2_steps) * opts.batch_size
    lines = read_text_lines(shipped_data("mlm/hau.txt"))[: opts.lines]
    blocks = masked_blocks(MlmDataset(lines, tokenizer, opts.max_length), tokenizer, opts.seed)
    sentences = read_conll(shipped_data("ner/en/train.txt"), label_map=NER_TARGET_MAP)
    label2id = {label: i for i, label in enumerate(labels)}
    tagged = list(TokenClassificationDataset(sentences, tokenizer, label2id, max_length=opts.max_length))
    paths = {}
    for kind, items in (("language", blocks), ("task", tagged)):
        paths[kind] = work / f"data-{kind}.safetensors"
        save_file(padded(in_training_order(items, rows, opts.seed), opts.max_length, tokenizer.pad_token_id),
                  str(paths[kind]))
    return paths


def training_arguments(output_dir: Path, opts) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=opts.batch_size, learning_rate=opts.learning_rate,
        lr_scheduler_type="linear", weight_decay=opts.weight_decay, optim="adamw_torch", seed=opts.seed,
        save_strategy="no", eval_strategy="no", logging_steps=10**6, report_to=[], disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, max_steps=opts.phase2_steps,
    )


def run_ours(kind: str, method: str, model_dir: Path, data: Path, k: int, opts, work: Path, attention: str):
    """Our run with BERT's `attention` kernel: (support as {base name: flat indices}, stored values as dense
    {base name: tensor}, head, digests of the starting weights)."""
    tensors = load_file(str(data))
    rows = [{key: tensors[key][i] for key in tensors} for i in range(len(tensors["input_ids"]))]

    def make_model():
        model = (prepare_mlm_model(model_dir) if kind == "language"
                 else BertForTokenClassification.from_pretrained(model_dir).train())
        model.set_attn_implementation(attention)
        return model

    sft = SparseFineTuningArguments(method=method, num_params=k, l1_lambda=opts.l1 if kind == "language" else 0.0,
                                    phase1_overrides={"max_steps": opts.phase1_steps}, seed=opts.seed)
    result = train_sparse(make_model, training_arguments(work / f"ours-{kind}-{method}-{attention}", opts), sft,
                          trainer_class=InOrder, train_dataset=rows, data_collator=default_data_collator)
    shapes = {n: p.shape for n, p in base_parameters(result.model).items()}
    values = {n: torch.zeros(shapes[n]).view(-1).index_put_((d.indices.long(),), d.values).view(shapes[n])
              for n, d in result.params.items()}
    support = {n: i.cpu() for n, i in result.support.indices.items()}
    theta0 = {n: digest(p) for n, p in base_parameters(make_model()).items()}
    return support, values, result.head, theta0


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().float().numpy().tobytes()).hexdigest()


def run_reference(python: Path, reference: Path, kind: str, method: str, model_dir: Path, data: Path, k: int,
                  opts, work: Path, support: dict | None, prefix: str = "bert."):
    spec = {"kind": kind, "method": "lt-sft" if method == "lt-sft" else "masked", "model": str(model_dir),
            "data": str(data), "seed": opts.seed, "batch_size": opts.batch_size, "learning_rate": opts.learning_rate,
            "weight_decay": opts.weight_decay, "k": k, "l1": opts.l1 if kind == "language" else 0.0,
            "l1_maskable_only": True, "phase1_steps": opts.phase1_steps, "phase2_steps": opts.phase2_steps,
            "detach_theta0": opts.detach_reference_theta0,
            "output_dir": str(work / f"ref-{kind}-{method}"), "output": str(work / f"ref-{kind}-{method}.safetensors")}
    if spec["method"] == "masked":
        spec["mask_file"] = str(work / f"mask-{kind}-{method}.safetensors")
        save_file({prefix + n: mask for n, mask in support.items()}, spec["mask_file"])
    spec_path = work / f"spec-{kind}-{method}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(reference / "src"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([str(python), str(DRIVER), str(spec_path)], check=False, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the reference run ({kind}, {method}) failed:\n{done.stderr[-4000:]}")
    tensors = load_file(spec["output"])
    sidecar = json.loads(Path(spec["output"] + ".json").read_text())
    strip = len(sidecar["base_model_prefix"]) + 1

    def part(tag: str) -> dict[str, torch.Tensor]:
        return {key[len(tag) + 2:]: value for key, value in tensors.items() if key.startswith(tag + "::")}

    masks = {n[strip:]: m.bool() for n, m in part("mask").items()}
    values = {n[strip:]: v for n, v in part("diff").items()}
    theta0 = {n[strip:]: d for n, d in sidecar["theta0"].items()}
    return {n: m.reshape(-1).nonzero().squeeze(1) for n, m in masks.items()}, values, part("head"), theta0


def as_masks(support: dict[str, torch.Tensor], shapes: dict) -> dict[str, torch.Tensor]:
    """A support ({name: flat indices}) as boolean masks of the parameters' shapes."""
    return {name: torch.zeros(shapes[name].numel(), dtype=torch.bool).index_fill_(0, indices.long(), True)
            .view(shapes[name]) for name, indices in support.items()}


def max_abs_difference(a: tuple, b: tuple) -> float:
    """The largest difference between two runs' stored values (`(support, values, ...)` as the runs return)
    over the entries both selected; an entry only one selected shows in the selected counts and the Jaccard."""
    worst = 0.0
    for name in set(a[0]) & set(b[0]):
        mine, theirs = a[0][name].long(), b[0][name].long()
        common = mine[torch.isin(mine, theirs)]
        if common.numel():
            difference = a[1][name].reshape(-1)[common] - b[1][name].reshape(-1)[common]
            worst = max(worst, float(difference.abs().max()))
    return worst


def stored_entries(values: dict[str, torch.Tensor]) -> int:
    return sum(int((v != 0).sum()) for v in values.values())


@torch.no_grad()
def composed_f1(ner_dir: Path, lang: dict, task: dict, head: dict, labels: list[str], test: str, opts) -> float:
    """Entity F1 on the shipped file `test` of base + language delta + task delta (dense sums) with the task head."""
    model = BertForTokenClassification.from_pretrained(ner_dir).eval()
    params, heads = base_parameters(model), head_parameters(model)
    for delta in (lang, task):
        for name, value in delta.items():
            params[name].add_(value)
    for name, value in head.items():
        heads[name].copy_(value)
    tokenizer = AutoTokenizer.from_pretrained(ner_dir)
    path = shipped_data(test)
    data = TaskData("ner", read_conll(path, label_map=NER_TARGET_MAP)[: opts.test_sentences], [str(path)])
    return evaluate_task(model, tokenizer, data, labels, max_length=opts.max_length)["f1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="a clone of cambridgeltl/composable-sft")
    parser.add_argument("--venv", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "sftstore" / "composable-sft-venv", help="the reference's virtual environment (created if missing)")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--phase1-steps", type=int, default=100)
    parser.add_argument("--phase2-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--l1", type=float, default=0.1, help="L1 lambda of the language deltas (the paper's 0.1)")
    parser.add_argument("--detach-reference-theta0", action="store_true",
                        help="detach the reference's stored starting weights, without which its L1 term has no gradient "
                             "(README, 'Equivalence with composable-sft')")
    parser.add_argument("--attention", choices=["eager", "sdpa"], default="eager",
                        help="our side's BERT attention kernel (the reference's transformers 4.37 has eager only)")
    parser.add_argument("--keep-reference-ties", action="store_true",
                        help="LT-SFT: our side selects as many entries as the reference kept (it keeps every entry tied "
                             "with the K-th), so both train the same support")
    parser.add_argument("--density", type=float, default=0.05, help="K as a fraction of the maskable entries")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lines", type=int, default=600, help="Hausa text lines for the language delta")
    parser.add_argument("--test-sentences", type=int, default=None, help="cap on the test sentences (default: all)")
    parser.add_argument("--methods", default="lt-sft,rand-sft,bitfit")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--markdown", action="store_true")
    opts = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not (opts.reference / "src" / "sft" / "lt_sft.py").is_file():
        sys.exit(f"{opts.reference}: not a clone of cambridgeltl/composable-sft (no src/sft/lt_sft.py)")
    python = ensure_venv(opts.venv)
    with tempfile.TemporaryDirectory(prefix="sft-reference-") as temporary:
        work = opts.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        labels = list(NER_DEFAULT_LABELS)
        base_dir, ner_dir = build_base(work, opts.seed, opts.hidden, opts.layers, opts.dropout, labels)
        data = write_data(work, opts, labels)
        shapes = {n: p.shape for n, p in base_parameters(BertForTokenClassification.from_pretrained(ner_dir)).items()}
        models = {"language": (base_dir, prepare_mlm_model(base_dir)),
                  "task": (ner_dir, BertForTokenClassification.from_pretrained(ner_dir))}
        maskable = {kind: sum(p.numel() for p in base_parameters(model).values() if p.requires_grad)
                    for kind, (_, model) in models.items()}
        rows = []
        for method in opts.methods.split(","):
            sides = {"ours": {}, "reference": {}}
            for kind, (model_dir, _) in models.items():
                k = round(opts.density * maskable[kind])
                if method == "lt-sft":  # each side selects its own support
                    ref = run_reference(python, opts.reference, kind, method, model_dir, data[kind], k, opts, work, None)
                    kept = sum(i.numel() for i in ref[0].values()) if opts.keep_reference_ties else k
                    ours = run_ours(kind, method, model_dir, data[kind], kept, opts, work, opts.attention)
                else:  # the reference trains inside our support
                    kept = k
                    ours = run_ours(kind, method, model_dir, data[kind], k, opts, work, opts.attention)
                    given = {n: mask.to(torch.uint8) for n, mask in as_masks(ours[0], shapes).items()}
                    ref = run_reference(python, opts.reference, kind, method, model_dir, data[kind], k, opts, work, given)
                rounded = run_ours(kind, method, model_dir, data[kind], kept, opts, work,
                                   "sdpa" if opts.attention == "eager" else "eager")
                if ours[3] != ref[3]:
                    sys.exit(f"{kind}: the two sides did not start from the same weights")
                sides["ours"][kind], sides["reference"][kind] = ours, ref
                rows.append({
                    "method": method, "delta": kind, "k": k,
                    "selected": f"{sum(i.numel() for i in ours[0].values())} / {sum(i.numel() for i in ref[0].values())}",
                    "stored": f"{stored_entries(ours[1])} / {stored_entries(ref[1])}",
                    "jaccard": jaccard(as_masks(ours[0], shapes), as_masks(ref[0], shapes)) if method == "lt-sft" else None,
                    "max_abs": max_abs_difference(ours, ref),
                    "rounding": max_abs_difference(ours, rounded),
                })
            for side in ("ours", "reference"):
                lang, task = sides[side]["language"], sides[side]["task"]
                rows[-1][f"f1 {side}"] = (composed_f1(ner_dir, {}, task[1], task[2], labels, "ner/en/dev.txt", opts),
                                          composed_f1(ner_dir, lang[1], task[1], task[2], labels, "ner/hau/test.txt", opts))
        print_table(rows, opts)


def print_table(rows: list[dict], opts) -> None:
    header = ["method", "delta", "K", "selected ours / ref", "stored ours / ref", "support Jaccard",
              "max abs diff", "ours: eager vs SDPA", "F1 en dev ours / ref", "F1 hau test ours / ref"]

    def f1(row: dict, which: int) -> str:
        return f"{row['f1 ours'][which]:.4f} / {row['f1 reference'][which]:.4f}" if "f1 ours" in row else ""

    body = [[r["method"], r["delta"], str(r["k"]), r["selected"], r["stored"],
             "given" if r["jaccard"] is None else f"{r['jaccard']:.4f}", f"{r['max_abs']:.2e}", f"{r['rounding']:.2e}",
             f1(r, 0), f1(r, 1)]
            for r in rows]
    print(f"phase 1 {opts.phase1_steps} steps, phase 2 {opts.phase2_steps} steps, batch {opts.batch_size}, "
          f"lr {opts.learning_rate}, density {opts.density}, attention {opts.attention}, "
          f"{'our K = the reference kept, ' if opts.keep_reference_ties else ''}L1 {opts.l1} (language"
          f"{', reference theta0 detached' if opts.detach_reference_theta0 else ''}), dropout {opts.dropout}, "
          f"seed {opts.seed}; F1: task delta on CoNLL-2003 en dev, language + task deltas on MasakhaNER hau test")
    print(render_table(header, body, opts.markdown))


if __name__ == "__main__":
    main()
