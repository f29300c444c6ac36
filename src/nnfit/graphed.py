"""The training step as one CUDA graph: forward, loss, backward, clipping and the optimizer update,
captured once and replayed per batch.

On a GPU a small network's step is launch-bound: some forty kernels of a few microseconds each, each
launched by Python. Captured as one ``torch.cuda.CUDAGraph`` the step is one launch: 8-10x the
samples per second of the eager step for the tutorial network (the GPU issue's table; bench/gpu.py
measures it). The shapes are static, so the graph reads its batch from two static buffers that each
step refills with ``copy_``.

What a run can change without a new capture: the learning rate and Adam's beta1 (the schedule writes
floats into the optimizer's groups as always; the graph reads device tensors, refilled with ``fill_``
when a float changed). What makes a new capture: a different batch size or chunking (after an
out-of-memory halving), a new parameter group (``--unfreeze-at``), a replaced optimizer state (resume,
rollback). The ragged last batch of an epoch and the warm-up steps before a capture run eagerly, with
the graph's own math, so that where a capture happened does not change the numbers.

An ensemble (``--ensemble K``, a ``model.StackedMLP``) is captured the same way: its batches are
(K, b, d), each member's slice of its own order, the loss is a (K,) vector and the backward is that of
its sum (the members are independent), clipping is the eager step's (each member's own norm,
``model.clip_grad_norm_``), and each member's learning rate (``plan.member_lr``) is a factor inside the
captured update itself. The captured ensemble step has been tested only on the CPU through
``EagerGraph``; it has never run on a real GPU (scripts/gpu_check.sh will run it there).

Where a step cannot be captured it stays eager, and the run says why once: under DDP (its gradient
hooks and bucket rebuilding are not capture-safe without freezing the set of gradients that reduce),
with ``--precision 16-mixed`` (the gradient scaler decides on the host, per step, whether to skip the
step), when a schedule changes what a capture holds fixed (SGD's momentum under one-cycle), when a
capture fails (a custom module that reads a value back to the host), and with ``--cuda-graph off``.

``torch.compile(mode="reduce-overhead")`` captures graphs too, but its compile time (tens of
seconds for forward and backward) is longer than a whole fit of a few seconds: not used.

Everything here runs on the CPU as well, through ``EagerGraph``, a stand-in that records the captured
function and calls it on each replay: the tests prove the plumbing there, and on a GPU
(marker ``cuda``) that the graph gives the eager step's numbers.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from nnfit.model import batch_rows, clip_grad_norm_

WARMUP_STEPS = 3  # eager steps on a side stream before a capture: lazy state (optimizer, cuBLAS) is made there
GRAPHED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


class CudaGraph:
    """One ``torch.cuda.CUDAGraph``: warm-up and capture on a side stream, replay on the current one."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graph = None
        self.stream = torch.cuda.Stream(device)

    def warm(self, fn):
        """Run ``fn`` eagerly on the side stream (torch's recipe for whole-network capture)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = fn()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    def capture(self, fn):
        """Record ``fn`` (nothing runs); returns its outputs, static tensors that each replay rewrites."""
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            return fn()

    def replay(self) -> None:
        self.graph.replay()

    def reset(self) -> None:
        if self.graph is not None:
            self.graph.reset()
        self.graph = None


class EagerGraph:
    """The CPU stand-in for ``CudaGraph``: ``capture`` records the function and runs nothing (as a
    capture does); ``replay`` calls it and writes its outputs into the static tensors ``capture`` returned."""

    def __init__(self, device: torch.device | None = None):
        self.fn = None
        self.out = None
        self.captures = 0
        self.replays = 0

    def warm(self, fn):
        return fn()

    def capture(self, fn):
        self.fn = fn
        self.captures += 1
        self.out = None
        return _StaticOut(self)

    def replay(self) -> None:
        self.replays += 1
        value = self.fn().detach()
        if self.out is None:
            self.out = torch.empty_like(value)
        self.out.copy_(value)

    def reset(self) -> None:
        self.fn = self.out = None


class _StaticOut:
    """What ``EagerGraph.capture`` returns: resolves to the static output once the first replay ran."""

    def __init__(self, graph: EagerGraph):
        self.graph = graph


def _static(out):
    return out.graph.out if isinstance(out, _StaticOut) else out


def why_eager(optimizer, plan, config) -> str | None:
    """Why the step of this run cannot be a CUDA graph (None: it can)."""
    if plan.device.type != "cuda":
        return "not on CUDA"
    if getattr(config, "cuda_graph", "auto") == "off":
        return "--cuda-graph off"
    if plan.ddp:
        return ("DDP's gradient all-reduce hooks are not capture-safe without freezing the set of gradients "
                "that reduce; each DDP worker runs the eager step")
    if plan.scaler is not None:
        return "--precision 16-mixed: the gradient scaler decides on the host, each step, whether to skip it"
    if type(optimizer) not in GRAPHED_OPTIMIZERS:
        return f"the {type(optimizer).__name__} optimizer is captured only as L-BFGS's closure"
    unusual = [k for k in ("amsgrad", "maximize", "nesterov") if any(g.get(k) for g in optimizer.param_groups)]
    if unusual:
        return f"the optimizer's {', '.join(unusual)} is not part of the captured update"
    return None


class GraphedStep:
    """A training step ``step(xb, yb) -> loss`` replayed from a captured graph.

    The first steps after a (re)start run eagerly on a side stream (torch's recipe before a capture: the
    optimizer makes its state there); then one step is captured and every full batch replays it.
    ``eager`` is the ordinary step (same signature): it runs the ragged last batch, and every step once
    capture has failed. The loss a replay returns is a static tensor that the next step overwrites: use
    it (add it to a running total) before the next call.

    An ensemble's batches are (K, b, d) and its loss (K,): rows are counted along the last but one axis.
    ``loss(out, Y)`` is the training loss (``train._mse``: one number, or one per member).

    The captured update is Adam's, AdamW's or SGD's, written here over the optimizer's own state tensors
    (``exp_avg``, ``exp_avg_sq``, ``step``; ``momentum_buffer``), so that the learning rate and Adam's
    beta1 can be device tensors: torch's capturable Adam reads a tensor beta1 back to the host
    (``_foreach_pow(beta1, steps)`` takes a number), which a capture forbids, and one-cycle changes
    beta1 at every step. The math is torch's (the CPU tests compare the two step by step), and the state
    stays torch's, so a checkpoint, a resume and every eager step see an ordinary optimizer.
    """

    def __init__(self, model, optimizer, plan, config, eager, log=print, graph_factory=None, loss=F.mse_loss):
        self.model, self.optimizer, self.plan, self.eager, self.loss_fn = model, optimizer, plan, eager, loss
        self.grad_clip = config.grad_clip
        self.log = log
        self.graph_factory = graph_factory or CudaGraph
        self.graph = None
        self.failed: str | None = None  # why capture is impossible in this run (then every step is eager)
        self.captures: list[dict] = []  # one per capture: rows, micro-batch, seconds
        self._warm = 0
        self._shape = None
        self._hyper: list = []  # per group: [lr seen last, lr tensor, beta1 seen last, beta1 tensor]
        self._baked: list = []  # per group: what the capture fixed, which a schedule must not change
        self._warmer = None
        self._rows = 0  # the largest batch seen: smaller ones are ragged last batches, run eagerly
        self._state = self._groups = None
        self.x = self.y = self.loss = None

    # The loop's side.

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if self.failed is not None:
            return self.eager(xb, yb)
        rows = xb.shape[-2]  # (b, d), or an ensemble's (K, b, d)
        ragged = rows < self._rows  # the epoch's last, shorter batch: once per epoch, not replayed
        if not ragged:
            self._rows = rows
            if self.graph is not None and ((rows, self.plan.micro) != self._shape or self._stale()):
                self.invalidate()
        if not self._hyper:
            self._prepare()
        elif self._refill():
            return self.eager(xb, yb)
        if ragged or (self.graph is None and self._warm < WARMUP_STEPS):
            self._warm += not ragged
            return self._unreplayed(xb, yb, side_stream=not ragged)
        if self.graph is None:
            try:
                self._capture(xb, yb)
            except RuntimeError as exc:
                self._give_up(exc)
                return self.eager(xb, yb)
        self.x.copy_(xb, non_blocking=True)
        self.y.copy_(yb, non_blocking=True)
        self.graph.replay()
        return _static(self.loss)

    def invalidate(self) -> None:
        """Forget the graph: the next steps warm up and capture again (new trainable set, batch or state)."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self._warm, self._shape, self._hyper, self._baked = None, 0, None, [], []
        self.x = self.y = self.loss = None

    # One step.

    def _body(self, X, Y, update):
        """One training step on X, Y: forward, loss, backward, clipping, ``update``."""
        plan = self.plan
        # Python only, no kernel: the backward below then writes fresh gradients (in a graph: into the
        # same buffers on every replay) instead of adding to old ones.
        self.optimizer.zero_grad(set_to_none=True)
        n = X.shape[-2]
        size = plan.micro or n
        total = None
        for i in range(0, n, size):  # after an out-of-memory halving: chunks, gradients accumulated
            xb, yb = batch_rows(X, i, i + size), batch_rows(Y, i, i + size)
            # cache_enabled=False: autocast's cache of casted weights must not outlive a capture.
            with torch.autocast(plan.device.type, dtype=plan.amp, enabled=plan.amp is not None,
                                cache_enabled=False):
                out = self.model(xb)
            loss = self.loss_fn(out.to(yb.dtype), yb)
            if size < n:
                loss = loss * (xb.shape[-2] / n)
            # An ensemble's members are independent: the gradient of their losses' sum is each member's own.
            (loss.sum() if loss.dim() else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.grad_clip:
            clip_grad_norm_(self._params(), self.grad_clip, X.shape[0] if X.dim() == 3 else 1)
        update()
        return total

    def _unreplayed(self, xb, yb, side_stream: bool):
        """A step run eagerly with the graph's own math (so that a run's numbers do not depend on where a
        capture happened, or a resume restarted it): the warm-up steps before a capture, on a side stream
        as torch's recipe asks, and the ragged last batch."""
        if self._warmer is None:
            self._warmer = self.graph_factory(self.plan.device)
        body = lambda: self._body(xb, yb, self._update)  # noqa: E731
        return self._warmer.warm(body) if side_stream else body()

    def _capture(self, xb, yb) -> None:
        started = time.perf_counter()
        self.x, self.y = torch.empty_like(xb), torch.empty_like(yb)
        graph = self.graph_factory(self.plan.device)
        try:
            out = graph.capture(lambda: self._body(self.x, self.y, self._update))
        except RuntimeError:
            self.optimizer.zero_grad(set_to_none=True)
            graph.reset()
            self.invalidate()
            raise
        rows = xb.shape[-2]
        self.graph, self._shape, self.loss = graph, (rows, self.plan.micro), out
        self._state, self._groups = self.optimizer.state, len(self.optimizer.param_groups)
        seconds = time.perf_counter() - started
        self.captures.append({"rows": rows, "micro": self.plan.micro, "seconds": seconds})
        micro = f" in chunks of {self.plan.micro}" if self.plan.micro else ""
        members = f", {xb.shape[0]} ensemble members" if xb.dim() == 3 else ""
        self.log(f"training step captured as a CUDA graph (batch {rows}{micro}{members}) in {seconds * 1000:.0f} ms")

    def _give_up(self, exc: BaseException) -> None:
        cause = _out_of_memory(exc)
        if cause is not None:  # the loop halves the batch; the next call captures at the new size
            raise cause
        self.failed = f"capture failed: {str(exc).splitlines()[0][:200]}"
        self.log(f"training step: eager, not a CUDA graph ({self.failed})")

    # The update the graph runs.

    def _adam(self) -> bool:
        return isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW))

    def _prepare(self) -> None:
        """Before a capture: the device tensors the graph reads for what a schedule changes (the learning
        rate, Adam's beta1), what it holds fixed, and Adam's step counts on the device."""
        device, hyper, baked = self.plan.device, [], []
        for group in self.optimizer.param_groups:
            lr = float(group["lr"])
            dtype = group["params"][0].dtype if group["params"] else torch.float32  # float64 models: exact rates
            entry = [lr, torch.tensor(lr, device=device, dtype=dtype)]
            fixed = {"weight_decay": group.get("weight_decay", 0.0)}
            if self._adam():
                beta1, beta2 = (float(b) for b in group["betas"])
                entry += [beta1, torch.tensor(beta1, device=device, dtype=dtype)]
                fixed.update(beta2=beta2, eps=group["eps"], decoupled=isinstance(self.optimizer, torch.optim.AdamW)
                             or bool(group.get("decoupled_weight_decay")))
            else:
                fixed.update(momentum=group.get("momentum", 0.0), dampening=group.get("dampening", 0.0))
            hyper.append(entry)
            baked.append(fixed)
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if state and torch.is_tensor(state.get("step")) and state["step"].device != p.device:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        self._hyper, self._baked = hyper, baked

    @torch.no_grad()
    def _update(self) -> None:
        """Adam/AdamW or SGD, as torch computes it, with the learning rate and beta1 read from tensors:
        foreach kernels whose scalars are tensors or constants, no value read back to the host.

        An ensemble's members may each have their own learning rate (``plan.member_lr``, (K,) factors
        over the group's rate): wherever torch's update uses the rate, member k's slice of each tensor
        uses rate x factor k. That is the eager step's ``_scale_updates`` (each member's update scaled)
        exactly, without its copy of every parameter."""
        for group, (_, lr, *beta), fixed in zip(self.optimizer.param_groups, self._hyper, self._baked):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            state = [self._state_of(p) for p in params]
            wd = fixed["weight_decay"]
            rates = self._member_rates(params, lr)  # None: one rate for the whole group
            if self._adam():
                beta1, beta2 = beta[1], fixed["beta2"]
                m, v, steps = ([s[k] for s in state] for k in ("exp_avg", "exp_avg_sq", "step"))
                torch._foreach_add_(steps, 1.0)
                if wd and fixed["decoupled"] and rates is not None:  # p *= 1 - rate x wd, each member its rate
                    torch._foreach_mul_(params, torch._foreach_add(torch._foreach_mul(rates, -wd), 1.0))
                elif wd and fixed["decoupled"]:
                    torch._foreach_mul_(params, 1 - lr * wd)
                elif wd:
                    grads = torch._foreach_add(grads, params, alpha=wd)
                torch._foreach_mul_(m, beta1)  # m = beta1 m + (1 - beta1) g: torch's lerp, in tensor scalars
                torch._foreach_add_(m, torch._foreach_mul(grads, 1 - beta1))
                torch._foreach_mul_(v, beta2)
                torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
                step = steps[0]  # the group's parameters step together
                denom = torch._foreach_sqrt(v)
                torch._foreach_div_(denom, (1 - beta2 ** step).sqrt())
                torch._foreach_add_(denom, fixed["eps"])
                update = torch._foreach_div(m, denom)
                if rates is None:
                    torch._foreach_mul_(update, lr / (1 - beta1 ** step))
                else:  # each member's step size: its rate over the bias correction
                    torch._foreach_mul_(update, torch._foreach_div(rates, 1 - beta1 ** step))
                torch._foreach_sub_(params, update)
            else:
                if wd:
                    grads = torch._foreach_add(grads, params, alpha=wd)
                if fixed["momentum"]:
                    if any(s.get("momentum_buffer") is None for s in state):  # the first step: torch's clone
                        for st, g in zip(state, grads):
                            st["momentum_buffer"] = g.detach().clone()
                    else:
                        bufs = [st["momentum_buffer"] for st in state]
                        torch._foreach_mul_(bufs, fixed["momentum"])
                        torch._foreach_add_(bufs, grads, alpha=1 - fixed["dampening"])
                    grads = [st["momentum_buffer"] for st in state]
                torch._foreach_sub_(params, torch._foreach_mul(grads, lr if rates is None else rates))

    def _member_rates(self, params, lr):
        """Each parameter's learning rate as a tensor along its member axis, (K, 1, ...): the group's rate
        times ``plan.member_lr``; None when every member has the group's rate. Views and one small kernel:
        nothing of a parameter's size is copied."""
        factors = getattr(self.plan, "member_lr", None)
        if factors is None:
            return None
        return torch._foreach_mul([factors.view(-1, *[1] * (p.dim() - 1)) for p in params], lr)

    def _state_of(self, p) -> dict:
        """The optimizer's state of ``p``, made as torch makes it on a first step (outside any capture:
        the warm-up steps come first)."""
        state = self.optimizer.state[p]
        if self._adam() and not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _refill(self) -> bool:
        """Write a changed learning rate (or beta1) into the tensor the graph reads: a fill_, no sync.
        True when a value the capture fixed has changed: the step then stays eager for the run."""
        for group, entry, fixed in zip(self.optimizer.param_groups, self._hyper, self._baked):
            if group["lr"] != entry[0]:
                entry[1].fill_(group["lr"])
                entry[0] = group["lr"]
            if len(entry) > 2:
                beta1, beta2 = group["betas"]
                if beta1 != entry[2]:
                    entry[3].fill_(beta1)
                    entry[2] = beta1
                if beta2 != fixed["beta2"]:
                    return self._fixed_changed("Adam's beta2")
            elif group.get("momentum", 0.0) != fixed["momentum"]:
                return self._fixed_changed("SGD's momentum")
            if group.get("weight_decay", 0.0) != fixed["weight_decay"]:
                return self._fixed_changed("the weight decay")
        return False

    def _fixed_changed(self, what: str) -> bool:
        self.failed = f"the schedule changes {what}, which a captured step holds fixed"
        self.log(f"training step: eager from here on, not a CUDA graph ({self.failed})")
        self.invalidate()
        return True

    def _stale(self) -> bool:
        """The optimizer's state was replaced (a resume or rollback loaded it) or a group was added."""
        return self.optimizer.state is not self._state or len(self.optimizer.param_groups) != self._groups

    def _params(self) -> list:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def _out_of_memory(exc: BaseException | None):
    """The out-of-memory error behind ``exc``, if any: an allocation that fails inside a capture may
    surface as the error of ending the capture, with the out-of-memory error as its context."""
    from nnfit import devices

    seen = 0
    while exc is not None and seen < 5:
        if devices.is_out_of_memory(exc):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


class GraphedClosure:
    """L-BFGS's closure as a CUDA graph: forward, loss and backward over the whole (static) training
    set, the same shapes on every call. ``closure()`` replays it and returns the static loss tensor;
    the gradients are the graph's, in ``.grad``, where L-BFGS reads them."""

    def __init__(self, model, X, Y, grad_clip, params, device, log=print, graph_factory=None, loss=F.mse_loss):
        self.model, self.X, self.Y, self.grad_clip, self.loss_fn = model, X, Y, grad_clip, loss
        self.params = list(params)
        self.device = device
        self.log = log
        self.graph_factory = graph_factory or CudaGraph
        self.graph = None
        self.loss = None
        self.key = self._key()

    def _key(self):
        return (self.X.data_ptr(), len(self.X), tuple((id(p), p.requires_grad) for p in self.params))

    def matches(self, X, params) -> bool:
        return self.X is X and [id(p) for p in params] == [id(p) for p in self.params] and self._key() == self.key

    def _body(self):
        for p in self.params:  # Python only: the backward writes fresh gradients
            p.grad = None
        loss = self.loss_fn(self.model(self.X), self.Y)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        return loss.detach()

    def capture(self, zero_grad) -> None:
        started = time.perf_counter()
        graph = self.graph_factory(self.device)
        zero_grad()
        graph.warm(self._body)  # no parameter moves: a warm-up computes a loss and gradients, no step
        zero_grad()
        out = graph.capture(self._body)
        self.graph, self.loss = graph, out
        seconds = time.perf_counter() - started
        self.log(f"L-BFGS closure captured as a CUDA graph ({len(self.X)} rows) in {seconds * 1000:.0f} ms")

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return _static(self.loss)
