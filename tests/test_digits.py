import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from lightning_recipes.datamodules import DigitsDataModule


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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, r"image_size=0 is invalid"),
        ({"batch_size": -2}, r"batch_size=-2 is invalid"),
        ({"num_workers": -1}, r"num_workers=-1 is invalid"),
        ({"val_fraction": 1.5}, r"val_fraction=1.5 is invalid"),
        ({"scale": (1.2, 0.8)}, r"scale=\(1.2, 0.8\) is invalid"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)
