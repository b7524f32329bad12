"""Config files, model building, devices and processes, self-describing checkpoints and the scripts' command
lines."""
import argparse
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import os
import pickle
import platform
import re
import signal
import sys
import traceback
import types
import typing
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.torch_version import TorchVersion

from config import GSASRecError, GSASRecExperimentConfig
from dataset_utils import Sequences, offsets_from_lengths
from eval_utils import has_native_bf16, metric_problems, recommend_batched
from fast_training import BitFieldDropout
from gsasrec import GSASRec

CHECKPOINT_FORMAT = "gsasrec-pytorch-checkpoint-1"
# The one Python class a file of ours may hold besides tensors and plain values: the torch version that training
# records stored before they stored it as text (a str subclass, rebuilt from its text; nothing runs).
EARLIER_CHECKPOINT_CLASSES = [TorchVersion]
# The fields of a checkpoint of ours and what each must hold; all but "training" (how it was made) are required.
CHECKPOINT_FIELDS = {
    "config": lambda value: isinstance(value, dict) and all(isinstance(name, str) for name in value),
    "num_items": lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 1,
    "model_state": lambda value: isinstance(value, dict) and all(isinstance(tensor, torch.Tensor)
                                                                 for tensor in value.values()),
    "training": lambda value: isinstance(value, dict) and {"seconds", "steps", "world_size", "device", "threads",
                                                           "torch"} <= set(value),
}


def load_config(path: str) -> GSASRecExperimentConfig:
    """Runs a config file and returns its `config` variable."""
    path = Path(path)
    if not path.is_file():
        raise GSASRecError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"gsasrec_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except GSASRecError as error:
        raise GSASRecError(f"{path}: {error}") from None
    except SyntaxError as error:
        raise GSASRecError(f"{path}, line {error.lineno}: {error.msg}") from None
    except Exception as error:
        lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == str(path)]
        where = f", line {lines[-1]}" if lines else ""
        raise GSASRecError(f"{path}{where}: {type(error).__name__}: {error}") from None
    config = getattr(module, "config", None)
    if not isinstance(config, GSASRecExperimentConfig):
        raise GSASRecError(f"{path} must define `config = GSASRecExperimentConfig(...)`")
    try:
        return with_checked_metrics(config)
    except GSASRecError as error:
        raise GSASRecError(f"{path}: {error}") from None


def with_checked_metrics(config: GSASRecExperimentConfig) -> GSASRecExperimentConfig:
    """The config once ir_measures knows its metrics and they fit its lists (eval_utils.metric_problems): config.py
    checks everything else, but imports nothing of the project."""
    problems = metric_problems(config.metrics, config.recommendation_limit)
    if problems:
        raise GSASRecError("invalid config: " + "; ".join(problems))
    return config


def parse_field_value(name: str, text: str, annotation) -> object:
    """A --set value as the config field's type: int, float, bool (true/false), str, list (comma-separated),
    or None where the field allows it."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if text == "None" and type(None) in options:
        return None
    kind = next(option for option in options if option is not type(None))
    kind = typing.get_origin(kind) or kind
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise GSASRecError(f"--set {name}: expected true or false, got {text!r}")
        return text.lower() == "true"
    if kind in (list, tuple):
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        return kind(text)
    except ValueError:
        raise GSASRecError(f"--set {name}: expected {kind.__name__}"
                           f"{' or None' if type(None) in options else ''}, got {text!r}") from None


def apply_overrides(config: GSASRecExperimentConfig, overrides: list[str]) -> GSASRecExperimentConfig:
    """The config with FIELD=VALUE overrides (train_gsasrec.py --set), each parsed to its field's type."""
    known = {field.name: field for field in dataclasses.fields(GSASRecExperimentConfig)}
    hints = typing.get_type_hints(GSASRecExperimentConfig)
    values = {}
    for override in overrides:
        name, equals, text = override.partition("=")
        name = name.strip()
        if not equals or not name:
            raise GSASRecError(f"--set {override!r}: expected FIELD=VALUE")
        if name not in known:
            nearest = difflib.get_close_matches(name, known, n=1)
            raise GSASRecError(f"--set {name}: no such config field" +
                               (f" (did you mean {nearest[0]}?)" if nearest else ""))
        values[name] = parse_field_value(name, text.strip(), hints[name])
    return with_checked_metrics(dataclasses.replace(config, **values))


def build_model(config: GSASRecExperimentConfig, num_items: int) -> GSASRec:
    """The config's network for a catalogue of num_items, with the dropout modules of its engine (the fast one's
    draw cheaper masks: fast_training.BitFieldDropout)."""
    dropout = BitFieldDropout if config.engine == "fast" else nn.Dropout
    return GSASRec(num_items, sequence_length=config.sequence_length, embedding_dim=config.embedding_dim,
                   num_heads=config.num_heads, num_blocks=config.num_blocks, dropout_rate=config.dropout_rate,
                   reuse_item_embeddings=config.reuse_item_embeddings,
                   embedding_init_std=config.embedding_init_std,
                   initial_score=-math.log(num_items) if config.prior_score_init else None,
                   sparse_item_gradients=config.sparse_item_updates, block=config.block,
                   feed_forward_multiplier=config.ligr_feed_forward_multiplier, dropout=dropout)


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The named device, else CUDA when present, else the CPU; one this machine does not have is refused here
    rather than at the first tensor moved to it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, (str, torch.device)):
        raise TypeError(f"device must be a name such as 'cpu' or 'cuda:0', or a torch.device, got {name!r}")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise GSASRecError(f"unknown device {str(name)!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GSASRecError(f"device {str(name)!r} requested but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise GSASRecError(f"device {str(name)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GSASRecError(f"device {str(name)!r} requested but MPS is not available")
    return device


def init_distributed(device_name: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device): under torchrun joins the process group (nccl on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, resolve_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    requested = resolve_device(device_name)  # an unknown device, or CUDA where there is none, is refused here too
    if requested.type == "mps":
        raise GSASRecError("torchrun runs on CPUs (gloo) or CUDA GPUs (nccl), not on mps")
    use_cuda = requested.type == "cuda"
    if use_cuda and requested.index is not None:
        raise GSASRecError(f"under torchrun each process takes the GPU of its LOCAL_RANK: use --device cuda, "
                           f"not {device_name}")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise GSASRecError(f"torchrun started a process for GPU {local_rank}, but this machine has "
                           f"{torch.cuda.device_count()}: set --nproc-per-node to at most that")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world_size, device


def weights_digest(model: nn.Module) -> str:
    """A short hash of the weights, to show that the ranks of a run hold the same ones."""
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a flag checked between steps; a second one interrupts at once."""

    def __init__(self, announce: bool):
        self.requested = False
        self.announce = announce
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nStopping: saving the training state after this step (press Ctrl-C again to abort)...")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def machine_description(device: torch.device) -> dict:
    """What a run or a benchmark ran on, for comparing figures across machines: the CPU model (from
    /proc/cpuinfo where there is one) or the GPU name, the CPU threads torch uses, native bf16, torch's version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file()
                                                             else []) if line.startswith("model name")]
        name = models[0] if models else platform.processor() or platform.machine()
    return {"device": name, "threads": torch.get_num_threads(), "native_bf16": has_native_bf16(device),
            "torch": str(torch.__version__)}


def checkpoint_name(config: GSASRecExperimentConfig, step: int, metric_value: float) -> str:
    """The official naming scheme, so checkpoints sort and read the same as the paper repo's."""
    return (f"gsasrec-{config.dataset_name}-step:{step}-t:{config.gbce_t}-negs:{config.negs_per_pos}"
            f"-emb:{config.embedding_dim}-dropout:{config.dropout_rate}-metric:{metric_value}.pt")


def atomic_write(path: Path, write: typing.Callable[[Path], None]) -> None:
    """write(temporary path) in the same folder, then rename over path: a process killed at any moment leaves
    the old file or the new one, never a broken one (only a hidden .NAME.tmp, which a resumed run removes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def atomic_save(payload: dict, path: Path) -> None:
    """torch.save through atomic_write."""
    atomic_write(path, lambda temporary: torch.save(payload, temporary))


def cpu_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU, as checkpoints store it."""
    return {name: value.detach().cpu() for name, value in model.state_dict().items()}


def model_checkpoint(model: GSASRec, config: GSASRecExperimentConfig, **extra) -> dict:
    """Weights plus everything needed to rebuild the model without a config file."""
    return {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(config), "num_items": model.num_items,
            "model_state": cpu_weights(model), **extra}


# This repository's module names and the official port's (REFERENCE.md): inside each Transformer block, and at the
# top level; the embedding tables have the same names in both.
OFFICIAL_BLOCK_NAMES = {"attention_norm": "first_norm", "query": "multihead_attention.query_proj",
                        "key": "multihead_attention.key_proj", "value": "multihead_attention.val_proj",
                        "feed_forward_norm": "second_norm", "feed_forward.0": "dense1", "feed_forward.3": "dense2"}
OFFICIAL_TOP_NAMES = {"final_norm": "seq_norm"}


def rename_parameters(state: dict[str, torch.Tensor], to_official: bool) -> dict[str, torch.Tensor]:
    """A state dict under the official port's parameter names (to_official) or back under ours."""
    blocks, top = OFFICIAL_BLOCK_NAMES, OFFICIAL_TOP_NAMES
    if not to_official:
        blocks, top = {new: old for old, new in blocks.items()}, {new: old for old, new in top.items()}
    block_pattern = r"blocks\.(\d+)\.(.+)\.(weight|bias)" if to_official else \
        r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)"
    block_prefix = "transformer_blocks" if to_official else "blocks"
    renamed = {}
    for name, value in state.items():
        block = re.fullmatch(block_pattern, name)
        if block and block[2] in blocks:
            name = f"{block_prefix}.{block[1]}.{blocks[block[2]]}.{block[3]}"
        else:
            module, _, parameter = name.rpartition(".")
            name = f"{top.get(module, module)}.{parameter}"
        renamed[name] = value
    return renamed


def load_tensors_file(path: Path, what: str) -> object:
    """A file torch.save wrote, read with weights_only=True: it may hold tensors and plain Python values only, so a
    checkpoint from a stranger cannot run code when it is read. A failure is one line naming the file."""
    try:
        with torch.serialization.safe_globals(EARLIER_CHECKPOINT_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL (\S+)", str(error))  # how torch names what its weights-only unpickler refused
        if unsafe:
            raise GSASRecError(f"{path} holds Python objects other than tensors and plain values ({unsafe[1]}); "
                               "refusing to load it (weights_only)") from None
        raise GSASRecError(f"{path} is not a readable {what} (UnpicklingError: damaged, or not written by "
                           "torch.save)") from None
    except OSError as error:
        raise GSASRecError(f"cannot read {path}: {error.strerror or error}") from None
    except Exception as error:
        raise GSASRecError(f"{path} is not a readable {what} ({type(error).__name__}: damaged, truncated, or not "
                           "written by torch.save)") from None


def checkpoint_damage(checkpoint: dict) -> str | None:
    """What is missing or of the wrong kind in a checkpoint of ours, or None: the scripts then need not guard
    every field they read."""
    missing = [name for name in CHECKPOINT_FIELDS if name not in checkpoint and name != "training"]
    if missing:
        return f"it has no {', '.join(missing)}"
    wrong = [name for name, fits in CHECKPOINT_FIELDS.items() if name in checkpoint and not fits(checkpoint[name])]
    return f"its {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not what a checkpoint holds" if wrong else None


def read_checkpoint(path: str, config: GSASRecExperimentConfig | None = None) -> dict:
    """A checkpoint of this repository, or a bare state dict of the official port (which needs its config)
    wrapped as one."""
    path = Path(path)
    if not path.is_file():
        raise GSASRecError(f"checkpoint not found: {path}")
    checkpoint = load_tensors_file(path, "checkpoint")
    if isinstance(checkpoint, dict) and checkpoint.get("format") == CHECKPOINT_FORMAT:
        damage = checkpoint_damage(checkpoint)
        if damage:
            raise GSASRecError(f"{path} is a damaged checkpoint: {damage}")
        return checkpoint
    if isinstance(checkpoint, dict) and "item_embedding.weight" in checkpoint and any(
            str(name).startswith("transformer_blocks.") for name in checkpoint):
        if not all(isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in checkpoint.items()):
            raise GSASRecError(f"{path} is a damaged official-port checkpoint: it holds something other than "
                               "named tensors")
        if config is None:
            raise GSASRecError(f"{path} is an official-port checkpoint (weights only, no config): give its "
                               "config, e.g. --config=config_ml1m.py")
        return official_checkpoint(checkpoint, config, path)
    raise GSASRecError(f"{path} is neither a gsasrec-pytorch checkpoint nor an official-port state dict")


def official_checkpoint(official_state: dict, config: GSASRecExperimentConfig, path: Path) -> dict:
    """An official-port state dict as this repository's checkpoint (the item count comes from the embedding
    table); its tensors are checked against the config's model when the model is built."""
    model_state = rename_parameters(official_state, to_official=False)
    table = model_state["item_embedding.weight"]
    if table.dim() != 2 or len(table) < 3:
        raise GSASRecError(f"{path} is a damaged official-port checkpoint: its item_embedding.weight is "
                           f"{tuple(table.shape)}, not (items + 2, embedding_dim)")
    num_items = len(table) - 2
    return {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(config), "num_items": num_items,
            "model_state": model_state, "official": True}


def check_tensors(model_state: dict, expected: dict, what: str, official: bool) -> None:
    """Names and shapes of a checkpoint's tensors against the model built for it, in one line naming the first
    differences (under the official port's names for its checkpoints), instead of load_state_dict's report."""
    def named(names: list[str]) -> str:
        return ", ".join(rename_parameters(dict.fromkeys(names), to_official=True) if official else names)
    missing, unexpected = sorted(set(expected) - set(model_state)), sorted(set(model_state) - set(expected))
    if missing or unexpected:
        raise GSASRecError(f"{what}: " + "; ".join(([f"missing {named(missing[:3])}"] if missing else []) +
                                                   ([f"unexpected {named(unexpected[:3])}"] if unexpected else [])))
    for name, value in expected.items():
        if value.shape != model_state[name].shape:
            raise GSASRecError(f"{what}: {named([name])} is {tuple(model_state[name].shape)} in the checkpoint, "
                               f"{tuple(value.shape)} for it")


# Reasons that end a run (unless a rerun's config allows more); the others (train_gsasrec's Trainer.stop_reason)
# pause it.
ENDING_REASONS = ("early stopping", "max_epochs")


@dataclasses.dataclass
class Progress:
    """Where a training run stands: saved in the training state, updated in place by train_gsasrec's Trainer."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_loss_sum: float = 0.0
    best_metric: float = -math.inf
    best_checkpoint: str | None = None
    epochs_without_improvement: int = 0
    elapsed_seconds: float = 0.0
    stopped: str | None = None  # None while it runs

    @property
    def finished(self) -> bool:
        return self.stopped in ENDING_REASONS


def read_training_state(path: Path, keys: tuple[str, ...]) -> tuple[dict, GSASRecExperimentConfig]:
    """A run folder's saved training state (a checkpoint with `keys` besides, tensors and plain values only) and
    its config, or a one-line error."""
    try:
        saved = load_tensors_file(path, "training state")
    except GSASRecError as error:
        raise GSASRecError(f"{error}; start over with --fresh or pass another --run-dir") from None
    missing = [key for key in keys if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise GSASRecError(f"{path} is not a training state (no {', '.join(missing)}); start over "
                           "with --fresh or pass another --run-dir")
    return saved, checkpoint_config(saved, path)


def saved_fields(cls: type, values: dict) -> dict:
    """The fields of dataclass cls in a saved dict of them, each of its default's kind (a number field holds no
    bool); fields this version does not know are left out, a value of the wrong kind is a ValueError."""
    kinds = {int: int, float: (int, float), type(None): (str, type(None))}
    known = {field.name: field.default for field in dataclasses.fields(cls)}
    kept = {name: value for name, value in values.items() if name in known}
    wrong = [name for name, value in kept.items()
             if not isinstance(value, kinds.get(type(known[name]), object))
             or (isinstance(value, bool) and type(known[name]) in (int, float))]
    if wrong:
        raise ValueError(f"its progress holds a wrong kind of value for {', '.join(wrong)}")
    return kept


def usable_best_checkpoint(run_dir: Path, saved_path: str | None) -> tuple[str | None, str | None]:
    """(path, problem): a run's best checkpoint looked up by name in its folder, which may have been moved or
    copied, and why it cannot be used (None, the problem) where it is missing or damaged."""
    if saved_path is None:
        return None, None
    best = Path(run_dir) / Path(saved_path).name
    try:
        read_checkpoint(best)
    except GSASRecError as error:
        return None, str(error)
    return str(best), None


def drop_log_records_after(path: Path, step: int) -> int:
    """Removes, atomically, the records of a JSONL training log past `step` and the lines that are not whole
    records; returns how many of those there were."""
    if not path.is_file():
        return 0

    def step_of(line: str) -> int | None:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        step = record.get("step") if isinstance(record, dict) else None
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    text = path.read_text(errors="replace")
    steps = [(line, step_of(line)) for line in text.splitlines()]
    kept = "".join(f"{line}\n" for line, line_step in steps if line_step is not None and line_step <= step)
    if kept != text:
        atomic_write(path, lambda temporary: temporary.write_text(kept))
    return sum(line_step is None for _, line_step in steps)


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """This process's random streams, for a training state: torch's global one, the training generator, CUDA's."""
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng_state(saved: dict | None, generator: torch.Generator, device: torch.device) -> bool:
    """Restores what rng_state saved; False, restoring nothing, where there is none or another kind of device saved
    it (a CPU generator's state, Mersenne Twister, and a CUDA one's, Philox, differ in size, not only in meaning)."""
    if saved is None or saved["generator"].numel() != generator.get_state().numel():
        return False
    torch.set_rng_state(saved["torch"])
    generator.set_state(saved["generator"])
    if device.type == "cuda" and saved["cuda"] is not None:
        torch.cuda.set_rng_state(saved["cuda"], device)
    return True


def write_official_checkpoint(checkpoint: dict, path: str) -> None:
    """The checkpoint's weights as the official port saves them: a bare state dict under its parameter names."""
    block = checkpoint["config"].get("block", "sasrec")
    if block != "sasrec":
        raise GSASRecError(f"the official port has SASRec blocks only; this checkpoint's are {block!r}")
    atomic_save(rename_parameters(checkpoint["model_state"], to_official=True), Path(path))


def checkpoint_config(checkpoint: dict, path: str) -> GSASRecExperimentConfig:
    """The config a checkpoint holds, validated as any config is."""
    try:
        return GSASRecExperimentConfig.from_dict(checkpoint["config"])
    except (GSASRecError, TypeError) as error:  # TypeError: a saved config that is no dict of fields
        raise GSASRecError(f"{path} holds a config this version refuses: {error}") from None


def model_from_checkpoint(checkpoint: dict, config: GSASRecExperimentConfig | None = None, num_items: int | None = None,
                          path: str = "checkpoint") -> tuple[GSASRec, GSASRecExperimentConfig]:
    """Rebuilds the model; a given config or dataset item count must agree with the checkpoint's."""
    saved_config = checkpoint_config(checkpoint, path)
    if num_items is not None and num_items != checkpoint["num_items"]:
        raise GSASRecError(f"{path} was trained on {checkpoint['num_items']} items but the dataset has {num_items}")
    if config is not None:
        # The architecture, and the loss, which says how scores read as probabilities (calibration).
        trained_as = ["sequence_length", "embedding_dim", "num_heads", "num_blocks", "reuse_item_embeddings",
                      "block", "ligr_feed_forward_multiplier", "loss"]
        different = [name for name in trained_as if getattr(config, name) != getattr(saved_config, name)]
        if different:
            raise GSASRecError(f"{path} does not fit the config: " + ", ".join(
                f"{name}={getattr(saved_config, name)} in the checkpoint, {getattr(config, name)} in the config"
                for name in different))
    official = checkpoint.get("official", False)
    config = config or saved_config
    model = build_model(config, checkpoint["num_items"])
    # Our checkpoints' architecture was compared above, so a tensor that does not fit means a damaged file.
    check_tensors(checkpoint["model_state"], model.state_dict(),
                  f"{path} does not fit the config" if official else f"{path} is damaged", official)
    model.load_state_dict(checkpoint["model_state"])
    return model, config


def load_model(checkpoint_path: str, device: str | None = None, config: GSASRecExperimentConfig | None = None
               ) -> tuple[GSASRec, GSASRecExperimentConfig]:
    """A trained model in eval mode on `device` (default: CUDA if present), and its config; an official-port
    checkpoint needs its config."""
    if not isinstance(checkpoint_path, (str, os.PathLike)):
        raise TypeError(f"checkpoint_path must be a path (str or os.PathLike), got {checkpoint_path!r}")
    if config is not None and not isinstance(config, GSASRecExperimentConfig):
        raise TypeError(f"config must be a GSASRecExperimentConfig or None, got {type(config).__name__}")
    model, config = model_from_checkpoint(read_checkpoint(checkpoint_path, config), config, path=checkpoint_path)
    return model.to(resolve_device(device)).eval(), config


def recommend_batch(model: GSASRec, histories: list[list[int]], k: int = 10,
                    exclude_seen: bool = True) -> list[list[tuple[int, float]]]:
    """Top-k (item_id, score) for each history (item ids, oldest first), as evaluation ranks (batched by length,
    the last sequence_length items as input, the whole history excluded)."""
    if not isinstance(model, GSASRec):
        raise TypeError(f"model must be a GSASRec (utils.load_model gives one), got {type(model).__name__}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise GSASRecError(f"k must be a whole number >= 1, got {k!r}")
    if not isinstance(exclude_seen, (bool, np.bool_)):
        raise TypeError(f"exclude_seen must be True or False, got {exclude_seen!r}")
    try:
        histories = [history_ids(history, model.num_items) for history in histories]
    except TypeError:
        raise GSASRecError(f"histories must be a list of histories (lists of item ids), got {histories!r}") from None
    if not histories:
        return []
    lengths = np.array([len(history) for history in histories], dtype=np.int64)
    sequences = Sequences(np.concatenate(histories), offsets_from_lengths(lengths))
    items, scores = recommend_batched(model, sequences, k, filter_rated=exclude_seen)
    return [[(int(item), float(score)) for item, score in zip(row_items, row_scores) if score > float("-inf")]
            for row_items, row_scores in zip(items.tolist(), scores.tolist())]


def history_ids(history, num_items: int) -> np.ndarray:
    """A user's history as an int64 array, refusing what is not a non-empty list of item ids in 1..num_items."""
    try:
        ids = np.asarray(history)
    except ValueError:
        ids = np.asarray(None)
    if ids.ndim != 1 or not len(ids):
        raise GSASRecError(f"a history is a non-empty list of item ids, got {str(history)[:60]}")
    if ids.dtype.kind not in "iu" or not ((ids >= 1) & (ids <= num_items)).all():
        raise GSASRecError(f"history item ids must be whole numbers in 1..{num_items}, got {str(history)[:60]}")
    return ids.astype(np.int64)


def recommend(model: GSASRec, history: list[int], k: int = 10, exclude_seen: bool = True) -> list[tuple[int, float]]:
    """Top-k (item_id, score) after a history of item ids (oldest first); scores are logits, sigmoid(score)
    is the predicted probability the item is next."""
    return recommend_batch(model, [history], k, exclude_seen)[0]


class CommandLineParser(argparse.ArgumentParser):
    """argparse for the scripts: the module docstring as help, and a bad flag reported like every other input
    problem (one 'error: ...' line, exit status 2) instead of argparse's usage block."""

    def __init__(self, description: str | None = None, **options):
        options.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **options)

    def error(self, message: str):
        raise GSASRecError(f"{message} (see {self.prog} --help)")


def output_file(path: str | None, flag: str, reads: tuple[Path, ...] = ()) -> Path | None:
    """A file a script will write, checked before any work: its folder must exist and be writable, and it must be
    neither a folder nor one of the files the script `reads`."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise GSASRecError(f"{flag} {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise GSASRecError(f"{flag} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise GSASRecError(f"{flag} {path}: the folder {path.parent} is not writable")
    if any(path.resolve() == Path(read).resolve() for read in reads):
        raise GSASRecError(f"{flag} {path}: is a file this command reads; give another name")
    return path


def writable_folder(path: str, flag: str) -> Path:
    """A folder a script will write into (made if missing), checked before any work: it, or the nearest folder
    above it that exists, must be a writable folder."""
    path = Path(path)
    existing = next(folder for folder in (path, *path.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise GSASRecError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GSASRecError(f"{flag} {path}: {existing} is not writable")
    return path


def whole_number_at_least(minimum: int, maximum: int | None = None) -> typing.Callable[[str], int]:
    """An argparse type for counts and seeds: a whole number of at least `minimum` (and at most `maximum`),
    refused before any work."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value
    parse.__name__ = "whole number"  # argparse names the type in its message for text that is no number
    return parse


def run_cli(main) -> None:
    """Runs a script's main(), turning input problems into one line on stderr and exit status 2."""
    try:
        main()
    except GSASRecError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
