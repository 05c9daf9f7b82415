"""Progress for logs: plain lines instead of a progress bar when nobody watches a terminal.

A progress bar redraws itself with carriage returns; in a file (a scheduler's job log, ``nohup``,
CI) that is one unreadable line of thousands of redraws. Written to a file, a run prints a line
at every epoch's end and, in long epochs, one every ``every_s`` seconds between them.
"""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, TQDMProgressBar

from .callbacks import EpochHistory


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _epoch(epoch: int, epochs: int) -> str:
    return f"epoch {epoch}/{epochs - 1}"


def epoch_line(row: dict, epochs: int, budget_s: float | None = None) -> str:
    """One epoch of ``metrics.csv`` as a line: its figures in the order people read them. Epochs
    count from 0, as in ``metrics.csv``, the report's curves and Lightning's progress bar."""
    parts = [_epoch(row["epoch"], epochs), f"step {row['step']:,}"]
    for key, label in (
        ("train_loss_epoch", "loss {:.3f}"),
        ("train_top1", "train top-1 {:.4f}"),
        ("val_loss", "val loss {:.3f}"),
        ("val_top1", "val top-1 {:.4f}"),
        ("train_images_per_second", "{:,.0f} img/s"),
    ):
        if row.get(key) is not None:
            parts.append(label.format(row[key]))
    parts.append(_clock(row["elapsed_s"], budget_s))
    return "  ".join(parts)


def _clock(elapsed_s: float, budget_s: float | None) -> str:
    return _duration(elapsed_s) + (f" of {_duration(budget_s)}" if budget_s else "")


class ProgressLines(Checkpoint):
    """Prints ``history``'s row at each epoch's end, and a line with the step, loss and speed
    at most every ``every_s`` seconds within an epoch; times as a share of ``budget_s`` if set.
    (A ``Checkpoint`` subclass, as :class:`EpochHistory` is, so that it runs after the epoch's
    metrics are logged and after the history has its row.)"""

    def __init__(self, history: EpochHistory, every_s: float = 60.0, budget_s: float | None = None):
        self.history = history
        self.budget_s = budget_s
        self.every_s = every_s
        self._last = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if now - self._last < self.every_s or not trainer.is_global_zero:
            return
        self._last = now
        m = trainer.callback_metrics
        # The run's step, as in the epoch lines and metrics.csv, and how far into the epoch.
        into = f"{batch_idx + 1:,}"
        if trainer.num_training_batches != float("inf"):
            into += f"/{trainer.num_training_batches:,}"
        parts = [
            _epoch(trainer.current_epoch, trainer.max_epochs),
            f"step {trainer.global_step:,} (batch {into})",
        ]
        if "train_loss" in m:
            parts.append(f"loss {float(m['train_loss']):.3f}")
        if "img_s" in m:
            parts.append(f"{float(m['img_s']):,.0f} img/s")
        parts.append(_clock(self.history.elapsed(), self.budget_s))
        print("  ".join(parts), flush=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero and self.history.rows:
            print(epoch_line(self.history.rows[-1], trainer.max_epochs, self.budget_s), flush=True)


def progress_callback(
    history: EpochHistory, budget_s: float | None = None, interactive: bool | None = None
) -> L.Callback:
    """A progress bar on a terminal, :class:`ProgressLines` otherwise (with a time budget, each
    line shows the time spent of it: a budgeted run ends on the clock, before its epochs)."""
    if interactive is None:
        interactive = sys.stderr.isatty()
    if interactive:
        return TQDMProgressBar(refresh_rate=10)
    return ProgressLines(history, budget_s=budget_s)
