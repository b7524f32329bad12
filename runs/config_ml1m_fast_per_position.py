"""config_ml1m_fast.py with per-position negatives (a fresh draw of k for every position, as the paper samples
them), to compare its learning curve with the default per-sequence draw."""
from dataclasses import replace

from config_ml1m_fast import config as fast_config

config = replace(fast_config, negative_sampling="per_position", training_window="latest")
