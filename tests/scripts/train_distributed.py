"""Train a tiny LT-SFT task delta; run alone or under torchrun. Usage: BASE_DIR OUT_DIR GLOBAL_BATCH.

Each process gets GLOBAL_BATCH / world_size examples per step, so every run sees the same global
batches. The main process saves the delta (sft_delta.safetensors) in OUT_DIR.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sftstore.demo import NER_LABELS  # noqa: E402
from sftstore.train.data import shipped_data  # noqa: E402
from sftstore.train.lt_sft import SparseFineTuningArguments  # noqa: E402
from sftstore.train.options import TrainingOptions  # noqa: E402
from sftstore.train.task import TaskData, train_task_delta  # noqa: E402

base, out, global_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
world = int(os.environ.get("WORLD_SIZE", "1"))
data = TaskData.read("ner", [shipped_data("ner/en/train.txt")]).head(64)
options = TrainingOptions(batch_size=global_batch // world, max_length=32, max_steps=6, phase1_max_steps=4,
                          eval_steps=3, learning_rate=1e-3, progress=False, use_cpu=True)
delta = train_task_delta(base, "ner", data, data, os.path.join(out, "run"),
                         sft=SparseFineTuningArguments(density=0.05), options=options)
if int(os.environ.get("RANK", "0")) == 0:
    delta.save_pretrained(os.path.join(out, "delta"))
    assert delta.config.labels == NER_LABELS
