"""The ImageNet-1k classes, for weights that were trained on them: official CvT files carry no
class names, and Hugging Face folders name them in words, while ImageNet folders are named by
WordNet id. Taken from timm's tables; the order (sorted ids) is the one official weights
predict in."""

from __future__ import annotations

from functools import cache


@cache
def imagenet_1k_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(WordNet ids, descriptions) of the 1,000 classes, in output order."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    wnids = tuple(info.index_to_label_name(i) for i in range(1000))
    return wnids, tuple(info.index_to_description(i) for i in range(1000))


def is_imagenet_1k(class_names: list[str] | None, num_classes: int) -> bool:
    """Weights of 1,000 classes without names (an official file), or whose first class is
    ImageNet-1k's first, by description (Hugging Face labels, Tiny ImageNet's words) or id."""
    if num_classes != 1000:
        return False
    if not class_names:
        return True
    wnids, descriptions = imagenet_1k_classes()
    return class_names[0] in (wnids[0], descriptions[0])


def imagenet_1k_aliases() -> dict[str, int]:
    """Every name an ImageNet-1k class goes by (its WordNet id and description) → its output."""
    wnids, descriptions = imagenet_1k_classes()
    return {name: i for names in (wnids, descriptions) for i, name in enumerate(names)}
