"""gSASRec on MovieLens-1M trained as the official port trains it: the paper's hyperparameters and per-position
negatives with PyTorch's N(0, 1) embedding init, a constant learning rate and early stopping after 200 epochs
without a better validation nDCG@10. It reaches the paper's figures, after about 80,000 steps (14 h on 2 cores)."""
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
)
