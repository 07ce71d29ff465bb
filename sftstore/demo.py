"""An offline demonstration of the store and the composer on a tiny model built on the spot.

`sft demo` builds a 2-layer BERT with a small word-piece tokenizer, makes a language delta for
Hausa and English and a NER task delta (synthetic sparse differences: training arrives with
`sft train-lang` / `sft train-task`), imports them into a store, composes task + language,
runs `pipeline("token-classification")`, hot-swaps the language, reverts, and reloads the saved
directory with plain `transformers`. The same builders give the tests their tiny models.
"""

from __future__ import annotations

import copy
import string
from collections.abc import Callable
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


def run_demo(workdir: str | Path, echo: Callable[[str], None] = print) -> dict:
    """Run the demonstration in `workdir` (a store, artifacts and a composed model land there)."""
    from transformers import pipeline

    from .compose import compose
    from .modeling import load_model
    from .store import DeltaStore

    workdir = Path(workdir)
    base_dir = build_tiny_base(workdir / "tiny-bert")
    echo(f"1. built a tiny BERT base model and tokenizer in {base_dir}")
    base = load_model(base_dir, "token-classification", NER_LABELS)
    specs = {
        "lang/en": dict(kind="language", language="en", density=0.03, seed=1),
        "lang/hau": dict(kind="language", language="hau", density=0.03, seed=2),
        "task/ner": dict(kind="task", task="ner", task_type="token-classification", labels=NER_LABELS, density=0.05, seed=3),
    }
    store = DeltaStore(workdir / "store")
    for ref, spec in specs.items():
        fields = dict(spec)
        delta = synthetic_delta(base, fields.pop("density"), fields.pop("seed"), **fields)
        version, _ = store.import_directory(delta.save_pretrained(workdir / "artifacts" / ref.replace("/", "-")))
        echo(f"2. imported {version.ref}: {version.nnz:,} non-zeros ({version.density:.2%}), blob {version.tensors_sha256[:12]}")

    base_key = str(base_dir.resolve())
    task, hau, en = (store.load(ref, base_key) for ref in ("task/ner", "lang/hau", "lang/en"))
    composed = compose(base_dir, [task, hau], device="cpu")
    original = {n: p.detach().clone() for n, p in base.state_dict().items()}
    sentence = "shugaban kasar najeriya buhari ya ce a kano"
    tagger = pipeline("token-classification", model=composed.model, tokenizer=composed.tokenizer, device="cpu")
    tags_hau = [(t["word"], t["entity"]) for t in tagger(sentence)]
    echo(f"3. composed task/ner + lang/hau; tags: {tags_hau}")
    composed.swap(language=en)
    tags_en = [(t["word"], t["entity"]) for t in tagger(sentence)]
    echo(f"4. hot-swapped to lang/en; tags: {tags_en}")
    out_dir = composed.save(workdir / "composed-ner-en")
    reloaded = pipeline("token-classification", model=str(out_dir))
    same = [(t["word"], t["entity"]) for t in reloaded(sentence)] == tags_en
    echo(f"5. saved {out_dir}; transformers.pipeline reloads it with the same tags: {same}")
    composed.remove(task)
    composed.reset()
    head = {"classifier.weight", "classifier.bias"}
    exact = all(torch.equal(p, original[n]) for n, p in composed.model.state_dict().items() if n not in head)
    echo(f"6. reverted every delta: encoder bit-identical to the base: {exact}")
    echo("(The deltas are synthetic: the tags show the mechanics, not NER quality.)")
    return {"tags_hau": tags_hau, "tags_en": tags_en, "reload_matches": same, "revert_exact": exact}
