"""config_ml1m_fast.py with an exponential moving average of the weights (decay 0.999, about the last 1,000 steps)
validated, checkpointed and shipped instead of the raw weights."""
from dataclasses import replace

from config_ml1m_fast import config as fast_config

config = replace(fast_config, weight_averaging_decay=0.999)
