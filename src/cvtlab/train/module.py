"""The LightningModule: loss, metrics, optimiser, schedule and weight EMA around a CvT."""

from __future__ import annotations

import dataclasses
import math
import random
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from ..data.augment import BatchAugment, normalize, random_crop, resize_images
from ..data.augment_config import AugmentConfig
from ..errors import CvtLabError
from ..models.registry import build_model, get_config
from .config import batch_size_at, train_size_at
from .muon import MuonAdamW


def param_groups(model: nn.Module, weight_decay: float, muon: bool = False) -> list[dict]:
    """Optimiser groups: no decay on norms, biases (every tensor of one dimension) and the names
    the model lists in ``no_weight_decay`` (the class token). With ``muon``, the weights that
    mix channels inside the network (every linear layer but the classifier's, and the patch
    embeddings after the stem) form a group of their own, marked ``muon: True`` for
    :class:`~cvtlab.train.muon.MuonAdamW`; the stem, which reads pixels, the classifier and the
    depthwise filters stay with AdamW."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    stem = getattr(getattr(model, "stage0", None), "patch_embed", None)
    pixels = {id(p) for p in stem.parameters()} if stem is not None else set()
    decay, no_decay, matrices = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip:
            no_decay.append(p)
        elif (
            muon
            and not name.startswith("head.")
            and id(p) not in pixels
            and (p.ndim == 2 or (p.ndim == 4 and p.shape[1] > 1))
        ):
            matrices.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if muon:
        groups.insert(0, {"params": matrices, "weight_decay": weight_decay, "muon": True})
    return groups


def make_optimizer(
    model: nn.Module,
    kind: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    precision: str = "32",
    muon_exact: bool = False,
    muon_polynomials: str = "quintic",
) -> torch.optim.Optimizer:
    """The optimiser a run trains ``model`` with: ``kind`` ``"adamw"`` or ``"muon"``
    (:class:`~cvtlab.train.muon.MuonAdamW` over :func:`param_groups`), set up for the run's
    Lightning ``precision``."""
    muon = kind == "muon"
    extra = {}
    if muon and precision == "bf16-mixed":
        # A run trains in bf16 only where bf16 products are the fast ones (precision.py), so
        # Muon's orthogonalising products run in bf16 too.
        extra["ns_dtype"] = torch.bfloat16
    if muon and muon_exact:
        extra["exact"] = True
    if muon:
        extra["polynomials"] = muon_polynomials
    # The fused kernel updates every tensor in one pass: 3-4x faster than the per-op (foreach)
    # AdamW on a CPU, and a handful of launches instead of dozens on a GPU. Lightning cannot clip
    # gradients for an optimiser that unscales fp16 gradients itself, so fp16 mixed precision
    # keeps the foreach one.
    return (MuonAdamW if muon else torch.optim.AdamW)(
        param_groups(model, weight_decay, muon=muon),
        lr=lr,
        betas=betas,
        fused=precision != "16-mixed",
        **extra,
    )


def warmup_decay(
    step: float, warmup: int, total: int, min_ratio: float, decay: str = "cosine"
) -> float:
    """Learning-rate multiplier: linear warmup to 1, then down to ``min_ratio`` at ``total``
    along a half cosine or a straight line."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    falling = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * falling


class CvTClassifier(L.LightningModule):
    def __init__(
        self,
        model: str,
        model_config: dict,
        class_names: list[str],
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        optimizer: str = "adamw",
        muon_exact: bool = False,
        muon_polynomials: str = "quintic",
        warmup_steps: int = 0,
        total_steps: int = 1,
        min_lr_ratio: float = 0.01,
        lr_decay: str = "cosine",
        label_smoothing: float = 0.1,
        regularise_min_steps: int | None = None,
        ema_decay: float = 0.0,
        ema_warmup_power: float = 2 / 3,
        ema_warmup_gamma: float = 1.0,
        augment: dict | None = None,
        channels_last: bool = False,
        compile: bool = False,
        train_sizes: list | None = None,
        steps_per_epoch: int | None = None,
        budget_seconds: float | None = None,
        batch_size: int | None = None,
        train_batch_sizes: list | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        base = get_config(model)
        self.model = build_model(type(base)(**model_config), model)
        self.model.model_name = model
        self.model.class_names = list(class_names)
        self.num_classes = len(class_names)
        self.augment = BatchAugment(AugmentConfig(**(augment or {})), self.num_classes)
        self.label_smoothing = label_smoothing  # for hard targets; 0 once a short run drops it
        # Set once the run's length is known (regularise_min_steps): the projected optimiser
        # steps and the step from which erasing and smoothing are off (None: kept).
        self.regularisation: dict | None = None
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        # With the warm-up the decay at step s is min(ema_decay, 1 - (1 + s/gamma)^-power), so
        # the random start fades from the average at once (TrainConfig.ema_warmup_power).
        self.ema = (
            ModelEmaV3(
                self.model,
                decay=ema_decay,
                use_warmup=True,
                warmup_power=ema_warmup_power,
                warmup_gamma=ema_warmup_gamma,
            )
            if ema_decay > 0
            else None
        )
        if self.ema is not None:
            # timm leaves its copy in eval mode, which Lightning warns about at the start of
            # training; the copy never runs a training forward, and evaluation sets eval mode.
            self.ema.requires_grad_(False).train()
        # Kept out of the module tree, so the state dict holds each weight once.
        self.__dict__["_compiled"] = torch.compile(self.model) if compile else None
        k = self.num_classes
        top5 = min(5, k)
        # torchmetrics' input checks (torch.unique of the labels, a NaN test of the loss) wait for
        # the device on every update, which stalls a GPU each step; the inputs here are ours, and
        # a non-finite loss is caught by the module itself.
        acc = dict(average="micro", validate_args=False)
        self.train_top1 = MulticlassAccuracy(k, top_k=1, **acc)
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_top1 = MulticlassAccuracy(k, top_k=1, **acc)
        self.val_top5 = MulticlassAccuracy(k, top_k=top5, **acc)
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.val_top1_raw = MulticlassAccuracy(k, top_k=1, **acc)
        self.test_top1 = MulticlassAccuracy(k, top_k=1, **acc)
        self.test_top5 = MulticlassAccuracy(k, top_k=top5, **acc)
        self.test_loss = MeanMetric(nan_strategy="disable")
        self.test_per_class = MulticlassAccuracy(k, top_k=1, average=None, validate_args=False)
        self.test_confusion = MulticlassConfusionMatrix(k, validate_args=False)
        self._seen, self._clock = 0, None
        # Images trained on this process, in the whole run and in one epoch: the schedule counts
        # images rather than optimiser steps, as the batch may change (``train_batch_sizes``).
        self.images_trained = 0
        self._epoch_count = (0, 0)  # (epoch, images trained in it)
        self._batch_epoch: float | None = None  # the schedule epoch of the last training batch
        self._nonfinite: torch.Tensor | None = None  # set once a training loss was not finite
        self._spent_at: tuple[int, float] | None = None  # (step // 10, budget share) under DDP
        self._resumed_means: dict | None = None  # the epoch's running means, from a checkpoint

    # -- data on the device --------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        images, labels = batch
        # A dataset kept at its own smaller size (Tiny ImageNet for a 224-px model) comes to the
        # model's size first, so augmentation sees what it would in an upscaled cache.
        images = resize_images(images, self.model.img_size)
        if self.trainer is not None and self.trainer.training:
            self._settle_regularisation()
            x, targets = self.augment(images, labels)
            current = train_size_at(self.hparams.train_sizes, epoch := self.schedule_epoch())
            if current is not None and current[0] != x.shape[-1]:
                # Progressive resizing: early epochs see smaller images, so cost less per step.
                size, how = current
                if how == "crop":
                    x = random_crop(x, size)
                else:
                    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            self._batch_epoch = epoch
        else:
            x, targets = normalize(images), labels
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, targets, labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not `self._compiled or self.model`: a compiled module's truth value asks for its len().
        return (self.model if self._compiled is None else self._compiled)(x)

    def eval_model(self) -> nn.Module:
        """The weights that are validated, tested and exported: the EMA when it is on."""
        return self.ema.module if self.ema is not None else self.model

    # -- steps ---------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        x, targets, labels = batch
        logits = self(x)
        if targets.ndim == 2:
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        # Reading the flag waits for the device, so on accelerators it is read every 25 steps
        # (and before any checkpoint is written) rather than after each step.
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        if loss.device.type == "cpu" or (batch_idx + 1) % 25 == 0:
            self._raise_if_nonfinite()
        self.train_loss.update(loss.detach())
        self.train_top1.update(logits.detach(), labels)
        self._seen += len(x)
        self.images_trained += len(x)
        self._epoch_count = (self.current_epoch, self.epoch_images + len(x))
        self.log("train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        elapsed = time.perf_counter() - (self._clock or time.perf_counter())
        if elapsed > 0:
            world = self.trainer.world_size if self._trainer is not None else 1
            self.log(
                "img_s", self._seen * world / elapsed, prog_bar=True, on_step=True, on_epoch=False
            )
        return loss

    # -- where the run is in its schedule ------------------------------------------------
    @property
    def epoch_images(self) -> int:
        """Images trained on this process in the current epoch."""
        epoch, images = self._epoch_count
        return images if epoch == self.current_epoch else 0

    def trained_steps(self) -> float:
        """How far training has come, in optimiser steps of ``batch_size`` images (the global
        step itself when the batch never changes, or for a module built without batch_size)."""
        base = self.hparams.batch_size
        return self.images_trained / base if base else float(self.global_step)

    def train_batch_size(self) -> int:
        """The batch that ``train_batch_sizes`` sets now. The loader calls it for each batch it
        draws, so under a time budget it reuses the schedule position of the last training batch
        rather than read the clock (which, under DDP, is a collective)."""
        hp = self.hparams
        if not hp.train_batch_sizes:
            return hp.batch_size
        epoch = self._batch_epoch if hp.budget_seconds else self.current_epoch
        if epoch is None:
            epoch = self.trained_steps() / (hp.steps_per_epoch or 1)
        return batch_size_at(hp.train_batch_sizes, epoch, hp.batch_size)

    def schedule_step(self, step: float) -> float:
        """The position in the learning-rate schedule, in optimiser steps. Under a time budget it
        is the further of ``step`` and the share of the budget spent times ``total_steps``."""
        budget = self.hparams.budget_seconds
        if not budget or self._trainer is None:
            return float(step)
        return max(float(step), min(1.0, self._budget_spent(budget)) * self.hparams.total_steps)

    def _budget_spent(self, budget: float) -> float:
        timers = [c for c in self.trainer.callbacks if isinstance(c, Timer)]
        spent = timers[0].time_elapsed("train") / budget if timers else 0.0
        if self.trainer.world_size == 1:
            return spent
        # Every process must step with the same learning rate and image size, or the replicas
        # drift apart: all take process 0's clock, read at the same steps (every 10, to keep
        # the collective off most steps).
        bucket = self.global_step // 10
        if self._spent_at is None or self._spent_at[0] != bucket:
            self._spent_at = (bucket, float(self.trainer.strategy.broadcast(spent, src=0)))
        return self._spent_at[1]

    def schedule_epoch(self) -> float:
        """The epoch that ``train_sizes`` reads: fractional under a time budget."""
        per_epoch = self.hparams.steps_per_epoch
        if not self.hparams.budget_seconds or not per_epoch:
            return self.current_epoch
        return self.schedule_step(self.trained_steps()) / per_epoch

    # -- regularisation by the run's length ----------------------------------------------
    PROJECT_AT = 0.05  # the share of a time budget whose pace projects the run's steps

    def _settle_regularisation(self) -> None:
        hp = self.hparams
        if self.regularisation is not None or not hp.get("regularise_min_steps"):
            return
        if hp.budget_seconds:
            spent = self._budget_spent(hp.budget_seconds)
            if spent < self.PROJECT_AT:
                return
            # Steps rather than images: the later, larger images cost more a step but come in
            # smaller batches (the recipes' train_batch_sizes), so the pace in steps holds best.
            projected = round(self.global_step / spent)
        else:
            projected = planned_steps(
                hp.total_steps, hp.steps_per_epoch, hp.batch_size, hp.train_batch_sizes
            )
        short = projected < hp.regularise_min_steps
        self.regularisation = {
            "projected_steps": projected,
            "off_from_step": self.global_step if short else None,
        }
        if short:
            self._drop_regularisers()
            if self.global_rank == 0:
                print(
                    f"about {projected:,} steps in this run, fewer than regularise_min_steps "
                    f"({hp.regularise_min_steps:,}): random erasing and label smoothing off from "
                    f"step {self.global_step:,}",
                    flush=True,
                )

    def _drop_regularisers(self) -> None:
        cfg = dataclasses.replace(self.augment.cfg, random_erase=0.0, label_smoothing=0.0)
        self.augment = BatchAugment(cfg, self.num_classes)
        self.label_smoothing = 0.0

    def _raise_if_nonfinite(self) -> None:
        if self._nonfinite is not None and bool(self._nonfinite):
            raise FloatingPointError(
                f"the training loss became non-finite (NaN or inf) by epoch {self.current_epoch}, "
                f"step {self.global_step}"
            )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def on_train_epoch_start(self) -> None:
        self._seen, self._clock = 0, time.perf_counter()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._clock is None:  # resumed mid-epoch: on_train_epoch_start did not run
            self._seen, self._clock = 0, time.perf_counter()
        if self._resumed_means is not None:
            self._add_resumed_means(self._resumed_means)
            self._resumed_means = None

    # The epoch means of training loss and top-1 are running sums in torchmetrics' states, which
    # Lightning does not checkpoint: an epoch resumed mid-way would average only the batches
    # after the resume. The sums over all processes go into the checkpoint instead.
    _EPOCH_MEANS = ("train_loss", "train_top1")

    def _epoch_means(self) -> dict:
        states = [
            (n, k, v) for n in self._EPOCH_MEANS for k, v in getattr(self, n).metric_state.items()
        ]
        # One collective for all of them (exact in float64 for any count a run reaches).
        flat = torch.cat([v.detach().double().reshape(-1) for _, _, v in states])
        if self._trainer is not None and self.trainer.world_size > 1:
            flat = self.trainer.strategy.reduce(flat.clone(), reduce_op="sum")
        flat, means, at = flat.cpu(), {}, 0
        for name, key, value in states:
            means.setdefault(name, {})[key] = flat[at : at + value.numel()].reshape(value.shape)
            at += value.numel()
        return {"epoch": self.current_epoch, "states": means}

    def _add_resumed_means(self, saved: dict) -> None:
        # A checkpoint from an epoch's end (the sums already reset, or about to be) belongs to an
        # epoch this run does not continue; the sums are whole-run totals, kept by process 0.
        if saved["epoch"] != self.current_epoch or self.global_rank != 0:
            return
        for name, states in saved["states"].items():
            metric = getattr(self, name)
            for key, value in states.items():
                mine = getattr(metric, key)
                setattr(metric, key, mine + value.to(mine.device, mine.dtype))

    def on_train_epoch_end(self) -> None:
        elapsed = time.perf_counter() - (self._clock or time.perf_counter())
        world = self.trainer.world_size if self.trainer else 1
        ips = self._seen * world / elapsed if elapsed > 0 else 0.0
        self.log("train_images_per_second", ips, sync_dist=False, rank_zero_only=True)
        # The epoch's images beside its speed: a run's overall speed is then all its images over
        # the time they took, whatever sizes and batches its epochs trained at. (The count comes
        # from the checkpoint in an epoch resumed mid-way; the speed is measured since the resume.)
        images = float(self.epoch_images * world)
        self.log("train_images", images, sync_dist=False, rank_zero_only=True)
        self.log("train_loss_epoch", self.train_loss.compute(), sync_dist=True)
        self.log("train_top1", self.train_top1.compute())
        self.train_loss.reset()
        self.train_top1.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        x, _, labels = batch
        logits = self.eval_model()(x)
        self.val_loss.update(F.cross_entropy(logits.float(), labels))
        self.val_top1.update(logits, labels)
        self.val_top5.update(logits, labels)
        if self.ema is not None:
            self.val_top1_raw.update(self.model(x), labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val_loss", self.val_loss.compute(), prog_bar=False, sync_dist=True)
        self.log("val_top1", self.val_top1.compute(), prog_bar=True)
        self.log("val_top5", self.val_top5.compute())
        if self.ema is not None:
            self.log("val_top1_raw", self.val_top1_raw.compute())
            self.val_top1_raw.reset()
        self.val_loss.reset()
        self.val_top1.reset()
        self.val_top5.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        x, _, labels = batch
        logits = self.eval_model()(x)
        self.test_loss.update(F.cross_entropy(logits.float(), labels))
        self.test_top1.update(logits, labels)
        self.test_top5.update(logits, labels)
        self.test_per_class.update(logits, labels)
        self.test_confusion.update(logits, labels)

    def on_test_epoch_end(self) -> None:
        self.log("test_loss", self.test_loss.compute(), sync_dist=True)
        self.log("test_top1", self.test_top1.compute())
        self.log("test_top5", self.test_top5.compute())
        # Kept for the report; torchmetrics has already summed them across processes.
        self.per_class_accuracy = self.test_per_class.compute().cpu()
        self.confusion = self.test_confusion.compute().cpu()
        for m in (
            self.test_loss,
            self.test_top1,
            self.test_top5,
            self.test_per_class,
            self.test_confusion,
        ):
            m.reset()

    def predict_step(self, batch, batch_idx: int):
        x, _, _ = batch
        return self.eval_model()(x).softmax(-1)

    # -- optimisation --------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        precision = str(self.trainer.precision) if self._trainer is not None else "32"
        optimizer = make_optimizer(
            self.model,
            hp.get("optimizer", "adamw"),  # runs saved before the option: AdamW
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            betas=tuple(hp.betas),
            precision=precision,
            muon_exact=hp.get("muon_exact", False),
            muon_polynomials=hp.get("muon_polynomials", "quintic"),
        )

        def lr_factor(_: int) -> float:
            # The position comes from the images trained, not the scheduler's step count, so
            # that steps of a larger batch move the schedule further.
            done = self.trained_steps()
            position = done if done < hp.warmup_steps else self.schedule_step(done)
            return warmup_decay(
                position, hp.warmup_steps, hp.total_steps, hp.min_lr_ratio, hp.lr_decay
            )

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for an optimiser that could unscale
        # fp16 gradients itself, as the fused AdamW could; with bf16 or fp32 there is no scaler,
        # so the gradients are true gradients and are clipped directly.
        if gradient_clip_val and optimizer.param_groups[0].get("fused"):
            # foreach: one call over all gradients; torch picks it by default on GPUs only,
            # and on a CPU the per-tensor loop costs a few ms of Python a step.
            if gradient_clip_algorithm in (None, "norm"):
                nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val, foreach=True)
            else:
                nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val, foreach=True)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- exact resume ----------------------------------------------------------------------
    def _raise_if_grouped_differently(self, saved: dict) -> None:
        # A state saved under other groups cannot be restored: a resume with another
        # --optimizer, or a Muon run saved before the patch embeddings after the stem joined the
        # blocks' linear layers in Muon's group.
        hp = self.hparams
        muon = hp.get("optimizer", "adamw") == "muon"
        want = [len(g["params"]) for g in param_groups(self.model, hp.weight_decay, muon=muon)]
        have = [len(g["params"]) for g in saved.get("param_groups", [])]
        if have != want:
            raise CvtLabError(
                f"--resume: the checkpoint's optimiser state groups its tensors {have}, this"
                f" run {want} (another --optimizer, or a Muon run saved before Muon stepped the"
                " patch embeddings): start a new run, or one from its weights with --pretrained"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._raise_if_nonfinite()  # never save weights a non-finite loss has touched
        # Plain tensors and numbers only, so the checkpoint loads with weights_only=True.
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(),
        }
        checkpoint["epoch_means"] = self._epoch_means()
        if self.regularisation is not None:
            checkpoint["regularisation"] = dict(self.regularisation)
        checkpoint["images_trained"] = {
            "run": self.images_trained,
            "epoch": self._epoch_count[0],
            "in_epoch": self._epoch_count[1],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("optimizer_states") or []
        if saved and self._trainer is not None:  # resuming, not reading weights
            self._raise_if_grouped_differently(saved[0])
        # Checkpoints written before images were counted held a fixed batch throughout.
        steps = checkpoint.get("global_step", 0)
        counted = checkpoint.get("images_trained") or {
            "run": steps * (self.hparams.batch_size or 0),
            "epoch": checkpoint.get("epoch", 0),
            "in_epoch": 0,
        }
        self.images_trained = int(counted["run"])
        self._epoch_count = (int(counted["epoch"]), int(counted["in_epoch"]))
        self._resumed_means = checkpoint.get("epoch_means")
        settled = checkpoint.get("regularisation")
        if settled is not None and self.regularisation is None:
            self.regularisation = dict(settled)
            if settled["off_from_step"] is not None:
                self._drop_regularisers()
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(states["python"])


def planned_steps(
    total_steps: int, steps_per_epoch: int | None, batch_size: int | None, schedule: list | None
) -> int:
    """The optimiser steps of a run's epochs: ``total_steps`` counts steps of ``batch_size``
    images, and a ``train_batch_sizes`` schedule trains some epochs in other batches."""
    if not schedule or not steps_per_epoch or not batch_size:
        return total_steps
    epochs = round(total_steps / steps_per_epoch)
    images = steps_per_epoch * batch_size
    return sum(math.ceil(images / batch_size_at(schedule, e, batch_size)) for e in range(epochs))


def load_module(path: str) -> CvTClassifier:
    """A trained module from a cvtlab Lightning checkpoint (read with ``weights_only=True``)."""
    from pathlib import Path

    if not Path(path).is_file():
        raise CvtLabError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling, zip and I/O errors all mean the same to the user
        raise CvtLabError(
            f"{path}: not a readable cvtlab checkpoint ({type(e).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise CvtLabError(
            f"{path}: not a cvtlab training checkpoint (no hyper_parameters/state_dict)"
        )
    hp = dict(ckpt["hyper_parameters"])
    hp["compile"] = False
    module = CvTClassifier(**hp)
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CvtLabError(f"{path}: does not match its own architecture ({first})") from None
    return module.eval()
