"""SASRec on MovieLens-1M: config_ml1m.py with one negative per positive and plain BCE (k = 1, t = 0), on a shorter
schedule. Scores start at zero: one negative per positive does not push the model to a popularity ranking first."""
from dataclasses import replace

from config_ml1m import config as gsasrec_config

config = replace(gsasrec_config, negs_per_pos=1, gbce_t=0.0, prior_score_init=False, lr_decay_steps=4800,
                 max_steps=4800, selection_start_step=3840)
