"""SASRec mode on MovieLens-1M (config_ml1m_sasrec.py: k = 1 per position, t = 0) with the small embedding init
and bf16 of config_ml1m_fast.py, and a 6,000-step cosine schedule: with one negative per positive SASRec peaks
earlier than gSASRec. Scores start at zero: one negative per positive does not overwhelm the positives, so the
prior score init is not needed."""
from dataclasses import replace

from config_ml1m_sasrec import config as sasrec_config

config = replace(sasrec_config, embedding_init_std=0.05, bf16=True, lr_decay_steps=6000, max_steps=6000)
