"""Properties of our LT-SFT that `benchmarks/reference.py` relies on to match composable-sft's trainer."""

from __future__ import annotations

from typing import ClassVar

from transformers import AutoTokenizer, DataCollatorForTokenClassification

from sftstore.demo import NER_LABELS
from sftstore.modeling import base_parameters
from sftstore.train.data import (
    NER_TARGET_MAP,
    TokenClassificationDataset,
    read_conll,
    shipped_data,
)
from sftstore.train.language import prepare_mlm_model
from sftstore.train.lt_sft import SparseFineTuningArguments, train_sparse
from sftstore.train.options import TrainingOptions
from sftstore.train.sparse_trainer import SparseFineTuningTrainer


class CountRecorder(SparseFineTuningTrainer):
    """Records the N of `lambda / N` that each phase's trainer was given."""

    counts: ClassVar[list[int]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        CountRecorder.counts.append(self.l1_count)


def test_l1_divides_by_every_parameter_of_the_model(tmp_path, tiny_bert_dir):
    """The paper's J = lambda / N * sum |theta - theta0|, with N counted as composable-sft counts it: every
    parameter of the model (frozen LayerNorms, the untied frozen decoder and the head included), not only
    the regularised ones; lambda = 0.1 then pulls exactly as hard as in the paper's runs."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    sentences = read_conll(shipped_data("ner/en/train.txt"), label_map=NER_TARGET_MAP)[:16]
    label2id = {label: i for i, label in enumerate(NER_LABELS)}
    dataset = TokenClassificationDataset(sentences, tokenizer, label2id, max_length=16)
    options = TrainingOptions(batch_size=8, max_length=16, max_steps=2, phase1_max_steps=2, eval_steps=2,
                              progress=False, use_cpu=True)
    args = options.training_arguments(str(tmp_path / "run"), metric="loss", greater_is_better=False)
    sft = SparseFineTuningArguments(density=0.05, l1_lambda=0.1, phase1_overrides=options.phase1_overrides())
    CountRecorder.counts = []
    items = _as_mlm(dataset)
    train_sparse(lambda: prepare_mlm_model(tiny_bert_dir), args, sft, trainer_class=CountRecorder, train_dataset=items,
                 eval_dataset=items, data_collator=DataCollatorForTokenClassification(tokenizer))
    model = prepare_mlm_model(tiny_bert_dir)
    everything = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in base_parameters(model).values() if p.requires_grad)
    assert everything > trainable  # the decoder copy, LayerNorms and head are counted too
    assert CountRecorder.counts == [everything, everything]  # phase 1 and phase 2


def _as_mlm(dataset: TokenClassificationDataset) -> list[dict]:
    """Token-classification items turned into MLM items: every first sub-token predicts itself."""
    return [{**item, "labels": [t if label != -100 else -100 for t, label in zip(item["input_ids"], item["labels"])]}
            for item in dataset]

