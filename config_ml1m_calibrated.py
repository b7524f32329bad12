"""gSASRec on MovieLens-1M with t = 1.0: beta = alpha, so sigmoid(score) estimates the real probability that an
item is the next one (the paper's fully calibrated setting; it trains more slowly than t = 0.75). Built on
config_ml1m_fast.py (prior score init, small embedding init, bf16), with the latest training windows of the
committed checkpoint's run."""
from dataclasses import replace

from config_ml1m_fast import config as fast_config

config = replace(fast_config, gbce_t=1.0, training_window="latest")
