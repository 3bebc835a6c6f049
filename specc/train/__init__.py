"""Training compiled cells: configs, built-in tasks, the loop, checkpoints, sampling, experiments.

    from specc.train import load_config, train
    result = train(load_config("configs/char_lstm.yaml"))
"""
from .config import ConfigError, config_from_dict, load_config, parse_config
from .loop import Result, evaluate, train

__all__ = ["ConfigError", "config_from_dict", "load_config", "parse_config", "train", "evaluate", "Result"]
