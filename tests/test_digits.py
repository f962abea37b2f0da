import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision.transforms import v2

from lightning_recipes.datamodules import DigitsDataModule
from lightning_recipes.datamodules.digits import RandomAffineNormalize


def test_split_is_the_reference_stratified_split():
    dm = DigitsDataModule()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (1437, 360)
    digits = load_digits()
    _, _, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    assert dm.train_set.targets.tolist() == y_train.tolist()
    assert dm.val_set.targets.tolist() == y_test.tolist()
    # Stratified: each class keeps its share of the 1,797 images within one image.
    share = torch.bincount(torch.tensor(digits.target)) * 0.2
    assert (torch.bincount(dm.val_set.targets) - share).abs().max() < 1
    assert dm.test_set is dm.val_set


def test_eval_batches_are_normalised_and_deterministic():
    dm = DigitsDataModule(image_size=8, batch_size=360)
    dm.setup("fit")
    (x1, y1), (x2, y2) = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert x1.shape == (360, 1, 8, 8) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    dm_plain = DigitsDataModule(augment=False)
    dm_plain.setup("fit")
    train = torch.stack([dm_plain.train_set[i][0] for i in range(len(dm_plain.train_set))])
    # Normalised with the training set's own statistics.
    assert train.mean().abs() < 1e-5 and (train.std() - 1).abs() < 1e-4


def test_resize_and_augmentation():
    dm = DigitsDataModule(image_size=16, batch_size=8)
    dm.setup("fit")
    assert dm.image_size == 16
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 16, 16) and y.dtype == torch.long
    torch.manual_seed(0)
    a = dm.train_set[0][0]
    torch.manual_seed(1)
    b = dm.train_set[0][0]
    assert not torch.equal(a, b), "training augmentation must be random"
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


def test_workers_load_the_same_batches():
    dm0 = DigitsDataModule(augment=False, batch_size=128, num_workers=0)
    dm2 = DigitsDataModule(augment=False, batch_size=128, num_workers=2)
    for dm in (dm0, dm2):
        dm.setup("fit")
    assert dm2.persistent_workers and not dm0.persistent_workers
    for (a, ya), (b, yb) in zip(dm0.val_dataloader(), dm2.val_dataloader()):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_mixup_cutmix_and_repeated_augmentation_reach_the_base_class():
    dm = DigitsDataModule(mixup_alpha=0.2, cutmix_alpha=1.0, ra_reps=3, batch_size=64)
    dm.setup("fit")
    assert (dm.mixup_alpha, dm.cutmix_alpha, dm.ra_reps) == (0.2, 1.0, 3)
    # torchvision's RASampler keeps len // 256 * 256 = 1,280 of the 1,437 images' 3 copies per epoch: 20 batches.
    assert len(dm.train_dataloader()) == 20
    plain = DigitsDataModule(batch_size=64)
    plain.setup("fit")
    assert len(plain.train_dataloader()) == 23  # ceil(1,437 / 64)


def _torchvision_pipeline(image_size, degrees, translate, scale, mean, std):
    """The per-sample v2 pipeline the data module replaced: what its samples must equal, pixel for pixel."""
    resize = [] if image_size == 8 else [v2.Resize(image_size, antialias=True)]
    affine = v2.RandomAffine(degrees, translate=(translate, translate), scale=scale,
                             interpolation=v2.InterpolationMode.BILINEAR)  # fmt: skip
    return v2.Compose([*resize, affine, v2.Normalize([mean], [std])]), v2.Compose([*resize, v2.Normalize([mean], [std])])


@pytest.mark.parametrize(
    ("image_size", "degrees", "translate", "scale"),
    [(16, 10.0, 0.1, (0.9, 1.1)), (8, 10.0, 0.1, (0.9, 1.1)), (12, 45.0, 0.25, (0.6, 1.4)), (16, 0.0, 0.0, (1.0, 1.0))],
)
def test_samples_equal_torchvision_resize_affine_normalize(image_size, degrees, translate, scale):
    dm = DigitsDataModule(image_size=image_size, max_rotation=degrees, max_translate=translate, scale=scale)
    dm.setup("fit")
    digits = load_digits()
    train_idx, held_out_idx = train_test_split(range(1797), test_size=0.2, stratify=digits.target, random_state=0)
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    train_8px, held_out_8px = images[train_idx], images[held_out_idx]
    mean, std = train_8px.mean().item(), train_8px.std().item()
    train_tf, eval_tf = _torchvision_pipeline(image_size, degrees, translate, scale, mean, std)
    for index in range(0, 1437, 97):
        torch.manual_seed(index)
        expected, after_expected = train_tf(train_8px[index]), torch.rand(4)
        torch.manual_seed(index)
        (image, label), after = dm.train_set[index], torch.rand(4)
        assert torch.equal(image, expected) and label == digits.target[train_idx[index]]
        # The same draws from torch's RNG, no more and no fewer: the next numbers agree too.
        assert torch.equal(after, after_expected)
    assert all(torch.equal(dm.val_set[i][0], eval_tf(held_out_8px[i])) for i in range(0, 360, 11))


def test_random_affine_normalize_equals_torchvision_and_checks_the_size():
    affine = RandomAffineNormalize(degrees=20.0, translate=0.15, scale=(0.8, 1.2), mean=0.25, std=2.0, size=10)
    reference = v2.Compose([
        v2.RandomAffine(20.0, translate=(0.15, 0.15), scale=(0.8, 1.2), interpolation=v2.InterpolationMode.BILINEAR),
        v2.Normalize([0.25], [2.0]),
    ])  # fmt: skip
    image = torch.rand(1, 10, 10)
    outputs = set()
    for seed in range(20):
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        assert torch.equal(affine(image), expected)
        outputs.add(expected.sum().item())
    assert len(outputs) == 20, "every seed moves the image differently"
    with pytest.raises(ValueError, match=r"built for 10x10 images, got 8x8"):
        affine(torch.rand(1, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, r"image_size=0 is invalid"),
        ({"batch_size": -2}, r"batch_size=-2 is invalid"),
        ({"num_workers": -1}, r"num_workers=-1 is invalid"),
        ({"val_fraction": 1.5}, r"val_fraction=1.5 is invalid"),
        ({"scale": (1.2, 0.8)}, r"scale=\(1.2, 0.8\) is invalid"),
        ({"mixup_alpha": -0.2}, r"mixup_alpha=-0.2 is invalid: .*\(--data.mixup_alpha\)"),
        ({"cutmix_alpha": float("nan")}, r"cutmix_alpha=nan is invalid: .*\(--data.cutmix_alpha\)"),
        ({"ra_reps": 0}, r"ra_reps=0 is invalid: .*\(--data.ra_reps\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)
