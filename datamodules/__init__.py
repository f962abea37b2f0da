"""Lightning data modules: embedded digits (offline default), CIFAR-10, your own image folders, and text."""

from lightning_recipes.datamodules.base import ImageClassificationDataModule
from lightning_recipes.datamodules.cifar10 import CIFAR10DataModule
from lightning_recipes.datamodules.digits import DigitsDataModule
from lightning_recipes.datamodules.image_folder import ImageFolderDataModule
from lightning_recipes.datamodules.text import TextDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "ImageClassificationDataModule", "ImageFolderDataModule", "TextDataModule"]
