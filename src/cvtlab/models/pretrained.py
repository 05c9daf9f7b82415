"""Loading weights: official microsoft/CvT ``.pth`` files, Hugging Face ``CvtForImageClassification``
folders (or ``hf:`` hub ids), and cvtlab's own ``.safetensors`` and Lightning checkpoints.

Every file is read with ``weights_only=True`` or as safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.decode import Crop, parse_crop
from ..errors import CvtLabError
from .convert import config_from_hf, hf_to_cvtlab, is_hf_state_dict
from .cvt import CvTConfig
from .imagenet import imagenet_1k_aliases, imagenet_1k_classes, is_imagenet_1k
from .registry import MODEL_CONFIGS, build_model, get_config
from .seed import SeedConfig

_META_MODEL = "cvtlab_model"
_META_CONFIG = "cvtlab_config"
_META_CLASSES = "cvtlab_class_names"
_META_CROP = "cvtlab_eval_crop"

# The crop the official CvT evaluation and Hugging Face's image processor take below 384 px
# (shorter side to 256, centre 224); at 384 px and above both resize the whole image instead.
IMAGENET_CROP = 0.875


class Checkpoint:
    """A state dict in cvtlab's names plus what the file says about its architecture."""

    def __init__(
        self,
        state_dict: dict[str, torch.Tensor],
        source: str,
        model_name: str | None = None,
        config: CvTConfig | SeedConfig | None = None,
        class_names: list[str] | None = None,
    ):
        self.state_dict = state_dict
        self.source = source
        self.model_name = model_name
        self.config = config
        self.class_names = class_names
        # What the file's makers say about its input: the size it was trained at (an official
        # file's name, a Hugging Face processor), and how its test images were cropped, either
        # outright (``eval_crop``, a cvtlab export) or as ImageNet models are (``crop_pct``
        # below 384 px, the whole image resized from 384 px up).
        self.img_size: int | None = None
        self.eval_crop: Crop | None = None
        self.crop_pct: float | None = None

    def view_for(self, img_size: int) -> Crop:
        """How this checkpoint's test images become ``img_size`` squares (1.0: cvtlab's own
        whole-shorter-side view, what its runs train and test on)."""
        if self.eval_crop is not None:
            return self.eval_crop
        if self.crop_pct is not None:
            return self.crop_pct if img_size < 384 else "squash"
        return 1.0


def _config_from_meta(data: dict | None) -> CvTConfig | SeedConfig | None:
    """The stored config's own fields say its type: only the seed model's has ``embed_dim``."""
    if data is None:
        return None
    return SeedConfig(**data) if "embed_dim" in data else CvTConfig.from_dict(data)


def load_state_dict_file(path: str | Path) -> Checkpoint:
    """Read one weights file (``.safetensors``, ``.pth``/``.pt``/``.bin``, Lightning ``.ckpt``)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CvtLabError(f"{source}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CvtLabError(f"{source}: the file is empty")
    if path.suffix == ".safetensors":
        try:
            state_dict = load_file(path)
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CvtLabError(f"{source}: not a readable safetensors file ({e})") from None
        name = meta.get(_META_MODEL)
        config = _config_from_meta(json.loads(meta[_META_CONFIG])) if _META_CONFIG in meta else None
        classes = json.loads(meta[_META_CLASSES]) if _META_CLASSES in meta else None
        ckpt = _normalise(Checkpoint(state_dict, source, name, config, classes))
        if _META_CROP in meta:
            try:
                ckpt.eval_crop = parse_crop(meta[_META_CROP], f"{source}: {_META_CROP}")
            except CvtLabError:
                pass  # a hand-edited value: the view is a default, not the weights
        return ckpt
    with open(path, "rb") as f:
        head = f.read(4)
    # PyTorch writes a zip archive, or before 1.6 a bare pickle (protocol 2 and up start 0x80).
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        if path.suffix.lower() == ".onnx":  # an export, for ONNX Runtime and its kin
            raise CvtLabError(
                f"{source}: an ONNX export runs in ONNX Runtime, not here; give the run folder, "
                "its .ckpt or a .safetensors export"
            )
        raise CvtLabError(f"{source}: not a PyTorch checkpoint (neither a zip nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e).strip()
        if text.startswith("Weights only load failed"):
            # PyTorch's advice here is to load with weights_only=False, which runs any code
            # the file holds; cvtlab never does.
            detail = " (it holds objects besides tensors and plain data, which cvtlab refuses)"
        else:
            # A cut-off file and the like; a KeyError's message is a bare number, no help.
            first = text.splitlines()[0] if text else ""
            detail = f" ({first})" if first and not isinstance(e, KeyError) else ""
        raise CvtLabError(f"{source}: not a readable PyTorch checkpoint{detail}") from None
    if not isinstance(obj, dict):
        raise CvtLabError(f"{source}: expected a state dict, found {type(obj).__name__}")
    name = config = classes = None
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        hparams = obj.get("hyper_parameters") or {}
        name = hparams.get("model")
        config = _config_from_meta(hparams.get("model_config"))
        classes = hparams.get("class_names")
        state_dict = obj["state_dict"]
        # A Lightning checkpoint of cvtlab's module holds the network under "model." and, when
        # the run kept an EMA, the averaged weights under "ema.module.": those are the ones the
        # run validated, tested and exported, so they are the ones taken.
        for prefix in ("ema.module.", "model."):
            if any(k.startswith(prefix) for k in state_dict):
                state_dict = {
                    k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)
                }
                break
    elif "model" in obj and isinstance(obj["model"], dict):
        state_dict = obj["model"]
    else:
        state_dict = obj
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CvtLabError(f"{source}: the checkpoint holds values that are not tensors")
    return _normalise(Checkpoint(dict(state_dict), source, name, config, classes))


def _normalise(ckpt: Checkpoint) -> Checkpoint:
    sd = ckpt.state_dict
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[7:]: v for k, v in sd.items()}
    if is_hf_state_dict(sd):
        sd = hf_to_cvtlab(sd)
    ckpt.state_dict = sd
    return ckpt


def _load_hf_folder(folder: Path) -> Checkpoint:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CvtLabError(
            f"{folder}: a checkpoint folder needs a config.json (Hugging Face layout) "
            "or checkpoints/ (a cvtlab run folder)"
        )
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CvtLabError(f"{config_file}: not valid JSON ({e})") from None
    config, names = config_from_hf(hf, str(config_file))
    for weights in ("model.safetensors", "pytorch_model.bin"):
        if (folder / weights).is_file():
            ckpt = load_state_dict_file(folder / weights)
            break
    else:
        raise CvtLabError(f"{folder}: no model.safetensors or pytorch_model.bin beside config.json")
    ckpt.config, ckpt.class_names, ckpt.source = config, names, str(folder)
    ckpt.img_size, ckpt.crop_pct = _hf_processor_view(folder)
    return ckpt


def _hf_processor_view(folder: Path) -> tuple[int | None, float]:
    """The input size and crop of a Hugging Face folder's image processor (CvT's is ConvNeXt's:
    ``size.shortest_edge`` and ``crop_pct``, 224 and 0.875 by default)."""
    try:
        processor = json.loads((folder / "preprocessor_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None, IMAGENET_CROP
    size = processor.get("size")
    if isinstance(size, dict):
        size = size.get("shortest_edge", size.get("height"))
    crop_pct = processor.get("crop_pct")
    size = size if isinstance(size, int) and size > 0 else None
    ok = isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1
    return size, float(crop_pct) if ok else IMAGENET_CROP


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            allow_patterns=["config.json", "preprocessor_config.json", "*.safetensors", "*.bin"],
        )
    except Exception as e:  # network, auth and missing-repo errors all end the same way
        raise CvtLabError(
            f"hf:{repo_id}: could not download from the Hugging Face hub ({type(e).__name__}); "
            "download the model folder elsewhere and pass its path instead"
        ) from None
    return Path(path)


def read_checkpoint(source: str | Path) -> Checkpoint:
    """Read any supported checkpoint source into cvtlab's names."""
    text = str(source)
    if text.startswith("hf:"):
        return _load_hf_folder(_download_hub(text[3:]))
    from ..inference import resolve_checkpoint  # a run folder → the checkpoint it tested

    path = resolve_checkpoint(source)
    if path.is_dir():
        return _load_hf_folder(path)
    ckpt = load_state_dict_file(path)
    head = ckpt.state_dict.get("head.weight")
    # A file from outside cvtlab (no architecture in it) with 1,000 outputs and no names is an
    # official one: its classes are ImageNet-1k's, in their order, and it was evaluated as
    # ImageNet models are.
    if ckpt.config is None and not ckpt.class_names and head is not None:
        if is_imagenet_1k(None, head.shape[0]):
            ckpt.class_names = list(imagenet_1k_classes()[1])
            ckpt.crop_pct = IMAGENET_CROP
    if ckpt.config is None:
        # Official files name their input size: CvT-13-384x384-IN-1k.pth. The architecture
        # has no position embeddings, so the same tensors fit every size and only the name
        # tells 384-px weights from 224-px ones.
        size = re.search(r"(?<!\d)(\d{2,4})x\1(?!\d)", path.name)
        ckpt.img_size = int(size.group(1)) if size else None
    return ckpt


def _infer_model_name(ckpt: Checkpoint) -> str:
    """The first registered model whose every non-head tensor has the checkpoint's shape."""
    wanted = {k: tuple(v.shape) for k, v in ckpt.state_dict.items() if not k.startswith("head.")}
    for name, cfg in MODEL_CONFIGS.items():
        with torch.device("meta"):
            model = build_model(cfg, name)
        have = {
            k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("head.")
        }
        if have == wanted:
            return name
    raise CvtLabError(
        f"{ckpt.source}: cannot tell which architecture these weights are for; "
        f"pass the model name (one of {', '.join(MODEL_CONFIGS)})"
    )


# Settings that change how a network trains or what it classifies, not what it is.
_NOT_ARCHITECTURE = ("num_classes", "act_layer", "drop_rate", "attn_drop_rate", "drop_path_rates")


def _registered_name(cfg: CvTConfig | SeedConfig) -> str | None:
    """The registered model ``cfg`` builds (a Hugging Face config of CvT-13 is ``cvt_13``)."""
    mine = {k: v for k, v in asdict(cfg).items() if k not in _NOT_ARCHITECTURE}
    for name, known in MODEL_CONFIGS.items():
        if type(known) is type(cfg):
            theirs = {k: v for k, v in asdict(known).items() if k not in _NOT_ARCHITECTURE}
            if theirs == mine:
                return name
    return None


def load_weights(model: nn.Module, ckpt: Checkpoint, fresh_head: bool = False) -> bool:
    """Copy ``ckpt`` into ``model``; a different head size is skipped (the model keeps its fresh
    head), anything else that does not fit is an error naming the keys and shapes. Returns
    whether the checkpoint's head was loaded (``fresh_head``: never)."""
    own = model.state_dict()
    sd = dict(ckpt.state_dict)
    head_keys = [k for k in own if k.startswith("head.")]
    # A head of another size, or none at all (num_classes=0, the pooled features), is the
    # model's own: the checkpoint's is left out.
    if (
        fresh_head
        or not head_keys
        or any(k in sd and sd[k].shape != own[k].shape for k in head_keys)
    ):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    for key, value in sd.items():
        if key in own and value.shape != own[key].shape:
            raise CvtLabError(
                f"{ckpt.source}: {key} has shape {tuple(value.shape)} in the checkpoint "
                f"but {tuple(own[key].shape)} in the model"
            )
    missing = sorted(set(own) - set(sd) - set(head_keys))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing keys: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}"
            )
        if unexpected:
            parts.append(
                f"unknown keys: {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}"
            )
        raise CvtLabError(f"{ckpt.source}: does not fit this architecture ({'; '.join(parts)})")
    model.load_state_dict(sd, strict=False)
    head_loaded = bool(head_keys) and all(k in sd for k in head_keys)
    if head_loaded and ckpt.class_names and len(ckpt.class_names) == model.num_classes:
        model.class_names = list(ckpt.class_names)
    return head_loaded


def load_pretrained_into(model: nn.Module, source: str | Path) -> nn.Module:
    load_weights(model, read_checkpoint(source))
    return model


def _head_rows(ckpt: Checkpoint, class_names: list[str]) -> list[int] | None:
    """The checkpoint's head row for each class to train, where it predicts every one of them:
    by name, or for an ImageNet-1k checkpoint also by WordNet id and description (Tiny
    ImageNet's 200 classes are ImageNet-1k classes)."""
    head = ckpt.state_dict.get("head.weight")
    if head is None:
        return None
    imagenet = bool(ckpt.class_names) and is_imagenet_1k(ckpt.class_names, head.shape[0])
    index = imagenet_1k_aliases() if imagenet else {}
    index.update({name: i for i, name in enumerate(ckpt.class_names or [])})
    rows = [index.get(name) for name in class_names]
    return None if not index or None in rows else rows


def start_from_pretrained(
    model: nn.Module, source: str | Path, model_name: str, class_names: list[str]
) -> str:
    """Load ``source`` into a model about to be trained on ``class_names``; returns a line that
    says what was loaded. The head starts from the checkpoint's rows for those classes where it
    predicts them all (the same classes, a subset, or Tiny ImageNet's classes from ImageNet-1k
    weights); a head trained on other classes starts fresh, since its outputs would mean the
    wrong classes."""
    ckpt = read_checkpoint(source)
    rows = _head_rows(ckpt, class_names)
    head_rows = ckpt.state_dict["head.weight"].shape[0] if rows else 0
    if rows and rows != list(range(head_rows)):
        picked = dict(ckpt.state_dict)
        for key in ("head.weight", "head.bias"):
            if key in picked:
                picked[key] = picked[key][rows]
        ckpt = Checkpoint(picked, ckpt.source, ckpt.model_name, ckpt.config, list(class_names))
    other_classes = rows is None and bool(ckpt.class_names)
    try:
        head_loaded = load_weights(model, ckpt, fresh_head=other_classes)
    except CvtLabError as e:
        if ckpt.model_name and ckpt.model_name != model_name:
            raise CvtLabError(
                f"--pretrained {source}: its weights are a {ckpt.model_name}, this run trains a "
                f"{model_name}; give --model {ckpt.model_name} to start from them"
            ) from None
        raise CvtLabError(f"--pretrained {e}") from None
    kind = ckpt.model_name or model_name
    if head_loaded and rows and len(rows) < head_rows:
        return (
            f"starting from {source}: {kind} weights, its head's rows for these "
            f"{len(rows)} classes (of its {head_rows})"
        )
    if head_loaded:
        return f"starting from {source}: {kind} weights, its head included"
    head = ckpt.state_dict.get("head.weight")
    count = len(ckpt.class_names or []) or (head.shape[0] if head is not None else 0)
    other = "other " if ckpt.class_names and count == len(class_names) else ""
    had = f"its head predicts {count} {other}classes" if count else "it has no head"
    fresh = f"a fresh {len(class_names)}-class head"
    return f"starting from {source}: {kind} weights and {fresh} ({had})"


def from_pretrained(
    source: str | Path,
    *,
    model: str | None = None,
    num_classes: int | None = None,
    act_layer: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a model from a checkpoint and load its weights.

    ``source`` is an official microsoft/CvT ``.pth`` file, a Hugging Face
    ``CvtForImageClassification`` folder (``config.json`` + weights) or ``hf:<repo id>``, a
    cvtlab ``.safetensors``/``.ckpt`` file (its EMA weights when the run kept an EMA) or a
    training run's folder (the checkpoint its test scored). The architecture comes from the
    file where it says so (Hugging Face config, cvtlab metadata); otherwise from ``model`` or,
    failing that, from the registered config whose shapes match. ``num_classes`` different from the checkpoint's
    gives a fresh head. ``act_layer`` defaults to what the weights were trained with: QuickGELU
    for official CvT weights in any format, the stored choice for cvtlab's own.
    """
    ckpt = read_checkpoint(source)
    name = model or ckpt.model_name
    if model is not None:
        cfg = get_config(model)
    elif ckpt.config is not None:
        cfg = ckpt.config
    else:
        name = _infer_model_name(ckpt)
        cfg = get_config(name)
    if not model and ckpt.config is None:
        head = ckpt.state_dict.get("head.weight")
        if head is not None:
            overrides.setdefault("num_classes", head.shape[0])
    if ckpt.img_size is not None and model is None:
        overrides.setdefault("img_size", ckpt.img_size)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if act_layer is not None:
        if not isinstance(cfg, CvTConfig):
            raise CvtLabError(f"{source}: act_layer applies to CvT models only")
        overrides["act_layer"] = act_layer
    values = {**asdict(cfg), **overrides}
    unknown = sorted(set(overrides) - set(asdict(cfg)))
    if unknown:
        raise CvtLabError(f"unknown model options: {', '.join(unknown)}")
    cfg = type(cfg)(**values)
    name = name or _registered_name(cfg)
    net = build_model(cfg, name or "model")
    net.model_name = name or "custom"
    load_weights(net, ckpt)
    net.eval_crop = ckpt.view_for(net.img_size)
    return net


def save_weights(model: nn.Module, path: str | Path, class_names: list[str] | None = None) -> Path:
    """Write ``model``'s weights as ``.safetensors`` with its architecture in the metadata, so
    :func:`from_pretrained` rebuilds it with no other information."""
    path = Path(path)
    meta = {_META_CONFIG: json.dumps(model.cfg.to_dict())}
    if getattr(model, "model_name", None):
        meta[_META_MODEL] = model.model_name
    names = class_names or getattr(model, "class_names", None)
    if names:
        meta[_META_CLASSES] = json.dumps(list(names))
    if getattr(model, "eval_crop", 1.0) != 1.0:
        meta[_META_CROP] = str(model.eval_crop)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    # safetensors creates its files readable by their owner alone; an export is made to be
    # shared, so it gets the permissions any file written here gets (the umask's).
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    tmp.replace(path)
    return path
