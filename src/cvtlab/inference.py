"""Loading a trained model for evaluation, prediction and export, whatever file holds it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.augment import normalize
from .data.decode import Crop, DecodeError, decode_image, parse_crop
from .errors import CvtLabError
from .models.imagenet import imagenet_1k_aliases, is_imagenet_1k


@dataclass
class Predictor:
    model: nn.Module
    class_names: list[str]
    img_size: int
    run_config: dict | None = None  # the training run's config.yaml, when beside the checkpoint
    # False when the weights came without class names (an official .pth, a Hugging Face folder
    # without labels): ``class_names`` are then the output indices as strings.
    names_known: bool = True
    # Other names of the classes, for matching data to outputs: an ImageNet-1k model's classes
    # also go by their WordNet ids and descriptions (models/imagenet.py).
    aliases: dict[str, int] | None = None
    # How images become img_size squares for this model (data/decode.py): 1.0 for cvtlab's runs,
    # the official evaluation's view for ImageNet weights (0.875 below 384 px, else "squash").
    crop: Crop = 1.0

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, flip: bool = False, shift: int = 0) -> torch.Tensor:
        """uint8 (N, H, W, 3) images → class probabilities (N, K); ``flip`` and ``shift``
        average them over views of each image (test-time augmentation: ``view_averaged``)."""
        device = next(self.model.parameters()).device
        x = normalize(torch.from_numpy(np.array(images, dtype=np.uint8)).to(device))
        return view_averaged(self.model, x, flip, shift).exp()


class CompiledForInference(nn.Module):
    """``model`` compiled by Inductor for inference: its weights frozen into the compiled code
    (BatchNorm folded into the convolutions, the linear layers' weights packed once, for oneDNN in
    bf16 and for MKL in fp32, their biases added inside the products), elementwise work fused. On a
    2-core AMD Zen 4 in bf16: 1.10-1.20x the eager model's images/s across the benchmark's models,
    1.14x for CvT-13 at 64 px (benchmarks/RESULTS.md, throughput attempt 42), after 30-60 s of
    compiling. In fp32 (on a 2-core AMD Zen 3, which has no bf16 instructions) 1.00-1.07x (attempt
    44).

    Every call runs at ``batch_size`` images, smaller batches padded and larger ones split, so
    that a run compiles once: a new input shape would compile again. The weights are folded and
    packed into the compiled code at the first call, so a model changed afterwards needs a new
    ``CompiledForInference``. Calls run without gradients.
    """

    def __init__(self, model: nn.Module, batch_size: int):
        super().__init__()
        # Inductor's C++ toolchain probe notes the missing CUDA runtime on every CPU machine.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self.model = model.eval()  # its parameters tell callers the device and dtype
        self.batch_size = batch_size
        self._compiled = torch.compile(model, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        n, b = len(x), self.batch_size
        if n > b:
            return torch.cat([self(x[i : i + b]) for i in range(0, n, b)])
        if n < b:
            x = torch.cat([x, x.new_zeros((b - n, *x.shape[1:]))])
        # Freezing is what makes it faster; it is set at each call, not once, because a
        # recompilation (a new dtype or device) reads the setting anew. On a CPU, Inductor's
        # pattern matcher would turn the attention into SDPA's flash kernel, slower here than
        # the attention's own products (RESULTS, throughput attempts 19 and 42).
        settings = {"freezing": True, "pattern_matcher": x.device.type != "cpu"}
        with inductor_config.patch(settings), torch.inference_mode():
            return self._compiled(x)[:n]


def check_shift(shift: int, size: int) -> None:
    """Reflection fills a border narrower than the image only."""
    if not 0 <= shift < size:
        raise CvtLabError(f"--shift must be from 0 to {size - 1} pixels, not {shift}")


def view_averaged(
    model: nn.Module, x: torch.Tensor, flip: bool = False, shift: int = 0
) -> torch.Tensor:
    """Log of the mean class probabilities over views of the (B, C, H, W) batch ``x``: the
    images themselves, their mirror images (``flip``), and each of those moved ``shift`` pixels
    up, down, left and right, the uncovered border reflected as training's crops reflect it
    (``shift``). With neither, the model's log-probabilities. The views come in mirrored pairs,
    so with ``flip`` an image and its mirror image get the same probabilities, whatever the
    model."""
    h, w = x.shape[-2:]
    check_shift(shift, min(h, w))
    views = [x, x.flip(-1)] if flip else [x]
    if shift:
        for padded in [F.pad(v, (shift,) * 4, mode="reflect") for v in views]:
            for top, left in ((0, shift), (2 * shift, shift), (shift, 0), (shift, 2 * shift)):
                views.append(padded[..., top : top + h, left : left + w])
    if len(views) == 1:
        return model(x).float().log_softmax(-1)
    # One forward pass per view, not one over them all: the memory of a plain batch.
    probs = sum(model(v).float().softmax(-1) for v in views)
    return torch.log(probs / len(views))


def _run_config(checkpoint: Path) -> dict | None:
    import yaml

    for candidate in (checkpoint.parent.parent / "config.yaml", checkpoint.parent / "config.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text())
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A training run's folder → the checkpoint its test scored; any other path unchanged.

    A run folder is one with ``checkpoints/``. Its ``metrics.json`` names the checkpoint that
    was tested (looked up by file name, so a moved or copied run folder still resolves); a run
    that has not finished follows its ``config.yaml``: ``best.ckpt`` unless the recipe says
    ``test_checkpoint: last`` or no best has been written yet, then ``last.ckpt``.
    """
    path = Path(path)
    folder = path / "checkpoints"
    if not (path.is_dir() and folder.is_dir()):
        return path
    tested = None
    metrics = path / "metrics.json"
    if metrics.is_file():
        try:
            tested = json.loads(metrics.read_text()).get("test_checkpoint")
        except (OSError, ValueError, AttributeError):
            pass
    if tested:
        names = [Path(tested).name]
    else:
        # The run's config.yaml, found as it is for any of its checkpoints.
        rule = (_run_config(folder / "last.ckpt") or {}).get("test_checkpoint", "best")
        names = ["last.ckpt", "best.ckpt"] if rule == "last" else ["best.ckpt", "last.ckpt"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CvtLabError(
        f"{path}: a run folder without its checkpoint (looked for {', '.join(names)})"
    )


def load_predictor(
    checkpoint: str | Path, img_size: int | None = None, crop: float | str | None = None
) -> Predictor:
    """A model in eval mode from a cvtlab ``.ckpt`` or a training run's folder (the checkpoint
    its test scored; its EMA weights when the run kept an EMA), a cvtlab ``.safetensors``
    export, an official ``.pth`` or a Hugging Face folder.

    ``img_size`` runs it at another input size than the one it was trained at (CvT has no
    position embeddings: any multiple of its total stride fits the same weights); ``crop``
    overrides how images become squares (a fraction in (0, 1] or ``"squash"``; default: the
    checkpoint's own view)."""
    view_given = None if crop is None else parse_crop(crop)
    path = resolve_checkpoint(checkpoint)
    if path.suffix == ".ckpt":
        from .train.module import load_module

        module = load_module(str(path))
        model = module.eval_model().eval()
        names = list(module.hparams.class_names)
        view: Crop = 1.0
        if img_size is not None and img_size != model.img_size:
            _run_at(model, img_size)
    else:
        from .models.pretrained import from_pretrained

        sized = {} if img_size is None else {"img_size": img_size}
        model = from_pretrained(path, **sized).eval()
        names = getattr(model, "class_names", None)
        view = getattr(model, "eval_crop", 1.0)
    if view_given is not None:
        view = view_given
    known = bool(names)
    if known:
        model.class_names = names
    else:
        names = [str(i) for i in range(model.num_classes)]
    aliases = imagenet_1k_aliases() if known and is_imagenet_1k(names, len(names)) else None
    return Predictor(model, names, int(model.img_size), _run_config(path), known, aliases, view)


def _run_at(model: nn.Module, img_size: int) -> None:
    """Make ``model`` take ``img_size`` inputs: the same weights, since neither CvT nor the seed
    model has position embeddings; only the size must divide by the total stride."""
    from dataclasses import replace

    from .models.cvt import check_img_size

    check_img_size(img_size, model.cfg.total_stride, getattr(model, "model_name", None) or "model")
    model.img_size, model.cfg = img_size, replace(model.cfg, img_size=img_size)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` where PyTorch sees a GPU, else ``cpu``; ``cuda`` without a GPU is a
    one-line error."""
    if device not in ("auto", "cpu", "cuda"):
        raise CvtLabError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CvtLabError("--device cuda: PyTorch sees no CUDA GPU on this machine")
    return device


def read_image(
    path: str | Path, size: int, data: bytes | None = None, crop: Crop = 1.0
) -> np.ndarray:
    """One image file of any format and mode → (size, size, 3) uint8, made square as ``crop``
    says; a one-line error names the file when it cannot be used. ``data``: its bytes, where
    they come from elsewhere than ``path`` (a zip), which then only names it."""
    if data is None:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise CvtLabError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return decode_image(data, size, crop)[0]
    except DecodeError as e:
        raise CvtLabError(f"{path}: {e}") from None
