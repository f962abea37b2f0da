"""The per-image train and eval pipelines of torchvision's classification references, for the image data modules.

Follows ``references/classification/presets.py`` (``ClassificationPresetTrain`` / ``ClassificationPresetEval``) and
``train.py`` (``--auto-augment``, ``--ra-magnitude``, ``--augmix-severity``, ``--interpolation``, ``--random-erase``,
``--weights``) with torchvision's ``transforms.v2`` implementations. MixUp / CutMix act on batches: see ``base.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Optional, get_args

import torch
from torchvision.transforms import v2

from lightning_recipes.datamodules.base import _check_positive_int, check_number

AutoAugment = Literal["ra", "ta_wide", "augmix", "imagenet", "cifar10", "svhn"]
Interpolation = Literal["bilinear", "bicubic", "nearest"]
AUTO_AUGMENTS: tuple[str, ...] = get_args(AutoAugment)
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
RA_MAGNITUDE = 9  # torchvision's --ra-magnitude default
AUGMIX_SEVERITY = 3  # torchvision's --augmix-severity default
_RA_BINS = 31  # v2.RandAugment's num_magnitude_bins: magnitudes 0..30


def check_augment_options(
    *,
    auto_augment: Optional[str],
    ra_magnitude: int,
    augmix_severity: int,
    interpolation: Optional[str],
    random_erasing: float,
) -> None:
    """Raise ``ValueError`` naming the ``--data.`` option for a bad or ineffective per-image augmentation setting."""
    if auto_augment is not None and auto_augment not in AUTO_AUGMENTS:
        raise ValueError(
            f"auto_augment={auto_augment!r} is invalid: use one of {', '.join(map(repr, AUTO_AUGMENTS))}, or null to "
            "disable it (--data.auto_augment)."
        )
    check_number("ra_magnitude", ra_magnitude, f"RandAugment's magnitude is an int in [0, {_RA_BINS - 1}]",
                 option="--data.ra_magnitude", integer=True, at_least=0, at_most=_RA_BINS - 1)  # fmt: skip
    if ra_magnitude != RA_MAGNITUDE and auto_augment != "ra":
        raise ValueError(
            f"ra_magnitude={ra_magnitude!r} has no effect with auto_augment={auto_augment!r}: it is RandAugment's "
            "magnitude; set --data.auto_augment ra, or drop --data.ra_magnitude."
        )
    check_number("augmix_severity", augmix_severity, "AugMix's severity is an int in [1, 10]",
                 option="--data.augmix_severity", integer=True, at_least=1, at_most=10)  # fmt: skip
    if augmix_severity != AUGMIX_SEVERITY and auto_augment != "augmix":
        raise ValueError(
            f"augmix_severity={augmix_severity!r} has no effect with auto_augment={auto_augment!r}: it is AugMix's "
            "severity; set --data.auto_augment augmix, or drop --data.augmix_severity."
        )
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation={interpolation!r} is invalid: use one of {', '.join(map(repr, INTERPOLATIONS))} "
            "(--data.interpolation)."
        )
    erasing = "it is a probability in [0, 1] (0 disables it)"
    check_number("random_erasing", random_erasing, erasing, option="--data.random_erasing", at_least=0, at_most=1)


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    """Raise ``ValueError`` unless ``mean`` is 3 finite numbers and ``std`` 3 positive finite numbers."""
    if len(mean) != 3 or not all(_is_finite(m) for m in mean):
        raise ValueError(f"mean={mean!r} is invalid: give 3 values, one per RGB channel, all finite (--data.mean).")
    if len(std) != 3 or not all(_is_finite(s) and s > 0 for s in std):
        raise ValueError(f"std={std!r} is invalid: give 3 positive values, one per RGB channel (--data.std).")


def auto_augment_transform(
    name: str, *, interpolation: str, ra_magnitude: int = RA_MAGNITUDE, augmix_severity: int = AUGMIX_SEVERITY
) -> v2.Transform:
    """The policy ``--auto-augment name`` adds in torchvision's ``ClassificationPresetTrain``."""
    mode = v2.InterpolationMode(interpolation)
    if name == "ra":
        return v2.RandAugment(interpolation=mode, magnitude=ra_magnitude)  # num_ops=2, as the preset
    if name == "ta_wide":
        return v2.TrivialAugmentWide(interpolation=mode)
    if name == "augmix":
        return v2.AugMix(interpolation=mode, severity=augmix_severity)
    return v2.AutoAugment(v2.AutoAugmentPolicy(name), interpolation=mode)


def train_transform(
    crop: Sequence[v2.Transform],
    *,
    hflip: bool,
    auto_augment: Optional[str],
    interpolation: str,
    ra_magnitude: int,
    augmix_severity: int,
    mean: Sequence[float],
    std: Sequence[float],
    random_erasing: float,
) -> v2.Compose:
    """``crop`` [+ horizontal flip] [+ auto-augment] + to float + normalize [+ RandomErasing], the preset's order.

    The auto-augment policy runs on the uint8 (PIL) image, before the conversion to float, as in the preset.
    """
    steps = list(crop)
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if auto_augment is not None:
        steps.append(auto_augment_transform(auto_augment, interpolation=interpolation, ra_magnitude=ra_magnitude,
                                            augmix_severity=augmix_severity))  # fmt: skip
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if random_erasing > 0:
        # After Normalize, as in torchvision's references: erased pixels become 0, the data set mean.
        steps.append(v2.RandomErasing(p=random_erasing))
    return v2.Compose(steps)


def eval_transform(
    *, resize_size: Optional[int], crop_size: Optional[int], interpolation: str, mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    """[Resize(shorter side) + CenterCrop] + to float + normalize: ``ClassificationPresetEval`` (None: no resize, crop)."""
    steps: list[v2.Transform] = []
    if resize_size is not None:
        steps.append(v2.Resize(resize_size, interpolation=v2.InterpolationMode(interpolation), antialias=True))
    if crop_size is not None:
        steps.append(v2.CenterCrop(crop_size))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


#: The eval settings a torchvision weights enum's ``transforms()`` fixes, by data-module option name.
EVAL_OPTIONS = ("val_resize_size", "val_crop_size", "mean", "std", "interpolation")


def weights_eval_settings(name: str) -> dict[str, Any]:
    """``{val_resize_size, val_crop_size, mean, std, interpolation}`` of torchvision weights ``name``'s transforms.

    Reads the enum only (``torchvision.models.get_weight``): nothing is downloaded.
    """
    from torchvision.models import get_weight
    from torchvision.transforms._presets import ImageClassification

    hint = "give a torchvision weights name such as 'ResNet50_Weights.IMAGENET1K_V2' (--data.weights_transforms)"
    if not isinstance(name, str) or name.count(".") != 1:
        raise ValueError(f"weights_transforms={name!r} is invalid: {hint}.")
    try:
        weights = get_weight(name)
    except (ValueError, KeyError):
        raise ValueError(f"weights_transforms={name!r} is not a torchvision weights name: {hint}.") from None
    preset = weights.transforms()
    if not isinstance(preset, ImageClassification):
        raise ValueError(
            f"weights_transforms={name!r} is invalid: its transforms are {type(preset).__name__}, not an image "
            f"classification preset; {hint}."
        )
    return {
        "val_resize_size": int(preset.resize_size[0]),
        "val_crop_size": int(preset.crop_size[0]),
        "mean": tuple(float(m) for m in preset.mean),
        "std": tuple(float(s) for s in preset.std),
        "interpolation": preset.interpolation.value,
    }


def resolve_eval_settings(
    weights_transforms: Optional[str], given: dict[str, Any], defaults: dict[str, Any], *, crop_hint: str = ""
) -> dict[str, Any]:
    """The values of ``EVAL_OPTIONS``: ``given`` (None = not given), else the weights', else ``defaults``.

    Checks the given sizes (positive ints) and mean / std (the module's default fills the one not given); a given
    value that differs from the weights' raises ``ValueError`` naming both options; and the resolved center crop
    must fit in the resized image (``crop_hint`` ends that message, e.g. the reference's sizes).
    """
    for name in ("val_resize_size", "val_crop_size"):
        if given[name] is not None:
            _check_positive_int(name, given[name])
    if given["mean"] is not None or given["std"] is not None:
        check_mean_std(defaults["mean"] if given["mean"] is None else given["mean"],
                       defaults["std"] if given["std"] is None else given["std"])  # fmt: skip
    if weights_transforms is None:
        settings = {key: defaults[key] if given[key] is None else given[key] for key in EVAL_OPTIONS}
    else:
        settings = weights_eval_settings(weights_transforms)
        for key in EVAL_OPTIONS:
            ours = given[key]
            if ours is not None and (tuple(ours) if key in ("mean", "std") else ours) != settings[key]:
                raise ValueError(
                    f"{key}={ours!r} conflicts with weights_transforms={weights_transforms!r}, whose eval transforms "
                    f"use {key}={settings[key]!r}: drop --data.{key} (the weights set it) or --data.weights_transforms."
                )
    if settings["val_crop_size"] > settings["val_resize_size"]:
        # CenterCrop larger than the resized image pads it with black borders.
        raise ValueError(
            f"val_crop_size={settings['val_crop_size']!r} is invalid with val_resize_size="
            f"{settings['val_resize_size']!r}: the crop must not exceed the resized shorter side "
            f"(--data.val_crop_size{crop_hint})."
        )
    return settings


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
