"""The reference trainer shared by `launch/train.py` and the CLI: config schema (`config`), corpus and
sampler (`data`), model and losses (`model`), and the training loop (`train`)."""
from .config import RecipeConfig, load_config

__all__ = ["RecipeConfig", "load_config"]
