"""The image data modules' torchvision-recipe options: auto-augment, interpolation, MixUp / CutMix, repeated
augmentation and pretrained weights' eval transforms, each compared with torchvision's own objects."""

from __future__ import annotations

import math
from argparse import ArgumentError

import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from PIL import Image
from torch import nn
from torchvision.models import get_weight
from torchvision.transforms import v2

from data_fakes import SIZES, write_cifar, write_tree
from lightning_recipes.callbacks import ResumableCheckpoint
from lightning_recipes.datamodules import CIFAR10DataModule, ImageFolderDataModule
from lightning_recipes.datamodules.cifar10 import CIFAR10_MEAN, CIFAR10_STD
from lightning_recipes.datamodules.image_folder import IMAGENET_MEAN, IMAGENET_STD

BILINEAR, BICUBIC = v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC


@pytest.fixture
def root(tmp_path) -> str:
    return write_tree(tmp_path)


def _image(size=(40, 30), seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy())


# ---- auto-augment and interpolation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "cls", "attributes"),
    [
        ("ra", v2.RandAugment, {"num_ops": 2, "magnitude": 9}),
        ("ta_wide", v2.TrivialAugmentWide, {}),
        ("augmix", v2.AugMix, {"severity": 3}),
        ("imagenet", v2.AutoAugment, {"policy": v2.AutoAugmentPolicy.IMAGENET}),
        ("cifar10", v2.AutoAugment, {"policy": v2.AutoAugmentPolicy.CIFAR10}),
    ],
)
def test_each_policy_is_torchvisions_after_crop_and_flip_with_the_interpolation(root, policy, cls, attributes):
    dm = ImageFolderDataModule(root=root, **SIZES, auto_augment=policy, random_erasing=0.25)
    steps = dm.train_transform().transforms
    assert [type(t) for t in steps] == [
        v2.RandomResizedCrop, v2.RandomHorizontalFlip, cls, v2.ToImage, v2.ToDtype, v2.Normalize, v2.RandomErasing
    ]
    assert steps[2].interpolation == BILINEAR  # the default; v2's own default for the policies is nearest
    assert all(getattr(steps[2], name) == value for name, value in attributes.items())
    cifar = CIFAR10DataModule(auto_augment=policy, interpolation="bicubic")
    cifar_steps = cifar.train_transform().transforms
    assert [type(t) for t in cifar_steps[:3]] == [v2.RandomCrop, v2.RandomHorizontalFlip, cls]
    assert cifar_steps[2].interpolation == BICUBIC


def test_interpolation_reaches_every_resize_and_the_policy_and_defaults_to_bilinear(root):
    default = ImageFolderDataModule(root=root, **SIZES, auto_augment="ta_wide")
    assert default.interpolation == "bilinear" and CIFAR10DataModule().interpolation == "bilinear"
    resized = [default.train_transform().transforms[0], default.train_transform().transforms[2],
               default.eval_transform().transforms[0]]  # fmt: skip
    assert [type(t) for t in resized] == [v2.RandomResizedCrop, v2.TrivialAugmentWide, v2.Resize]
    assert all(t.interpolation == BILINEAR for t in resized)
    bicubic = ImageFolderDataModule(root=root, **SIZES, auto_augment="ra", interpolation="bicubic")
    resized = [bicubic.train_transform().transforms[0], bicubic.train_transform().transforms[2],
               bicubic.eval_transform().transforms[0]]  # fmt: skip
    assert all(t.interpolation == BICUBIC for t in resized)


def test_the_train_pipeline_equals_torchvisions_preset_draw_for_draw(root):
    # ClassificationPresetTrain(crop_size=16, interpolation=bicubic, auto_augment_policy="ra", ra_magnitude=12,
    # random_erase_prob=0.5, backend="pil", use_v2=True) written out; the same seed gives the same tensor.
    dm = ImageFolderDataModule(root=root, **SIZES, auto_augment="ra", ra_magnitude=12, interpolation="bicubic",
                               random_erasing=0.5)  # fmt: skip
    preset = v2.Compose([
        v2.RandomResizedCrop(16, interpolation=BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandAugment(interpolation=BICUBIC, magnitude=12),
        v2.PILToTensor(),
        v2.ToDtype(torch.float, scale=True),
        v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        v2.RandomErasing(p=0.5),
        v2.ToPureTensor(),
    ])  # fmt: skip
    ours_transform = dm.train_transform()
    for seed in range(8):
        image = _image(seed=seed)
        torch.manual_seed(seed)
        ours = ours_transform(image)
        torch.manual_seed(seed)
        assert torch.equal(ours, preset(image))
    val_preset = v2.Compose([v2.Resize(20, interpolation=BICUBIC, antialias=True), v2.CenterCrop(16),
                             v2.PILToTensor(), v2.ToDtype(torch.float, scale=True),
                             v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])  # fmt: skip
    assert torch.equal(dm.eval_transform()(_image()), val_preset(_image()))


def test_the_options_parse_from_the_command_line(root, tmp_path):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageFolderDataModule, "data")
    cfg = parser.parse_args(["--data.root", root, "--data.auto_augment", "augmix", "--data.augmix_severity", "5",
                             "--data.interpolation", "bicubic", "--data.mixup_alpha", "0.2", "--data.ra_reps", "4"])
    dm = ImageFolderDataModule(**cfg.data)
    assert (dm.auto_augment, dm.augmix_severity, dm.interpolation, dm.mixup_alpha, dm.ra_reps) == (
        "augmix", 5, "bicubic", 0.2, 4)  # fmt: skip
    with pytest.raises(ArgumentError, match="auto_augment"):
        parser.parse_args(["--data.root", root, "--data.auto_augment", "trivial"])
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CIFAR10DataModule, "data")
    cfg = parser.parse_args(["--data.weights_transforms", "ViT_B_16_Weights.IMAGENET1K_V1"])
    assert CIFAR10DataModule(**cfg.data).image_size == 224


# ---- validation --------------------------------------------------------------------------------------------------

INVALID = [
    ({"auto_augment": "trivial"}, r"auto_augment='trivial' is invalid: use one of 'ra', 'ta_wide', 'augmix', 'imagenet', 'cifar10', 'svhn', or null to disable it \(--data\.auto_augment\)\."),
    ({"auto_augment": "ra", "ra_magnitude": 31}, r"ra_magnitude=31 is invalid: RandAugment's magnitude is an int in \[0, 30\] \(--data\.ra_magnitude\)\."),
    ({"auto_augment": "ra", "ra_magnitude": 9.5}, r"ra_magnitude=9\.5 is invalid: RandAugment's magnitude is an int"),
    ({"auto_augment": "ta_wide", "ra_magnitude": 12}, r"ra_magnitude=12 has no effect with auto_augment='ta_wide': it is RandAugment's magnitude; set --data\.auto_augment ra, or drop --data\.ra_magnitude\."),
    ({"auto_augment": "augmix", "augmix_severity": 0}, r"augmix_severity=0 is invalid: AugMix's severity is an int in \[1, 10\] \(--data\.augmix_severity\)\."),
    ({"augmix_severity": 5}, r"augmix_severity=5 has no effect with auto_augment=None: it is AugMix's severity; set --data\.auto_augment augmix"),
    ({"interpolation": "lanczos"}, r"interpolation='lanczos' is invalid: use one of 'bilinear', 'bicubic', 'nearest' \(--data\.interpolation\)\."),
    ({"mixup_alpha": -0.2}, r"mixup_alpha=-0\.2 is invalid: Beta's alpha must be a finite value >= 0 \(0 disables it\) \(--data\.mixup_alpha\)\."),
    ({"cutmix_alpha": math.inf}, r"cutmix_alpha=inf is invalid: Beta's alpha must be a finite value >= 0 \(0 disables it\) \(--data\.cutmix_alpha\)\."),
    ({"ra_reps": 0}, r"ra_reps=0 is invalid: the copies of each image per epoch are an int >= 1 \(1 disables repeated augmentation\) \(--data\.ra_reps\)\."),
    ({"ra_reps": True}, r"ra_reps=True is invalid: the copies of each image per epoch are an int >= 1"),
    ({"val_resize_size": 0}, r"val_resize_size=0 is invalid: it must be a positive int \(--data\.val_resize_size\)\."),
    ({"weights_transforms": "resnet50"}, r"weights_transforms='resnet50' is invalid: give a torchvision weights name such as 'ResNet50_Weights\.IMAGENET1K_V2' \(--data\.weights_transforms\)\."),
    ({"weights_transforms": "ResNet50_Weights.IMAGENET1K_V9"}, r"weights_transforms='ResNet50_Weights\.IMAGENET1K_V9' is not a torchvision weights name: give"),
    ({"weights_transforms": "Nope_Weights.V1"}, r"weights_transforms='Nope_Weights\.V1' is not a torchvision weights name"),
    ({"weights_transforms": "FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1"}, r"its transforms are SemanticSegmentation, not an image classification preset"),
    ({"weights_transforms": "ResNet50_Weights.IMAGENET1K_V2", "val_resize_size": 256}, r"val_resize_size=256 conflicts with weights_transforms='ResNet50_Weights\.IMAGENET1K_V2', whose eval transforms use val_resize_size=232: drop --data\.val_resize_size \(the weights set it\) or --data\.weights_transforms\."),
    ({"weights_transforms": "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1", "interpolation": "bilinear"}, r"interpolation='bilinear' conflicts with weights_transforms='ViT_B_16_Weights\.IMAGENET1K_SWAG_E2E_V1', whose eval transforms use interpolation='bicubic'"),
    ({"weights_transforms": "ResNet50_Weights.IMAGENET1K_V2", "mean": (0.5, 0.5, 0.5)}, r"mean=\(0\.5, 0\.5, 0\.5\) conflicts with weights_transforms='ResNet50_Weights\.IMAGENET1K_V2', whose eval transforms use mean=\(0\.485, 0\.456, 0\.406\)"),
]


@pytest.mark.parametrize(("kwargs", "message"), INVALID, ids=[str(k) for k, _ in INVALID])
def test_invalid_options_are_named(root, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(root=root, **kwargs)
    with pytest.raises(ValueError, match=message):
        CIFAR10DataModule(**kwargs)


# ---- pretrained weights' eval transforms -------------------------------------------------------------------------


def _assert_same_as_the_weights(ours: v2.Compose, preset, image: Image.Image) -> None:
    """The resized, cropped pixels are the preset's exactly; the floats within 1 ulp: v2's ToDtype multiplies by
    1/255 where the preset's convert_image_dtype divides by 255."""
    from torchvision.transforms import functional as F1

    pixels = v2.Compose([*ours.transforms[:2], v2.PILToTensor()])(image)
    resized = F1.resize(image, preset.resize_size, interpolation=preset.interpolation, antialias=preset.antialias)
    assert torch.equal(pixels, F1.pil_to_tensor(F1.center_crop(resized, preset.crop_size)))
    torch.testing.assert_close(ours(image), preset(image), rtol=0, atol=1e-6)


def test_weights_transforms_evaluate_exactly_as_the_weights_do(root):
    weights = get_weight("ResNet50_Weights.IMAGENET1K_V2")
    dm = ImageFolderDataModule(root=root, weights_transforms="ResNet50_Weights.IMAGENET1K_V2")
    assert (dm.val_resize_size, dm.val_crop_size, dm.image_size, dm.interpolation) == (232, 224, 224, "bilinear")
    assert dm.mean == IMAGENET_MEAN and dm.std == IMAGENET_STD
    image = _image((300, 260))
    _assert_same_as_the_weights(dm.eval_transform(), weights.transforms(), image)
    # A value the weights also use is no conflict.
    assert ImageFolderDataModule(root=root, weights_transforms="ResNet50_Weights.IMAGENET1K_V2",
                                 val_resize_size=232, mean=IMAGENET_MEAN).val_resize_size == 232  # fmt: skip


def test_weights_transforms_set_the_interpolation_of_training_too(root):
    weights = get_weight("ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1")
    dm = ImageFolderDataModule(root=root, train_crop_size=384, auto_augment="ta_wide",
                               weights_transforms="ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1")  # fmt: skip
    assert (dm.val_resize_size, dm.val_crop_size, dm.interpolation) == (384, 384, "bicubic")
    steps = dm.train_transform().transforms
    assert steps[0].interpolation == steps[2].interpolation == BICUBIC
    _assert_same_as_the_weights(dm.eval_transform(), weights.transforms(), _image((400, 390)))


def test_cifar10_with_weights_transforms_trains_and_evaluates_at_their_size(tmp_path, monkeypatch):
    write_cifar(tmp_path, monkeypatch)
    weights = get_weight("ViT_B_16_Weights.IMAGENET1K_V1")
    dm = CIFAR10DataModule(data_dir=str(tmp_path), weights_transforms="ViT_B_16_Weights.IMAGENET1K_V1",
                           batch_size=2, num_workers=0)  # fmt: skip
    assert (dm.image_size, dm.val_resize_size, dm.mean) == (224, 256, IMAGENET_MEAN)
    dm.setup("fit")
    _assert_same_as_the_weights(dm.val_set.transform, weights.transforms(), Image.fromarray(dm.val_set.data[0]))
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 224, 224)
    default = CIFAR10DataModule()
    assert (default.image_size, default.mean, default.std) == (32, CIFAR10_MEAN, CIFAR10_STD)
    assert [type(t) for t in default.eval_transform().transforms] == [v2.ToImage, v2.ToDtype, v2.Normalize]


# ---- MixUp / CutMix ----------------------------------------------------------------------------------------------


def _trainer() -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)  # fmt: skip


def _batch(n: int = 6, classes: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 8, 8, generator=generator), torch.arange(n) % classes]


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.2, 1.0), (0.2, 0.0), (0.0, 1.0)])
def test_training_batches_are_mixed_as_torchvisions_random_choice_does(root, mixup, cutmix):
    dm = ImageFolderDataModule(root=root, **SIZES, mixup_alpha=mixup, cutmix_alpha=cutmix)
    dm.trainer = _trainer()
    dm.trainer.training = True
    # torchvision's get_mixup_cutmix(mixup_alpha, cutmix_alpha, num_classes=3, use_v2=True)
    mixers = [v2.MixUp(alpha=mixup, num_classes=3)] if mixup > 0 else []
    mixers += [v2.CutMix(alpha=cutmix, num_classes=3)] if cutmix > 0 else []
    reference = v2.RandomChoice(mixers)
    kinds = set()
    for seed in range(12):
        images, labels = _batch()
        torch.manual_seed(seed)
        mixed, targets = dm.on_after_batch_transfer([images, labels], 0)
        after = torch.random.get_rng_state()
        torch.manual_seed(seed)
        expected_images, expected_targets = reference(images, labels)
        assert torch.equal(torch.random.get_rng_state(), after)  # the same draws from the global RNG
        assert torch.equal(mixed, expected_images) and torch.equal(targets, expected_targets)
        assert targets.dtype == torch.float32 and targets.shape == (6, 3)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        # The images mix each image with its predecessor in the batch in the proportion of the targets.
        lam = targets[0, labels[0]]  # labels[0] = 0 differs from labels[-1] = 2
        if ((mixed == images) | (mixed == images.roll(1, 0))).all():  # CutMix: a box pasted from the predecessor
            torch.testing.assert_close((mixed == images).all(1)[0].float().mean(), lam)
            kinds.add("cutmix")
        else:
            torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))
            kinds.add("mixup")
    assert kinds == {name for name, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0}


def test_validation_and_untrained_batches_keep_their_labels(root):
    dm = ImageFolderDataModule(root=root, **SIZES, mixup_alpha=0.2, cutmix_alpha=1.0)
    batch = _batch()
    assert dm.on_after_batch_transfer(batch, 0) is batch  # no Trainer
    dm.trainer = _trainer()
    for stage in ("validating", "testing", "predicting", "sanity_checking"):
        setattr(dm.trainer, stage, True)
        assert dm.on_after_batch_transfer(batch, 0) is batch
    plain = ImageFolderDataModule(root=root, **SIZES)
    plain.trainer = _trainer()
    plain.trainer.training = True
    assert plain.on_after_batch_transfer(batch, 0) is batch


class _Recorder(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 16 * 16, 3)
        self.seen: list[tuple[str, torch.dtype, tuple]] = []

    def training_step(self, batch, batch_idx):
        images, targets = batch
        self.seen.append(("train", targets.dtype, tuple(targets.shape)))
        return F.cross_entropy(self.head(images.flatten(1)), targets)

    def validation_step(self, batch, batch_idx):
        self.seen.append(("val", batch[1].dtype, tuple(batch[1].shape)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_trainer_mixes_the_training_batches_only(root, tmp_path):
    dm = ImageFolderDataModule(root=root, **SIZES, mixup_alpha=0.2, cutmix_alpha=1.0, batch_size=4, num_workers=0)
    model = _Recorder()
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                      num_sanity_val_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert model.seen == [("val", torch.int64, (4,)), ("train", torch.float32, (4, 3)),
                          ("train", torch.float32, (4, 3)), ("val", torch.int64, (4,))]  # fmt: skip


class _StopAt(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 4:
            raise RuntimeError("node lost")


def _fit_mixed(root: str, run_dir, callbacks, ckpt_path=None) -> _Recorder:
    seed_everything(0, verbose=False)
    dm = ImageFolderDataModule(root=root, **SIZES, mixup_alpha=0.2, cutmix_alpha=1.0, batch_size=3, num_workers=0)
    model = _Recorder()
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir,
                      callbacks=[ResumableCheckpoint(every_n_steps=2), *callbacks])  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_a_mid_epoch_resume_mixes_as_the_uninterrupted_run(root, tmp_path):
    # 9 images in batches of 3: the failure hits batch 1 of epoch 1; the mixing draws come from the restored RNG.
    uninterrupted = _fit_mixed(root, tmp_path / "a", [])
    with pytest.raises(RuntimeError, match="node lost"):
        _fit_mixed(root, tmp_path / "b", [_StopAt()])
    resumed = _fit_mixed(root, tmp_path / "b", [], ckpt_path="last")
    assert [kind for kind, *_ in resumed.seen] == ["train"] * 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), uninterrupted.state_dict().values()))
    assert not torch.equal(resumed.head.weight, _Recorder().head.weight)


# ---- repeated augmentation ---------------------------------------------------------------------------------------


class _Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 600

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1), index


def test_ra_reps_reaches_the_train_loader(root):
    dm = ImageFolderDataModule(root=root, **SIZES, ra_reps=3, batch_size=8, num_workers=0)
    dm.train_set = _Items()
    loader = dm.train_dataloader()
    assert loader.sampler.repetitions == 3 and len(loader) == 512 // 8
    labels = next(iter(loader))[1].tolist()
    assert labels[:3] == [labels[0]] * 3 and labels[3:6] == [labels[3]] * 3
    dm = CIFAR10DataModule(ra_reps=4, num_workers=0)
    dm.train_set = _Items()
    assert dm.train_dataloader().sampler.repetitions == 4
