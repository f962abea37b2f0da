"""LightningModule recipes with LightningCLI entry points: ResNet (SGD, BatchNorm) and ViT (AdamW, LayerNorm)."""
