"""The LightningDataModule: cached uint8 batches in, augmentation left to the model's device.

Batches are (uint8 images (B, H, W, 3), int64 labels); the LightningModule normalises and
augments them after they reach the device (``on_after_batch_transfer``), so the GPU does that
work when training there.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import CvtLabError
from .cache import DecodedDataset, open_decoded, reopenable, reopened
from .splits import plan_splits


class CachedImages(Dataset):
    """Rows of the decoded cache; fetched a whole batch at a time through ``__getitems__``."""

    def __init__(self, data: DecodedDataset, rows: np.ndarray):
        self.images = data.images
        self.labels = data.labels
        self.rows = np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:  # spawned workers open the cache's file (cache.py)
        return {**self.__dict__, "images": reopenable(self.images)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, images=reopened(state["images"]))

    def __getitem__(self, i: int):
        r = self.rows[i]
        return torch.from_numpy(np.array(self.images[r])), int(self.labels[r])

    def __getitems__(self, indices: list[int]):
        rows = self.rows[np.asarray(indices)]
        order = np.argsort(rows)  # sorted reads are sequential in the memory map
        images = np.empty((len(rows),) + self.images.shape[1:], dtype=np.uint8)
        images[order] = self.images[rows[order]]
        return torch.from_numpy(images), torch.from_numpy(self.labels[rows].astype(np.int64))


def _leave_interrupts_to_the_main_process(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches every process in its group, workers too, and a batch
    scheduler's SIGTERM every process of the job. A worker that quit on it would fail the batch
    the main process still draws while it finishes the step and saves (the clean stop of
    ``train/callbacks.py: StopOnSignal``); the main process shuts the workers down when it ends,
    and a worker whose main process is gone exits by itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _keep_batch(batch):
    return batch


class EpochShuffle(Sampler[int]):
    """A seeded permutation per epoch, split across DDP ranks, that can resume mid-epoch.

    ``resume(epoch, consumed)`` makes the next iteration of that epoch continue with exactly the
    samples after the first ``consumed``, in the same order. ``len`` stays the full epoch, as
    Lightning counts the batches already done from its own restored progress.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.per_rank = math.ceil(n / world_size)
        self.epoch = 0
        self._resume_at = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._resume_at = epoch, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        pad = self.per_rank * self.world_size - self.n
        if pad:
            perm = torch.cat([perm, perm[:pad]])
        return perm[self.rank :: self.world_size].tolist()

    def __iter__(self):
        order = self._order()[self._resume_at :]
        self._resume_at = 0
        yield from order

    def __len__(self) -> int:
        return self.per_rank

    def resume(self, epoch: int, consumed: int) -> None:
        self.epoch, self._resume_at = epoch, consumed


class ScheduledBatches(Sampler[list[int]]):
    """Batches drawn in the sampler's order, each as large as ``batch_size_now()`` says when it is
    drawn: the training batch can change mid-epoch (the loader draws its indices in the main
    process, so the value is read there, a prefetched batch or two ahead). An incomplete last
    batch is dropped. It has no ``len``, as the number of batches is known only at the epoch's
    end: Lightning then ends the epoch, and validates, when the iterator ends."""

    def __init__(self, sampler: Sampler[int], batch_size_now: Callable[[], int]):
        self.sampler, self.batch_size_now = sampler, batch_size_now

    def __iter__(self) -> Iterator[list[int]]:
        order = iter(self.sampler)
        while True:
            size = self.batch_size_now()
            batch = list(islice(order, size))
            if len(batch) < size:
                return
            yield batch


class ImageDataModule(L.LightningDataModule):
    """Tiny ImageNet (zip or folder) or any image folder, from the decoded cache: batches of
    uint8 (B, img_size, img_size, 3) images and their labels.

    ``upscale=False``: images smaller than ``img_size`` that the cache keeps at their own size
    (Tiny ImageNet's 64 px) come in batches at that size, for the model's module to resize on
    the device (:func:`~cvtlab.data.augment.resize_images`; cvtlab's training module does)."""

    def __init__(
        self,
        data: str | Path,
        img_size: int = 64,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_per_class: int = 10,
        seed: int = 0,
        num_workers: int = 0,
        upscale: bool = True,
    ):
        super().__init__()
        self.data_path = str(data)
        self.img_size = img_size
        self.upscale = upscale
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_per_class = val_per_class
        self.seed = seed
        self.num_workers = num_workers
        self.data: DecodedDataset | None = None
        self.rows: dict[str, np.ndarray] = {}
        self._train_sampler: EpochShuffle | None = None
        # Set by the training run when the batch follows a schedule (``train_batch_sizes``).
        self.batch_size_now: Callable[[], int] | None = None

    def prepare_data(self) -> None:
        # One process builds the cache; the others wait on its lock and reuse it.
        open_decoded(self.data_path, self.img_size, upscale=self.upscale)

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = open_decoded(self.data_path, self.img_size, upscale=self.upscale)
            names = self.data.class_names
            if len(names) < 2:
                raise CvtLabError(
                    f"{self.data_path}: one class ({names[0]!r}); a classifier needs images of"
                    " at least two classes, one folder each"
                )
            self.rows = plan_splits(self.data, self.val_per_class, self.seed)
            if self.batch_size > len(self.rows["train"]):
                raise CvtLabError(
                    f"--batch-size {self.batch_size} is larger than the {len(self.rows['train'])} training images"
                )

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = CachedImages(self.data, self.rows[split])
        rank, world = self._rank()
        if shuffle:
            if self._train_sampler is None:
                self._train_sampler = EpochShuffle(len(dataset), self.seed, rank, world)
            sampler = self._train_sampler
            batching = dict(batch_size=self.batch_size, sampler=sampler, drop_last=True)
            if self.batch_size_now is not None:
                scheduled = ScheduledBatches(sampler, self.batch_size_now)
                batching = dict(batch_sampler=scheduled)
        else:
            # Each rank evaluates a disjoint share; torchmetrics adds them up across ranks.
            sampler = list(range(rank, len(dataset), world))
            batching = dict(batch_size=self.eval_batch_size, sampler=sampler, drop_last=False)
        return DataLoader(
            dataset,
            **batching,
            collate_fn=_keep_batch,
            # Its own generator: creating an epoch's iterator must not draw from the global RNG,
            # or a resumed run's dropout and augmentation would drift from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=_leave_interrupts_to_the_main_process,
            # Page-locked batches copy to a GPU asynchronously, overlapping the previous step.
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not len(self.rows["test"]):
            raise CvtLabError(f"{self.data_path}: no labelled test images")
        return self._loader("test", shuffle=False)

    def state_dict(self) -> dict:
        """Where training stands in the data: saved in every checkpoint for an exact resume."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        # Batches trained so far in this epoch (the loader itself may have prefetched more),
        # and the images in them, which differ from batches × batch_size under a batch schedule.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        images = getattr(trainer.lightning_module, "epoch_images", done * self.batch_size)
        return {
            "epoch": trainer.current_epoch,
            "batches_done": done,
            "batch_size": self.batch_size,
            "images_done": images,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.setup()
        rank, world = self._rank()
        self._train_sampler = EpochShuffle(len(self.rows["train"]), self.seed, rank, world)
        done = state.get("images_done", state["batches_done"] * state["batch_size"])
        self._train_sampler.resume(state["epoch"], done)
