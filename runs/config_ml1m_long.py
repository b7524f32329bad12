"""config_ml1m_fast.py with a 24,000-step cosine schedule (500 epochs) instead of 12,000."""
from dataclasses import replace

from config_ml1m_fast import config as fast_config

config = replace(fast_config, lr_decay_steps=24000, max_steps=24000, training_window="latest")
