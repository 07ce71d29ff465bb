"""Fine-tuning Slow and Fast: weight sets, phase detection from loss curves, multipliers, training."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForTokenClassification, TrainerCallback

from sftstore.demo import NER_LABELS
from sftstore.modeling import base_parameters, load_model
from sftstore.train.data import shipped_data
from sftstore.train.options import TrainingOptions
from sftstore.train.slow_fast import SlowFastPolicy
from sftstore.train.sparse_trainer import SparseFineTuningTrainer
from sftstore.train.task import TaskData

Q = "encoder.layer.{}.attention.self.query.weight"
FFN = "encoder.layer.{}.intermediate.dense.weight"
OUT = "encoder.layer.{}.output.dense.weight"
ATTN_OUT = "encoder.layer.{}.attention.output.dense.weight"


def test_weight_sets_of_a_12_layer_encoder():
    policy = SlowFastPolicy(num_layers=12)
    for layer in range(12):
        ffn, attention = policy.weight_set(FFN.format(layer)), policy.weight_set(Q.format(layer))
        assert policy.weight_set(OUT.format(layer)) == ffn
        assert policy.weight_set(ATTN_OUT.format(layer)) == attention
        if layer < 4:
            assert (ffn, attention) == ("S_II", "S_I")  # feed-forward of the first 4: S_II
        elif layer < 10:
            assert (ffn, attention) == ("S_I", "S_I")  # everything in the first 10: S_I
        else:
            assert (ffn, attention) == ("V_I", "V_II")  # the last 2: attention is V_II
    assert policy.weight_set("embeddings.word_embeddings.weight") == "other"
    assert policy.weight_set("pooler.dense.weight") == "other"


def test_weight_sets_scale_with_depth():
    policy = SlowFastPolicy(num_layers=6)  # 10/12 -> 5 layers, 4/12 -> 2, 2/12 -> 1
    assert [policy.weight_set(FFN.format(i)) for i in range(6)] == ["S_II", "S_II", "S_I", "S_I", "S_I", "V_I"]
    assert [policy.weight_set(Q.format(i)) for i in range(6)] == ["S_I"] * 5 + ["V_II"]


def drive(policy: SlowFastPolicy, losses) -> list[tuple[bool, dict]]:
    states = []
    for loss in losses:
        policy.record(loss)
        states.append((policy.in_first_phase, policy.multipliers()))
    return states


def test_first_phase_multipliers_then_the_second_phase():
    policy = SlowFastPolicy(num_layers=12, window=10)
    steep = [5.0 - 0.1 * t for t in range(40)]  # each window's mean drops by 1.0 > 0.1
    flat = [1.0] * 30
    states = drive(policy, steep + flat)
    for in_first, multipliers in states[:40]:
        assert in_first
        assert multipliers == {"S_I": 0.01, "S_II": 0.01, "V_I": 1.0, "V_II": 1.0, "other": 1.0}
    # P1 ends at the first step whose earlier window's mean is no more than 0.1 above the last one's:
    # at t = 56 the earlier window (steps 37-46) holds 1.3, 1.2, 1.1 and seven 1.0s: mean 1.06
    # (at t = 55 it is 1.1 - 1.0, a hair above 0.1 in floating point)
    first_p2 = next(t for t, (in_first, _) in enumerate(states) if not in_first)
    assert first_p2 == 56
    in_first, multipliers = states[-1]
    assert not in_first
    assert multipliers["V_II"] == 10.0 and multipliers["S_I"] == 1.0 and multipliers["V_I"] == 1.0
    assert multipliers["S_II"] == pytest.approx(max(1 - 1.0**3, 0.0))  # flat: phi = 1, R = 0


def test_second_phase_r_follows_the_loss_ratio():
    policy = SlowFastPolicy(num_layers=12, window=4, threshold=10.0)  # P1 ends as soon as windows fill
    drive(policy, [2.0] * 4 + [1.0] * 4)
    assert not policy.in_first_phase
    assert policy.phi() == pytest.approx(0.5)
    assert policy.multipliers()["S_II"] == pytest.approx(1 - 0.5**3)
    policy.fast = False  # the paper leaves policy IV out for NER
    assert policy.multipliers()["V_II"] == 1.0


def test_first_phase_never_comes_back():
    policy = SlowFastPolicy(num_layers=12, window=5)
    drive(policy, [1.0] * 10)  # no drop: P1 ends when the windows fill
    assert not policy.in_first_phase
    drive(policy, [10.0 - t for t in range(10)])  # a later steep drop does not restart P1
    assert not policy.in_first_phase


class LearningRates(TrainerCallback):
    """The learning rate each group stepped with (read right after the optimizer step)."""

    def __init__(self):
        self.steps = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append({g["sft_set"]: g["lr"] for g in optimizer.param_groups})


def test_training_steps_with_the_scaled_learning_rates(tmp_path, tiny_bert_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    data = TaskData.read("ner", [shipped_data("ner/en/train.txt")]).head(32)
    dataset = data.dataset(tokenizer, NER_LABELS, 32)
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    options = TrainingOptions(batch_size=8, max_steps=4, eval_steps=100, learning_rate=1e-3, progress=False,
                              use_cpu=True, lr_policy="slow-fast")
    args = options.training_arguments(str(tmp_path), metric="loss", greater_is_better=False)
    recorder = LearningRates()
    trainer = SparseFineTuningTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                                      data_collator=DataCollatorForTokenClassification(tokenizer),
                                      callbacks=[recorder], **options.trainer_kwargs())
    assert trainer.lr_policy.num_layers == 2
    before = {n: p.detach().clone() for n, p in base_parameters(model).items()}
    trainer.train()
    assert len(recorder.steps) == 4
    for rates in recorder.steps:  # the first 200 steps are P1: S_I at c1 = 0.01 of the others' rate
        assert rates["S_I"] == pytest.approx(0.01 * rates["other"])
    assert all(torch.isfinite(p).all() for p in base_parameters(model).values())
    assert any(not torch.equal(p, before[n]) for n, p in base_parameters(model).items())
