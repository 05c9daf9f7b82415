"""``cvtlab train``: one run from configuration to checkpoints, metrics and report."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import uuid
import warnings
import zipfile
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import TQDMProgressBar

from ..compare import history_figures
from ..data.datamodule import ImageDataModule
from ..data.download import check_recorded_data, resolve_data
from ..errors import CvtLabError, check_creatable
from ..machine import describe_machine
from ..models.cvt import check_img_size
from ..models.pretrained import start_from_pretrained
from ..models.registry import get_config
from .callbacks import (
    AtomicCheckpointIO,
    EpochHistory,
    LastCheckpoint,
    RunCheckpoint,
    RunCSVLogger,
    StopOnSignal,
)
from .config import TrainConfig, make_config, save_config, train_size_at
from .module import CvTClassifier
from .precision import resolve_precision
from .progress import progress_callback
from .whitening import whiten_stem


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")
    # Epoch metrics are torchmetrics' computed values, already reduced over the processes.
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")
    # A resumed run's checkpoints/ is its own; and its data order does resume mid-epoch (the
    # sampler is in the checkpoint; the kill-and-resume test checks the result).
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    # The module augments on the device in on_after_batch_transfer, by design.
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
    # DDP compares a gradient's strides with its bucket's, size-1 dimensions included: the seed
    # model's 1x1 convolution weights get gradients laid out the same in memory with other
    # strides on their 1x1 dimensions, and the check calls that a mismatch.
    warnings.filterwarnings("ignore", message=".*Grad strides do not match bucket view strides.*")
    # Step-level logging simply does not happen in epochs shorter than its interval; the epoch
    # rows are written all the same.
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # Data without validation images has no val_top1 for best.ckpt: the run says so itself.
    warnings.filterwarnings("ignore", message=".*could not find the monitored key.*")
    warnings.filterwarnings(
        "ignore", message=".*Total length of `DataLoader` across ranks is zero.*"
    )


def _logger(cfg: TrainConfig, out: Path):
    if cfg.logger == "none":
        return False
    if cfg.logger == "csv":
        return RunCSVLogger(out, name="logs", version="")
    if cfg.logger == "tensorboard":
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(out, name="logs", version="")
        except ModuleNotFoundError:
            raise CvtLabError(
                "--logger tensorboard needs the tensorboard package (pip install tensorboard)"
            ) from None
    try:
        import wandb  # noqa: F401  (Lightning's own message would name Lightning's extra)
    except ModuleNotFoundError:
        raise CvtLabError(
            "--logger wandb needs the wandb package (pip install 'cvtlab[wandb]')"
        ) from None
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_DIR", str(out))
    return WandbLogger(
        project=os.environ.get("WANDB_PROJECT", "cvtlab"),
        save_dir=str(out),
        name=out.name,
        id=_wandb_run_id(out),
        resume="allow",
    )


def _wandb_run_id(out: Path) -> str:
    """The W&B run of this run folder, made on its first start: a resumed run (after a kill or
    Ctrl-C) goes on drawing the same curves instead of starting a second W&B run."""
    path = out / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]
    if _is_first_process():  # the one that logs; the others never open the run
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def _is_first_process() -> bool:
    """The first process of the whole run (Lightning re-runs the command for the other DDP
    processes, and the user starts it on every node)."""
    return (
        int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    )


def _check_out(cfg: TrainConfig, out: Path) -> dict:
    """Refuse an ``--out`` the run cannot use; with ``--resume``, return the checkpoint it goes
    on from (memory-mapped: its tensors are not read). ``out`` is a folder this run holds
    (:func:`hold_run_folder`)."""
    last = out / "checkpoints" / "last.ckpt"
    if cfg.resume:
        if not last.is_file():
            raise CvtLabError(
                f"--resume: {last} does not exist, so there is no run to resume in {out}"
            )
        why, saved = None, {}
        if not zipfile.is_zipfile(last):  # a checkpoint is a zip; a cut-off one has no index
            why = "cut short, or not a checkpoint"
        else:
            try:  # memory-mapped: reads the file's index, not its tensors
                saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # unpickling, zip and I/O errors alike
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if why:
            raise CvtLabError(
                f"--resume: {last} cannot be read ({why}); the run cannot continue from it"
            )
        done = _epochs_done(saved)
        if done is not None and done > cfg.epochs:
            raise CvtLabError(
                f"--epochs {cfg.epochs}: the run in {out} has trained {done} epochs already; "
                f"give --epochs {done + 1} or more to train on"
            )
        return saved
    if (out / "config.yaml").exists() or (out / "checkpoints").exists():
        raise CvtLabError(
            f"{out} holds another run; pass --resume to continue it or choose another --out"
        )
    return {}


def _warn_unreached_phases(cfg: TrainConfig, img_size: int) -> None:
    """A phase from an epoch the run never reaches is most likely a recipe's schedule kept with
    a shorter ``--epochs``: say so, and what the run trains at instead."""
    for key, unit in (("train_sizes", "px"), ("train_batch_sizes", "images a batch")):
        unreached = [e for e in getattr(cfg, key) or [] if e[0] >= cfg.epochs]
        if not unreached:
            continue
        start, value = unreached[0][:2]
        line = f"{key}: the phase from epoch {start} ({value} {unit}) never starts in a "
        line += f"{cfg.epochs}-epoch run"
        reached = train_size_at(cfg.train_sizes, cfg.epochs - 1)
        if key == "train_sizes" and reached and reached[0] != img_size:
            line += f", which trains at {reached[0]} px while validation and test run at "
            line += f"{img_size} px"
        print(f"cvtlab: warning: {line}; give --epochs {int(start) + 1} or more", file=sys.stderr)


def _epochs_done(checkpoint: dict) -> int | None:
    """Whole epochs a Lightning checkpoint has trained (its ``epoch`` lags by one when it was
    saved at an epoch's end), or None when it does not say."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        return None


# What a checkpoint's weights and optimiser state are made for: a resumed run keeps them.
KEPT_ON_RESUME = {"model": "--model", "optimizer": "--optimizer"}


def _announce_resumed_config(cfg: TrainConfig, path: Path) -> None:
    """A resumed run may take new settings (more epochs, the data at a new path, more devices):
    say which; refuse those its checkpoint cannot go on with."""
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        saved = {}
    now = cfg.to_dict()
    for key, flag in KEPT_ON_RESUME.items():
        if key in saved and saved[key] != now[key]:
            raise CvtLabError(
                f"{flag} {now[key]}: the run in {path.parent} trains with {saved[key]}, which "
                f"its checkpoint holds; start a new run (another --out) to use {now[key]}"
            )
    if "ema_decay" in saved and (saved["ema_decay"] > 0) != (now["ema_decay"] > 0):
        kept = "with an EMA of its weights" if saved["ema_decay"] else "without an EMA"
        raise CvtLabError(
            f"--ema-decay {now['ema_decay']}: the run in {path.parent} trains {kept}, as its "
            "checkpoint does; a resumed run can change the decay, not turn the EMA on or off"
        )
    if now["data"] == saved.get("data"):
        check_recorded_data(now["data"])
    changed = [
        f"{key} {saved[key]!r} -> {now[key]!r}"
        for key in now
        if key in saved and saved[key] != now[key] and key not in ("resume", "out")
    ]
    if changed:
        print("resuming with changed settings: " + "; ".join(changed), flush=True)


def _check_resumed_classes(checkpoint: dict, class_names: list[str], data: str) -> None:
    """The data may have moved (another path, a zip of the folder), not changed its classes:
    a checkpoint's classifier outputs mean the classes it was trained on."""
    trained = list(checkpoint.get("hyper_parameters", {}).get("class_names") or [])
    if trained and trained != list(class_names):
        differ = sorted(set(class_names) ^ set(trained))
        what = (
            f"{len(differ)} class names differ, e.g. {', '.join(differ[:3])}"
            if differ
            else "the same class names in another order"
        )
        raise CvtLabError(
            f"--data {data}: not the classes the run trains on ({what}); a resumed run takes its "
            "data at a new path, not other data: start a new run, with --pretrained for its weights"
        )


class _SaveConfigOnceRestored(L.Callback):
    """``config.yaml`` takes a resumed run's new settings only once its checkpoint has loaded
    into them: a resume that fails leaves the run's description as it was."""

    def __init__(self, cfg: TrainConfig, path: Path):
        self.cfg, self.path = cfg, path

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            save_config(dataclasses.replace(self.cfg, resume=False), self.path)


# The run folder the first process chose when --out was not given: the processes Lightning
# launches for DDP re-run the command, and take the first's folder from their environment.
DEFAULT_OUT_VARIABLE = "CVTLAB_DEFAULT_OUT"


def default_out(recipe: str | None, model: str | None) -> str:
    """``runs/<recipe or model>``, or the first of ``-2``, ``-3`` … after it that holds no run."""
    chosen = os.environ.get(DEFAULT_OUT_VARIABLE)
    if chosen:
        return chosen
    if {"WORLD_SIZE", "LOCAL_RANK"} & set(os.environ) or int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        # Processes started together (torchrun, srun) would each pick a folder of their own.
        raise CvtLabError("give --out: the processes of a distributed run must name one folder")
    base = Path("runs") / (Path(recipe).stem if recipe else model or TrainConfig.model)
    out, n = base, 1
    while (out / "config.yaml").exists() or (out / "checkpoints").exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    os.environ[DEFAULT_OUT_VARIABLE] = str(out)
    return str(out)


def configure_from_cli(recipe: str | None, flags: dict) -> TrainConfig:
    """A run's config; ``--resume`` starts from the saved ``config.yaml`` of ``--out``. Without
    ``--out`` a new run gets a folder of its own (:func:`default_out`)."""
    if not flags.get("out"):
        if flags.get("resume"):
            raise CvtLabError("--resume needs --out, the folder of the run to continue")
        flags = {**flags, "out": default_out(recipe, flags.get("model"))}
    if flags.get("resume"):
        saved = Path(flags["out"]) / "config.yaml"
        if saved.is_file():
            return make_config(saved, **flags)
    return make_config(recipe, **flags)


def build_trainer(
    cfg: TrainConfig,
    out: Path,
    history: EpochHistory,
    extra_callbacks=(),
    precision: str | None = None,
) -> L.Trainer:
    ckpt_dir = out / "checkpoints"
    last = RunCheckpoint(
        dirpath=ckpt_dir,
        filename="last",
        save_top_k=0,
        save_last=True,
        every_n_train_steps=cfg.ckpt_every_n_steps or None,
        enable_version_counter=False,
    )
    best = RunCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor="val_top1",
        mode="max",
        save_top_k=1,
        enable_version_counter=False,
    )
    epoch_end = LastCheckpoint(ckpt_dir / "last.ckpt")  # and every epoch's end, and the last step
    progress = progress_callback(history, cfg.max_minutes * 60 if cfg.max_minutes else None)
    devices = cfg.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    callbacks = [
        history,
        last,
        best,
        epoch_end,
        StopOnSignal(ckpt_dir / "last.ckpt", out),
        progress,
        *extra_callbacks,
    ]
    logger = _logger(cfg, out)
    try:
        return L.Trainer(
            max_epochs=cfg.epochs,
            max_time={"minutes": cfg.max_minutes} if cfg.max_minutes else None,
            limit_train_batches=cfg.limit_train_batches,
            accelerator=cfg.accelerator,
            devices=devices,
            num_nodes=cfg.num_nodes,
            strategy=cfg.strategy,
            precision=precision or cfg.precision,
            gradient_clip_val=cfg.grad_clip,
            callbacks=callbacks,
            logger=logger,
            default_root_dir=out,
            use_distributed_sampler=False,
            plugins=[AtomicCheckpointIO()],
            enable_model_summary=False,
            enable_progress_bar=isinstance(progress, TQDMProgressBar),
            log_every_n_steps=10,
            num_sanity_val_steps=0,
            # cuDNN picks the fastest kernels for each input shape once (a few shapes per run).
            benchmark=True,
        )
    except (MisconfigurationException, ValueError, TypeError, ModuleNotFoundError) as e:
        # Lightning's checks of the hardware flags (no GPU, an unknown strategy, no such devices,
        # an accelerator whose package is missing, a precision it lacks): one line naming them.
        given = f"--accelerator {cfg.accelerator} --devices {cfg.devices} "
        given += f"--strategy {cfg.strategy} --num-nodes {cfg.num_nodes} "
        given += f"--precision {precision or cfg.precision}"
        reason = " ".join(str(e).split())
        raise CvtLabError(f"{given}: {reason}") from None


def hold_run_folder(out: Path, create: bool = True):
    """Claim ``out`` for this run until the returned file is closed, or a one-line error when
    another run holds it: two runs in one folder (a ``--resume`` typed in a second terminal, a
    scheduler's requeued job while the first still runs) would overwrite each other's
    checkpoints and logs. The claim is an advisory lock, released by the system when the process
    ends however it ends; where the file system has no locks, nothing is claimed. Without
    ``create`` (a resume) a folder that does not exist is not made, nor claimed."""
    if out.exists() and not out.is_dir():
        raise CvtLabError(f"--out {out}: is a file; the run folder must be a folder")
    check_creatable(out)
    if not create and not out.is_dir():
        return None
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    handle = open(out / ".cvtlab-run.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise CvtLabError(
            f"--out {out}: another cvtlab train is running in it ({holder or 'its process'}); "
            "wait for it to end, or stop it (Ctrl-C saves its last step) and then --resume"
        ) from None
    except OSError:  # a file system without locks (some network mounts)
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def train(cfg: TrainConfig, extra_callbacks=()) -> dict:
    """Train, test the best (``test_checkpoint: last``: the last) checkpoint on the test split,
    write ``metrics.json`` and the report; returns the metrics."""
    _quiet_lightning()
    out = Path(cfg.out)
    first = _is_first_process()  # only it checks and claims the folder
    claim = hold_run_folder(out, create=not cfg.resume) if first else None
    try:
        return _train(cfg, out, first, extra_callbacks)
    finally:
        if claim is not None:
            claim.close()


def _train(cfg: TrainConfig, out: Path, first: bool, extra_callbacks) -> dict:
    resumed = {}
    if first:
        resumed = _check_out(cfg, out)
        if cfg.resume:
            _announce_resumed_config(cfg, out / "config.yaml")
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.matmul_precision:
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    img_size = cfg.img_size or get_config(cfg.model).img_size
    dm = ImageDataModule(
        resolve_data(cfg.data),
        img_size=img_size,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        val_per_class=cfg.val_per_class,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        # Images smaller than the model's (Tiny ImageNet at 224 px) stay at their own size in
        # the cache; the module resizes each batch on the device.
        upscale=False,
    )
    dm.prepare_data()
    dm.setup()
    if first and cfg.resume:
        _check_resumed_classes(resumed, dm.class_names, cfg.data)
    if first and not len(dm.rows["val"]):
        print(
            f"cvtlab: warning: {cfg.data}: no validation images (too few images a class to "
            "carve them from), so no best checkpoint: the run tests its last",
            file=sys.stderr,
        )
    history = EpochHistory(out / "metrics.csv")
    precision, why = resolve_precision(cfg.precision, cfg.accelerator)
    if first and cfg.precision == "auto":
        print(f"precision {precision} ({why})", flush=True)
    if cfg.resume:
        extra_callbacks = (*extra_callbacks, _SaveConfigOnceRestored(cfg, out / "config.yaml"))
    trainer = build_trainer(cfg, out, history, extra_callbacks, precision)

    steps_per_epoch = len(dm.rows["train"]) // (cfg.batch_size * trainer.world_size)
    if cfg.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.limit_train_batches)
    if steps_per_epoch < 1:
        raise CvtLabError(
            f"--batch-size {cfg.batch_size} × {trainer.world_size} processes is larger than the "
            f"{len(dm.rows['train'])} training images"
        )
    for _, batch in cfg.train_batch_sizes or []:
        if batch * trainer.world_size > len(dm.rows["train"]):
            raise CvtLabError(
                f"train_batch_sizes: batch {batch} × {trainer.world_size} processes is larger "
                f"than the {len(dm.rows['train'])} training images"
            )
    model_cfg = get_config(
        cfg.model, num_classes=dm.num_classes, img_size=img_size, **cfg.model_overrides
    )
    for _, size, *how in cfg.train_sizes or []:
        if how == ["crop"] and size > img_size:
            raise CvtLabError(f"train_sizes: cannot crop {size} px from {img_size}-px images")
        if size > img_size:
            # The images are decoded at the model's size: larger would be them upscaled, and
            # validation and test stay at the model's size.
            raise CvtLabError(
                f"train_sizes: {size} px is above the model's {img_size} px, the size the images "
                "are decoded at and tested at; set --img-size for a larger model input"
            )
        try:
            check_img_size(size, getattr(model_cfg, "total_stride", 1), cfg.model)
        except CvtLabError as e:
            raise CvtLabError(f"train_sizes: {e}") from None
    if first:
        _warn_unreached_phases(cfg, img_size)
    module = CvTClassifier(
        model=cfg.model,
        model_config=model_cfg.to_dict(),
        class_names=dm.class_names,
        lr=cfg.peak_lr,
        weight_decay=cfg.weight_decay,
        betas=cfg.betas,
        optimizer=cfg.optimizer,
        muon_exact=cfg.muon_exact,
        muon_polynomials=cfg.muon_polynomials,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        total_steps=cfg.epochs * steps_per_epoch,
        min_lr_ratio=cfg.min_lr_ratio,
        lr_decay=cfg.lr_decay,
        label_smoothing=cfg.label_smoothing,
        regularise_min_steps=cfg.regularise_min_steps,
        ema_decay=cfg.ema_decay,
        ema_warmup_power=cfg.ema_warmup_power,
        ema_warmup_gamma=cfg.ema_warmup_gamma,
        augment=cfg.to_dict()["augment"] | {"label_smoothing": cfg.label_smoothing},
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        train_sizes=cfg.train_sizes,
        steps_per_epoch=steps_per_epoch,
        budget_seconds=cfg.max_minutes * 60 if cfg.budget_schedule else None,
        batch_size=cfg.batch_size,
        train_batch_sizes=cfg.train_batch_sizes,
    )
    if cfg.train_batch_sizes:
        dm.batch_size_now = module.train_batch_size
    if cfg.pretrained and not cfg.resume:
        loaded = start_from_pretrained(module.model, cfg.pretrained, cfg.model, dm.class_names)
        if first:
            print(loaded, flush=True)
    if cfg.whiten_stem and not cfg.resume:
        # The images of the first epochs, at the size they are trained at (the model's, also
        # where the cache keeps smaller images at their own size).
        phase = train_size_at(cfg.train_sizes, 0.0)
        size = phase[0] if phase and phase[1] == "resize" else img_size
        whiten_stem(module.model, dm.data.images, dm.rows["train"], size=size, seed=cfg.seed)
    if (cfg.pretrained or cfg.whiten_stem) and not cfg.resume and module.ema is not None:
        module.ema.set(module.model)

    if first and not cfg.resume:
        # Only now, after every check: a run refused before it trains leaves no config.yaml,
        # which would claim the folder for a run that never was.
        save_config(cfg, out / "config.yaml")
    if trainer.logger:
        # The whole recipe (data, epochs, seed, precision …) beside the model's settings, which
        # Lightning logs itself: what a W&B or TensorBoard user filters and compares runs by.
        trainer.logger.log_hyperparams({"run": cfg.to_dict()})
    last = out / "checkpoints" / "last.ckpt"
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if cfg.resume else None)
    except FloatingPointError as e:
        raise CvtLabError(
            f"{e}; stopped, the last good checkpoint is {last} (try a lower --lr)"
        ) from None
    # Testing restores the best checkpoint, callbacks included: keep the full history first.
    rows = list(history.rows)
    best_path = out / "checkpoints" / "best.ckpt"
    use_best = cfg.test_checkpoint == "best" and best_path.is_file()
    test_ckpt = str(best_path) if use_best else str(last)
    results = trainer.test(module, datamodule=dm, ckpt_path=test_ckpt, verbose=False)[0]
    history.rows = rows
    metrics = _summarise(cfg, rows, results, test_ckpt, trainer.world_size)
    metrics["num_classes"] = dm.num_classes
    metrics["precision"] = precision
    if module.regularisation is not None:
        metrics["regularisation"] = module.regularisation
    metrics["machine"] = describe_machine()
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        from .reporting import send_report_to_logger, write_report

        history.write()
        write_report(out, module, dm, rows)
        send_report_to_logger(trainer.logger, out / "report")
    return metrics


def _summarise(cfg: TrainConfig, rows: list[dict], test: dict, test_ckpt: str, world: int) -> dict:
    return {
        "model": cfg.model,
        **history_figures(rows),
        "test_top1": float(test["test_top1"]),
        "test_top5": float(test["test_top5"]),
        "test_loss": float(test["test_loss"]),
        "test_checkpoint": test_ckpt,
        "processes": world,
    }


__all__ = ["configure_from_cli", "train"]
