"""gSASRec on MovieLens-1M: the paper's model, loss and per-position negatives (k = 256, t = 0.75), trained fast.
Unlike the official port: scores start at the prior and embeddings small, so learning starts at once (no popularity
plateau); random windows; a cosine schedule whose last fifth validation picks from (docs/training.md)."""
from config import GSASRecExperimentConfig

config = GSASRecExperimentConfig(
    dataset_name="ml1m",
    sequence_length=200,
    embedding_dim=128,
    num_heads=1,
    max_batches_per_epoch=100,
    num_blocks=2,
    dropout_rate=0.5,
    negs_per_pos=256,
    gbce_t=0.75,
    negative_sampling="per_position",
    embedding_init_std=0.05,
    prior_score_init=True,
    training_window="random",
    lr_decay_steps=8400,
    max_steps=8400,
    selection_start_step=6720,
    bf16_scores=True,
)
