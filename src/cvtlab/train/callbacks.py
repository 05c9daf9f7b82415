"""Callbacks, plugins and the CSV logger a cvtlab run adds to Lightning's Trainer."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..errors import CvtLabError, RunInterrupted

EPOCH_KEYS = [
    "epoch",
    "step",
    "lr",
    "train_loss_epoch",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "val_top1_raw",
    "train_images_per_second",
    "train_images",
    "elapsed_s",
]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file beside the target, flush it to disk, then rename: a kill at any
    moment leaves either the old checkpoint or the new one, never a torn file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _sync_folder(path.parent)
        except (OSError, RuntimeError) as e:
            # torch.save reports a full disk as a RuntimeError about a file position.
            if shutil.disk_usage(path.parent).free < 2**20:  # measured before the unlink
                reason = "the disk is full"
            elif isinstance(e, OSError) and e.strerror:
                reason = e.strerror
            else:
                reason = str(e).split("\n")[0]
            tmp.unlink(missing_ok=True)
            raise CvtLabError(
                f"{path}: the checkpoint could not be written ({reason}); the one before it, if"
                " any, is intact"
            ) from None


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk: until then a rename can be lost to a power cut, leaving
    the previous checkpoint under the name, however durably the new file's bytes were written."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a platform or file system that cannot open folders
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that follows its run folder when the folder moves.

    Lightning forgets the best score it kept when a run resumes from another directory, and
    keeps pointing at the old folder's files: a run folder copied off a cluster node and resumed
    elsewhere would replace ``best.ckpt`` with the first epoch after the resume, better or not.
    The saved paths are moved into this folder instead."""

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and saved != self.dirpath:

            def moved(path):
                if not path or os.path.dirname(path) != saved:
                    return path
                return os.path.join(self.dirpath, os.path.basename(path))

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": moved(state_dict.get("best_model_path")),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path")),
                "last_model_path": moved(state_dict.get("last_model_path")),
                "best_k_models": {
                    moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()
                },
            }
        super().load_state_dict(state_dict)


class LastCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` after every epoch (its ``metrics.csv`` row included) and when
    training stops, unless that step is already saved. Lightning's ``ModelCheckpoint`` writes its
    ``last.ckpt`` at an epoch's end only when the monitored metric improved, so a run whose last
    epoch set no best, or that its time budget stopped, would end with an older one. (A
    ``Checkpoint`` subclass, listed after :class:`EpochHistory`, so Lightning runs it after
    the epoch's row is kept.)"""

    def __init__(self, path: Path):
        self.path = str(path)
        self._saved_step: int | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.global_step == self._saved_step:
            return
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step


class StopOnSignal(Callback):
    """Ctrl-C (SIGINT) or SIGTERM (``kill``, a scheduler's preemption) during training finishes
    the step in progress, writes ``last.ckpt`` at that step and stops with
    :class:`RunInterrupted`, so ``--resume`` continues from there instead of from the last
    periodic checkpoint. A second signal stops at once. (Lightning alone ends the run where it
    stands on Ctrl-C, and at the next step on SIGTERM, saving nothing.)"""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, path: Path, out: Path):
        self.path, self.out = str(path), out
        self.requested: int | None = None
        self._previous: dict = {}

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():  # signals reach only that one
            self._previous = {s: signal.signal(s, self._request) for s in self.SIGNALS}

    def _request(self, signum: int, frame) -> None:
        if self.requested is not None:
            self._restore()
            raise KeyboardInterrupt
        self.requested = signum
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            return  # Ctrl-C reaches every process on this machine; the first one says it
        print(
            f"\ncvtlab: {signal.Signals(signum).name}: saving at the end of this step "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        stop = self.requested is not None
        if trainer.world_size > 1:
            # Every process must stop at the same point: saving is collective, and one process
            # may have been signalled (``kill`` of the first) while the others were not.
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        return stop

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if self._stop_requested(trainer):
            self._stop(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        # A signal during the last validation, after the last step: stop before the test.
        if self._stop_requested(trainer):
            self._stop(trainer)
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def _stop(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self._restore()
        signum = self.requested or signal.SIGTERM  # another process's signal, in DDP
        raise RunInterrupted(
            f"{signal.Signals(signum).name} at step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}); {self.path} holds it. Continue with: "
            f"cvtlab train --resume --out {self.out}",
            signum,
            quiet=not trainer.is_global_zero,
        )


class EpochHistory(Checkpoint):
    """One row per epoch in ``metrics.csv``, rewritten whole each epoch and kept in the
    checkpoint so a resumed run continues the same file. (A ``Checkpoint`` subclass so that
    Lightning calls it after the module has logged its epoch metrics.)"""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self._start_elapsed = 0.0
        self._t0 = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._start_elapsed = self.rows[-1]["elapsed_s"] if self.rows else 0.0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row["lr"] = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        for key in EPOCH_KEYS[3:-1]:
            if key in m:
                row[key] = int(m[key]) if key == "train_images" else float(m[key])
        row["elapsed_s"] = round(self.elapsed(), 2)
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        if trainer.is_global_zero:
            self.write()

    def elapsed(self) -> float:
        """Seconds of training so far, those before a resume included."""
        if self._t0 is None:
            return self._start_elapsed
        return self._start_elapsed + time.perf_counter() - self._t0

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=EPOCH_KEYS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict.get("rows", []))


class _ContinuingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing ``metrics.csv`` when it starts, so a resumed run
    would lose every row logged before the interruption. This one keeps those rows, up to
    the first step the resumed run logs again, and appends after them."""

    def _check_log_dir_exists(self) -> None:
        # Called by the writer's __init__; Lightning's version deletes the file here.
        self._earlier: list[dict] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self._earlier = list(csv.DictReader(f))

    def save(self) -> None:
        if self._earlier and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            kept = [row for row in self._earlier if int(float(row["step"])) < first]
            self.metrics_keys = sorted(self._earlier[0])
            with open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._earlier = []
        super().save()


class RunCSVLogger(CSVLogger):
    """Lightning's CSV logger (``logs/metrics.csv``: every logged value by step) that carries
    on after ``--resume`` instead of starting the file again."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
