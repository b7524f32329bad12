"""SASRec on MovieLens-1M trained with the full softmax: config_ml1m.py's model, windows and schedule with
cross-entropy over the whole catalogue instead of gBCE, on a schedule that fits an hour on 2 cores. A softmax is
shift-invariant, so the scores need no prior start."""
from dataclasses import replace

from config_ml1m import config as gsasrec_config

config = replace(gsasrec_config, loss="softmax", prior_score_init=False, lr_decay_steps=3600, max_steps=3600,
                 selection_start_step=2880)
