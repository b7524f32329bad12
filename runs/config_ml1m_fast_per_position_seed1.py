"""config_ml1m_fast_per_position.py with seed 1: a second sample of per-position negatives."""
from dataclasses import replace

from config_ml1m_fast import config as fast_config

config = replace(fast_config, negative_sampling="per_position", seed=1, training_window="latest")
