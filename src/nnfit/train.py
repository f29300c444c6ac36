"""The training loop: one function to read top to bottom, with helpers for a step, an epoch and an evaluation.

Data lives as tensors on the training device. Each epoch draws a permutation,
gathers the data once in that order, and batches are contiguous slices of it.
Losses stay on the device as detached tensors and are read once per epoch.
"""

from __future__ import annotations

import functools
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nnfit import devices, freeze, trainstate
from nnfit.errors import NnfitError, TrainingDiverged

LBFGS_ITERATIONS_PER_EPOCH = 20
LBFGS_MAX_WORK = 5e9  # training rows x parameters up to which full-batch L-BFGS wins (bench/core.py)
DEFAULT_STEPS = 20_000  # Adam/SGD steps when --epochs is not given
# Rows per forward pass x parameters below which one CPU thread trains faster than several: the
# matmuls are too small to split, and on a busy machine the threads' barriers cost up to 100x (docs/benchmarks.md).
ONE_THREAD_MAX_WORK = 2e7
MAX_ROLLBACKS = 3  # retries, each with half the learning rate, after a non-finite loss


@dataclass
class TrainData:
    """Standardized training and validation tensors, already on the training device."""

    X_train: torch.Tensor
    Y_train: torch.Tensor
    X_val: torch.Tensor
    Y_val: torch.Tensor


@dataclass(frozen=True)
class Recipe:
    """The optimizer, schedule and sizes a run actually uses, after the config's 'auto' choices."""

    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    schedule: str
    patience: int

    def describe(self) -> str:
        if self.optimizer == "lbfgs":
            return (f"full-batch L-BFGS (lr {self.lr:g}, {LBFGS_ITERATIONS_PER_EPOCH} iterations per epoch, "
                    f"up to {self.epochs} epochs, patience {self.patience})")
        return (f"{self.optimizer} lr {self.lr:g}, batch {self.batch_size}, schedule {self.schedule}, "
                f"up to {self.epochs} epochs, patience {self.patience}")


def choose_recipe(config, n_train: int, n_params: int) -> Recipe:
    """Fill in every 'auto' setting. Small problems get full-batch L-BFGS, which reaches a far
    lower error than any minibatch method on smooth low-dimensional functions (bench/core.py)."""
    optimizer = config.optimizer
    if optimizer == "auto":
        # fp16 needs a loss scaler, which L-BFGS's line search cannot use.
        # Nor can it work on bf16-rounded losses: its line search sees steps of the rounding, not of the loss.
        small = n_train * n_params <= LBFGS_MAX_WORK and config.precision == "32"
        optimizer = "lbfgs" if small else "adam"
    if optimizer == "lbfgs":
        return Recipe("lbfgs", config.lr or 1.0, n_train, config.epochs or 200, "none", config.patience or 10)
    lr = config.lr or (0.01 if optimizer == "sgd" else 3e-3)
    batch = config.batch_size or int(min(4096, max(32, 2 ** round(math.log2(max(n_train, 1) / 64)))))
    batch = min(batch, n_train)
    steps_per_epoch = math.ceil(n_train / batch)
    epochs = config.epochs or max(10, min(2000, math.ceil(DEFAULT_STEPS / steps_per_epoch)))
    schedule = config.schedule if config.schedule != "auto" else ("onecycle" if optimizer in ("adam", "adamw") else "none")
    return Recipe(optimizer, lr, batch, epochs, schedule, config.patience or 20)


def make_optimizer(params, recipe: Recipe, config) -> torch.optim.Optimizer:
    """The optimizer gets trainable parameters only: a list of them, or parameter groups (--lr-for)."""
    params = [p for p in params if isinstance(p, dict) or p.requires_grad]
    if recipe.optimizer == "lbfgs":
        return torch.optim.LBFGS(params, lr=recipe.lr, max_iter=LBFGS_ITERATIONS_PER_EPOCH, history_size=50,
                                 tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, foreach=True)
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    try:  # the fused kernel updates all tensors in one pass: 1.4-2x faster per step at batch 64 on the CPU
        return cls(params, lr=recipe.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return cls(params, lr=recipe.lr, weight_decay=config.weight_decay, foreach=True)


def make_schedule(optimizer, recipe: Recipe, steps_per_epoch: int):
    total = recipe.epochs * steps_per_epoch
    if recipe.schedule == "onecycle" and total >= 5:
        # One peak per parameter group, so that --lr-for groups keep their own learning rate.
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total,
                                                   # at least two warm-up steps: OneCycleLR divides by the
                                                   # length of each phase, which is 0 in a very short run
                                                   pct_start=min(0.5, max(0.1, 2.5 / total)),
                                                   div_factor=10, final_div_factor=100)
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=recipe.lr * 1e-3)
    return None


@dataclass
class TrainResult:
    recipe: Recipe
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    stopped: str = ""
    seconds: float = 0.0
    grad_norms: dict[str, float | None] = field(default_factory=dict)  # at the last step; None: no gradient
    frozen: list[str] = field(default_factory=list)  # frozen to the end, proven bit-identical to the start
    unfrozen_at: dict[str, int] = field(default_factory=dict)
    moved: dict[str, float] = field(default_factory=dict)  # L2 norm of (final - start) per parameter
    batch_size_final: int = 0  # rows per forward pass at the end (per rank); smaller than the batch after an OOM
    oom_retries: list[dict] = field(default_factory=list)  # one entry per halving after an out-of-memory error
    rollbacks: list[dict] = field(default_factory=list)  # one entry per rollback after a non-finite loss


def _restoring_threads(fn):
    """train() may set torch's CPU threads for its run (``_use_threads``); put the caller's setting back."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def _use_threads(config, recipe: Recipe, n_params: int, ctx, reporter) -> None:
    threads, line = devices.cpu_threads(config.threads, recipe.batch_size * n_params <= ONE_THREAD_MAX_WORK, ctx)
    if threads:
        torch.set_num_threads(threads)
    if line:
        reporter.log(line)


@_restoring_threads
def train(model: torch.nn.Module, data: TrainData, config, reporter, ctx=None, saver=None) -> TrainResult:
    """Train ``model`` in place on ``data``; the best weights by validation loss are restored at the end.

    With a distributed ``ctx`` (torchrun or ``--devices N``) the model is wrapped in
    DistributedDataParallel and each rank trains on its shard of every global batch. ``saver``
    (a ``trainstate.Saver``) writes the training state and may hold the state to resume from.
    """
    ctx = ctx or devices.Context(device=next(model.parameters()).device)
    saver = saver or trainstate.Saver(None, None, together=ctx.distributed)
    n_train = len(data.X_train)
    named = [(n, p) for n, p in freeze.unwrap(model).named_parameters() if p.requires_grad]
    frozen_at_start = [n for n, p in freeze.unwrap(model).named_parameters() if not p.requires_grad]
    unfreeze = freeze.unfreeze_schedule(model, config.unfreeze_at)
    freeze.check_lr_for(model, config.lr_for, {n for n, _ in named} | {n for ns in unfreeze.values() for n in ns})
    recipe = choose_recipe(config, n_train, sum(p.numel() for _, p in named))
    _use_threads(config, recipe, sum(p.numel() for _, p in named), ctx, reporter)
    if config.lr_for and recipe.optimizer == "lbfgs":
        raise NnfitError("--lr-for gives parameters their own learning rate, but --optimizer auto chose full-batch "
                         "L-BFGS for this small problem, and L-BFGS takes all parameters in one group; "
                         "pass --optimizer adam, adamw or sgd")
    optimizer = make_optimizer(freeze.param_groups(named, config.lr_for, recipe.lr), recipe, config)
    rank_batch = _rank_batch(recipe, ctx, reporter)
    steps_per_epoch = 1 if recipe.optimizer == "lbfgs" else \
        math.ceil((n_train - n_train % ctx.world_size) / (rank_batch * ctx.world_size))
    scheduler = make_schedule(optimizer, recipe, steps_per_epoch)
    has_val = len(data.X_val) > 0
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    deadline = time.perf_counter() + config.time_budget if config.time_budget else math.inf
    plan = StepPlan.build(config, ctx, data, reporter)
    net = _wrap(model, ctx)
    X_val, Y_val = _rank_part(data.X_val, ctx), _rank_part(data.Y_val, ctx)
    if recipe.optimizer == "lbfgs":  # full batch: each rank holds a contiguous part of the training rows
        X_lbfgs, Y_lbfgs = _rank_part(data.X_train, ctx), _rank_part(data.Y_train, ctx)

    result = TrainResult(recipe)
    best_state = _copy_state(model)
    start_values = freeze.snapshot(model)  # the proof that frozen tensors stay put, and movement, start here
    # Early stopping waits for the last scheduled unfreeze: the run was asked to train those parameters.
    patience_from = max(unfreeze, default=1) - 1
    writer = _tensorboard(config, ctx)  # None unless --tensorboard; only the main process writes

    def snapshot(position, perm=None, total=None) -> trainstate.State:
        state = trainstate.capture(freeze.unwrap(model), optimizer, scheduler, plan, generator, result, best_state,
                                   start_values, position, perm, total)
        state.info["seconds"] = time.perf_counter() - start
        return state

    def restore(state: trainstate.State):
        """Put the model, optimizer, schedule, RNGs and records back as they were in ``state``; returns
        (epoch, partial): where the loop goes on, and the unfinished epoch's permutation and progress."""
        nonlocal optimizer, scheduler, best_state, start_values, net
        freeze.unwrap(model).load_state_dict(trainstate.part(state, "model"))
        start_values, best_state = trainstate.part(state, "start"), trainstate.part(state, "best")
        position = state.position
        optimizer, scheduler = _rebuild(model, frozen_at_start, unfreeze, position["epoch"], recipe, config,
                                        steps_per_epoch)
        optimizer.load_state_dict(trainstate.unpacked(state, "optimizer"))
        if scheduler is not None:
            scheduler.load_state_dict(trainstate.unpacked(state, "scheduler"))
        if plan.scaler is not None:
            plan.scaler.load_state_dict(trainstate.unpacked(state, "scaler"))
        plan.micro, plan.eval_chunk = state.info["micro"], state.info["eval_chunk"]
        plan.guard.retries[:] = state.info["oom_retries"]
        trainstate.restore_rng(state, generator)
        result.history = [dict(row) for row in state.info["history"]]
        result.best_epoch, result.best_val_loss = state.info["best_epoch"], state.info["best_val_loss"]
        result.unfrozen_at = {k: int(v) for k, v in state.info["unfrozen_at"].items()}
        result.rollbacks = [dict(r) for r in state.info["rollbacks"]]
        saver.steps = position["steps"]
        net = _wrap(model, ctx)
        if position["finished"]:
            return position["epoch"] + 1, None
        return position["epoch"], (state.tensors["perm"], (position["step"], position["rows"],
                                                           state.tensors["total"].clone().to(plan.device)))

    saver.capture = snapshot
    reporter.start(recipe, n_train, len(data.X_val))
    earlier = saver.resume.info.get("seconds", 0.0) if saver.resume is not None else 0.0  # before a resume
    start, deadline = time.perf_counter() - earlier, deadline - earlier
    epoch, partial = 1, None  # partial: the permutation and progress of an epoch a checkpoint interrupted
    if saver.resume is not None:
        epoch, partial = restore(saver.resume)
        reporter.log(f"resuming from {saver.resume.describe()} ({saver.folder})")
        last_good = saver.resume
    else:
        last_good = snapshot(saver.position(0))  # where a divergence in the first epoch rolls back to
    retries = 0  # rollbacks to ``last_good``
    while epoch <= recipe.epochs:
        epoch_start = time.perf_counter()
        if epoch in unfreeze and partial is None:
            optimizer = _unfreeze(model, unfreeze[epoch], start_values, optimizer, scheduler, recipe, config, epoch)
            result.unfrozen_at.update(dict.fromkeys(unfreeze[epoch], epoch))
            reporter.log(f"epoch {epoch}: unfroze {', '.join(unfreeze[epoch])}")
            net = _wrap(model, ctx)  # DDP fixes the set of trainable parameters when it is built
        net.train()
        saver.epoch = epoch
        if recipe.optimizer == "lbfgs":
            train_loss = _lbfgs_epoch(net, optimizer, X_lbfgs, Y_lbfgs, config.grad_clip, plan, n_train)
            saver.step()  # one L-BFGS step per epoch; its state is saved at the epoch's end
        else:
            perm, progress = partial if partial is not None else (torch.randperm(n_train, generator=generator), None)
            partial, saver.perm = None, perm
            if not (ctx.distributed or plan.stream):
                on_device = perm.to(data.X_train.device)
                train_loss = _epoch(net, optimizer, scheduler, data.X_train[on_device], data.Y_train[on_device],
                                    recipe.batch_size, config, reporter, epoch, deadline, plan, saver, progress)
            else:
                rows = _rank_rows(perm, rank_batch, ctx)
                X, Y = plan.gather(data.X_train, data.Y_train, rows)
                # A mid-epoch deadline would stop the ranks at different steps: under DDP it is checked per epoch.
                train_loss = _epoch(net, optimizer, scheduler, X, Y, rank_batch, config, reporter, epoch,
                                    math.inf if ctx.distributed else deadline, plan, saver, progress)
        if ctx.distributed:
            train_rows = len(X_lbfgs) if recipe.optimizer == "lbfgs" else len(X)
            train_loss, val_loss, out_of_time, saver.agreed = _reduce_epoch(model, train_loss, train_rows, X_val,
                                                                            Y_val, ctx, plan, deadline)
        else:
            val_loss = evaluate_loss(model, data.X_val, data.Y_val, plan=plan) if has_val else train_loss
            out_of_time = False
        train_loss, val_loss = torch.stack([train_loss.float(), val_loss.float()]).tolist()  # the epoch's one sync
        seconds = time.perf_counter() - epoch_start
        lr = optimizer.param_groups[0]["lr"]
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            # A non-finite loss: the weights of this epoch are lost, not the run. Roll back to the last
            # good state with the learning rate halved once more per retry, a bounded number of times.
            retries += 1
            if retries > MAX_ROLLBACKS:
                model.load_state_dict(best_state)
                result.stopped = f"the training loss became {train_loss} in epoch {epoch}"
                _diverged(result, recipe)
            rollbacks = result.rollbacks
            diverged_in = epoch
            epoch, partial = restore(last_good)
            _scale_lr(optimizer, scheduler, 0.5 ** retries)
            new_lr = optimizer.param_groups[0]["lr"]
            result.rollbacks = [*rollbacks, {"epoch": diverged_in, "loss": train_loss, "retry": retries,
                                             "lr": new_lr}]
            reporter.log(f"the training loss became {train_loss} in epoch {diverged_in}: rolled back to "
                         f"{last_good.describe()} with the learning rate halved to {new_lr:.3g} "
                         f"(retry {retries} of {MAX_ROLLBACKS})")
            continue
        result.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                               "lr": lr, "seconds": seconds})
        if writer is not None:
            _log_scalars(writer, result.history[-1], model, n_train)
        improved = val_loss < result.best_val_loss
        if improved:
            result.best_epoch, result.best_val_loss = epoch, val_loss
            best_state = _copy_state(model)
        reporter.epoch(result.history[-1], improved)
        if epoch - max(result.best_epoch, patience_from) >= recipe.patience:
            result.stopped = f"no better validation loss for {recipe.patience} epochs"
            break
        if recipe.optimizer == "lbfgs" and epoch > patience_from + 1 and train_loss >= result.history[-2]["train_loss"]:
            # L-BFGS's line search only accepts a lower loss: no change means it has converged, and
            # waiting out the patience would repeat the same empty step.
            result.stopped = "L-BFGS converged (the training loss stopped falling)"
            break
        if out_of_time or (not ctx.distributed and time.perf_counter() >= deadline):
            result.stopped = f"time budget of {config.time_budget:g} s reached"
            break
        last_good, retries = snapshot(saver.position(epoch)), 0
        saver.epoch_end(last_good)
        epoch += 1
    else:
        result.stopped = f"reached {recipe.epochs} epochs"
    result.seconds = time.perf_counter() - start
    if writer is not None:
        writer.close()
    result.batch_size_final = plan.micro or (len(X_lbfgs) if recipe.optimizer == "lbfgs" else rank_batch)
    result.oom_retries = plan.guard.retries
    result.grad_norms = freeze.grad_norms(model)
    result.frozen = [n for n, p in freeze.unwrap(model).named_parameters() if not p.requires_grad]
    _verify_frozen(model, start_values, result.frozen, "during training")
    model.load_state_dict(best_state)
    _verify_frozen(model, start_values, result.frozen, "in the best weights restored at the end")
    result.moved = freeze.movement(model, start_values)
    reporter.finish(result)
    return result


def _rebuild(model, frozen_at_start, unfreeze, epoch: int, recipe, config, steps_per_epoch):
    """An optimizer and schedule shaped as they were in ``epoch``: over the parameters trainable at the
    start, plus those unfrozen up to ``epoch``. Only the shape matters: their states are loaded next."""
    named = dict(freeze.unwrap(model).named_parameters())
    for name, p in named.items():
        p.requires_grad_(name not in frozen_at_start)
    optimizer = make_optimizer(freeze.param_groups(list(named.items()), config.lr_for, recipe.lr), recipe, config)
    scheduler = make_schedule(optimizer, recipe, steps_per_epoch)
    for when in sorted(unfreeze):
        if when > epoch:
            continue
        for name in unfreeze[when]:
            named[name].requires_grad_(True)
        if recipe.optimizer == "lbfgs":
            optimizer = make_optimizer([p for p in named.values() if p.requires_grad], recipe, config)
        else:
            for group in freeze.param_groups([(n, named[n]) for n in unfreeze[when]], config.lr_for, recipe.lr):
                _add_group(optimizer, scheduler, group)
    return optimizer, scheduler


def _scale_lr(optimizer, scheduler, factor: float) -> None:
    """Scale every learning rate, and what the schedule computes them from (after a divergence)."""
    for group in optimizer.param_groups:
        for key, value in group.items():
            if key.endswith("lr") and isinstance(value, (int, float)) and not isinstance(value, bool):
                group[key] = value * factor  # lr, initial_lr, max_lr, min_lr
    if scheduler is not None:
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        if hasattr(scheduler, "eta_min"):
            scheduler.eta_min *= factor


def _diverged(result: TrainResult, recipe: Recipe) -> None:
    lr = f"it was {recipe.lr:g}, and {MAX_ROLLBACKS} retries halved it down to {recipe.lr * 0.5 ** MAX_ROLLBACKS:g}"
    raise TrainingDiverged(f"training diverged: {result.stopped}, and again after rolling back {MAX_ROLLBACKS} "
                           f"times with the learning rate halved each time; lower --lr ({lr}), add --grad-clip 1, "
                           "or try --optimizer adam", result)


def _verify_frozen(model, start_values, names, when) -> None:
    """A frozen tensor that moved is a bug in nnfit: raise (FrozenTensorChanged, not NnfitError)."""
    freeze.verify_unchanged(dict(freeze.unwrap(model).named_parameters()), start_values, names, when)


def _unfreeze(model, names, start_values, optimizer, scheduler, recipe, config, epoch):
    """Make ``names`` trainable from ``epoch`` on and hand them to the optimizer; returns the optimizer."""
    _verify_frozen(model, start_values, names, f"before epoch {epoch}, while frozen")
    named = dict(freeze.unwrap(model).named_parameters())
    for name in names:
        named[name].requires_grad_(True)
    if recipe.optimizer == "lbfgs":
        # L-BFGS takes exactly one parameter group, so it is rebuilt over the new parameter set:
        # its curvature history restarts at this epoch.
        return make_optimizer([p for p in named.values() if p.requires_grad], recipe, config)
    for group in freeze.param_groups([(n, named[n]) for n in names], config.lr_for, recipe.lr):
        _add_group(optimizer, scheduler, group)
    return optimizer


def _add_group(optimizer, scheduler, group: dict) -> None:
    """Add a parameter group mid-run, where the schedule is now: its learning rate (and the schedule's
    per-group settings) are the first group's, scaled by the ratio of their configured rates."""
    first = optimizer.param_groups[0]
    configured = first.get("max_lr", scheduler.base_lrs[0] if scheduler is not None else first["lr"])
    scale = group["lr"] / configured
    for key, value in first.items():
        if key.endswith("lr") and isinstance(value, float):  # lr, initial_lr, max_lr, min_lr
            group[key] = value * scale
        elif key in ("max_momentum", "base_momentum", "momentum", "betas"):
            group[key] = value
    optimizer.add_param_group(group)
    if scheduler is not None:
        scheduler.base_lrs.append(scheduler.base_lrs[0] * scale)


def _tensorboard(config, ctx):
    """A SummaryWriter on RUN/tb with --tensorboard (imported here: tensorboard is an optional extra)."""
    if not (getattr(config, "tensorboard", False) and ctx.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise NnfitError("--tensorboard needs the tensorboard package, which is not installed; install it with "
                         "pip install 'nnfit[tensorboard]' (from a clone: pip install -e '.[tensorboard]'), "
                         "or drop --tensorboard") from None
    from pathlib import Path

    return SummaryWriter(log_dir=str(Path(config.out) / "tb"))


def _log_scalars(writer, row: dict, model, n_train: int) -> None:
    """One epoch's scalars. The gradient norm (of the last step's gradients) costs one host sync per epoch."""
    grads = [p.grad.detach().double().norm() for p in freeze.unwrap(model).parameters() if p.grad is not None]
    epoch = row["epoch"]
    writer.add_scalar("loss/train", row["train_loss"], epoch)
    writer.add_scalar("loss/val", row["val_loss"], epoch)
    writer.add_scalar("lr", row["lr"], epoch)
    if grads:
        writer.add_scalar("grad_norm", float(torch.stack(grads).norm()), epoch)
    writer.add_scalar("examples_per_second", n_train / max(row["seconds"], 1e-9), epoch)
    writer.flush()  # an interrupted run still leaves every finished epoch on disk


def _epoch(model, optimizer, scheduler, X, Y, batch_size, config, reporter, epoch, deadline, plan, saver=None,
           progress=None) -> torch.Tensor:
    """One pass over the (already permuted) training data in contiguous slices; ``progress`` (steps,
    rows, running loss) continues an epoch that a saved state interrupted."""
    n = len(X)
    step, i, total = progress or (0, 0, torch.zeros((), device=plan.device, dtype=devices.accumulator(plan.device)))
    log_every = config.log_every
    while i < n:
        xb, yb = X[i:i + batch_size], Y[i:i + batch_size]
        if plan.stream:  # data in (pinned) CPU memory: copy this batch while the GPU works
            xb, yb = xb.to(plan.device, non_blocking=True), yb.to(plan.device, non_blocking=True)
        try:
            loss = _step(model, optimizer, xb, yb, config.grad_clip, plan)
        except RuntimeError as exc:
            if not devices.is_out_of_memory(exc):
                raise
            loss = None
        if loss is None:  # out of memory: the exception (and the graph it held) is gone; retry in halves
            optimizer.zero_grad(set_to_none=True)
            plan.micro = plan.guard.halve(plan.micro or len(xb), "a training step", plan.device)
            continue
        step += 1
        if scheduler is not None:
            scheduler.step()
        total.add_(loss.detach(), alpha=len(xb))  # one kernel, no host sync
        if log_every and step % log_every == 0:
            reporter.batch(epoch, step, loss)
        reporter.tick(step, total, i + len(xb))
        i += len(xb)
        if saver is not None and saver.step():  # a checkpoint is due, or SIGINT/SIGTERM asked to stop
            saver.mid_epoch(step, i, total)
        if deadline != math.inf and time.perf_counter() >= deadline:
            return total / i
    return total / n


def _step(model, optimizer, xb, yb, grad_clip, plan) -> torch.Tensor:
    if plan.plain:  # fp32, the whole batch at once: the fast path
        loss = F.mse_loss(model(xb), yb)  # shapes were checked equal before training
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    else:
        optimizer.zero_grad(set_to_none=True)
        loss = _backward(model, optimizer, xb, yb, plan, "a training step")
    if plan.scaler is not None:
        plan.scaler.unscale_(optimizer)  # clip and step on the true gradients
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(_all_params(optimizer), grad_clip, foreach=True)
    if plan.scaler is not None:
        plan.scaler.step(optimizer)
        plan.scaler.update()
    else:
        optimizer.step()
    return loss


def _backward(model, optimizer, X, Y, plan, where: str, weight: float = 1.0) -> torch.Tensor:
    """``weight`` x the mean squared error over X, its gradient accumulated in ``.grad``, in chunks of
    ``plan.micro`` rows; after an out-of-memory error, frees what it holds and retries in halves."""
    while True:
        try:
            return _forward_backward(model, X, Y, plan, weight)
        except RuntimeError as exc:
            if not devices.is_out_of_memory(exc):
                raise
        optimizer.zero_grad(set_to_none=True)
        plan.micro = plan.guard.halve(plan.micro or len(X), where, plan.device)


def _forward_backward(model, X, Y, plan, weight: float) -> torch.Tensor:
    n = len(X)
    size = plan.micro or n
    total = None
    for i in range(0, n, size):
        xb = X[i:i + size].to(plan.device, non_blocking=True)
        yb = Y[i:i + size].to(plan.device, non_blocking=True)
        # Under DDP only the last chunk all-reduces gradients: one exchange per step, whatever the chunking.
        sync = model.no_sync() if plan.ddp and i + size < n else nullcontext()
        with sync:
            with torch.autocast(plan.device.type, dtype=plan.amp, enabled=plan.amp is not None):
                out = model(xb)
            loss = F.mse_loss(out.to(yb.dtype), yb) * (len(xb) * weight / n)  # autocast's output back to fp32
            (plan.scaler.scale(loss) if plan.scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def _lbfgs_epoch(model, optimizer, X, Y, grad_clip, plan, n_total: int) -> torch.Tensor:
    """Full-batch L-BFGS: one optimizer.step() runs up to LBFGS_ITERATIONS_PER_EPOCH iterations.

    Under DDP each rank holds part of the rows. The closure returns the all-reduced loss of the
    whole training set, so that every rank takes the same line-search decisions, and each rank's
    loss is weighted so that DDP's gradient average is the full batch's gradient.
    """
    world = plan.ctx.world_size
    weight = world * len(X) / n_total

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = None
        if plan.plain:
            try:
                loss = F.mse_loss(model(X), Y)
                loss.backward()
            except RuntimeError as exc:
                if not devices.is_out_of_memory(exc):
                    raise
                loss = None
            if loss is None:  # out of memory: from now on the full batch is taken in halves
                optimizer.zero_grad(set_to_none=True)
                plan.micro = plan.guard.halve(len(X), "an L-BFGS step", plan.device)
        if loss is None:
            loss = _backward(model, optimizer, X, Y, plan, "an L-BFGS step", weight)
            if plan.ddp:
                loss = devices.all_reduce(loss / world, plan.ctx)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], grad_clip, foreach=True)
        return loss

    optimizer.step(closure)
    if plan.plain:
        with torch.no_grad():
            return F.mse_loss(model(X), Y)
    return evaluate_loss(freeze.unwrap(model), X, Y, plan=plan)  # this rank's part; reduced per epoch


def _all_params(optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def evaluate_loss(model, X, Y, chunk: int = 65536, plan=None) -> torch.Tensor:
    """Mean squared error on standardized data, in chunks, keeping no graph."""
    return squared_error_sum(model, X, Y, chunk, plan) / max(1, Y.numel())


def squared_error_sum(model, X, Y, chunk: int = 65536, plan=None) -> torch.Tensor:
    """Sum of squared errors under inference mode, in chunks copied to the model's device; after an
    out-of-memory error the chunk is halved (``plan.guard``) and the same chunk retried."""
    model.eval()
    device = plan.device if plan is not None else X.device
    chunk = plan.eval_chunk if plan is not None and plan.eval_chunk else chunk
    total = torch.zeros((), device=device, dtype=devices.accumulator(device))
    i = 0
    with torch.inference_mode():
        while i < len(X):
            try:
                xb = X[i:i + chunk].to(device, non_blocking=True)
                yb = Y[i:i + chunk].to(device, non_blocking=True)
                total += F.mse_loss(model(xb), yb, reduction="sum").double()
            except RuntimeError as exc:
                if plan is None or not devices.is_out_of_memory(exc):
                    raise
                xb = yb = None
            if xb is None:
                chunk = plan.eval_chunk = plan.guard.halve(chunk, "evaluation", device)
                continue
            i += chunk
    return total


def _reduce_epoch(model, train_loss, train_rows: int, X_val, Y_val, ctx, plan, deadline):
    """The epoch's numbers over all ranks in one all-reduce: the training loss, the validation loss of
    the whole validation set, whether any rank ran out of time, and whether any was sent SIGINT or SIGTERM,
    so that every rank stops together (the last two as the signal to stop for, or None)."""
    f64 = {"device": plan.device, "dtype": devices.accumulator(plan.device)}
    sse = squared_error_sum(model, X_val, Y_val, plan=plan) if len(X_val) else torch.zeros((), **f64)
    local = [train_loss.to(f64["dtype"]) * train_rows, torch.tensor(float(train_rows), **f64), sse.to(f64["dtype"]),
             torch.tensor(float(Y_val.numel()), **f64), torch.tensor(float(time.perf_counter() >= deadline), **f64),
             torch.tensor(_stop_vote(trainstate.STOP.signal, ctx.world_size), **f64)]
    stats = devices.all_reduce(torch.stack(local), ctx)
    train = stats[0] / stats[1]
    val = stats[2] / stats[3] if plan.has_val else train
    votes = float(stats[5])
    stop = signal.SIGTERM if votes > ctx.world_size else signal.SIGINT if votes > 0 else None
    return train, val, bool(stats[4] > 0), stop


def _stop_vote(signum: int | None, world_size: int) -> float:
    """A rank's stop request as one summable number: 0 none, 1 SIGINT, world_size + 1 SIGTERM. The sum
    over the ranks says whether any was asked to stop, and whether any by SIGTERM (which then wins)."""
    return 0.0 if signum is None else float(world_size + 1) if signum == signal.SIGTERM else 1.0


@dataclass
class StepPlan:
    """How a step runs: on which device, in what precision, in chunks of how many rows, with DDP or not.

    ``plain`` (fp32, whole batches, one process, data on the device) is the fast path.
    """

    ctx: devices.Context
    device: torch.device
    guard: devices.MemoryGuard
    amp: torch.dtype | None = None
    scaler: object = None
    ddp: bool = False
    stream: bool = False  # data in CPU memory, batches copied as they are used
    has_val: bool = False
    micro: int | None = None  # rows per forward pass after an out-of-memory error (None: the whole batch)
    eval_chunk: int | None = None
    _buffers: tuple = ()

    @classmethod
    def build(cls, config, ctx, data, reporter) -> "StepPlan":
        amp = {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}[config.precision]
        scaler = torch.amp.GradScaler(ctx.device.type) if config.precision == "16-mixed" else None
        stream = data.X_train.device != ctx.device or config.data_on == "cpu"
        return cls(ctx, ctx.device, devices.MemoryGuard(config.min_batch_size, reporter.log), amp, scaler,
                   ctx.distributed, stream, len(data.X_val) > 0)

    @property
    def plain(self) -> bool:
        return self.amp is None and self.micro is None and not self.ddp and not self.stream

    def gather(self, X, Y, rows):
        """This epoch's rows in order: on the device, or into reused (pinned) CPU buffers."""
        if not self.stream:
            rows = rows.to(X.device)
            return X[rows], Y[rows]
        if not self._buffers or len(self._buffers[0]) != len(rows):
            pin = self.device.type == "cuda"
            self._buffers = tuple(torch.empty((len(rows), *T.shape[1:]), dtype=T.dtype, pin_memory=pin)
                                  for T in (X, Y))
        rows = rows.to(X.device)
        return (torch.index_select(X, 0, rows, out=self._buffers[0]),
                torch.index_select(Y, 0, rows, out=self._buffers[1]))


def _wrap(model, ctx):
    """DistributedDataParallel around the model under torch.distributed; the model itself otherwise."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(freeze.unwrap(model),
                                   device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def _rank_batch(recipe, ctx, reporter) -> int:
    """Rows per step on each rank: --batch-size is the global batch."""
    if not ctx.distributed or recipe.optimizer == "lbfgs":
        return recipe.batch_size
    if recipe.batch_size < ctx.world_size:
        raise NnfitError(f"the global batch of {recipe.batch_size} is smaller than the {ctx.world_size} workers; "
                         f"pass --batch-size {ctx.world_size} or more")
    per_rank = recipe.batch_size // ctx.world_size
    if per_rank * ctx.world_size != recipe.batch_size:
        reporter.log(f"the global batch {recipe.batch_size} is not a multiple of {ctx.world_size} workers: "
                     f"each takes {per_rank} rows, {per_rank * ctx.world_size} in all")
    return per_rank


def _rank_rows(perm: torch.Tensor, rank_batch: int, ctx) -> torch.Tensor:
    """This rank's rows for one epoch: slice ``rank`` of every global batch of the shared permutation.

    Every rank gets the same number of rows (the permutation's last ``n % world_size`` rows, a
    different few each epoch, are left out), so DDP's gradient average is each global batch's mean.
    """
    world, rank = ctx.world_size, ctx.rank
    if world == 1:
        return perm
    n = len(perm) - len(perm) % world
    full = n // (rank_batch * world) * rank_batch * world
    head = perm[:full].view(-1, world, rank_batch)[:, rank].reshape(-1)
    tail = perm[full:n].view(world, -1)[rank]
    return torch.cat([head, tail])


def _rank_part(T: torch.Tensor, ctx) -> torch.Tensor:
    """This rank's contiguous part of a tensor (validation rows, or the full batch of L-BFGS)."""
    return torch.tensor_split(T, ctx.world_size)[ctx.rank] if ctx.distributed else T


def _copy_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
