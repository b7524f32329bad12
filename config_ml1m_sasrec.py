"""SASRec mode on MovieLens-1M: the gSASRec config (config_ml1m.py) with one negative per positive and plain
BCE (t = 0). The negative is drawn per position, as SASRec does: shared per sequence, k = 1 would give every
position of a sequence the same single negative, and with k = 1 the per-position draw costs nothing extra."""
from dataclasses import replace

from config_ml1m import config as gsasrec_config

config = replace(gsasrec_config, negs_per_pos=1, gbce_t=0.0, negative_sampling="per_position")
