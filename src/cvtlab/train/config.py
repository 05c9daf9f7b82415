"""A training run's configuration: plain data, read from a recipe YAML, overridden by flags."""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..data.augment_config import AugmentConfig, is_pair_of_numbers
from ..errors import CvtLabError


@dataclass
class TrainConfig:
    # what to train on, and what
    data: str = "tiny-imagenet"
    model: str = "cvt_13_64"
    img_size: int | None = None  # None: the model's own size
    pretrained: str | None = None
    model_overrides: dict = field(default_factory=dict)  # e.g. {drop_path_rate: 0.1}
    val_per_class: int = 10
    # optimisation
    epochs: int = 100
    batch_size: int = 128
    eval_batch_size: int | None = None
    lr: float = 1e-3  # peak learning rate at batch_size 512, scaled linearly to batch_size
    scale_lr: bool = True
    weight_decay: float = 0.05
    # "adamw", or "muon": orthogonalised momentum for the weights that mix channels (the blocks'
    # linear layers, the patch embeddings after the stem), AdamW for the other tensors, at the
    # same rate and decay (train/muon.py)
    optimizer: str = "adamw"
    # with muon: orthogonalise its updates exactly (an eigendecomposition) instead of by five
    # Newton-Schulz iterations, which leave the singular values anywhere in about 0.7-1.2
    muon_exact: bool = False
    # with muon: the iterations' polynomials, "quintic" (the same each step) or "polar_express"
    # (one per step, which lands the singular values closer to one for the same products)
    muon_polynomials: str = "quintic"
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 5.0
    min_lr_ratio: float = 0.01
    lr_decay: str = "cosine"  # after warmup, down to min_lr_ratio: "cosine" or "linear"
    grad_clip: float | None = 5.0
    label_smoothing: float = 0.1
    # Random erasing and label smoothing pay only in a run long enough to fit its training
    # images well ahead of validation: a run of fewer optimiser steps than this drops both (the
    # count projected from the pace over the first 5% of a budget_schedule's clock, otherwise
    # the epochs' steps). None: always as set.
    regularise_min_steps: int | None = None
    ema_decay: float = 0.0  # 0 turns the weight EMA off
    # The EMA's decay at step s is min(ema_decay, 1 - (1 + s/gamma)^-power): with power 1 the
    # plain mean of the steps so far until the cap (0.999 after 1,000 steps); timm's 2/3 reaches
    # 0.999 only after 31,623, so a shorter run ends averaging fewer steps than the cap says.
    # With power 1 and gamma G the average spans about 1/G of the steps so far until the cap: a
    # span that shortens with the run on a slower machine.
    ema_warmup_power: float = 2 / 3
    ema_warmup_gamma: float = 1.0
    # Start the stem's filters as whitened principal components of the first training images'
    # patches (train/whitening.py) instead of random ones; not with pretrained weights.
    whiten_stem: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # progressive resizing: [[from_epoch, size], ...]; training batches are resized to `size`
    # from that epoch on (validation and test stay at the model's size). None: no resizing.
    train_sizes: list | None = None
    # the training batch by phase: [[from_epoch, batch_size], ...], read on the same schedule as
    # train_sizes (mid-epoch under budget_schedule), e.g. larger batches while images are small.
    # The schedule and warmup count images, in steps of `batch_size`; every step takes the
    # schedule's rate whatever its batch (with AdamW an update's size follows the rate, and
    # scaling it with the batch cost 3 points: RESULTS, attempts Z and Z2). None: batch_size.
    train_batch_sizes: list | None = None
    # engineering
    out: str = "runs/cvtlab"
    seed: int = 0
    devices: str | int = 1
    accelerator: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    # "auto": the fastest on this machine (bf16-mixed on GPUs; on CPUs measured, train/precision.py)
    precision: str = "32"
    # fp32 matrix products: "high" lets a GPU run them on TF32 tensor cores (None: torch's default)
    matmul_precision: str | None = None
    compile: bool = False
    channels_last: bool = False
    num_workers: int = 0
    logger: str = "csv"
    ckpt_every_n_steps: int = 200
    max_minutes: float | None = None  # wall-clock budget for training (time-to-accuracy runs)
    # With max_minutes: the learning-rate schedule and train_sizes advance with whichever is
    # further along, the steps or the budget's clock, so the schedule is finished when the budget
    # is spent however fast the machine runs; `epochs` becomes an upper bound.
    budget_schedule: bool = False
    # The checkpoint the test split scores: "best" (highest val_top1) or "last" (the weights at
    # the end of training). A schedule annealed to a time budget is best read at its end: late
    # epochs differ by less than a 2,000-image validation split can tell apart.
    test_checkpoint: str = "best"
    limit_train_batches: int | None = None  # train on only this many batches per epoch (smoke runs)
    resume: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.augment, (dict, AugmentConfig)):
            raise CvtLabError(
                "augment must be a mapping of augmentation settings (crop, flip, mixup …), "
                f"not {self.augment!r}"
            )
        if not isinstance(self.model_overrides, dict):
            raise CvtLabError(
                "model_overrides must be a mapping of model options (drop_path_rates …), "
                f"not {self.model_overrides!r}"
            )
        betas = self.betas
        if not is_pair_of_numbers(betas) or not all(0 <= b < 1 for b in betas):
            raise CvtLabError(
                f"betas must be two numbers in [0, 1), like [0.9, 0.999], not {betas!r}"
            )
        if isinstance(self.augment, dict):
            known = {f.name for f in fields(AugmentConfig)}
            unknown = sorted(set(self.augment) - known)
            if unknown:
                raise CvtLabError(
                    f"unknown augment key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
                )
            self.augment = AugmentConfig(**self.augment)
        self.betas = tuple(self.betas)
        if self.lr <= 0:
            raise CvtLabError(f"--lr must be positive, got {self.lr}")
        if self.val_per_class < 1:
            raise CvtLabError(f"val_per_class must be at least 1, got {self.val_per_class}")
        if self.epochs <= 0:
            raise CvtLabError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise CvtLabError(f"--batch-size must be positive, got {self.batch_size}")
        if self.precision not in ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "auto"):
            raise CvtLabError(
                f"--precision must be 32, bf16-mixed, 16-mixed or auto, not {self.precision!r}"
            )
        if self.matmul_precision not in (None, "highest", "high", "medium"):
            raise CvtLabError(
                f"--matmul-precision must be highest, high or medium, not {self.matmul_precision!r}"
            )
        if self.weight_decay < 0:
            raise CvtLabError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if not 0 <= self.ema_decay < 1:
            raise CvtLabError(f"--ema-decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.ema_warmup_power <= 0:
            raise CvtLabError(
                f"--ema-warmup-power must be more than 0, got {self.ema_warmup_power}"
            )
        if self.ema_warmup_gamma <= 0:
            raise CvtLabError(
                f"--ema-warmup-gamma must be more than 0, got {self.ema_warmup_gamma}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise CvtLabError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0:
            raise CvtLabError(f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise CvtLabError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise CvtLabError(
                f"grad_clip must be positive (or null: no clipping), got {self.grad_clip}"
            )
        if self.optimizer not in ("adamw", "muon"):
            raise CvtLabError(f"--optimizer must be adamw or muon, not {self.optimizer!r}")
        # Imported here, not at the top: the CLI imports this module to build its parser, and
        # muon imports torch.
        from .muon import NEWTON_SCHULZ

        if self.muon_polynomials not in NEWTON_SCHULZ:
            raise CvtLabError(
                f"muon_polynomials must be {' or '.join(NEWTON_SCHULZ)}, "
                f"not {self.muon_polynomials!r}"
            )
        if self.lr_decay not in ("cosine", "linear"):
            raise CvtLabError(f"--lr-decay must be cosine or linear, not {self.lr_decay!r}")
        if self.test_checkpoint not in ("best", "last"):
            raise CvtLabError(
                f"--test-checkpoint must be best or last, not {self.test_checkpoint!r}"
            )
        if self.logger not in ("csv", "tensorboard", "wandb", "none"):
            raise CvtLabError(
                f"--logger must be csv, tensorboard, wandb or none, not {self.logger!r}"
            )
        if self.train_sizes is not None:
            self.train_sizes = _check_train_sizes(self.train_sizes)
        if self.train_batch_sizes is not None:
            self.train_batch_sizes = _check_train_batch_sizes(self.train_batch_sizes)
        for key in ("train_sizes", "train_batch_sizes"):
            fractional = [e[0] for e in getattr(self, key) or [] if isinstance(e[0], float)]
            if fractional and not self.budget_schedule:
                raise CvtLabError(
                    f"{key}: a phase from epoch {fractional[0]} needs budget_schedule "
                    "(--budget-schedule), whose epochs advance within an epoch; without it "
                    "phases start at whole epochs"
                )
        if self.limit_train_batches is not None and self.limit_train_batches < 1:
            raise CvtLabError(
                "--limit-train-batches must be at least 1 (or unset: whole epochs), "
                f"got {self.limit_train_batches}"
            )
        if self.num_nodes < 1:
            raise CvtLabError(f"--num-nodes must be at least 1, got {self.num_nodes}")
        if self.num_workers < 0:
            raise CvtLabError(f"num_workers must be 0 or more, got {self.num_workers}")
        if self.regularise_min_steps is not None and (
            isinstance(self.regularise_min_steps, bool)
            or not isinstance(self.regularise_min_steps, int)
            or self.regularise_min_steps < 1
        ):
            raise CvtLabError(
                "regularise_min_steps must be a whole number of steps (1 or more) or null, "
                f"not {self.regularise_min_steps!r}"
            )
        if self.ckpt_every_n_steps < 0:
            raise CvtLabError(
                f"ckpt_every_n_steps must be 0 (off) or more, got {self.ckpt_every_n_steps}"
            )
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise CvtLabError(f"max_minutes must be positive, got {self.max_minutes}")
        if self.budget_schedule and not self.max_minutes:
            raise CvtLabError(
                "budget_schedule needs a time budget: set max_minutes (--max-minutes)"
            )
        if self.whiten_stem and self.pretrained:
            raise CvtLabError(
                "--whiten-stem sets the stem from the data and --pretrained from a checkpoint: "
                "choose one"
            )

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / 512 if self.scale_lr else self.lr

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["augment"]["rrc_scale"] = list(self.augment.rrc_scale)
        return d


def _phases_in_order(entries: list[list]) -> bool:
    """A phase schedule's entries start at epoch 0 and their epochs strictly increase."""
    epochs = [e[0] for e in entries]
    return bool(entries) and epochs[0] == 0 and epochs == sorted(set(epochs))


def phase_start(value: Any) -> int | float:
    """A phase's first epoch: a whole number, or a fraction (only a budget schedule, whose epoch
    advances within an epoch, can start a phase there). Raises ValueError or TypeError."""
    start = float(value)
    return int(start) if start.is_integer() else start


def whole_number(value: Any) -> int:
    """An image size or a batch, which int() would truncate silently (32.5 -> 32)."""
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


def _check_train_sizes(value: Any) -> list[list]:
    problem = (
        "train_sizes must be a list of [from_epoch, size] or [from_epoch, size, 'crop'] entries "
        f"starting at epoch 0, with whole-number sizes, not {value!r}"
    )
    try:
        entries = [[phase_start(e[0]), whole_number(e[1]), *e[2:]] for e in value]
    except (TypeError, ValueError, IndexError, KeyError):
        raise CvtLabError(problem) from None
    if (
        not _phases_in_order(entries)
        or min(e[1] for e in entries) < 8
        or any(len(e) > 3 or (len(e) == 3 and e[2] not in ("crop", "resize")) for e in entries)
    ):
        raise CvtLabError(problem)
    return entries


def _check_train_batch_sizes(value: Any) -> list[list[int]]:
    problem = (
        "train_batch_sizes must be a list of [from_epoch, batch_size] entries starting at epoch 0, "
        f"with positive whole-number batch sizes, not {value!r}"
    )
    try:
        entries = [[phase_start(e[0]), whole_number(e[1])] for e in value if len(e) == 2]
    except (TypeError, ValueError, KeyError):
        raise CvtLabError(problem) from None
    if (
        not _phases_in_order(entries)
        or len(entries) != len(value)
        or min(e[1] for e in entries) < 1
    ):
        raise CvtLabError(problem)
    return entries


def batch_size_at(schedule: list[list] | None, epoch: float, default: int) -> int:
    """The training batch at ``epoch`` under a ``train_batch_sizes`` schedule (None: ``default``)."""
    current = default
    for start, size in schedule or []:
        if epoch >= start:
            current = size
    return current


def train_size_at(schedule: list[list] | None, epoch: float) -> tuple[int, str] | None:
    """The training image size and how batches reach it (``"resize"`` the whole image, or a
    random ``"crop"`` at the full resolution) at ``epoch`` (fractional under a budget schedule)
    under a ``train_sizes`` schedule (None: unchanged)."""
    current = None
    for start, size, *how in schedule or []:
        if epoch >= start:
            current = (size, how[0] if how else "resize")
    return current


RECIPES = Path(__file__).resolve().parent.parent / "configs"


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file, or the name of one shipped with cvtlab (``demo``, ``cpu_30min``, …)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise CvtLabError(f"{path}: no such recipe file (shipped recipes: {names})")


def load_recipe(path: str | Path) -> dict:
    path = recipe_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CvtLabError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CvtLabError(f"{path}: a recipe is a mapping of keys to values")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        close = [difflib.get_close_matches(k, known, n=1) for k in unknown]
        hints = [f"{k} (did you mean {c[0]}?)" if c else k for k, c in zip(unknown, close)]
        raise CvtLabError(f"{path}: unknown key(s) {', '.join(hints)}")
    data = _typed(data, TrainConfig, path)
    if isinstance(data.get("augment"), dict):
        data["augment"] = _typed(data["augment"], AugmentConfig, f"{path}: augment")
    return data


def _typed(values: dict, cls: type, where: str | Path) -> dict:
    """``values`` with each number in the type its field declares. YAML reads ``3e-3`` (no dot)
    as a string, which failed later with a TypeError, and ``96.5`` for a batch as a float, which
    failed deep inside the run; here the first becomes 0.003 and the second is an error. A switch
    takes only true or false: the string "false" (quoted) would have turned it on."""
    types = {f.name: f.type for f in fields(cls)}
    out = dict(values)
    for key, value in values.items():
        kind = types.get(key)
        if kind == "bool" and not isinstance(value, bool):
            raise CvtLabError(f"{where}: {key} must be true or false, not {value!r}")
        if value is None or kind not in _NUMBERS:
            continue
        expected = _NUMBERS[kind]
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            if expected is int:
                out[key] = whole_number(value)
            else:
                out[key] = float(value)
                if not math.isfinite(out[key]):
                    raise ValueError
        except (ValueError, OverflowError):
            noun = "a whole number" if expected is int else "a number"
            raise CvtLabError(f"{where}: {key} must be {noun}, not {value!r}") from None
    return out


_NUMBERS = {"int": int, "int | None": int, "float": float, "float | None": float}


def make_config(recipe: str | Path | None = None, **flags: Any) -> TrainConfig:
    """The recipe's values, then every flag that was given (not None) on top."""
    values = load_recipe(recipe) if recipe else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig(**values)


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
