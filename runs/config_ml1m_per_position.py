"""config_ml1m.py (the paper's hyperparameters, official initialisation, constant learning rate, early stopping)
with a fresh draw of negatives for every position, as the official port samples them."""
from dataclasses import replace

from config_ml1m import config as gsasrec_config

config = replace(gsasrec_config, negative_sampling="per_position")
