"""Trains gSASRec: gBCE with sampled negatives, validation nDCG@10 after every epoch, early stopping.

Resumable: the run folder holds the latest training state (written atomically after every epoch, on
Ctrl-C / SIGTERM and when a budget runs out), the best checkpoint and a JSONL log. Rerunning the same
command continues where it stopped, with the same numbers an uninterrupted run gives.
"""
import argparse
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from config import GSASRecError, GSASRecExperimentConfig
from dataset_utils import DatasetSplit, ensure_dataset, load_dataset
from eval_utils import evaluate
from gsasrec import GSASRec, gbce_beta, gbce_loss
from utils import atomic_save, build_model, checkpoint_name, load_config, model_checkpoint, resolve_device, run_cli

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
# Fields a resumed run may change: they bound the run but do not change what one step computes.
BUDGET_FIELDS = {"max_epochs", "max_steps", "max_training_time", "early_stopping_patience"}


LENGTH_GROUP_SIZE = 32


def training_loss(model: GSASRec, batch: torch.Tensor, config: GSASRecExperimentConfig, beta: float,
                  generator: torch.Generator) -> torch.Tensor:
    """gBCE over every non-padded position of a (batch, width) window: inputs batch[:, :-1], labels batch[:, 1:].

    Rows go through the model in groups of similar length, each group cut to its longest row: the same
    loss as one padded pass (sequences do not interact), with about 40% less work on ML-1M."""
    k = config.negs_per_pos
    output_table = model.output_item_embeddings
    lengths = (batch != model.padding_id).sum(1)
    # Drawn up front for every row (and, per position, every column) so the draw does not depend on grouping.
    shape = (len(batch), k) if config.negative_sampling == "per_sequence" else (*batch[:, 1:].shape, k)
    negatives = torch.randint(1, model.num_items + 1, shape, generator=generator,
                              device=generator.device).to(batch.device)
    positive_scores, negative_scores = [], []
    for group in torch.argsort(lengths).split(LENGTH_GROUP_SIZE):
        rows = batch[group, -max(int(lengths[group].max()), 2):]
        input, labels = rows[:, :-1], rows[:, 1:]
        is_target = input != model.padding_id
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            hidden = model(input).float()
        target_hidden = hidden[is_target]
        positive_scores.append((target_hidden * output_table[labels[is_target]]).sum(-1))
        if config.negative_sampling == "per_sequence":
            group_negatives = output_table[negatives[group]].transpose(1, 2)
            negative_scores.append(torch.bmm(hidden, group_negatives)[is_target])
        else:
            group_negatives = negatives[group, -input.shape[1]:][is_target]
            # Scoring the whole catalogue and gathering is far cheaper than gathering (n, k, E) embeddings.
            negative_scores.append((target_hidden @ output_table.T).gather(1, group_negatives))
    return gbce_loss(torch.cat(positive_scores), torch.cat(negative_scores), beta)


def training_batch(dataset: DatasetSplit, rows: np.ndarray, sequence_length: int) -> torch.Tensor:
    """The last sequence_length + 1 items of each chosen user, cut to the longest one in the batch."""
    width = min(int(dataset.train.lengths[rows].max()), sequence_length + 1)
    return torch.from_numpy(dataset.train.windows(rows, width, dataset.padding_id).astype(np.int64))


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a flag checked between steps; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping: saving the training state after this step (press Ctrl-C again to abort)...")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def comparable(config: GSASRecExperimentConfig) -> dict:
    values = config.__dict__.copy()
    for name in BUDGET_FIELDS:
        values.pop(name)
    return values


def train(config: GSASRecExperimentConfig, dataset: DatasetSplit, run_dir: Path, device: torch.device,
          log_test_metrics: bool = False, progress: bool = True) -> dict:
    """Trains (or resumes) the run in run_dir; returns the final training state's summary."""
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_FILE
    torch.manual_seed(config.seed)
    model = build_model(config, dataset.num_items).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(config.seed)
    trainable_rows = np.flatnonzero(dataset.train.lengths >= 2)
    batches_per_epoch = min(config.max_batches_per_epoch, math.ceil(len(trainable_rows) / config.train_batch_size))
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "permutation": None, "best_metric": -math.inf,
             "best_checkpoint": None, "epochs_without_improvement": 0, "elapsed_seconds": 0.0,
             "finished": None, "stopped": None}
    if state_path.is_file():
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if comparable(GSASRecExperimentConfig.from_dict(saved["config"])) != comparable(config):
            raise GSASRecError(f"{run_dir} holds a run with a different config; pass --run-dir to start a new "
                               "run elsewhere or --fresh to overwrite it")
        model.load_state_dict(saved["model_state"])
        optimizer.load_state_dict(saved["optimizer_state"])
        scheduler.load_state_dict(saved["scheduler_state"])
        torch.set_rng_state(saved["torch_rng"])
        if device.type == "cuda" and saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        generator.set_state(saved["generator_state"])
        state = saved["progress"]
        if state["finished"] in ("early stopping", "max_epochs"):
            print(f"{run_dir} already finished ({state['finished']}); best checkpoint: {state['best_checkpoint']}")
            return state
        print(f"Resuming {run_dir} at step {state['step']} (epoch {state['epoch']})")
    beta = gbce_beta(config.negs_per_pos, dataset.num_items, config.gbce_t)

    def save_state():
        atomic_save({"config": config.__dict__, "model_state": model.state_dict(),
                     "optimizer_state": optimizer.state_dict(), "scheduler_state": scheduler.state_dict(),
                     "torch_rng": torch.get_rng_state(), "generator_state": generator.get_state(),
                     "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     "progress": state}, state_path)

    def budget_exhausted() -> str | None:
        if config.max_steps is not None and state["step"] >= config.max_steps:
            return "max_steps"
        if config.max_training_time is not None and state["elapsed_seconds"] >= config.max_training_time:
            return "max_training_time"
        return None

    clock = [time.perf_counter()]

    def tick():
        """Adds the wall-clock time since the last tick to the run's elapsed time."""
        now = time.perf_counter()
        state["elapsed_seconds"] += now - clock[0]
        clock[0] = now

    stop_request = StopRequest()
    model.train()
    try:
        while state["epoch"] < config.max_epochs and state["finished"] is None:
            if state["batch_in_epoch"] == 0:
                state["permutation"] = torch.randperm(len(trainable_rows), generator=generator,
                                                      device=generator.device).cpu().numpy()
                state["epoch_loss_sum"] = 0.0
            bar = tqdm(total=batches_per_epoch, initial=state["batch_in_epoch"], disable=not progress,
                       desc=f"epoch {state['epoch']}", leave=False)
            while state["batch_in_epoch"] < batches_per_epoch:
                reason = budget_exhausted() or ("interrupted" if stop_request.requested else None)
                if reason:
                    tick()
                    state["stopped"] = reason
                    save_state()
                    bar.close()
                    print(f"Stopped ({reason}) at step {state['step']}; rerun the same command to continue.")
                    return state
                start = state["batch_in_epoch"] * config.train_batch_size
                rows = trainable_rows[state["permutation"][start:start + config.train_batch_size]]
                loss = training_loss(model, training_batch(dataset, rows, config.sequence_length).to(device),
                                     config, beta, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                state["step"] += 1
                state["batch_in_epoch"] += 1
                loss_value = loss.item()
                state["epoch_loss_sum"] += loss_value
                bar.update()
                bar.set_postfix(loss=f"{loss_value:.4f}")
                tick()
            bar.close()
            validation = evaluate(model, dataset.val_input, dataset.val_target, config.metrics,
                                  config.recommendation_limit, config.filter_rated, config.eval_batch_size)
            tick()
            record = {"step": state["step"], "epoch": state["epoch"], "time_s": round(state["elapsed_seconds"], 2),
                      "train_loss": state["epoch_loss_sum"] / batches_per_epoch,
                      **{f"val_{name}": value for name, value in validation.items()}}
            if log_test_metrics:
                test = evaluate(model, dataset.test_input, dataset.test_target, config.metrics,
                                config.recommendation_limit, config.filter_rated, config.eval_batch_size)
                record.update({f"test_{name}": value for name, value in test.items()})
                clock[0] = time.perf_counter()  # test evaluation is bookkeeping, not training time
            metric = validation[config.val_metric]
            if metric > state["best_metric"]:
                state["best_metric"] = metric
                state["epochs_without_improvement"] = 0
                previous = state["best_checkpoint"]
                best_path = run_dir / checkpoint_name(config, state["step"], metric)
                atomic_save(model_checkpoint(model, config, step=state["step"], epoch=state["epoch"],
                                             val_metrics=validation), best_path)
                state["best_checkpoint"] = str(best_path)
                if previous and Path(previous) != best_path:
                    Path(previous).unlink(missing_ok=True)
            else:
                state["epochs_without_improvement"] += 1
            with open(run_dir / LOG_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")
            print(f"epoch {state['epoch']} step {state['step']} loss {record['train_loss']:.4f} " +
                  " ".join(f"{key} {value:.4f}" for key, value in record.items() if "@" in key) +
                  f" | best {config.val_metric} {state['best_metric']:.4f} ({state['elapsed_seconds']:.0f}s)", flush=True)
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            if state["epochs_without_improvement"] >= config.early_stopping_patience:
                state["finished"] = "early stopping"
            elif state["epoch"] >= config.max_epochs:
                state["finished"] = "max_epochs"
            state["stopped"] = state["finished"]
            save_state()
    finally:
        stop_request.restore()
    print(f"Finished ({state['finished']}); best checkpoint: {state['best_checkpoint']}")
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file defining `config = GSASRecExperimentConfig(...)`")
    parser.add_argument("--run-dir", help="folder for the state, log and best checkpoint "
                                          "(default: models/<config file name>)")
    parser.add_argument("--fresh", action="store_true", help="discard a saved state in the run folder and start over")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--source", help="path to ml-1m.txt when the ML-1M split must be prepared")
    parser.add_argument("--log-test-metrics", action="store_true",
                        help="also log test metrics after each epoch (for learning curves; never used for selection)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    config = load_config(args.config)
    run_dir = Path(args.run_dir or Path("models") / Path(args.config).stem)
    if args.fresh:
        for path in [run_dir / STATE_FILE, run_dir / LOG_FILE, *run_dir.glob("gsasrec-*.pt")]:
            path.unlink(missing_ok=True)
    dataset = load_dataset(ensure_dataset(config.dataset_name, args.source))
    run_dir.mkdir(parents=True, exist_ok=True)
    state = train(config, dataset, run_dir, resolve_device(args.device), args.log_test_metrics,
                  progress=not args.no_progress)
    print(json.dumps({"best_checkpoint": state["best_checkpoint"], f"best_val_{config.val_metric}": state["best_metric"],
                      "steps": state["step"], "stopped": state["stopped"]}))


if __name__ == "__main__":
    run_cli(main)
