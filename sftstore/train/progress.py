"""What training and evaluation tell their user on stderr: a log line every N steps (step, loss, learning
rate, elapsed, ETA), a line per evaluation, bars (on a terminal, or when asked) that show the loss, and
warnings about a run that learnt nothing. `transformers`' own printer, which writes raw dicts such as
`{'loss': ...}`, is never used (`SparseFineTuningTrainer` swaps it for `TrainingProgress`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tqdm import tqdm
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

if TYPE_CHECKING:
    from ..delta import SparseDelta

T = TypeVar("T")


def bars_wanted(progress: bool | None) -> bool:
    """Bars when asked (True), never (False), or when stderr is a terminal (None)."""
    return sys.stderr.isatty() if progress is None else progress


def echo(line: str) -> None:
    """One line on stderr, above any bar being drawn."""
    tqdm.write(line, file=sys.stderr)


def bar(items: Iterable[T], bars: bool, desc: str, total: int | None = None) -> Iterable[T]:
    """`items`, with a bar on stderr when `bars` (e.g. the batches of an evaluation)."""
    return tqdm(items, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, leave=False) if bars else items


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


@dataclass(frozen=True)
class Progress:
    """How a training run reports: bars or not, a line every `log_every` steps (0: none), lines prefixed by `label`."""

    bars: bool = False
    log_every: int = 0
    label: str = ""


class TrainingProgress(TrainerCallback):
    """A training bar (with the loss) and an evaluation bar, a log line every time the Trainer logs the loss,
    and a line per evaluation. Only the main process of a distributed run reports. While the run lasts,
    `transformers` shows errors only and no bars of its own (checkpoint writes, reloads of the best one)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.train_bar = self.eval_bar = None
        self.loss: float | None = None
        self.best: float | None = None
        self.started, self.first_step = time.monotonic(), 0  # set again when training begins
        self.quieted: tuple[int, bool] | None = None  # transformers' log settings while the run silences them

    def _name(self, args) -> str:
        phase = Path(args.output_dir).name  # the run's phase (phase1, phase2, full) or its directory
        return f"{self.progress.label} {phase}".strip()

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.started, self.first_step = time.monotonic(), state.global_step
        self.quieted = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if self.progress.bars:
            self.train_bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self._name(args), unit="step",
                                  file=sys.stderr, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.train_bar is not None:
            self.train_bar.update(state.global_step - self.train_bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        self.loss = float(logs["loss"])
        if self.train_bar is not None:
            self.train_bar.set_postfix(loss=f"{self.loss:.4f}", refresh=False)
        if self.progress.log_every:
            elapsed = time.monotonic() - self.started
            done = max(state.global_step - self.first_step, 1)
            eta = elapsed / done * max(state.max_steps - state.global_step, 0)
            lr = logs.get("learning_rate")
            echo(f"{self._name(args)} step {state.global_step}/{state.max_steps} loss {self.loss:.4f}"
                 + (f" lr {float(lr):.3g}" if lr is not None else "")
                 + f" elapsed {_duration(elapsed)} ETA {_duration(eta)}")

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not (self.progress.bars and state.is_world_process_zero):
            return
        if self.eval_bar is None:
            total = len(eval_dataloader) if hasattr(eval_dataloader, "__len__") else None
            self.eval_bar = tqdm(total=total, desc=f"{self._name(args)} evaluating", unit="batch", file=sys.stderr,
                                 dynamic_ncols=True, leave=False)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None
        metric = args.metric_for_best_model or "loss"
        value = (metrics or {}).get(f"eval_{metric}")
        if value is None:
            return
        higher = args.greater_is_better if args.greater_is_better is not None else metric != "loss"
        if self.best is None or (value > self.best if higher else value < self.best):
            self.best = value
        if self.progress.log_every:
            echo(f"{self._name(args)} step {state.global_step}/{state.max_steps} dev {metric} {value:.4f} "
                 f"(best {self.best:.4f})")

    def on_train_end(self, args, state, control, **kwargs):
        if self.train_bar is not None:
            self.train_bar.close()
            self.train_bar = None
        if self.quieted is not None:
            verbosity, bars = self.quieted
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        if self.progress.log_every and state.is_world_process_zero:
            echo(f"{self._name(args)} done: {state.global_step} steps in {_duration(time.monotonic() - self.started)}"
                 + (f", last loss {self.loss:.4f}" if self.loss is not None else ""))


def run_warnings(delta: SparseDelta) -> list[str]:
    """What is wrong with a trained delta that its user should hear about: it changes nothing, or its best
    dev score is 0 (the head never predicted a right label or entity)."""
    warnings = []
    if not any(bool(entry.values.any()) for entry in delta.params.values()):
        warnings.append(f"warning: {delta.kind} delta {delta.name!r} changes no base parameter (every stored value is 0): "
                        "train longer (--max-steps, --epochs) or with a larger --lr")
    for name, value in delta.config.metrics.items():
        if name.startswith("dev_") and value == 0:
            warnings.append(f"warning: the best {name.replace('_', ' ', 1)} of {delta.kind} delta {delta.name!r} is 0: "
                            "it learnt nothing the dev set rewards; train longer (--max-steps, --epochs), with a larger "
                            "--lr, or check the data")
    return warnings
