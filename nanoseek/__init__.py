"""nanoseek: train your own DeepSeek-style reasoning model from nothing."""

from nanoseek.checkpoint import CheckpointError, load
from nanoseek.model import Config, DeepSeekV3, config_for_size
from nanoseek.tokenizer import Tokenizer, train_tokenizer

__all__ = ["CheckpointError", "Config", "DeepSeekV3", "Tokenizer", "config_for_size", "load", "train_tokenizer"]
__version__ = "0.1.0"
