"""Training: ``python -m hatmodel.train [--config NAME_OR_PATH] [--output-dir DIR]
[--resume] [key.sub=value ...]``.

With no arguments it trains the default (``configs/hat_scenes.yaml``: a small HAT on the
embedded generated scenes) and evaluates it on the test split. The loop is model-agnostic:
any :class:`~hatmodel.models.RetrievalModel` from the factory trains with any loss of
:mod:`hatmodel.losses`.

The output folder gets ``out.log``, ``config.yaml``, ``history.json``, ``curves.png``,
``best.safetensors`` / ``last.safetensors``, the epoch checkpoints in ``checkpoints/`` (see
:mod:`hatmodel.checkpoint`: each epoch commits atomically as a whole) and ``metrics.json``
(test metrics of the best checkpoint). ``--resume`` continues from the last committed epoch
with the same weights, optimizer, scheduler and RNG states, so an interrupted run ends exactly
where an uninterrupted one does (CPU, fixed seed); with no committed epoch yet it starts from
the beginning. A run without ``--resume`` in an earlier run's folder replaces that run.
``train.time_limit_s`` (0: none) is a safety net for slow machines: training stops early when
it is reached, then the test evaluation runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import (
    DEFAULT_CONFIG,
    config_path,
    list_configs,
    load_config,
    merge_config,
    resume_differences,
    validate_config,
)
from .data import Batch, build_dataset, build_tokenizer, epoch_pairs, train_loader
from .evaluate import METRIC_KEYS, evaluate_model, format_metrics, protocol_folds
from .losses import build_loss, score_spread
from .models import RetrievalModel, build_model
from .runtime import amp_autocast, lr_factor, needs_grad_scaler, pick_device, seed_everything

log = logging.getLogger("hatmodel")
COLLAPSE_SPREAD = 1e-3


def make_optimizer(model: RetrievalModel, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    t = cfg["train"]
    lr = float(t["lr"])
    groups = [{"params": list(model.head_parameters()), "lr": lr},
              {"params": list(model.encoder_parameters()), "lr": lr * float(t["encoder_lr_scale"])}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=lr,
                            weight_decay=float(t["weight_decay"]))


def _setup_logging(out_dir: Path, main: bool = True) -> None:
    """``out.log`` and stdout; a rank other than 0 of several processes logs only errors, to
    stderr."""
    log.setLevel(logging.INFO if main else logging.ERROR)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = ((logging.FileHandler(out_dir / "out.log"), logging.StreamHandler(sys.stdout))
                if main else (logging.StreamHandler(sys.stderr),))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


def _steps_per_epoch(n_pairs: int, cfg: dict[str, Any]) -> int:
    t = cfg["train"]
    steps = max(1, n_pairs // int(t["batch_size"]))
    return min(steps, int(t["max_steps_per_epoch"])) if t["max_steps_per_epoch"] else steps


def _same_image(image_index: torch.Tensor) -> torch.Tensor:
    return image_index[:, None] == image_index[None, :]


def train_step(model: RetrievalModel, batch: Batch, loss_fn, optimizer, scaler, cfg,
               device: torch.device,
               ctx: distributed.Context = distributed.SINGLE) -> tuple[float, dict[str, float]]:
    """One optimisation step on a batch; returns the loss and the score-matrix health.

    Under several processes ``batch`` is this rank's slice of the global batch; the loss, the
    health and the update are those of the whole global batch (:mod:`hatmodel.distributed`).
    """
    batch = batch.to(device)
    with amp_autocast(device, bool(cfg["train"]["amp"])):
        scores, image_index = distributed.batch_scores(model, batch, ctx)
    loss = loss_fn(scores.float(), _same_image(image_index))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    distributed.average_gradients(model, ctx)
    if cfg["train"]["grad_clip"]:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["train"]["grad_clip"]))
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach()), score_spread(scores)


def train(cfg: dict[str, Any], out_dir: str | Path, *, resume: bool = False,
          progress: bool = True,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, float]:
    """Train per ``cfg`` into ``out_dir``, then evaluate the best checkpoint on the test split.

    ``on_epoch_end(epoch, record)`` runs after each epoch's checkpoints are written (tests
    raise from it to simulate a killed run). Returns the test metrics.

    Under torchrun every rank trains its slice of each global batch and only rank 0 writes
    the run folder and evaluates (:mod:`hatmodel.distributed`); every rank returns rank 0's
    test metrics.
    """
    out_dir = Path(out_dir)
    cfg = validate_config(cfg, check_paths=True)
    checkpoint = _checkpoint_to_resume(cfg, out_dir) if resume else None
    t = cfg["train"]
    ctx, device = distributed.setup(cfg, pick_device(t["device"]), resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(out_dir, ctx.is_main)
    progress = progress and ctx.is_main
    if int(t["threads"]) > 0:
        torch.set_num_threads(int(t["threads"]))
    seed_everything(int(cfg["seed"]))
    if ctx.is_main:
        removed = [] if resume else ckpt.discard(out_dir)
        if removed:
            log.warning("%s held an earlier run: removed its %s (pass --resume to continue a "
                        "run)", out_dir, ", ".join(removed))
        ckpt.tidy(out_dir)
        ckpt.write_text(out_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))

    start = time.time()
    tokenizer = build_tokenizer(cfg)
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    model = build_model(cfg, tokenizer.vocab_size).to(device)
    optimizer = make_optimizer(model, cfg)
    per_image = train_set.captions_per_image if t["sample"] == "captions" else 1
    n_pairs = train_set.n_images * per_image
    steps_per_epoch = _steps_per_epoch(n_pairs, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device, bool(t["amp"])))
    loss_fn = build_loss(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters; %d train / %d val images; %d steps/epoch on %s",
             cfg["model"]["name"], n_params / 1e6, train_set.n_images, val_set.n_images,
             steps_per_epoch, device)
    if ctx.active:
        log.info("%d processes: each encodes %d of the %d pairs of every batch; rank 0 "
                 "evaluates while the others wait", ctx.world_size,
                 int(t["batch_size"]) // ctx.world_size, int(t["batch_size"]))

    first_epoch, history, best_rsum = 0, [], -1.0
    if checkpoint is not None:
        ckpt.restore(checkpoint, model, optimizer, scheduler, scaler)
        first_epoch = checkpoint.epoch + 1
        history, best_rsum = checkpoint.state["history"], float(checkpoint.state["best_rsum"])
        log.info("resumed after epoch %d (step %d) from %s", checkpoint.epoch,
                 scheduler.last_epoch, checkpoint.folder)
    elif resume:
        log.info("resume: %s holds no complete checkpoint yet: starting from the beginning",
                 out_dir)
    distributed.broadcast_module(model, ctx)

    val_count = int(cfg["eval"]["val_images"]) or val_set.n_images
    deadline = start + float(t["time_limit_s"]) if t["time_limit_s"] else math.inf
    for epoch in range(first_epoch, int(t["epochs"])):
        distributed.seed_epoch(int(cfg["seed"]), epoch, ctx)
        record = _train_epoch(model, train_set, tokenizer, optimizer, scheduler, scaler, loss_fn,
                              cfg, device, epoch, steps_per_epoch, progress, deadline, ctx)
        if ctx.is_main:  # the other ranks wait for it at distributed.agree below
            val, _ = evaluate_model(model, val_set, tokenizer, device,
                                    batch_size=int(cfg["eval"]["batch_size"]), count=val_count,
                                    memory_budget=int(cfg["eval"]["memory_budget"]),
                                    amp=bool(t["amp"]), progress=progress)
            record.update(val_rsum=val["rsum"], val_i2t_r1=val["i2t_r1"],
                          val_t2i_r1=val["t2i_r1"], elapsed_s=time.time() - start)
            history.append(record)
            log.info("epoch %d: loss %.4f  spread %.4f  lr %.2e  val %s  (%.0f s)", epoch,
                     record["loss"], record["spread"], record["lr"], format_metrics(val),
                     record["elapsed_s"])
            improved = val["rsum"] > best_rsum
            best_rsum = max(best_rsum, val["rsum"])
            ckpt.save_checkpoint(out_dir, epoch=epoch, model=model, cfg=cfg, optimizer=optimizer,
                                 scheduler=scheduler, scaler=scaler, history=history,
                                 best_rsum=best_rsum, improved=improved)
        stop = distributed.agree(time.time() > deadline, ctx)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        if stop:
            log.warning("train.time_limit_s (%s s) reached after epoch %d of %d: stopping "
                        "training early", t["time_limit_s"], epoch, int(t["epochs"]))
            break

    if not ctx.is_main:  # rank 0 plots and tests; the others wait for its metrics
        return distributed.share(dict.fromkeys(METRIC_KEYS, 0.0), ctx)
    from .plot import plot_history

    plot_history(history, out_dir / "curves.png")
    return distributed.share(
        _final_test(cfg, out_dir, model, tokenizer, device, progress, start), ctx)


def _checkpoint_to_resume(cfg: dict[str, Any], out_dir: Path) -> ckpt.Checkpoint | None:
    """The verified last checkpoint of ``out_dir`` (``None``: none has committed yet), after
    checking that ``cfg`` continues the same run (only keys that do not change what is
    computed, such as the device or the thread count, may differ)."""
    checkpoint = ckpt.find_checkpoint(out_dir)
    if checkpoint is not None:
        changed = resume_differences(merge_config(checkpoint.config), cfg)
        if changed:
            raise ValueError(f"resume: the config differs from the run in {out_dir} "
                             f"({'; '.join(changed)}); resume with the run's own config, or "
                             "start a new run in another folder")
    return checkpoint


def _train_epoch(model, train_set, tokenizer, optimizer, scheduler, scaler, loss_fn, cfg,
                 device, epoch: int, steps: int, progress: bool, deadline: float = math.inf,
                 ctx: distributed.Context = distributed.SINGLE) -> dict[str, Any]:
    t = cfg["train"]
    frozen = epoch < int(t["freeze_encoders_epochs"])
    model.freeze_encoders(frozen)
    model.train()
    pairs = epoch_pairs(train_set.n_images, train_set.captions_per_image, t["sample"],
                        int(cfg["seed"]), epoch)[: steps * int(t["batch_size"])]
    loader = train_loader(train_set, tokenizer,
                          distributed.shard_batches(pairs, int(t["batch_size"]), ctx),
                          int(t["batch_size"]) // ctx.world_size, int(cfg["data"]["num_workers"]))
    losses, spreads, gaps = [], [], []
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch}" + (" (frozen)" if frozen else ""),
               disable=not progress, leave=False)
    for i, batch in enumerate(bar):
        if i > 0 and deadline < math.inf and distributed.agree(time.time() > deadline, ctx):
            log.warning("epoch %d: time limit reached after %d of %d steps", epoch, i, steps)
            break
        loss, health = train_step(model, batch, loss_fn, optimizer, scaler, cfg, device, ctx)
        scheduler.step()
        if not math.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch} step {i}: loss is {loss}")
        losses.append(loss)
        spreads.append(health["spread"])
        gaps.append(health["pos_mean"] - health["neg_mean"])
        bar.set_postfix(loss=f"{loss:.3f}", spread=f"{health['spread']:.3f}")
        if (i + 1) % int(t["log_every"]) == 0:
            log.info("epoch %d step %d/%d: loss %.4f  score spread %.4f  pos-neg gap %.4f",
                     epoch, i + 1, steps, np.mean(losses[-int(t['log_every']):]),
                     health["spread"], gaps[-1])
    spread = float(np.mean(spreads[-10:]))
    if spread < COLLAPSE_SPREAD:
        log.warning("epoch %d: the score matrix has collapsed (spread %.2e): every pair scores "
                    "alike; lower the lr, or train with loss.name=infonce or "
                    "loss.hardest_negative=false first", epoch, spread)
    return {"epoch": epoch, "loss": float(np.mean(losses)), "spread": spread,
            "gap": float(np.mean(gaps[-10:])), "lr": optimizer.param_groups[0]["lr"],
            "frozen": frozen, "steps": len(losses)}


def _final_test(cfg, out_dir: Path, model, tokenizer, device, progress: bool,
                start: float) -> dict[str, float]:
    ckpt.load_weights(out_dir / "best.safetensors", model)
    test_set = build_dataset(cfg, "test")
    protocol = cfg["eval"]["protocol"]
    metrics, _ = evaluate_model(
        model, test_set, tokenizer, device, batch_size=int(cfg["eval"]["batch_size"]),
        folds=protocol_folds(protocol, test_set.n_images),
        memory_budget=int(cfg["eval"]["memory_budget"]), amp=bool(cfg["train"]["amp"]),
        progress=progress,
    )
    ckpt.write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    log.info("test (%s, %d images, best checkpoint): %s", protocol, test_set.n_images,
             format_metrics(metrics))
    log.info("total time %.0f s; wrote %s", time.time() - start, out_dir / "metrics.json")
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python -m hatmodel.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="a YAML file, or the bare name of a packaged config ("
                        f"{', '.join(list_configs())}); default %(default)s")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/<config>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its last committed epoch "
                        "(from the beginning when none has committed yet)")
    p.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = p.parse_intermixed_args(argv)

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device is not None:
        overrides.append(f"train.device={args.device}")
    cfg = load_config(args.config, overrides)
    out_dir = Path(args.output_dir or Path("runs") / config_path(args.config).stem)
    # A worker group that torchrun restarted after a failure continues from the last epoch.
    resume = args.resume or distributed.restarted()
    try:
        return train(cfg, out_dir, resume=resume, progress=not args.no_progress)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    from .cli import run

    run(main, "python -m hatmodel.train")
