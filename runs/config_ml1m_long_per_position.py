"""config_ml1m_long.py (24,000-step cosine) with per-position negatives, as the paper samples them."""
from dataclasses import replace

from config_ml1m_fast import config as fast_config

config = replace(fast_config, lr_decay_steps=24000, max_steps=24000, negative_sampling="per_position",
                 training_window="latest")
