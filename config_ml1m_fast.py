"""gSASRec on MovieLens-1M, fast: the paper's hyperparameters (config_ml1m.py: k = 256, t = 0.75, ...) with a
different initialisation and bf16 where the hardware supports it.

- embeddings start at N(0, 0.05) instead of PyTorch's N(0, 1);
- every item's score starts at log(1 / num_items) (GSASRec.start_scores_at): with zero-centred scores the 256
  negatives per positive first drive the model to a popularity ranking that takes thousands of steps to leave;
- bf16 autocast of the Transformer (the loss stays float32);
- a fixed budget of 12,000 steps (250 epochs) with the learning rate decaying to zero on a cosine;
- random training windows: long histories also show their older items, not only their latest 201."""
from dataclasses import replace

from config_ml1m import config as gsasrec_config

config = replace(gsasrec_config, embedding_init_std=0.05, prior_score_init=True, bf16=True,
                 lr_decay_steps=12000, max_steps=12000, training_window="random")
