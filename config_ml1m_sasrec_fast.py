"""SASRec mode on MovieLens-1M (config_ml1m_sasrec.py: k = 1, t = 0) with the small embedding init, bf16 and
12,000-step cosine schedule of config_ml1m_fast.py. Scores start at zero: with one negative per positive the
negatives do not overwhelm the positives, so the prior score init is not needed."""
from dataclasses import replace

from config_ml1m_sasrec import config as sasrec_config

config = replace(sasrec_config, embedding_init_std=0.05, bf16=True, lr_decay_steps=12000, max_steps=12000)
