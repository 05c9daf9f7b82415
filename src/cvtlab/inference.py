"""Loading a trained model for evaluation, prediction and export, whatever file holds it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data.augment import normalize
from .data.decode import DecodeError, decode_image
from .errors import CvtLabError


@dataclass
class Predictor:
    model: nn.Module
    class_names: list[str]
    img_size: int
    run_config: dict | None = None  # the training run's config.yaml, when beside the checkpoint
    # False when the weights came without class names (an official .pth, a Hugging Face folder
    # without labels): ``class_names`` are then the output indices as strings.
    names_known: bool = True

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, flip: bool = False) -> torch.Tensor:
        """uint8 (N, H, W, 3) images → class probabilities (N, K); ``flip`` averages them with
        the mirror images' (test-time augmentation)."""
        device = next(self.model.parameters()).device
        x = normalize(torch.from_numpy(np.array(images, dtype=np.uint8)).to(device))
        return flip_averaged(self.model, x).exp() if flip else self.model(x).softmax(-1)


def flip_averaged(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Log of the mean of the class probabilities for ``x`` and its mirror image: the same for
    an image and its mirror, whatever the model."""
    probs = model(x).float().softmax(-1) + model(x.flip(-1)).float().softmax(-1)
    return torch.log(probs / 2)


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


def load_predictor(checkpoint: str | Path) -> Predictor:
    """A model in eval mode from a cvtlab ``.ckpt`` or a training run's folder (the checkpoint
    its test scored; its EMA weights when the run kept an EMA), a cvtlab ``.safetensors``
    export, an official ``.pth`` or a Hugging Face folder."""
    path = resolve_checkpoint(checkpoint)
    if path.suffix == ".ckpt":
        from .train.module import load_module

        module = load_module(str(path))
        model = module.eval_model().eval()
        names = list(module.hparams.class_names)
    else:
        from .models.pretrained import from_pretrained

        model = from_pretrained(path).eval()
        names = getattr(model, "class_names", None)
    known = bool(names)
    if known:
        model.class_names = names
    else:
        names = [str(i) for i in range(model.num_classes)]
    return Predictor(model, names, int(model.img_size), _run_config(path), known)


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


def read_image(path: str | Path, size: int) -> np.ndarray:
    """One image file of any format and mode → (size, size, 3) uint8; a one-line error names the
    file when it cannot be used."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CvtLabError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return decode_image(data, size)[0]
    except DecodeError as e:
        raise CvtLabError(f"{path}: {e}") from None
