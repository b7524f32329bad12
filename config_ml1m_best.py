"""The strongest model this repository trains on MovieLens-1M in under an hour on 2 CPU cores: config_ml1m.py's
sizes with eSASRec's LiGR block (SwiGLU twice E wide, dropout 0.25) and a sampled softmax over 256 uniform
negatives per sequence with the log-Q correction, on a 5,400-step schedule (docs/losses.md)."""
from dataclasses import replace

from config_ml1m import config as gsasrec_config

config = replace(gsasrec_config, loss="sampled_softmax", negative_sampling="per_sequence", logq_correction=True,
                 block="ligr", ligr_feed_forward_multiplier=2, dropout_rate=0.25, prior_score_init=False,
                 lr_decay_steps=5400, max_steps=5400, selection_start_step=4320)
