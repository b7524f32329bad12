"""config_ml1m_fast.py with per-position negatives (the paper's draw) on a 6,000-step cosine schedule: per-position
negatives learnt faster early on (pre_trained/README.md, "Shared vs per-position negatives") but cost about twice
as much per CPU step, so the schedule is halved to keep the wall-clock of config_ml1m_fast.py."""
from dataclasses import replace

from config_ml1m_fast import config as fast_config

config = replace(fast_config, negative_sampling="per_position", lr_decay_steps=6000, max_steps=6000)
