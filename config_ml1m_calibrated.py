"""gSASRec on MovieLens-1M with t = 1.0: beta = alpha, so sigmoid(score) estimates the probability that an item is
the next one (the paper's fully calibrated setting). Otherwise config_ml1m.py."""
from dataclasses import replace

from config_ml1m import config as gsasrec_config

config = replace(gsasrec_config, gbce_t=1.0)
