"""Experiment configuration: one dataclass whose defaults are the official gSASRec port's, plus this repository's
additions (which default to the official behaviour). Imports nothing of the project."""
import math
import re
import types
import typing
from dataclasses import dataclass, fields


class GSASRecError(Exception):
    """A problem with the user's input (config, data, checkpoint); the scripts print it as one line."""


NEGATIVE_SAMPLING_MODES = ("per_position", "per_sequence")
TRAINING_WINDOWS = ("latest", "random")
USER_SAMPLING_MODES = ("uniform", "per_interaction")
LOSSES = ("gbce", "softmax", "sampled_softmax")
BLOCKS = ("sasrec", "ligr")
ENGINES = ("fast", "reference")
# The fast engine's two ways of scoring per-position negatives (fast_training.ScoringPathTrial).
SCORING_PATHS = ("gathered", "catalogue")
# A dataset name is a folder name under datasets/ (and part of file names): no path separators, not hidden.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class GSASRecExperimentConfig:
    """Frozen: a variant is dataclasses.replace(config, field=value), which validates it again."""
    dataset_name: str = "ml1m"
    sequence_length: int = 200
    embedding_dim: int = 256
    train_batch_size: int = 128
    num_heads: int = 4
    num_blocks: int = 3
    dropout_rate: float = 0.0
    negs_per_pos: int = 256
    max_epochs: int = 10000
    max_batches_per_epoch: int = 100
    metrics: tuple = ("nDCG@10", "R@1", "R@10")
    val_metric: str = "nDCG@10"
    early_stopping_patience: int = 200
    gbce_t: float = 0.75
    filter_rated: bool = True
    eval_batch_size: int = 512
    recommendation_limit: int = 10
    reuse_item_embeddings: bool = False
    # Additions of this implementation (the official port has none of these).
    seed: int = 42
    # The training loss: "gbce" (the paper's, over negs_per_pos sampled negatives), "softmax" (cross-entropy over the
    # whole catalogue; negs_per_pos, gbce_t and negative_sampling unused) or "sampled_softmax" (cross-entropy of the
    # positive among itself and its negs_per_pos sampled negatives).
    loss: str = "gbce"
    # sampled_softmax only: shift each negative's score by log(num_items / negs_per_pos), the log-Q correction for
    # uniform draws, so the sampled denominator estimates the full softmax's.
    logq_correction: bool = False
    # The Transformer block: "sasrec" (the paper's) or "ligr" (pre-LayerNorm, SwiGLU feed-forward, gated residuals:
    # eSASRec's), whose feed-forward is ligr_feed_forward_multiplier * embedding_dim wide.
    block: str = "sasrec"
    ligr_feed_forward_multiplier: int = 4
    # "per_position": a fresh uniform draw of k negatives for every position, as the paper samples them.
    # "per_sequence": one draw of k negatives shared by all positions of a sequence (much faster).
    negative_sampling: str = "per_position"
    # Which sequence_length + 1 items of a longer training sequence a batch shows: "latest" (the official port's),
    # or "random", a window ending at a uniformly drawn position, so the older items of long histories are learnt too.
    training_window: str = "latest"
    # Which users an epoch's batches hold: "uniform", every user once (the official port's), or "per_interaction",
    # users drawn with replacement in proportion to their training targets per window's worth, so that with random
    # windows every training interaction of a long history is a target about as often as one of a short history.
    user_sampling: str = "uniform"
    learning_rate: float = 1e-3
    # Linear warm-up over this many steps, then constant (0 disables it: the official schedule).
    warmup_steps: int = 0
    # After the warm-up, cosine decay of the learning rate to zero over this many steps (0: constant).
    lr_decay_steps: int = 0
    # Std of the normal init of the embedding tables; None keeps PyTorch's N(0, 1) as the official port.
    embedding_init_std: float | None = None
    # Start every item's score at log(1 / num_items), the chance of a random item being the next one
    # (GSASRec.start_scores_at): learning then starts at once instead of after a long popularity plateau.
    prior_score_init: bool = False
    # bf16 autocast for the forward pass where the hardware has native bf16 (eval_utils.has_native_bf16); elsewhere,
    # where it would be emulated and many times slower, training stays in float32.
    bf16: bool = False
    # The catalogue products (of per_position_scoring's catalogue way, and of the full softmax) in bf16 where the
    # hardware has native bf16 (0.26 s a step instead of 0.30 s on an AMX CPU; loss and gradients within 1% of
    # float32's).
    bf16_scores: bool = False
    # Update the item tables lazily (torch.optim.SparseAdam): only the rows a step touched, their Adam moments
    # included, instead of Adam over every row. Not Adam's arithmetic (a row's moments decay only when it is
    # touched), but a step then costs about the same on a million-item catalogue as on ML-1M (docs/performance.md).
    sparse_item_updates: bool = False
    # Validate, checkpoint and ship an exponential moving average of the weights, updated after every step with
    # this decay (e.g. 0.999, about the last 1,000 steps); None keeps the raw weights, as the official port.
    weight_averaging_decay: float | None = None
    # Keep the best checkpoint on validation only from this step on (earlier epochs are validated and logged): with a
    # schedule whose late models are its best, 512 validation users cannot tell apart the late gains (docs/training.md).
    selection_start_step: int = 0
    # How training computes the loss and its gradients: "fast" (fast_training.py) or "reference" (plain PyTorch in
    # train_gsasrec.reference_loss with plain Adam; bf16 and bf16_scores unused). Both give the same loss.
    engine: str = "fast"
    # How the fast engine scores per-position negatives: "gathered" (each target's own k rows), "catalogue" (the
    # catalogue's product, each target's k picked out), or "auto": the first steps alternate the two (the same loss
    # and gradients) and the faster is kept, logged and recorded in checkpoints. Fix it for runs repeatable to the bit.
    per_position_scoring: str = "auto"
    # Budgets: stop after this many optimiser steps / seconds of training (None: no limit).
    max_steps: int | None = None
    max_training_time: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.metrics, list):  # as config files and --set give them
            object.__setattr__(self, "metrics", tuple(self.metrics))
        self.check_types()
        checks = [
            (DATASET_NAME.fullmatch(self.dataset_name) is not None,
             f"dataset_name must be a folder name of letters, digits, '.', '_' and '-', got {self.dataset_name!r}"),
            (0 <= self.seed < 2 ** 32, f"seed must be in 0..2**32 - 1, got {self.seed}"),
            (self.sequence_length >= 1, "sequence_length must be >= 1"),
            (self.embedding_dim >= 1, "embedding_dim must be >= 1"),
            (self.num_heads >= 1 and self.embedding_dim % self.num_heads == 0,
             f"num_heads ({self.num_heads}) must divide embedding_dim ({self.embedding_dim})"),
            (self.num_blocks >= 1, "num_blocks must be >= 1"),
            (0.0 <= self.dropout_rate < 1.0, "dropout_rate must be in [0, 1)"),
            (self.negs_per_pos >= 1, f"negs_per_pos must be >= 1, got {self.negs_per_pos}"),
            (0.0 <= self.gbce_t <= 1.0, f"gbce_t must be in [0, 1], got {self.gbce_t}"),
            (self.train_batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1"),
            (self.max_epochs >= 1 and self.max_batches_per_epoch >= 1,
             "max_epochs and max_batches_per_epoch must be >= 1"),
            (self.early_stopping_patience >= 1, "early_stopping_patience must be >= 1"),
            (self.recommendation_limit >= 1, "recommendation_limit must be >= 1"),
            (self.val_metric in self.metrics, f"val_metric {self.val_metric!r} must be one of metrics {self.metrics}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"),
            (not self.logq_correction or self.loss == "sampled_softmax",
             "logq_correction applies to loss='sampled_softmax' only"),
            (self.block in BLOCKS, f"block must be one of {BLOCKS}, got {self.block!r}"),
            (self.engine in ENGINES, f"engine must be one of {ENGINES}, got {self.engine!r}"),
            (self.per_position_scoring in ("auto", *SCORING_PATHS),
             f"per_position_scoring must be one of {('auto', *SCORING_PATHS)}, got {self.per_position_scoring!r}"),
            (not (self.engine == "reference" and self.sparse_item_updates),
             "sparse_item_updates is an optimizer of the fast engine; engine='reference' trains with plain Adam"),
            (self.ligr_feed_forward_multiplier >= 1, "ligr_feed_forward_multiplier must be >= 1"),
            (self.negative_sampling in NEGATIVE_SAMPLING_MODES,
             f"negative_sampling must be one of {NEGATIVE_SAMPLING_MODES}, got {self.negative_sampling!r}"),
            (self.training_window in TRAINING_WINDOWS,
             f"training_window must be one of {TRAINING_WINDOWS}, got {self.training_window!r}"),
            (self.user_sampling in USER_SAMPLING_MODES,
             f"user_sampling must be one of {USER_SAMPLING_MODES}, got {self.user_sampling!r}"),
            (self.user_sampling == "uniform" or self.training_window == "random",
             "user_sampling='per_interaction' needs training_window='random' (the latest windows show a user "
             "the same items every time)"),
            (0 < self.learning_rate < math.inf, f"learning_rate must be a number > 0, got {self.learning_rate}"),
            (self.warmup_steps >= 0 and self.lr_decay_steps >= 0, "warmup_steps and lr_decay_steps must be >= 0"),
            (self.embedding_init_std is None or 0 < self.embedding_init_std < math.inf,
             "embedding_init_std must be a number > 0 or None"),
            (self.weight_averaging_decay is None or 0.0 < self.weight_averaging_decay < 1.0,
             "weight_averaging_decay must be in (0, 1)"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.max_training_time is None or self.max_training_time > 0, "max_training_time must be > 0"),
            (self.selection_start_step >= 0, f"selection_start_step must be >= 0, got {self.selection_start_step}"),
            (self.selection_start_step <= (self.max_steps or self.selection_start_step),
             f"selection_start_step ({self.selection_start_step}) is past max_steps ({self.max_steps}), so no "
             f"checkpoint would be kept: lower it too, e.g. --set selection_start_step="
             f"{int(0.8 * (self.max_steps or 0))} (the last fifth of the run)"),
        ]
        for ok, message in checks:
            if not ok:
                raise GSASRecError(f"invalid config: {message}")

    @property
    def predicts_softmax(self) -> bool:
        """Whether the model's probability of an item is its softmax over the candidates (the softmax losses)
        rather than sigmoid(score) (gBCE)."""
        return self.loss != "gbce"

    @property
    def per_position_negatives(self) -> bool:
        """Whether training draws k negatives for every target position (the paper's draw), rather than one draw a
        sequence or none (the full softmax)."""
        return self.loss != "softmax" and self.negative_sampling == "per_position"

    def check_types(self) -> None:
        """Each field holds a value of its annotated type (an int where a float is expected is fine), so a wrong
        type is named here rather than failing later inside a comparison or the model."""
        for name, annotation in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
            allowed = tuple(typing.get_origin(option) or option for option in options)
            if float in allowed:
                allowed += (int,)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                names = " or ".join("None" if option is type(None) else option.__name__
                                    for option in allowed if option is not int or float not in allowed)
                raise GSASRecError(f"invalid config: {name} must be {names}, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "GSASRecExperimentConfig":
        """Builds a config, naming any field this version does not know instead of a TypeError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GSASRecError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)
