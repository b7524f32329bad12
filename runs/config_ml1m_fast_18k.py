"""config_ml1m_fast.py with an 18,000-step cosine schedule (375 epochs) instead of 12,000: with random training
windows a batch shows more distinct data, so a longer schedule may no longer overfit as it did with the latest
windows (runs/config_ml1m_long). The patience covers the whole schedule: a lucky validation score at step 1,824
(0.1860 on 512 users) would otherwise end the run at step 11,424, before the schedule's end."""
from dataclasses import replace

from config_ml1m_fast import config as fast_config

config = replace(fast_config, lr_decay_steps=18000, max_steps=18000, early_stopping_patience=375)
