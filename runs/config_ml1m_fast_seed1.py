"""config_ml1m_fast.py with another seed (init, shuffling, windows, negatives, dropout), to see how much of its
result is the draw."""
from dataclasses import replace

from config_ml1m_fast import config as fast_config

config = replace(fast_config, seed=1)
