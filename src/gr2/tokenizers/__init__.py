"""gr2.tokenizers: the VQ image tokenizer (plain torch; no Ray, Prefect or Lance)."""

from .checkpoint import Checkpoint, CheckpointError, checkpoint_id, load_checkpoint, read_config, save_checkpoint
from .model import Tokenizer, TokenizerConfig
from .quantize import FSQ, EMACodebook, codebook_stats
from .train import TokenizerTrainConfig, TrainMetrics, evaluate, train

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "EMACodebook",
    "FSQ",
    "Tokenizer",
    "TokenizerConfig",
    "TokenizerTrainConfig",
    "TrainMetrics",
    "checkpoint_id",
    "codebook_stats",
    "evaluate",
    "load_checkpoint",
    "read_config",
    "save_checkpoint",
    "train",
]
