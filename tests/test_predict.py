"""Readable predictions (`sftstore/predict.py`, `sft compose --text`): word-level entities with character
offsets and float scores, or a label with scores; and a composed directory that `pipeline` aggregates by words."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from transformers import AutoTokenizer, BertConfig, pipeline

from sftstore.compose import compose
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.errors import SftError
from sftstore.modeling import load_model
from sftstore.predict import Entity, SequencePrediction, TokenPrediction, predict, task_type_of
from sftstore.store import DeltaStore
from sftstore_cli.main import cli

MINILM_TOKENIZER = Path(__file__).parent / "data" / "minilm-tokenizer"
TEXT = "Shugaban kasar Najeriya, Buhari ya ziyarci Kano."
# word pieces: shu ##ga ##ban | ka ##sar | na ##jer ##iya | , | bu ##hari | ya | z ##iya ##rc ##i | kan ##o | .


class StubModel(nn.Module):
    """Logits looked up per token id: a token listed in `token_logits` gets (label, logit), every other 0."""

    def __init__(self, tokenizer, labels: list[str], token_logits: dict[str, tuple[str, float]], positions: int = 64):
        super().__init__()
        self.config = BertConfig(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
                                 max_position_embeddings=positions)
        table = torch.zeros(tokenizer.vocab_size, len(labels))
        for token, (label, logit) in token_logits.items():
            table[tokenizer.convert_tokens_to_ids(token), labels.index(label)] = logit
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM_TOKENIZER)


def probability(model: StubModel, tokenizer, token: str) -> float:
    """The probability of the label a token predicts, computed as `predict` does (float32 softmax)."""
    return float(model.table[tokenizer.convert_tokens_to_ids(token)].softmax(-1).max())


def test_words_take_their_first_sub_token_label_and_merge_into_entities(tokenizer):
    model = StubModel(tokenizer, NER_LABELS, {
        "##ga": ("B-PER", 5.0), "##sar": ("B-LOC", 5.0),  # later sub-tokens: ignored (no '##sar najer' fragment)
        "na": ("B-LOC", 2.0), "##jer": ("O", 9.0),
        "bu": ("B-PER", 3.0), "##hari": ("I-ORG", 9.0),
        "z": ("I-LOC", 1.0),  # an I- without a B- opens an entity
        "kan": ("I-LOC", 4.0),  # and the next I- of the same type continues it
    })
    [prediction] = predict(model, tokenizer, [TEXT], "token-classification")
    p = {token: probability(model, tokenizer, token) for token in ("na", "bu", "z", "kan")}
    assert prediction == TokenPrediction([
        Entity("LOC", p["na"], 15, 23, "Najeriya"),
        Entity("PER", p["bu"], 25, 31, "Buhari"),
        Entity("LOC", (p["z"] + p["kan"]) / 2, 35, 47, "ziyarci Kano"),
    ])
    assert all(TEXT[e.start:e.end] == e.text for e in prediction.entities)
    assert json.loads(json.dumps(prediction.to_dict())) == prediction.to_dict()  # floats survive JSON exactly
    assert isinstance(prediction.to_dict()["entities"][0]["score"], float)


def test_a_b_label_opens_a_new_entity_and_unprefixed_labels_tag_single_words(tokenizer):
    ner = StubModel(tokenizer, NER_LABELS, {"ya": ("B-LOC", 1.0), "kan": ("B-LOC", 1.0)})
    [prediction] = predict(ner, tokenizer, ["ya kano"], "token-classification")
    assert [(e.text, e.label) for e in prediction.entities] == [("ya", "LOC"), ("kano", "LOC")]
    pos = StubModel(tokenizer, ["NOUN", "VERB"], {"ya": ("VERB", 1.0), "kan": ("NOUN", 1.0), "da": ("NOUN", 1.0)})
    [tags] = predict(pos, tokenizer, ["ya kano da"], "token-classification")
    assert [(e.text, e.label) for e in tags.entities] == [("ya", "VERB"), ("kano", "NOUN"), ("da", "NOUN")]


def test_one_forward_for_many_texts_and_long_texts_are_cut_at_the_window(tokenizer):
    model = StubModel(tokenizer, NER_LABELS, {"kan": ("B-LOC", 1.0)}, positions=8)
    long_text = " ".join(["kano"] * 20)
    short, long = predict(model, tokenizer, ["da kano", long_text], "token-classification")
    assert [(e.start, e.end) for e in short.entities] == [(3, 7)]
    assert len(long.entities) == 3  # 8 positions: [CLS], 3 words of 2 pieces, [SEP]... cut inside the 4th word
    assert long.entities[-1].end <= len(long_text)
    assert predict(model, tokenizer, [], "token-classification") == []


def test_sequence_classification_gives_the_label_and_every_score(tokenizer):
    labels = ["entailment", "neutral", "contradiction"]
    model = StubModel(tokenizer, labels, {})
    model.forward = lambda input_ids, **_: SimpleNamespace(logits=torch.tensor([[0.5, 2.0, -1.0]]).expand(len(input_ids), 3))
    [prediction] = predict(model, tokenizer, ["kano"], "sequence-classification")
    expected = torch.tensor([0.5, 2.0, -1.0]).softmax(-1).tolist()
    assert prediction == SequencePrediction("neutral", expected[1], dict(zip(labels, expected)))
    assert json.loads(json.dumps(prediction.to_dict()))["scores"]["neutral"] == expected[1]


def test_bad_task_types_and_slow_tokenizers_are_refused(tokenizer, tiny_xlmr_dir):
    model = StubModel(tokenizer, NER_LABELS, {})
    with pytest.raises(SftError, match="cannot predict for task type 'masked-lm'"):
        predict(model, tokenizer, ["x"], "masked-lm")
    with pytest.raises(SftError, match="need a fast"):
        predict(model, SimpleNamespace(is_fast=False), ["x"], "token-classification")
    lang = synthetic_delta(load_model(tiny_xlmr_dir), 0.05, 1, kind="language", language="hau")
    with pytest.raises(SftError, match="got no task delta"):
        task_type_of([lang])


@pytest.fixture
def ner_store(tiny_bert_dir):
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    task = synthetic_delta(model, 0.08, 12, kind="task", task="ner", task_type="token-classification",
                           labels=NER_LABELS)
    DeltaStore().add(task, source={"type": "test"})
    return task


def test_the_composed_directory_aggregates_by_words_in_transformers_pipeline(tiny_bert_dir, ner_store, tmp_path):
    composed = compose(tiny_bert_dir, [ner_store], device="cpu")
    texts = ["buhari ya ziyarci kano da abuja", "shugaban kasar najeriya john said"]
    ours = predict(composed.model, composed.tokenizer, texts, "token-classification")
    out = composed.save(tmp_path / "ner")
    assert json.loads((out / "config.json").read_text())["id2label"] == {str(i): label for i, label in enumerate(NER_LABELS)}
    assert AutoTokenizer.from_pretrained(out).is_fast
    tagger = pipeline("token-classification", model=str(out), aggregation_strategy="first", device="cpu")
    for text, prediction in zip(texts, ours):
        theirs = tagger(text)
        assert [(e["entity_group"], e["start"], e["end"]) for e in theirs] == \
            [(e.label, e.start, e.end) for e in prediction.entities]
        assert [float(e["score"]) for e in theirs] == pytest.approx([e.score for e in prediction.entities], rel=1e-5)
    assert any(prediction.entities for prediction in ours)


def test_sft_compose_text_prints_a_table_and_json_with_floats(tiny_bert_dir, ner_store):
    runner = CliRunner()
    args = ["compose", "--base", str(tiny_bert_dir), "--task", "ner", "--device", "cpu", "--text", "buhari ya ce a kano"]
    table = runner.invoke(cli, args, terminal_width=80)
    assert table.exit_code == 0, table.output
    assert all(column in table.output for column in ("text", "label", "score", "chars"))
    result = runner.invoke(cli, [*args, "--json"])
    document = json.loads(result.output[result.output.index("{"):])
    composed = compose(tiny_bert_dir, [ner_store], device="cpu")
    [expected] = predict(composed.model, composed.tokenizer, ["buhari ya ce a kano"], "token-classification")
    assert document["prediction"] == expected.to_dict()
    assert all(isinstance(e["score"], float) and isinstance(e["start"], int) for e in document["prediction"]["entities"])
