"""Trains gSASRec as the paper does: batches of training windows, k uniform negatives per positive, scores, the gBCE
loss (or a softmax: config.loss), backward and Adam; after every epoch validation nDCG@10, the best checkpoint kept,
early stopping.

Two engines compute the same loss and gradients (config.engine): "reference", the plain PyTorch of reference_loss
below, and "fast" (the default), fast_training.py, which the tests hold equal to it. Resumable: the run folder holds
the latest training state (written atomically after every epoch, on Ctrl-C / SIGTERM and when a budget runs out),
the best checkpoint and a JSONL log. Rerunning the same command continues where it stopped, with the same numbers
an uninterrupted run gives.
"""
import json
import math
import os
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import fast_training
from config import GSASRecError, GSASRecExperimentConfig
from dataset_utils import DatasetSplit, ensure_dataset, epoch_sampler, load_dataset, training_batch
from eval_utils import evaluate, has_native_bf16
from gsasrec import GSASRec, gbce_beta, gbce_loss, logq_shift, sampled_softmax_loss, softmax_loss
from utils import (CommandLineParser, Progress, StopRequest, apply_overrides, atomic_save, build_model, check_tensors,
                   checkpoint_name, cpu_weights, drop_log_records_after, init_distributed, load_config,
                   machine_description, model_checkpoint, read_training_state, restore_rng_state, rng_state, run_cli,
                   saved_fields, usable_best_checkpoint, weights_digest, with_checked_metrics, writable_folder)

# Transparent huge pages for PyTorch's large CPU tensors, read at its first large allocation (docs/performance.md).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
STATE_FILE = "train_state.pt"
STATE_KEYS = ("config", "model_state", "optimizer_state", "scheduler_state", "progress", "rng_states")
LOG_FILE = "log.jsonl"
# Fields a resumed run may change: they bound the run but do not change what one step computes.
BUDGET_FIELDS = {"max_epochs", "max_steps", "max_training_time", "early_stopping_patience"}


def learning_rate_factor(config: GSASRecExperimentConfig, step: int) -> float:
    """The multiplier of the learning rate at a step: linear warm-up, then constant or a cosine decay to 0."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_decay_steps:
        progress = min(1.0, (step - config.warmup_steps) / config.lr_decay_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def sample_negatives(batch: torch.Tensor, config: GSASRecExperimentConfig, num_items: int,
                     generator: torch.Generator) -> torch.Tensor | None:
    """k = negs_per_pos uniform draws from items 1..num_items for every target position, in row-major order
    (negative_sampling="per_position", the paper's), or for every sequence ("per_sequence"): (targets or rows, k).
    Accidental hits on the positive are kept, as in the paper. None for the full softmax, which needs none."""
    if config.loss == "softmax":
        return None
    per_sequence = config.negative_sampling == "per_sequence"
    count = len(batch) if per_sequence else int((batch[:, :-1] != num_items + 1).sum())
    return torch.randint(1, num_items + 1, (count, config.negs_per_pos), generator=generator,
                         device=generator.device).to(batch.device)


def reference_loss(model: GSASRec, batch: torch.Tensor, negatives: torch.Tensor | None,
                   config: GSASRecExperimentConfig, beta: float) -> torch.Tensor:
    """The config's loss in plain PyTorch: one padded pass over a (batch, width) window (inputs batch[:, :-1],
    labels batch[:, 1:]), every item scored at every non-padded position, the positive's and the negatives' scores
    picked out. It holds (positions x catalogue) scores: fine on ML-1M; fast_training.training_loss is the same loss
    without them."""
    input, labels = batch[:, :-1], batch[:, 1:]
    is_target = input != model.padding_id
    hidden = model(input)[is_target]  # (n, E): the hidden state of every target position, in row-major order
    scores = hidden @ model.output_item_embeddings.T  # (n, num_items + 2)
    positive = scores.gather(1, labels[is_target].unsqueeze(1)).squeeze(1)
    if config.loss == "softmax":
        return softmax_loss(positive, scores[:, 1:-1].logsumexp(1))  # over items 1..num_items
    if config.negative_sampling == "per_sequence":
        negatives = negatives.unsqueeze(1).expand(-1, input.shape[1], -1)[is_target]  # a row's draw for each target
    negative = scores.gather(1, negatives)  # (n, k)
    if config.loss == "sampled_softmax":
        shift = logq_shift(config.negs_per_pos, model.num_items) if config.logq_correction else 0.0
        return sampled_softmax_loss(positive, negative, shift)
    return gbce_loss(positive, negative, beta)


class TrainingObjective(nn.Module):
    """The loss of one batch under the config's engine, as a module so DistributedDataParallel can wrap the step."""

    def __init__(self, model: GSASRec, config: GSASRecExperimentConfig, beta: float, optimizer: torch.optim.Optimizer):
        super().__init__()
        self.model, self.config, self.beta = model, config, beta
        # The item tables the fast engine's optimizer steps in backward; none for a plain Adam.
        self.table_steps = getattr(optimizer, "table_steps", fast_training.TableSteps())
        # How the fast engine scores per-position negatives; None where it does not draw them.
        self.scoring = (fast_training.ScoringPathTrial(config.per_position_scoring, model.num_items)
                        if config.engine == "fast" and config.per_position_negatives else None)

    def forward(self, batch: torch.Tensor, negatives: torch.Tensor | None) -> torch.Tensor:
        if self.config.engine == "reference":
            return reference_loss(self.model, batch, negatives, self.config, self.beta)
        return fast_training.training_loss(self.model, batch, negatives, self.config, self.beta, self.table_steps,
                                           self.scoring.next_path(len(negatives)) if self.scoring else "gathered")


def build_optimizer(model: GSASRec, config: GSASRecExperimentConfig, in_backward: bool) -> torch.optim.Optimizer:
    """Adam at the config's learning rate: plain for the reference engine; for the fast one with the item tables on
    optimizers of their own, stepped inside backward where in_backward (fast_training.AdamWithSeparateTables)."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")  # PyTorch's fused kernel: one pass a parameter
    if config.engine == "reference":
        return torch.optim.Adam(model.parameters(), lr=config.learning_rate, fused=fused)
    return fast_training.build_optimizer(model, config, in_backward, fused)


def comparable(config: GSASRecExperimentConfig) -> dict:
    """The config less its budgets, which a resumed run may change."""
    return {name: value for name, value in config.__dict__.items() if name not in BUDGET_FIELDS}


class Trainer:
    """One training run, alone or as one rank of a torchrun job. With world_size > 1 each rank trains on its own
    shard of users, train_batch_size of them per step, and DDP averages the gradients; rank 0 validates, logs and
    writes checkpoints, and its decisions are broadcast so all ranks stop together."""

    def __init__(self, config: GSASRecExperimentConfig, dataset: DatasetSplit, run_dir: Path, device: torch.device,
                 rank: int = 0, world_size: int = 1, log_test_metrics: bool = False, progress: bool = True):
        self.config, self.dataset, self.run_dir, self.device = config, dataset, Path(run_dir), device
        self.state_path = self.run_dir / STATE_FILE
        self.rank, self.world_size = rank, world_size
        self.log_test_metrics, self.show_progress = log_test_metrics, progress and rank == 0
        with_checked_metrics(config)
        torch.manual_seed(config.seed)
        self.model = build_model(config, dataset.num_items).to(device)
        torch.manual_seed(config.seed + rank)
        self.generator = torch.Generator(device=device).manual_seed(config.seed + rank)
        # Under DistributedDataParallel, which averages gradients after backward, no table is stepped in backward.
        self.optimizer = build_optimizer(self.model, config, in_backward=world_size == 1)
        self.averaged = None if config.weight_averaging_decay is None else AveragedModel(
            self.model, multi_avg_fn=get_ema_multi_avg_fn(config.weight_averaging_decay))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(learning_rate_factor, config))
        beta = gbce_beta(config.negs_per_pos, dataset.num_items, config.gbce_t)
        objective = TrainingObjective(self.model, config, beta, self.optimizer)
        self.scoring = objective.scoring
        self.scoring_announced = False
        self.objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda"
                                                 else None) if world_size > 1 else objective
        self.trainable_rows = np.flatnonzero(dataset.train.lengths >= 2)
        if not len(self.trainable_rows):
            raise GSASRecError("no training sequence has 2 or more items: there is nothing to learn from")
        self.sampler = epoch_sampler(dataset.train.lengths[self.trainable_rows], config, world_size, rank)
        self.batches_per_epoch = min(config.max_batches_per_epoch,
                                     math.ceil(len(self.sampler) / config.train_batch_size))
        self.progress = Progress()
        self.clock = time.perf_counter()

    @property
    def evaluated_model(self) -> GSASRec:
        """The weights that are validated, checkpointed and shipped: the moving average when the config keeps one."""
        return self.model if self.averaged is None else self.averaged.module

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def save_state(self) -> None:
        """Collective: gathers every rank's RNG state, then rank 0 writes the state file atomically. The file is
        also a model checkpoint, so evaluate_gsasrec.py can score a run's latest weights, not only its best; with
        weight averaging those are the averaged ones, and the raw weights go alongside for resuming."""
        own = rng_state(self.generator, self.device)
        rng_states = [own]
        if self.world_size > 1:
            rng_states = [None] * self.world_size
            dist.all_gather_object(rng_states, own)
        if self.rank == 0:
            raw_weights = {} if self.averaged is None else {"training_model_state": cpu_weights(self.model)}
            atomic_save(model_checkpoint(self.evaluated_model, self.config, optimizer_state=self.optimizer.state_dict(),
                                         scheduler_state=self.scheduler.state_dict(), rng_states=rng_states,
                                         progress=asdict(self.progress), training=self.training_record(),
                                         **raw_weights),
                        self.state_path)
            # Superseded best checkpoints go only once the saved state names the new one.
            for checkpoint in self.run_dir.glob("gsasrec-*.pt"):
                if str(checkpoint) != self.progress.best_checkpoint:
                    checkpoint.unlink()

    def load_state(self) -> None:
        """Resumes from the run folder's training state, whatever else in the folder is damaged."""
        saved, saved_config = read_training_state(self.state_path, STATE_KEYS)
        if comparable(saved_config) != comparable(self.config):
            raise GSASRecError(f"{self.run_dir} holds a run with a different config; pass --run-dir to start a "
                               "new run elsewhere or --fresh to overwrite it")
        try:
            self.restore(saved)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
            detail = (str(error).strip().splitlines() or ["no details"])[0]
            raise GSASRecError(f"{self.state_path} is damaged ({type(error).__name__}: {detail}); start over with "
                               "--fresh or pass another --run-dir") from None
        if self.rank == 0:
            self.progress.best_checkpoint, problem = usable_best_checkpoint(self.run_dir, self.progress.best_checkpoint)
            if problem:
                self.progress.best_metric = -math.inf
                self.say(f"Note: the best checkpoint is unusable ({problem}); the next model validated from step "
                         f"{self.config.selection_start_step} on becomes the best")
            self.drop_unsaved_records()

    def restore(self, saved: dict) -> None:
        """The saved run into this trainer: weights, optimizer, schedule, progress and random streams."""
        weights = saved.get("training_model_state", saved["model_state"])
        check_tensors(weights, self.model.state_dict(), f"{self.state_path} is damaged", official=False)
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(saved["optimizer_state"])
        for group in self.optimizer.param_groups:
            # The saved run's kernel choice may not exist on this device: take this device's.
            group["fused"] = self.optimizer.defaults["fused"]
        self.scheduler.load_state_dict(saved["scheduler_state"])
        made = saved.get("training", {})
        if self.scoring is not None and "per_position_scoring" in made:
            self.scoring.resume(made["per_position_scoring"], made.get("scoring_trial_us_per_target", {}))
        vars(self.progress).update(saved_fields(Progress, saved["progress"]))
        if self.averaged is not None:
            self.averaged.module.load_state_dict(saved["model_state"])
            self.averaged.n_averaged.fill_(self.progress.step)  # one update a step; 0 makes the next one a copy
        self.progress.stopped = self.ending_reason()
        rng_states = saved["rng_states"]
        own = rng_states[self.rank] if len(rng_states) == self.world_size else None
        if not restore_rng_state(own, self.generator, self.device):
            where = (f"with {len(rng_states)} process(es), resumed with {self.world_size}" if own is None
                     else f"on another kind of device than {self.device.type}")
            self.say(f"The run was saved {where}: random streams restart from the seed and the step")
            torch.manual_seed(self.config.seed + self.rank + self.progress.step)
            self.generator.manual_seed(self.config.seed + self.rank + self.progress.step)

    def drop_unsaved_records(self) -> None:
        """A run killed between logging an epoch and saving its state redoes that epoch: it is logged once. Log
        lines that are not whole records (a write cut short, an edit) go too."""
        if damaged := drop_log_records_after(self.run_dir / LOG_FILE, self.progress.step):
            self.say(f"Note: {self.run_dir / LOG_FILE} had {damaged} damaged line(s); they are dropped and the other "
                     "records kept")

    def tick(self) -> None:
        """Adds the wall-clock time since the last tick to the run's elapsed time."""
        now = time.perf_counter()
        self.progress.elapsed_seconds += now - self.clock
        self.clock = now

    def stop_reason(self, stop_request: StopRequest) -> str | None:
        """A budget or a signal; with several ranks, any rank's reason stops them all at the same step."""
        config, progress = self.config, self.progress
        reasons = {"max_steps": config.max_steps is not None and progress.step >= config.max_steps,
                   "max_training_time": (config.max_training_time is not None
                                         and progress.elapsed_seconds >= config.max_training_time),
                   "interrupted": stop_request.requested}
        code = next((code for code, hit in enumerate(reasons.values(), 1) if hit), 0)
        if self.world_size > 1:
            flag = torch.tensor([code], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        return [None, *reasons][code]

    def train_step(self, rows: np.ndarray) -> float:
        """One step of the paper's procedure on a batch of users; each of its effects is one line."""
        batch = training_batch(self.dataset, rows, self.config, self.generator).to(self.device)
        negatives = sample_negatives(batch, self.config, self.dataset.num_items, self.generator)
        loss = self.objective(batch, negatives)  # scores of the positives and the negatives, the config's loss
        loss.backward()  # gradients; the fast engine's item tables also take Adam's step here (fast_training.TableStep)
        self.optimizer.step()  # Adam on the parameters that have gradients
        self.optimizer.zero_grad(set_to_none=True)  # freed now rather than kept to the next backward
        self.scheduler.step()  # the next step's learning rate
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)  # the moving average that is validated and shipped
        return loss.item()

    def evaluate(self, inputs, targets) -> dict[str, float]:
        return evaluate(self.evaluated_model, inputs, targets, self.config.metrics, self.config.recommendation_limit,
                        self.config.filter_rated, self.config.eval_batch_size)

    def end_epoch(self) -> None:
        """Rank 0 validates, keeps the best checkpoint and logs; then every rank takes rank 0's state."""
        progress, config = self.progress, self.config
        if self.rank == 0:
            validation = self.evaluate(self.dataset.val_input, self.dataset.val_target)
            self.tick()
            record = {"step": progress.step, "epoch": progress.epoch, "time_s": round(progress.elapsed_seconds, 2),
                      "train_loss": progress.epoch_loss_sum / self.batches_per_epoch,
                      **{f"val_{name}": value for name, value in validation.items()}}
            if self.log_test_metrics:
                test = self.evaluate(self.dataset.test_input, self.dataset.test_target)
                record.update({f"test_{name}": value for name, value in test.items()})
            self.keep_if_best(validation)
            with open(self.run_dir / LOG_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")
            self.say(f"epoch {progress.epoch} step {progress.step} loss {record['train_loss']:.4f} " +
                     " ".join(f"{key} {value:.4f}" for key, value in record.items() if "@" in key) +
                     (f" | best {config.val_metric} {progress.best_metric:.4f}" if progress.best_checkpoint else
                      f" | selection from step {config.selection_start_step}") +
                     f" ({progress.elapsed_seconds:.0f}s)")
            progress.epoch += 1
            progress.batch_in_epoch = 0
            progress.stopped = self.ending_reason()
        if self.world_size > 1:
            shared = [progress]
            dist.broadcast_object_list(shared, src=0)
            vars(progress).update(vars(shared[0]))
        self.clock = time.perf_counter()  # test evaluation and waiting for rank 0 are not training time
        self.save_state()

    def ending_reason(self) -> str | None:
        """One of ENDING_REASONS or None, recomputed from the config, so a resumed run may raise max_epochs or the
        patience and go on."""
        if self.progress.epochs_without_improvement >= self.config.early_stopping_patience:
            return "early stopping"
        return "max_epochs" if self.progress.epoch >= self.config.max_epochs else None

    def training_record(self) -> dict:
        """How the weights were made, for checkpoints: training seconds and steps so far, and the machine."""
        scoring = {} if self.scoring is None or self.scoring.path is None else {
            "per_position_scoring": self.scoring.path,
            "scoring_trial_us_per_target": self.scoring.microseconds_per_target()}
        return {"seconds": round(self.progress.elapsed_seconds, 3), "steps": self.progress.step,
                "world_size": self.world_size, **machine_description(self.device), **scoring}

    def announce_scoring(self) -> None:
        """Says once how per-position negatives are scored, and the timings that chose it."""
        if self.scoring is None or self.scoring.path is None or self.scoring_announced:
            return
        self.scoring_announced = True
        timings = ", ".join(f"{path} {value:.1f} µs" for path, value in self.scoring.microseconds_per_target().items())
        self.say(f"Per-position negatives are scored {self.scoring.path} " +
                 (f"(fastest step per target: {timings})" if timings else "(not timed)"))

    def keep_if_best(self, validation: dict[str, float]) -> None:
        progress = self.progress
        if progress.step < self.config.selection_start_step:
            return
        metric = validation[self.config.val_metric]
        if metric <= progress.best_metric:
            progress.epochs_without_improvement += 1
            return
        progress.best_metric = metric
        progress.epochs_without_improvement = 0
        best_path = self.run_dir / checkpoint_name(self.config, progress.step, metric)
        atomic_save(model_checkpoint(self.evaluated_model, self.config, step=progress.step, epoch=progress.epoch,
                                     val_metrics=validation, training=self.training_record()), best_path)
        progress.best_checkpoint = str(best_path)  # the previous one goes once the state names this one (save_state)

    def pause(self, reason: str) -> Progress:
        """Saves the state of a run stopped by a budget or a signal, and says how to go on."""
        progress, config = self.progress, self.config
        self.tick()
        progress.stopped = reason
        self.save_state()
        if reason == "max_steps" and 0 < config.lr_decay_steps <= progress.step - config.warmup_steps:
            self.say(f"Finished the learning-rate schedule at step {progress.step}; best checkpoint: "
                     f"{progress.best_checkpoint}")
        else:
            how = ("rerun the same command" if reason == "interrupted" else
                   f"raise {reason} in the config and rerun the same command")
            self.say(f"Stopped ({reason}) at step {progress.step}; {how} to continue.")
        return progress

    def run(self) -> Progress:
        """Trains until early stopping, max_epochs, a budget or a signal; returns where the run stands."""
        progress, config = self.progress, self.config
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for unfinished in self.run_dir.glob(".*.tmp"):  # a write that a killed process did not finish
                unfinished.unlink()
            if not self.state_path.is_file():
                self.drop_unsaved_records()  # a first epoch logged, then killed before its state was saved
        if self.state_path.is_file():
            self.load_state()
            if progress.finished:
                self.say(f"{self.run_dir} already finished ({progress.stopped}); "
                         f"best checkpoint: {progress.best_checkpoint}")
                return progress
            self.say(f"Resuming {self.run_dir} at step {progress.step} (epoch {progress.epoch})")
        if config.bf16 and not has_native_bf16(self.device):
            self.say(f"Note: the config asks for bf16, but this {self.device.type} has no native bf16 "
                     "(it would be emulated, about 10x slower): training in float32")
        stop_request = StopRequest(announce=self.rank == 0)
        self.model.train()
        self.clock = time.perf_counter()
        try:
            while not progress.finished:
                self.sampler.set_epoch(progress.epoch)
                shard = self.trainable_rows[np.fromiter(self.sampler, dtype=np.int64)]
                if progress.batch_in_epoch == 0:
                    progress.epoch_loss_sum = 0.0
                bar = tqdm(total=self.batches_per_epoch, initial=progress.batch_in_epoch,
                           disable=not self.show_progress, desc=f"epoch {progress.epoch}", leave=False)
                while progress.batch_in_epoch < self.batches_per_epoch:
                    reason = self.stop_reason(stop_request)
                    if reason:
                        bar.close()
                        return self.pause(reason)
                    start = progress.batch_in_epoch * config.train_batch_size
                    loss = self.train_step(shard[start:start + config.train_batch_size])
                    self.announce_scoring()
                    progress.step += 1
                    progress.batch_in_epoch += 1
                    progress.epoch_loss_sum += loss
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.4f}")
                    self.tick()
                bar.close()
                self.end_epoch()
        finally:
            stop_request.restore()
        self.say(f"Finished ({progress.stopped}); best checkpoint: {progress.best_checkpoint}")
        return progress


def train(config: GSASRecExperimentConfig, dataset: DatasetSplit, run_dir: Path, device: torch.device,
          log_test_metrics: bool = False, progress: bool = True) -> Progress:
    """Trains (or resumes) the run in run_dir in this process; returns where the run stands."""
    return Trainer(config, dataset, run_dir, device, log_test_metrics=log_test_metrics, progress=progress).run()


def main() -> None:
    parser = CommandLineParser(__doc__)
    parser.add_argument("--config", required=True, help="config file defining `config = GSASRecExperimentConfig(...)`")
    parser.add_argument("--run-dir", help="folder for the state, log and best checkpoint (default: models/<config "
                                          "file name>, then -FIELD=VALUE for each --set and -seed<N> with --seed)")
    parser.add_argument("--fresh", action="store_true", help="discard a saved state in the run folder and start over")
    parser.add_argument("--seed", type=int, help="train with this seed instead of the config's (saved in its config)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, parsed to its type (repeatable; e.g. --set gbce_t=1.0 --set "
                             "metrics=nDCG@10,R@10); saved in the checkpoints' config and the run folder's name")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--source", help="path to ml-1m.txt when the ML-1M split must be prepared")
    parser.add_argument("--log-test-metrics", action="store_true",
                        help="also log test metrics after each epoch (for learning curves; never used for selection)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    config = apply_overrides(load_config(args.config), args.set)
    default_run_name = Path(args.config).stem + "".join(f"-{override.replace(' ', '')}" for override in args.set)
    if args.seed is not None:
        config = replace(config, seed=args.seed)
        default_run_name += f"-seed{args.seed}"
    run_dir = writable_folder(args.run_dir or Path("models") / default_run_name, "--run-dir")
    rank, world_size, device = init_distributed(args.device)
    if rank == 0:
        if args.fresh:
            for path in [run_dir / STATE_FILE, run_dir / LOG_FILE, *run_dir.glob("gsasrec-*.pt")]:
                path.unlink(missing_ok=True)
        ensure_dataset(config.dataset_name, args.source)
    if world_size > 1:
        dist.barrier()
    dataset = load_dataset(ensure_dataset(config.dataset_name, args.source))
    trainer = Trainer(config, dataset, run_dir, device, rank, world_size, args.log_test_metrics,
                      progress=not args.no_progress)
    progress = trainer.run()
    if world_size > 1:
        print(f"rank {rank}: stopped at epoch {progress.epoch} step {progress.step}, "
              f"weights {weights_digest(trainer.model)}", flush=True)
        dist.barrier()  # no rank tears down the process group while another still uses it
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"best_checkpoint": progress.best_checkpoint,
                          f"best_val_{config.val_metric}": progress.best_metric, "steps": progress.step,
                          "stopped": progress.stopped, "world_size": world_size}), flush=True)
    if world_size > 1:
        # A normal exit can still abort in gloo's background threads after all is saved: a rank leaves at once.
        os._exit(0)


if __name__ == "__main__":
    run_cli(main)
