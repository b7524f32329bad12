"""gSASRec on MovieLens-1M for a CPU: the paper's hyperparameters (config_ml1m.py) with a small embedding init
(N(0, 0.05) instead of PyTorch's N(0, 1)) and bf16 autocast where the hardware supports it."""
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
    embedding_init_std=0.05,
    bf16=True,
)
