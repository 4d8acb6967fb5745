"""MCN model package: network, losses, online k-means, checkpoints (no side effects on import)."""

from model.checkpoint import atomic_torch_save, load_mcn, save_model_checkpoint
from model.kmeans import KMeansConfig, OnlineKMeans
from model.losses import LossConfig, mcn_losses
from model.mcn import MCN, MCNConfig

__all__ = [
    "MCN",
    "MCNConfig",
    "load_mcn",
    "save_model_checkpoint",
    "atomic_torch_save",
    "LossConfig",
    "mcn_losses",
    "KMeansConfig",
    "OnlineKMeans",
]
