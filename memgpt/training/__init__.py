"""Training and evaluation of :mod:`memgpt.models` on :mod:`memgpt.tasks`: the trainer, its
resumable checkpoints and the torchrun/DDP plumbing.

Imports the models and tasks; never the applications (:mod:`memgpt.apps`).
"""

from .distributed import World, all_reduce_sum, init_from_env, launched_by_torchrun, shutdown, world
from .trainer import TaskLoss, TrainConfig, Trainer, evaluate, load_checkpoint, run_model

__all__ = [
    "TrainConfig",
    "Trainer",
    "TaskLoss",
    "run_model",
    "evaluate",
    "load_checkpoint",
    "World",
    "world",
    "launched_by_torchrun",
    "init_from_env",
    "shutdown",
    "all_reduce_sum",
]
