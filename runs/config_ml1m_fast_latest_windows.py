"""config_ml1m_fast.py as it was before random training windows: the recipe of runs/config_ml1m_fast."""
from dataclasses import replace

from config_ml1m_fast import config as fast_config

config = replace(fast_config, training_window="latest")
