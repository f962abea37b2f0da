"""Lightning data modules: embedded digits (offline default), CIFAR-10 and your own image folders."""

from lightning_recipes.datamodules.base import ImageClassificationDataModule
from lightning_recipes.datamodules.cifar10 import CIFAR10DataModule
from lightning_recipes.datamodules.digits import DigitsDataModule
from lightning_recipes.datamodules.image_folder import ImageFolderDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "ImageClassificationDataModule", "ImageFolderDataModule"]
