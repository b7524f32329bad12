"""SASRec mode on MovieLens-1M: the gSASRec config (config_ml1m.py) with one negative per positive and plain
BCE (t = 0)."""
from dataclasses import replace

from config_ml1m import config as gsasrec_config

config = replace(gsasrec_config, negs_per_pos=1, gbce_t=0.0)
