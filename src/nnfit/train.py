"""The training loop: one function to read top to bottom, with helpers for a step, an epoch and an evaluation.

Data lives as tensors on the training device. Each epoch draws a permutation,
gathers the data once in that order, and batches are contiguous slices of it.
Losses stay on the device as detached tensors and are read once per epoch.

An ensemble (``--ensemble K``, a ``model.StackedMLP``) runs through the same code: its data carry a
leading member axis (K, n, d), one permutation per member, its losses are (K,) vectors, and each
member keeps its own best epoch and weights. A single network is the case without that axis.
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
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from nnfit import devices, freeze, graphed, trainstate
from nnfit.model import batch_rows, clip_grad_norm_
from nnfit.model import members as count_members
from nnfit.model import training_memory
from nnfit.errors import NnfitError, TrainingDiverged
from nnfit.errors import setting as S

LBFGS_ITERATIONS_PER_EPOCH = 20
LBFGS_HISTORY = 50  # the curvature pairs L-BFGS keeps
LBFGS_MAX_WORK = 5e9  # training rows x parameters up to which full-batch L-BFGS wins (bench/core.py)
ANNEALING = ("onecycle", "cosine")  # schedules whose learning rate falls over the run's epochs
DEFAULT_STEPS = 20_000  # Adam/SGD steps when --epochs is not given
# Rows per forward pass x parameters up to which one CPU thread trains about as fast as two on a quiet
# machine (the matmuls are too small to split), while on a busy one the threads' barriers cost up to 100x.
# Above it the thread count follows the cores that are free (devices.cpu_threads). Full-batch L-BFGS keeps
# one thread up to 2e7: a second one makes the demo (900 rows, 9e6) at most 1.3x faster on a quiet machine
# (`python bench/threads.py`: 0.76 of the time per epoch; about 0.9 of `nnfit demo`'s training time), and
# one thread keeps the demo's numbers the same on every machine (threads change MKL's summation order).
ONE_THREAD_MAX_WORK = 1e6
ONE_THREAD_MAX_WORK_LBFGS = 2e7
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
    patience: int | None  # None: no early stopping (a schedule that anneals over every epoch)

    def describe(self) -> str:
        patience = f"patience {self.patience}" if self.patience is not None else "no early stopping"
        if self.optimizer == "lbfgs":
            return (f"full-batch L-BFGS (lr {self.lr:g}, {LBFGS_ITERATIONS_PER_EPOCH} iterations per epoch, "
                    f"up to {self.epochs} epochs, {patience})")
        return (f"{self.optimizer} lr {self.lr:g}, batch {self.batch_size}, schedule {self.schedule}, "
                f"{'up to ' if self.patience is not None else ''}{self.epochs} epochs, {patience}")


# Work (training rows x trainable parameters) up to which full-batch L-BFGS is likely to train faster on
# the CPU than on a GPU: torch's L-BFGS reads numbers back from the GPU about a hundred times per
# iteration (its two-loop recursion takes each history term as a Python number), which a tiny network's
# math cannot hide. The tutorial's exercise (800 x 10,401 = 8.3e6) trained in 1.84 s on an H200 against
# 1.27 s on that machine's CPU (issue "On a real GPU"); bench/gpu.py measures both. A run on CUDA below
# this size gets a hint; --device auto still means the GPU.
LBFGS_CPU_MAX_WORK = 2e7


def _lbfgs_hint(recipe, n_train: int, n_params: int, device: torch.device) -> str | None:
    if recipe.optimizer != "lbfgs" or device.type != "cuda" or n_train * n_params > LBFGS_CPU_MAX_WORK:
        return None
    return (f"hint: full-batch L-BFGS on a problem this small ({n_train:,} rows x {n_params:,} parameters) "
            "is usually faster on the CPU (--device cpu): torch's L-BFGS waits on the GPU many times per iteration")


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
    # A schedule that anneals over the run's epochs (onecycle, cosine) trains them all unless --patience is
    # given: its validation loss stalls while the rate is high and falls as it anneals, so patience would
    # stop it at the high rate (bench/patience.py: 55 of 236 epochs, 18x the test error).
    return Recipe(optimizer, lr, batch, epochs, schedule, config.patience or (None if schedule in ANNEALING else 20))


def make_optimizer(params, recipe: Recipe, config) -> torch.optim.Optimizer:
    """The optimizer gets trainable parameters only: a list of them, or parameter groups (--lr-for).

    Each group carries ``base_lr``, its configured (peak) rate, which ``Schedule.apply`` multiplies by
    the schedule's shape at every step."""
    params = list(params)
    if not any(isinstance(p, dict) for p in params):
        params = [{"params": params, "lr": recipe.lr}]
    groups = []
    for group in params:
        group = {**group, "params": [p for p in group["params"] if p.requires_grad]}
        group.setdefault("lr", recipe.lr)
        group["base_lr"] = group["lr"]
        groups.append(group)
    if recipe.optimizer == "lbfgs":
        return torch.optim.LBFGS(groups, lr=recipe.lr, max_iter=LBFGS_ITERATIONS_PER_EPOCH,
                                 history_size=LBFGS_HISTORY, tolerance_grad=1e-12, tolerance_change=1e-15,
                                 line_search_fn="strong_wolfe")
    trainable = [p for group in groups for p in group["params"]]
    # The fused kernel updates all tensors in one pass (Adam 1.4-2x faster per step at batch 64 on the CPU),
    # and takes GradScaler's scale and found-inf flag as tensors: with the foreach kernels, --precision
    # 16-mixed reads found-inf back to the host at every step (GradScaler._maybe_opt_step's .item()).
    kernel = {"fused": True} if _fused_supported(trainable) else {"foreach": True}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, **kernel)
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=recipe.lr, weight_decay=config.weight_decay, **kernel)


def _fused_supported(params) -> bool:
    """Whether torch has fused optimizer kernels for these parameters' devices and dtypes: torch only
    checks at the first step, so a fused optimizer on an unsupported device would fail mid-run."""
    kinds = _get_fused_kernels_supported_devices()
    return all(p.device.type in kinds and torch.is_floating_point(p) for p in params)


@dataclass
class Schedule:
    """The learning rate as a pure function of the step, like nanoGPT's ``get_lr``: ``lr_at(step)``.

    ``step`` counts the optimizer steps of the whole run (saved in every training state, so a resumed
    run continues on the same curve). ``factor`` halves with each rollback after a divergence. Every
    parameter group follows the same shape at its own height (its ``base_lr``, from --lr-for).
    """

    kind: str  # onecycle, cosine or none
    lr: float  # the recipe's (peak) learning rate
    total: int  # optimizer steps in the whole run
    factor: float = 1.0

    @classmethod
    def of(cls, recipe: Recipe, steps_per_epoch: int) -> "Schedule":
        total = recipe.epochs * steps_per_epoch
        kind = "none" if recipe.schedule == "onecycle" and total < 5 else recipe.schedule
        return cls(kind, recipe.lr, total)

    def lr_at(self, step: int, base: float | None = None) -> float:
        """The learning rate of ``step`` for a group whose configured rate is ``base`` (default: the recipe's)."""
        return (self.lr if base is None else base) * (self.factor * self._shape(step))

    def _shape(self, step: int) -> float:
        if self.kind == "onecycle":  # torch's OneCycleLR: up from peak/10 with a cosine, then down to peak/1000
            up = self._warmup()
            if step <= up:
                return _cosine_between(0.1, 1.0, step / up)
            return _cosine_between(1.0, 1e-3, (step - up) / (self.total - 1 - up))
        if self.kind == "cosine":  # torch's CosineAnnealingLR down to peak/1000
            return 1e-3 + (1.0 - 1e-3) * (1.0 + math.cos(math.pi * min(step, self.total) / self.total)) / 2.0
        return 1.0

    def _warmup(self) -> float:
        # At least two warm-up steps: a very short run would otherwise have a warm-up of length 0.
        return min(0.5, max(0.1, 2.5 / self.total)) * self.total - 1

    def momentum_at(self, step: int) -> float | None:
        """One-cycle also cycles the momentum (Adam's beta1), against the learning rate, as OneCycleLR does."""
        if self.kind != "onecycle":
            return None
        up = self._warmup()
        if step <= up:
            return _cosine_between(0.95, 0.85, step / up)
        return _cosine_between(0.85, 0.95, (step - up) / (self.total - 1 - up))

    def apply(self, optimizer, step: int) -> None:
        """Write the rate (and momentum) of ``step`` into every parameter group. A tensor-valued rate (a
        captured CUDA graph reads it) is filled in place, without a host sync; a float is assigned."""
        scale, momentum = self.factor * self._shape(step), self.momentum_at(step)
        for group in optimizer.param_groups:
            _set(group, "lr", group["base_lr"] * scale)
            if momentum is None:
                continue
            if "betas" in group:
                beta1, *rest = group["betas"]
                if isinstance(beta1, torch.Tensor):
                    beta1.fill_(momentum)
                else:
                    group["betas"] = (momentum, *rest)
            elif "momentum" in group:
                _set(group, "momentum", momentum)


def _cosine_between(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * min(max(pct, 0.0), 1.0)) + 1.0)


def _set(group: dict, key: str, value: float) -> None:
    if isinstance(group[key], torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


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
    threads: int | None = None  # torch's CPU threads during training (None: not a CPU run)
    rollbacks: list[dict] = field(default_factory=list)  # one entry per rollback after a non-finite loss
    # An ensemble's members each keep their own best epoch; best_epoch is then the latest of them, and
    # best_val_loss the mean of their best validation losses (train/val losses in history: member means).
    member_best_epochs: list[int] = field(default_factory=list)
    member_best_val_losses: list[float] = field(default_factory=list)


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
    limit = ONE_THREAD_MAX_WORK_LBFGS if recipe.optimizer == "lbfgs" else ONE_THREAD_MAX_WORK
    threads, line = devices.cpu_threads(config.threads, recipe.batch_size * n_params <= limit, ctx)
    if threads:
        torch.set_num_threads(threads)
    if line:
        reporter.log(line)


@_restoring_threads
def train(model: torch.nn.Module, data: TrainData, config, reporter, ctx=None, saver=None,
          member_lrs=None) -> TrainResult:
    """Train ``model`` in place on ``data``; the best weights by validation loss are restored at the end.

    With a distributed ``ctx`` (torchrun or ``--devices N``) the model is wrapped in
    DistributedDataParallel and each rank trains on its shard of every global batch. ``saver``
    (a ``trainstate.Saver``) writes the training state and may hold the state to resume from.
    A stacked ``model`` (an ensemble of K members) may give each member its own peak learning rate
    (``member_lrs``, K numbers; first-order optimizers only).
    """
    ctx = ctx or devices.Context(device=next(model.parameters()).device)
    saver = saver or trainstate.Saver(None, None, together=ctx.distributed)
    n_train = len(data.X_train)
    unfreeze = freeze.unfreeze_schedule(model, config.unfreeze_at)
    recipe = _recipe_for(model, config, n_train, unfreeze, ctx, reporter)
    lbfgs = recipe.optimizer == "lbfgs"
    rank_batch = _rank_batch(recipe, ctx, reporter)
    steps_per_epoch = 1 if lbfgs else math.ceil((n_train - n_train % ctx.world_size) / (rank_batch * ctx.world_size))
    plan = StepPlan.build(config, ctx, data, reporter, count_members(freeze.unwrap(model)))
    plan.member_lr = _member_lr(member_lrs, recipe, plan, model)
    plan.guard.estimate = memory_estimate(model, config, recipe, n_train, ctx.world_size)  # for an OOM's message
    result = TrainResult(recipe, threads=torch.get_num_threads() if ctx.device.type == "cpu" else None)
    run = Run(model, recipe, config, ctx, plan, saver, result, unfreeze, Schedule.of(recipe, steps_per_epoch))
    # Early stopping waits for the last scheduled unfreeze: the run was asked to train those parameters.
    stop = StopRules(recipe, config, patience_from=max(unfreeze, default=1) - 1, distributed=ctx.distributed)
    X_val, Y_val = _rank_part(data.X_val, ctx), _rank_part(data.Y_val, ctx)
    if lbfgs:  # full batch: each rank holds a contiguous part of the training rows
        X_full, Y_full = _rank_part(data.X_train, ctx), _rank_part(data.Y_train, ctx)

    saver.capture = run.snapshot
    reporter.start(recipe, n_train, len(data.X_val))
    hint = _lbfgs_hint(recipe, n_train, sum(p.numel() for p in model.parameters() if p.requires_grad), ctx.device)
    if hint is not None and not ctx.distributed:
        reporter.log(hint)
    epoch, partial = 1, None  # partial: the permutation and progress of an epoch a checkpoint interrupted
    if saver.resume is not None:
        epoch, partial = run.restore(saver.resume)
        reporter.log(f"resuming from {saver.resume.describe()} ({saver.folder})")
        rollback = Rollback(saver.resume)
    else:
        rollback = Rollback(run.keep_point(saver.position(0)))  # where a divergence in the first epoch goes back to
    stop.start(saver.resume)
    # None unless --tensorboard; only the main process writes. A resumed run purges the epochs from its first on.
    writer = _tensorboard(config, ctx, saver, purge=epoch if saver.resume is not None else None)
    while epoch <= recipe.epochs:
        epoch_start = time.perf_counter()
        if epoch in unfreeze and partial is None:
            run.unfreeze(epoch)
            reporter.log(f"epoch {epoch}: unfroze {', '.join(unfreeze[epoch])}")
        saver.epoch = epoch
        if lbfgs:
            train_loss, train_rows = run.lbfgs_epoch(X_full, Y_full, n_train), len(X_full)
        else:
            perm, progress = partial if partial is not None else (_permutation(n_train, run.generator, plan, data),
                                                                  None)
            partial, saver.perm = None, perm
            X, Y = _epoch_rows(data, perm, rank_batch, ctx, plan)
            # A mid-epoch deadline would stop the ranks at different steps: under DDP it is checked per epoch.
            train_loss = run.epoch(X, Y, rank_batch, reporter, epoch, math.inf if ctx.distributed else stop.deadline,
                                   progress)
            train_rows = X.shape[-2]
        train_loss, val_loss, out_of_time = _measure(run, data, train_loss, train_rows, X_val, Y_val, stop.deadline)
        if not all(map(math.isfinite, [*_listed(train_loss), *_listed(val_loss)])):
            epoch, partial = rollback(run, epoch, _worst(train_loss), reporter)
            continue
        row = {"epoch": epoch, "train_loss": _mean(train_loss), "val_loss": _mean(val_loss), "lr": run.lr(),
               "seconds": time.perf_counter() - epoch_start}
        result.history.append(row)
        if writer is not None:
            _log_scalars(writer, row, model, n_train)
        reporter.epoch(row, run.keep_best(epoch, val_loss))
        result.stopped = stop.reason(result, epoch, out_of_time)
        if result.stopped:
            break
        rollback.good(run.keep_point(saver.position(epoch)))
        saver.epoch_end(rollback.last_good)
        epoch += 1
    else:
        result.stopped = f"reached {recipe.epochs} epochs"
    if writer is not None:
        writer.close()
    run.finish(X_full if lbfgs else None, rank_batch)
    reporter.finish(result)
    return result


def _recipe_for(model, config, n_train: int, unfreeze, ctx, reporter) -> Recipe:
    """The recipe for this model and data, after checking --lr-for against it; sets the CPU threads."""
    named = [(n, p) for n, p in freeze.unwrap(model).named_parameters() if p.requires_grad]
    freeze.check_lr_for(model, config.lr_for, {n for n, _ in named} | {n for ns in unfreeze.values() for n in ns})
    n_params = sum(p.numel() for _, p in named)
    recipe = choose_recipe(config, n_train, n_params)
    _use_threads(config, recipe, n_params, ctx, reporter)
    if config.lr_for and recipe.optimizer == "lbfgs":
        raise NnfitError(f"{S('lr_for')} gives parameters their own learning rate, but {S('optimizer', 'auto')} chose full-batch "
                         "L-BFGS for this small problem, and L-BFGS takes all parameters in one group; "
                         f"pass {S('optimizer', 'adam')}, adamw or sgd")
    return recipe


def _permutation(n: int, generator: torch.Generator, plan, data: TrainData) -> torch.Tensor:
    """This epoch's order of the training rows: (n,), or (K, n) with one permutation per ensemble member.

    With the data on a GPU it is drawn there, seeded from the run's CPU generator (which stays the one
    saved RNG state): a CPU randperm of 1M rows and its copy cost milliseconds, as long as a whole epoch
    at batch 65536 on a GPU. On the CPU, torch.randperm as ever."""
    device = data.X_train.device

    def one() -> torch.Tensor:
        if device.type != "cuda":
            return torch.randperm(n, generator=generator)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))  # a CPU draw: no host sync
        return torch.randperm(n, generator=torch.Generator(device=device).manual_seed(seed), device=device)

    if plan.members == 1:
        return one()
    return torch.stack([one() for _ in range(plan.members)])


def _epoch_rows(data: TrainData, perm, rank_batch: int, ctx, plan):
    """This epoch's training rows in the permutation's order, gathered once: batches are slices of them
    ((n, d), or (K, n, d) for an ensemble: each member's rows in its own order)."""
    if not (ctx.distributed or plan.stream):
        on_device = perm.to(data.X_train.device)
        return data.X_train[on_device], data.Y_train[on_device]
    rows = _rank_rows(perm, rank_batch, ctx) if perm.dim() == 1 else \
        torch.stack([_rank_rows(p, rank_batch, ctx) for p in perm])
    return plan.gather(data.X_train, data.Y_train, rows)


def _listed(loss) -> list[float]:
    return loss if isinstance(loss, list) else [loss]


def _mean(loss) -> float:
    """An epoch's loss as one number: an ensemble's is the mean over its members."""
    return sum(loss) / len(loss) if isinstance(loss, list) else loss


def _worst(loss) -> float:
    """The non-finite value (or the largest) among the members' losses, for the rollback's message."""
    values = _listed(loss)
    return next((v for v in values if not math.isfinite(v)), max(values))


def _member_lr(member_lrs, recipe: Recipe, plan, model):
    """Each member's peak learning rate over the recipe's, as (K,) on the device (None: all the same).

    The first-order optimizers' updates are linear in the learning rate, so a step taken at the recipe's
    rate and scaled per member is exactly the step each member would take at its own rate."""
    if member_lrs is None:
        return None
    lrs = [float(v) for v in member_lrs]
    if plan.members == 1 or len(lrs) != plan.members:
        raise NnfitError(f"member_lrs gives {len(lrs)} learning rate(s) for a model of {plan.members} member(s); "
                         "give one per ensemble member")
    if recipe.optimizer == "lbfgs":
        raise NnfitError("per-member learning rates need a first-order optimizer (L-BFGS searches its own step); "
                         "pass optimizer='adam', 'adamw' or 'sgd'")
    if not all(math.isfinite(v) and v > 0 for v in lrs):
        raise NnfitError(f"member_lrs must be positive numbers, got {lrs}")
    if all(v == recipe.lr for v in lrs):
        return None
    p = next(model.parameters())
    return torch.tensor([v / recipe.lr for v in lrs], device=p.device, dtype=p.dtype)


def _measure(run, data, train_loss, train_rows: int, X_val, Y_val, deadline):
    """The epoch's training and validation losses as floats (the epoch's one host sync), and whether
    time ran out (under DDP: on any rank, agreed in the same all-reduce as the losses and stop signals)."""
    ctx, plan = run.ctx, run.plan
    if ctx.distributed:
        train_loss, val_loss, out_of_time, run.saver.agreed = _reduce_epoch(run.model, train_loss, train_rows, X_val,
                                                                            Y_val, ctx, plan, deadline)
    else:
        val_loss = evaluate_loss(run.model, data.X_val, data.Y_val, plan=plan) if plan.has_val else train_loss
        out_of_time = time.perf_counter() >= deadline
    train_loss, val_loss = torch.stack([train_loss.float(), val_loss.float()]).tolist()  # the one sync
    return train_loss, val_loss, out_of_time  # floats, or lists of K floats for an ensemble


class Run:
    """What the loop changes as it goes: the model (wrapped for DDP), its optimizer, schedule and step,
    the best and the starting weights. ``snapshot`` and ``restore`` move all of it at once."""

    def __init__(self, model, recipe: Recipe, config, ctx, plan: "StepPlan", saver, result: TrainResult, unfreeze,
                 schedule: Schedule):
        self.model, self.recipe, self.config, self.ctx, self.plan = model, recipe, config, ctx, plan
        self.saver, self.result, self.unfreeze_at, self.schedule = saver, result, unfreeze, schedule
        named = [(n, p) for n, p in freeze.unwrap(model).named_parameters() if p.requires_grad]
        self.frozen_at_start = [n for n, p in freeze.unwrap(model).named_parameters() if not p.requires_grad]
        self.optimizer = make_optimizer(freeze.param_groups(named, config.lr_for, recipe.lr), recipe, config)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.best_state = _copy_state(model)
        self.start_values = freeze.snapshot(model)  # the proof that frozen tensors stay put, and movement, start here
        # The rollback point: one state whose tensors every epoch's end overwrites (keep_point), and which of
        # best_state and start_values changed since it was last taken (so it copies only those).
        self._point, self._stale = None, {"best", "start"}
        self._prepare_views()
        self.net = _wrap(model, ctx)
        self.step = make_step(self.net, self.optimizer, plan, config)
        self._closure, self._no_closure_graph = None, False  # L-BFGS's captured closure (on CUDA)
        earlier = saver.resume.info.get("seconds", 0.0) if saver.resume is not None else 0.0  # before a resume
        self.started = time.perf_counter() - earlier

    def keep_best(self, epoch: int, val_loss) -> bool:
        """Keep the weights of each member (or of the one network) whose validation loss is its best so
        far; True when any improved. The weights are copied into ``best_state``'s own tensors in one
        foreach copy (an ensemble's improved members through views of their slices), without allocating."""
        result = self.result
        live = freeze.unwrap(self.model).state_dict(keep_vars=True)  # the tensors themselves: no detach() each
        if not isinstance(val_loss, list):
            if val_loss >= result.best_val_loss:
                return False
            result.best_epoch, result.best_val_loss = epoch, val_loss
            self._keep(live)
            return True
        if not result.member_best_epochs:
            result.member_best_epochs, result.member_best_val_losses = [0] * len(val_loss), [math.inf] * len(val_loss)
        better = [k for k, (v, b) in enumerate(zip(val_loss, result.member_best_val_losses)) if v < b]
        if not better:
            return False
        if len(better) == len(val_loss):
            self._keep(live)
        else:
            self._keep(live, better)
        for k in better:
            result.member_best_epochs[k], result.member_best_val_losses[k] = epoch, val_loss[k]
        # Training goes on while any member still improves: the stop rules read the latest best epoch.
        result.best_epoch = max(result.member_best_epochs)
        result.best_val_loss = sum(result.member_best_val_losses) / len(val_loss)
        return True

    def _keep(self, live: dict, members=None) -> None:
        """Copy the live weights into ``best_state``: all of them, or only the slices of ``members``."""
        if members is None:
            trainstate.copy_into([self.best_state[k] for k in live], list(live.values()))
        else:
            trainstate.copy_into([t for k in members for t in self._member_rows[k][0]],
                                 [t for k in members for t in self._member_rows[k][1]])
        self._stale.add("best")

    @torch.no_grad()  # views to copy from and into, not parts of any graph
    def _prepare_views(self) -> None:
        """An ensemble's per-member slices (views) of ``best_state`` and of the live weights, made whenever
        ``best_state`` is new (the start, a restore): copying some members' best weights is then one foreach
        copy over their slices, not a select per tensor and member every epoch."""
        live = freeze.unwrap(self.model).state_dict(keep_vars=True)
        self._member_rows = [([self.best_state[n][k] for n in live], [t[k] for t in live.values()])
                             for k in range(self.plan.members if self.plan.members > 1 else 0)]

    def keep_point(self, position) -> trainstate.State:
        """The state at an epoch's end that a divergence rolls back to (and that the saver may write).

        Every call overwrites the tensors of the previous one (``trainstate.capture``'s ``into``): the
        run keeps one rollback point, which a restore has already copied out of before the next. The
        best and starting weights are copied only when they changed since."""
        unchanged = [name for name in ("best", "start") if name not in self._stale]
        self._point = self.snapshot(position, into=self._point, unchanged=unchanged)
        self._stale = set()
        return self._point

    def lr(self) -> float:
        """The first parameter group's learning rate for the next step."""
        return self.schedule.lr_at(self.saver.steps, self.optimizer.param_groups[0]["base_lr"])

    def epoch(self, X, Y, batch_size: int, reporter, epoch: int, deadline: float, progress=None) -> torch.Tensor:
        self.net.train()
        return _epoch(self.step, self.schedule, self.optimizer, X, Y, batch_size, self.config, reporter, epoch,
                      deadline, self.plan, self.saver, progress)

    def lbfgs_epoch(self, X, Y, n_total: int) -> torch.Tensor:
        self.net.train()
        self.schedule.apply(self.optimizer, self.saver.steps)  # constant, but halved after a rollback
        loss = _lbfgs_epoch(self.net, self.optimizer, X, Y, self.config.grad_clip, self.plan, n_total,
                            self._lbfgs_graph(X, Y))
        self.saver.step()  # one L-BFGS step per epoch; its state is saved at the epoch's end
        return loss

    def _lbfgs_graph(self, X, Y):
        """On CUDA, L-BFGS's closure as a captured graph (``graphed.GraphedClosure``), kept while the rows
        and the trainable set stay; None (the eager closure) where it cannot be."""
        plan = self.plan
        if plan.device.type != "cuda" or not plan.plain or self.config.cuda_graph == "off" or self._no_closure_graph:
            return None
        params = _all_params(self.optimizer)
        if self._closure is None or not self._closure.matches(X, params):
            self._closure = None
            closure = graphed.GraphedClosure(self.net, X, Y, self.config.grad_clip, params, plan.device, plan.note,
                                             loss=lambda out, Y: _mse(out, Y).sum())  # the eager closure's loss
            try:
                closure.capture(lambda: self.optimizer.zero_grad(set_to_none=True))
            except RuntimeError as exc:
                self.optimizer.zero_grad(set_to_none=True)
                # Not retried at every epoch: after an out-of-memory error too, the rest of the run uses the
                # eager closure (which halves its batch if it runs out of memory as well).
                self._no_closure_graph = True
                oom = graphed._out_of_memory(exc) is not None
                plan.note(f"L-BFGS closure: eager, not a CUDA graph, for the rest of the run "
                          f"({'out of memory capturing it: ' if oom else ''}{str(exc).splitlines()[0][:200]})")
                if oom:
                    del closure
                    devices.free_memory(plan.device)  # what the failed capture held
                return None
            self._closure = closure
        return self._closure

    def renew(self) -> None:
        """A new step (and DDP wrapper) after the model's trainable set or the optimizer changed."""
        self.step.invalidate()
        self.net = _wrap(self.model, self.ctx)  # DDP fixes the set of trainable parameters when it is built
        self.step = make_step(self.net, self.optimizer, self.plan, self.config)
        self._closure = None

    def unfreeze(self, epoch: int) -> None:
        names = self.unfreeze_at[epoch]
        self.optimizer = _unfreeze(self.model, names, self.start_values, self.optimizer, self.recipe, self.config,
                                   epoch)
        self.result.unfrozen_at.update(dict.fromkeys(names, epoch))
        self.renew()

    def snapshot(self, position, perm=None, total=None, into=None, unchanged=()) -> trainstate.State:
        """A new, private copy of the run's state (``keep_point`` passes ``into``: the previous point's buffers)."""
        state = trainstate.capture(freeze.unwrap(self.model), self.optimizer, self.schedule.factor, self.plan,
                                   self.generator, self.result, self.best_state, self.start_values, position, perm,
                                   total, into, unchanged)
        state.info["seconds"] = time.perf_counter() - self.started
        return state

    def restore(self, state: trainstate.State):
        """Put the model, optimizer, schedule, RNGs and records back as they were in ``state``; returns
        (epoch, partial): where the loop goes on, and the unfinished epoch's permutation and progress."""
        plan, result = self.plan, self.result
        live = freeze.unwrap(self.model).state_dict()
        freeze.unwrap(self.model).load_state_dict(trainstate.part(state, "model"))
        # A state read from disk is on the CPU: the start and best weights go back to the model's device.
        self.start_values = trainstate.part(state, "start", live)
        self.best_state = trainstate.part(state, "best", live)
        self._stale = {"best", "start"}  # new best and start tensors: the next point copies them
        self._prepare_views()
        position = state.position
        self.optimizer = _rebuild(self.model, self.frozen_at_start, self.unfreeze_at, position["epoch"], self.recipe,
                                  self.config)
        try:  # the optimizer's and scaler's states are torch's own: the reader's schema cannot see into them
            self.optimizer.load_state_dict(trainstate.unpacked(state, "optimizer"))
            if plan.scaler is not None:
                plan.scaler.load_state_dict(trainstate.unpacked(state, "scaler"))
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise NnfitError(f"the training state in {self.saver.folder} does not fit this run ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]}); it was edited or damaged: start a new run") from None
        self.schedule.factor = state.info.get("lr_factor", 1.0)
        plan.micro, plan.eval_chunk = state.info["micro"], state.info["eval_chunk"]
        plan.guard.retries[:] = state.info["oom_retries"]
        trainstate.restore_rng(state, self.generator, plan.device, plan.note)
        result.history = [dict(row) for row in state.info["history"]]
        result.best_epoch, result.best_val_loss = state.info["best_epoch"], state.info["best_val_loss"]
        result.member_best_epochs, result.member_best_val_losses = map(list, state.info.get("member_best", ([], [])))
        result.unfrozen_at = {k: int(v) for k, v in state.info["unfrozen_at"].items()}
        result.rollbacks = [dict(r) for r in state.info["rollbacks"]]
        self.saver.steps = position["steps"]
        self.renew()
        if position["finished"]:
            return position["epoch"] + 1, None
        return position["epoch"], (state.tensors["perm"], (position["step"], position["rows"],
                                                           state.tensors["total"].clone().to(plan.device)))

    def finish(self, X_full, rank_batch: int) -> None:
        """Record the run's end and restore the best weights, proving frozen tensors never moved."""
        model, result, plan = self.model, self.result, self.plan
        result.seconds = time.perf_counter() - self.started
        result.batch_size_final = plan.micro or (len(X_full) if X_full is not None else rank_batch)
        result.oom_retries = plan.guard.retries
        result.grad_norms = freeze.grad_norms(model)
        result.frozen = [n for n, p in freeze.unwrap(model).named_parameters() if not p.requires_grad]
        _verify_frozen(model, self.start_values, result.frozen, "during training")
        model.load_state_dict(self.best_state)
        _verify_frozen(model, self.start_values, result.frozen, "in the best weights restored at the end")
        result.moved = freeze.movement(model, self.start_values)


@dataclass
class StopRules:
    """When training ends before its last epoch: patience, L-BFGS converged, or the time budget."""

    recipe: Recipe
    config: object
    patience_from: int  # early stopping counts from here (the last scheduled unfreeze)
    distributed: bool
    deadline: float = math.inf

    def start(self, resume) -> None:
        """The time budget counts the time a resumed run had already trained."""
        earlier = resume.info.get("seconds", 0.0) if resume is not None else 0.0
        if self.config.time_budget:
            self.deadline = time.perf_counter() - earlier + self.config.time_budget

    def reason(self, result: TrainResult, epoch: int, out_of_time: bool) -> str:
        """Why to stop after ``epoch``, or "" to go on."""
        patience = self.recipe.patience
        if patience is not None and epoch - max(result.best_epoch, self.patience_from) >= patience:
            return f"no better validation loss for {patience} epochs"
        history = result.history
        if self.recipe.optimizer == "lbfgs" and epoch > self.patience_from + 1 and \
                history[-1]["train_loss"] >= history[-2]["train_loss"]:
            # L-BFGS's line search only accepts a lower loss: no change means it has converged, and
            # waiting out the patience would repeat the same empty step.
            return "L-BFGS converged (the training loss stopped falling)"
        if out_of_time:
            why = f"time budget of {self.config.time_budget:g} s reached"
            if self.recipe.schedule in ANNEALING and epoch < self.recipe.epochs:
                # The learning rate is still high: the run ends before the part of the schedule that gives
                # most of its accuracy (bench/patience.py). Say how to fit the schedule into the budget.
                fits = max(1, epoch - 1)  # the last epoch may have been cut short
                why += (f" at epoch {epoch} of {self.recipe.epochs}, before the {self.recipe.schedule} schedule "
                        f"had annealed; for a schedule that fits in the budget, train {fits} epochs (--epochs {fits})")
            return why
        return ""


class Rollback:
    """After a non-finite loss the weights of that epoch are lost, not the run: go back to the last good
    state with the learning rate halved once more per retry, at most MAX_ROLLBACKS times in a row."""

    def __init__(self, last_good: trainstate.State):
        self.last_good, self.retries = last_good, 0

    def good(self, state: trainstate.State) -> None:
        self.last_good, self.retries = state, 0

    def __call__(self, run: Run, epoch: int, train_loss: float, reporter):
        """Roll ``run`` back; returns where the loop goes on (see ``Run.restore``)."""
        result = run.result
        self.retries += 1
        if self.retries > MAX_ROLLBACKS:
            run.model.load_state_dict(run.best_state)
            result.stopped = f"the training loss became {train_loss} in epoch {epoch}"
            _diverged(result, run.recipe)
        rollbacks = result.rollbacks
        where = run.restore(self.last_good)
        run.schedule.factor *= 0.5 ** self.retries
        new_lr = run.lr()
        result.rollbacks = [*rollbacks, {"epoch": epoch, "loss": train_loss, "retry": self.retries, "lr": new_lr}]
        reporter.log(f"the training loss became {train_loss} in epoch {epoch}: rolled back to "
                     f"{self.last_good.describe()} with the learning rate halved to {new_lr:.3g} "
                     f"(retry {self.retries} of {MAX_ROLLBACKS})")
        return where


def _rebuild(model, frozen_at_start, unfreeze, epoch: int, recipe, config):
    """An optimizer shaped as it was in ``epoch``: over the parameters trainable at the start, plus
    those unfrozen up to ``epoch``. Only the shape matters: its state is loaded next."""
    named = dict(freeze.unwrap(model).named_parameters())
    for name, p in named.items():
        p.requires_grad_(name not in frozen_at_start)
    optimizer = make_optimizer(freeze.param_groups(list(named.items()), config.lr_for, recipe.lr), recipe, config)
    for when in sorted(unfreeze):
        if when > epoch:
            continue
        for name in unfreeze[when]:
            named[name].requires_grad_(True)
        if recipe.optimizer == "lbfgs":
            optimizer = make_optimizer([p for p in named.values() if p.requires_grad], recipe, config)
        else:
            for group in freeze.param_groups([(n, named[n]) for n in unfreeze[when]], config.lr_for, recipe.lr):
                _add_group(optimizer, group, recipe)
    return optimizer


def _diverged(result: TrainResult, recipe: Recipe) -> None:
    lr = f"it was {recipe.lr:g}, and {MAX_ROLLBACKS} retries halved it down to {recipe.lr * 0.5 ** MAX_ROLLBACKS:g}"
    raise TrainingDiverged(f"training diverged: {result.stopped}, and again after rolling back {MAX_ROLLBACKS} "
                           f"times with the learning rate halved each time; lower {S('lr')} ({lr}), add {S('grad_clip', '1')}, "
                           f"or try {S('optimizer', 'adam')}", result)


def _verify_frozen(model, start_values, names, when) -> None:
    """A frozen tensor that moved is a bug in nnfit: raise (FrozenTensorChanged, not NnfitError)."""
    freeze.verify_unchanged(dict(freeze.unwrap(model).named_parameters()), start_values, names, when)


def _unfreeze(model, names, start_values, optimizer, recipe, config, epoch):
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
        _add_group(optimizer, group, recipe)
    return optimizer


def _add_group(optimizer, group: dict, recipe: Recipe) -> None:
    """Add a parameter group mid-run. ``Schedule.apply`` sets its rate (and momentum) before each step:
    its configured rate times the schedule's shape now."""
    group["base_lr"] = group["lr"]
    optimizer.add_param_group(group)


def _tensorboard(config, ctx, saver, purge: int | None):
    """A SummaryWriter on RUN/tb/<the run's start> with --tensorboard (imported here: tensorboard is an
    optional extra). Each run writes its own folder, so a run replacing another (--overwrite) is never
    drawn on top of it; a resumed run continues the folder, and the epochs it trains again after the saved
    state are purged from it (purge_step), so each epoch is drawn once."""
    if not (getattr(config, "tensorboard", False) and ctx.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise NnfitError(f"{S('tensorboard')} needs the tensorboard package, which is not installed; install it with "
                         "pip install 'nnfit[tensorboard]' (from a clone: pip install -e '.[tensorboard]'), "
                         f"or drop {S('tensorboard')}") from None
    from pathlib import Path

    from nnfit.runfolder import TENSORBOARD, new_events_name

    name = saver.info.get("tensorboard_run") or new_events_name(config.out)
    return SummaryWriter(log_dir=str(Path(config.out) / TENSORBOARD / name), purge_step=purge)


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


def _epoch(step, schedule: Schedule, optimizer, X, Y, batch_size, config, reporter, epoch, deadline, plan, saver,
           progress=None) -> torch.Tensor:
    """One pass over the (already permuted) training data in contiguous slices; ``progress`` (steps,
    rows, running loss) continues an epoch that a saved state interrupted."""
    n = X.shape[-2]  # rows; an ensemble's data are (K, n, d)
    count, i, total = progress or (0, 0, torch.zeros(plan.loss_shape, device=plan.device,
                                                     dtype=devices.accumulator(plan.device)))
    shown = total if plan.members == 1 else _MeanOf(total)  # what the progress bar reads, when it redraws
    log_every = config.log_every
    while i < n:
        xb, yb = batch_rows(X, i, i + batch_size), batch_rows(Y, i, i + batch_size)
        rows = xb.shape[-2]
        if plan.stream:  # data in (pinned) CPU memory: copy this batch while the GPU works
            xb, yb = xb.to(plan.device, non_blocking=True), yb.to(plan.device, non_blocking=True)
        schedule.apply(optimizer, saver.steps)
        try:
            loss = step(xb, yb)
        except RuntimeError as exc:
            if not devices.is_out_of_memory(exc):
                raise
            loss = None
        if loss is None:  # out of memory: the exception (and the graph it held) is gone; retry in halves
            optimizer.zero_grad(set_to_none=True)
            plan.micro = plan.guard.halve(plan.micro or rows, "a training step", plan.device)
            step.invalidate()
            continue
        count += 1
        total.add_(loss, alpha=rows)  # one kernel, no host sync
        if log_every and count % log_every == 0:
            reporter.batch(epoch, count, loss.mean())
        reporter.tick(count, shown, i + rows)
        i += rows
        if saver.step():  # a checkpoint is due, or SIGINT/SIGTERM asked to stop
            saver.mid_epoch(count, i, total)
        if deadline != math.inf and time.perf_counter() >= deadline:
            return total / i
    return total / n


class _MeanOf:
    """An ensemble's running loss as the progress bar reads it (``float()``): the members' mean, computed
    (with its host sync) only when the bar redraws."""

    def __init__(self, total: torch.Tensor):
        self.total = total

    def __float__(self) -> float:
        return float(self.total.mean())


def make_step(model, optimizer, plan: "StepPlan", config):
    """The training step for this model, optimizer and plan: the one place that chooses how a step runs.

    On CUDA it is one captured CUDA graph, replayed per batch (``graphed.GraphedStep``), where the run
    allows it; the run says once why not where it does not. Elsewhere, and as the graph's fallback, the
    eager step."""
    eager = EagerStep(model, optimizer, plan, config.grad_clip)
    why = graphed.why_eager(optimizer, plan, config)
    if why is None:
        return graphed.GraphedStep(model, optimizer, plan, config, eager, log=plan.guard.log, loss=_mse)
    if plan.device.type == "cuda" and not isinstance(optimizer, torch.optim.LBFGS):  # L-BFGS captures its closure
        plan.note(f"training step: eager, not a CUDA graph ({why})")
    return eager


class EagerStep:
    """One optimizer step on a batch: ``step(xb, yb)`` returns the batch's loss (detached, on the device).

    The loop calls ``invalidate()`` when what a step was built for changes under it: the trainable set
    (unfreeze), the micro-batch size (an out-of-memory halving), a restore or rollback, a new optimizer.
    An eager step keeps nothing between calls, so there is nothing to drop.
    """

    def __init__(self, model, optimizer, plan: "StepPlan", grad_clip: float | None):
        self.model, self.optimizer, self.plan, self.grad_clip = model, optimizer, plan, grad_clip

    def invalidate(self) -> None:
        pass

    def __call__(self, xb, yb) -> torch.Tensor:
        model, optimizer, plan = self.model, self.optimizer, self.plan
        if plan.plain:  # fp32, the whole batch at once: the fast path
            loss = _mse(model(xb), yb)  # shapes were checked equal before training
            optimizer.zero_grad(set_to_none=True)
            (loss.sum() if plan.members > 1 else loss).backward()  # members are independent: sum, not mean
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = _backward(model, optimizer, xb, yb, plan, "a training step")
        if plan.scaler is not None:
            plan.scaler.unscale_(optimizer)  # clip and step on the true gradients
        if self.grad_clip:
            clip_grad_norm_(_all_params(optimizer), self.grad_clip, plan.members)
        before = _copies(optimizer) if plan.member_lr is not None else None
        if plan.scaler is not None:
            plan.scaler.step(optimizer)
            plan.scaler.update()
        else:
            optimizer.step()
        if before is not None:
            _scale_updates(optimizer, before, plan.member_lr)
        return loss.detach()


def _mse(out: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The mean squared error: one number, or one per member for an ensemble's (K, b, k) outputs
    (``Y`` is (K, b, k), or (b, k) when every member sees the same rows)."""
    if out.dim() == 2:
        return F.mse_loss(out, Y)
    return (out - Y).square().mean(dim=(1, 2))


def _copies(optimizer) -> list[torch.Tensor]:
    return torch._foreach_mul(_all_params(optimizer), 1.0)


@torch.no_grad()
def _scale_updates(optimizer, before: list[torch.Tensor], member_lr: torch.Tensor) -> None:
    """Scale each member's update by its learning rate over the base rate: p = before + (p - before) * s."""
    params = _all_params(optimizer)
    torch._foreach_sub_(params, before)
    torch._foreach_mul_(params, [member_lr.view(-1, *[1] * (p.dim() - 1)) for p in params])
    torch._foreach_add_(params, before)


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
        plan.micro = plan.guard.halve(plan.micro or X.shape[-2], where, plan.device)


def _forward_backward(model, X, Y, plan, weight: float) -> torch.Tensor:
    n = X.shape[-2]
    size = plan.micro or n
    total = None
    for i in range(0, n, size):
        xb = batch_rows(X, i, i + size).to(plan.device, non_blocking=True)
        yb = batch_rows(Y, i, i + size).to(plan.device, non_blocking=True)
        # Under DDP only the last chunk all-reduces gradients: one exchange per step, whatever the chunking.
        sync = model.no_sync() if plan.ddp and i + size < n else nullcontext()
        with sync:
            with torch.autocast(plan.device.type, dtype=plan.amp, enabled=plan.amp is not None):
                out = model(xb)
            loss = _mse(out.to(yb.dtype), yb) * (xb.shape[-2] * weight / n)  # autocast's output back to fp32
            summed = loss.sum() if loss.dim() else loss
            (plan.scaler.scale(summed) if plan.scaler is not None else summed).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def _lbfgs_epoch(model, optimizer, X, Y, grad_clip, plan, n_total: int, graph=None) -> torch.Tensor:
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
                loss = _mse(model(X), Y).sum()  # an ensemble's members are independent: their sum is exact
                loss.backward()
            except RuntimeError as exc:
                if not devices.is_out_of_memory(exc):
                    raise
                loss = None
            if loss is None:  # out of memory: from now on the full batch is taken in halves
                optimizer.zero_grad(set_to_none=True)
                plan.micro = plan.guard.halve(len(X), "an L-BFGS step", plan.device)
        if loss is None:
            loss = _backward(model, optimizer, X, Y, plan, "an L-BFGS step", weight).sum()
            if plan.ddp:
                loss = devices.all_reduce(loss / world, plan.ctx)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], grad_clip, foreach=True)
        return loss

    optimizer.step(closure if graph is None else graph)  # graph: the same closure, captured (on CUDA)
    if plan.plain:
        with torch.no_grad():
            return _mse(model(X), Y)
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
                out = model(xb)
                # An ensemble's (K, b, k) outputs give one sum per member.
                sse = F.mse_loss(out, yb, reduction="sum") if out.dim() == 2 else (out - yb).square().sum(dim=(1, 2))
                total = total + sse.to(total.dtype)
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
    k = plan.members  # an ensemble's losses are (K,): K numbers each
    sse = squared_error_sum(model, X_val, Y_val, plan=plan) if len(X_val) else torch.zeros((), **f64)
    counts = [float(train_rows), float(Y_val.numel()), float(time.perf_counter() >= deadline),
              _stop_vote(trainstate.STOP.signal, ctx.world_size)]
    local = torch.cat([(train_loss.to(f64["dtype"]) * train_rows).reshape(-1).expand(k),
                       sse.to(f64["dtype"]).reshape(-1).expand(k), torch.tensor(counts, **f64)])
    stats = devices.all_reduce(local, ctx)
    rows, numel, late, votes = stats[2 * k:].tolist()
    train = (stats[:k] / rows).reshape(plan.loss_shape)
    val = (stats[k:2 * k] / numel).reshape(plan.loss_shape) if plan.has_val else train
    stop = signal.SIGTERM if votes > ctx.world_size else signal.SIGINT if votes > 0 else None
    return train, val, late > 0, stop


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
    members: int = 1  # K for an ensemble (a StackedMLP): data, losses and weights gain a member axis
    member_lr: torch.Tensor | None = None  # (K,) each member's learning rate over the recipe's
    _buffers: tuple = ()
    _said: set = field(default_factory=set)

    def note(self, message: str) -> None:
        """A line for the run's output, once per run (the reporter's log: only the main process prints)."""
        if message not in self._said:
            self._said.add(message)
            self.guard.log(message)

    @property
    def loss_shape(self) -> tuple:
        return () if self.members == 1 else (self.members,)

    @classmethod
    def build(cls, config, ctx, data, reporter, members: int = 1) -> "StepPlan":
        amp = {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}[config.precision]
        scaler = torch.amp.GradScaler(ctx.device.type) if config.precision == "16-mixed" else None
        stream = data.X_train.device != ctx.device or config.data_on == "cpu"
        return cls(ctx, ctx.device, devices.MemoryGuard(config.min_batch_size, reporter.log), amp, scaler,
                   ctx.distributed, stream, len(data.X_val) > 0, members=members)

    @property
    def plain(self) -> bool:
        return self.amp is None and self.micro is None and not self.ddp and not self.stream

    def gather(self, X, Y, rows):
        """This epoch's rows in order: on the device, or into reused (pinned) CPU buffers."""
        if not self.stream:
            rows = rows.to(X.device)
            return X[rows], Y[rows]
        flat = rows.reshape(-1)  # an ensemble's (K, m) rows: gathered as K * m, viewed as (K, m, d)
        if not self._buffers or len(self._buffers[0]) != len(flat):
            pin = self.device.type == "cuda"
            self._buffers = tuple(torch.empty((len(flat), *T.shape[1:]), dtype=T.dtype, pin_memory=pin)
                                  for T in (X, Y))
        flat = flat.to(X.device)
        return tuple(torch.index_select(T, 0, flat, out=buffer).view(*rows.shape, *T.shape[1:])
                     for T, buffer in zip((X, Y), self._buffers))


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
                         f"pass {S('batch_size', ctx.world_size)} or more")
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


def memory_estimate(model, config, recipe: Recipe, n_train: int, world_size: int = 1, dtype=None):
    """What training an ensemble (a StackedMLP) needs on each worker by ``model.training_memory``, for this
    recipe: its optimizer's state, its rows per step, the rows each member's epoch gathers; None for one
    network or a custom module, which are not checked."""
    net = freeze.unwrap(model)
    if count_members(net) == 1:
        return None
    moments = {"adam": 2, "adamw": 2, "sgd": 1 if config.momentum else 0}.get(recipe.optimizer, 2 * LBFGS_HISTORY + 2)
    lbfgs = recipe.optimizer == "lbfgs"  # full batch: each worker's part of the rows, taken in place
    part = math.ceil(n_train / world_size)
    batch = part if lbfgs else recipe.batch_size // world_size  # rows per step on each worker (_rank_batch)
    size = (dtype or next(net.parameters()).dtype).itemsize
    return training_memory(net.n_inputs, net.n_outputs, net.hidden, net.members, size, moments, batch,
                           0 if lbfgs else part, config.min_batch_size,
                           "full-batch L-BFGS" if lbfgs else recipe.optimizer)


def check_memory(model, config, n_train: int, ctx, dtype, reporter) -> None:
    """Before an ensemble is placed on its device: refuse one that cannot fit there even in the smallest
    micro-batches (``devices.check_members_fit``), naming the most members that fit by the estimate."""
    net = freeze.unwrap(model)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    estimate = memory_estimate(net, config, choose_recipe(config, n_train, trainable), n_train, ctx.world_size, dtype)
    if estimate is None:
        return
    p = next(net.parameters())
    held = p.element_size() * sum(t.numel() for t in net.parameters()) if p.device == ctx.device else 0
    devices.check_members_fit(estimate, ctx.device, held, reporter.log)
