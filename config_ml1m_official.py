"""gSASRec on MovieLens-1M trained as the official port trains it: config_ml1m.py's model, loss and per-position
negatives with each lever of its recipe undone (PyTorch's N(0, 1) embeddings, scores starting near zero, the
latest windows, a constant learning rate, early stopping after 200 epochs without a better validation nDCG@10).
It reaches the paper's figures after about 80,000 steps (14 h on 2 cores)."""
from dataclasses import replace

from config_ml1m import config as gsasrec_config

config = replace(gsasrec_config, embedding_init_std=None, prior_score_init=False, training_window="latest",
                 lr_decay_steps=0, max_steps=None, selection_start_step=0, bf16_scores=False)
