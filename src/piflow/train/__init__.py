"""Training loops (flow-matching teachers, π-ID students) and their infrastructure: EMA, checkpoints, logging."""
from piflow.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from piflow.train.ema import PowerEMA
from piflow.train.loop import TrainConfig, train

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "PowerEMA", "TrainConfig", "train"]
