"""The captured training step (nnfit.graphed): its plumbing on the CPU through the EagerGraph stand-in,
and on a GPU (marker ``cuda``) that the CUDA graph gives the eager step's numbers."""

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nnfit import graphed
from nnfit.model import MLP, StackedMLP

pytestmark = pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")  # the graph steps without optimizer.step()
cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _plan(device="cpu", amp=None, micro=None):
    return SimpleNamespace(device=torch.device(device), amp=amp, micro=micro, ddp=False, scaler=None)


def _config(grad_clip=None, cuda_graph="auto"):
    return SimpleNamespace(grad_clip=grad_clip, cuda_graph=cuda_graph)


def _eager(model, optimizer, plan, grad_clip=None):
    """The ordinary step, written out: what the graph must reproduce."""
    def step(xb, yb):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(plan.device.type, dtype=plan.amp, enabled=plan.amp is not None):
            out = model(xb)
        loss = F.mse_loss(out.to(yb.dtype), yb)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip,
                                           foreach=True)
        optimizer.step()
        return loss.detach()
    step.calls = 0

    def counted(xb, yb):
        counted.calls += 1
        return step(xb, yb)
    counted.calls = 0
    return counted


def _pair(kind="adam", device="cpu", seed=0, **opt):
    """Two identical models and optimizers: one for the eager step, one for the graphed step."""
    out = []
    for _ in range(2):
        torch.manual_seed(seed)
        model = MLP(2, 1, (16, 16), "tanh").to(device)
        if kind == "sgd":  # the optimizers as train.make_optimizer makes them
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, foreach=True,
                                        **opt)
        else:
            cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
            optimizer = cls(model.parameters(), lr=3e-3, weight_decay=1e-2 if kind == "adamw" else 1e-4, fused=True,
                            **opt)
        out.append((model, optimizer))
    return out


def _data(n=100, device="cpu"):
    g = torch.Generator().manual_seed(1)
    X = torch.rand(n, 2, generator=g)
    Y = (X[:, :1] * X[:, 1:]).sin()
    return X.to(device), Y.to(device)


def _batches(X, Y, size):
    return [(X[i:i + size], Y[i:i + size]) for i in range(0, len(X), size)]


def _assert_same(m1, m2, **tol):
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tol)


def _train_both(kind, epochs=3, size=32, schedule=True, grad_clip=None, device="cpu", factory=graphed.EagerGraph,
                plan=None, **opt):
    (m1, o1), (m2, o2) = _pair(kind, device, **opt)
    plan = plan or _plan(device)
    eager1 = _eager(m1, o1, plan, grad_clip)
    eager2 = _eager(m2, o2, plan, grad_clip)
    logs = []
    step = graphed.GraphedStep(m2, o2, plan, _config(grad_clip), eager2, log=logs.append, graph_factory=factory)
    scheds = []
    if schedule:  # OneCycleLR changes the learning rate and, for Adam, beta1 at every step
        n = epochs * -(-100 // size)
        scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=n,
                                                      cycle_momentum=kind != "sgd") for o in (o1, o2)]
    X, Y = _data(device=device)
    lrs, losses = [], []
    for _ in range(epochs):
        for xb, yb in _batches(X, Y, size):
            l1, l2 = eager1(xb, yb), step(xb, yb)
            losses.append((float(l1), float(l2)))
            for s in scheds:
                s.step()
            lrs.append(o2.param_groups[0]["lr"])
    return SimpleNamespace(m1=m1, m2=m2, o2=o2, step=step, eager=eager2, logs=logs, lrs=lrs, losses=losses)


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_the_replayed_step_gives_the_eager_steps_numbers_with_a_schedule_and_a_ragged_batch(kind):
    r = _train_both(kind, epochs=3, size=32)  # 100 rows: 3 full batches and a ragged one of 4 per epoch
    assert max(r.lrs) > 5 * min(r.lrs)  # the schedule did move the learning rate the graph reads
    _assert_same(r.m1, r.m2, rtol=1e-4, atol=1e-5)
    for l1, l2 in r.losses:
        assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-6)
    graph = r.step.graph
    assert graph.captures == 1
    # 12 steps: 3 warm-up steps and 3 ragged ones run unreplayed (with the graph's math), 6 are replays
    assert graph.replays == 6 and r.eager.calls == 0
    assert r.logs and "captured as a CUDA graph (batch 32)" in r.logs[0]


def test_a_schedule_that_was_not_followed_would_be_seen():
    """The proof above has teeth: a graph that kept the capture's learning rate gives other weights."""
    r = _train_both("adam", epochs=3, size=32)
    (m1, o1), (m2, o2) = _pair("adam")
    plan = _plan()
    step = graphed.GraphedStep(m2, o2, plan, _config(), _eager(m2, o2, plan), log=lambda m: None,
                               graph_factory=graphed.EagerGraph)
    step._refill = lambda: False
    sched = torch.optim.lr_scheduler.OneCycleLR(o2, max_lr=0.05, total_steps=12)
    X, Y = _data()
    for _ in range(3):
        for xb, yb in _batches(X, Y, 32):
            step(xb, yb)
            sched.step()
    with pytest.raises(AssertionError):
        _assert_same(r.m1, m2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[cuda, needs_gpu])])
def test_a_restart_mid_run_gives_the_same_weights_bit_for_bit(device):
    """What exact resume needs: a resumed process warms up and captures again at another step, and
    the weights do not depend on where that happened (warm-up, ragged and replayed steps: one math)."""
    import copy

    factory = graphed.EagerGraph if device == "cpu" else graphed.CudaGraph
    X, Y = _data(device=device)
    batches = _batches(X, Y, 16) * 3  # 100 rows: 6 batches of 16 and one of 4, three epochs

    def run(restart_at):
        (model, opt), _ = _pair("adam", device)
        plan = _plan(device)
        make = lambda: graphed.GraphedStep(model, opt, plan, _config(0.5), _eager(model, opt, plan),  # noqa: E731
                                           log=lambda m: None, graph_factory=factory)
        step = make()
        for k, (xb, yb) in enumerate(batches):
            if k == restart_at:  # the resumed process: the optimizer's state loaded, a new step
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
                step = make()
            frac = k / len(batches)
            for g in opt.param_groups:  # a schedule of the learning rate and beta1
                g["lr"], g["betas"] = 1e-2 * (1 - frac), (0.95 - 0.1 * frac, 0.999)
            step(xb, yb)
        return [p.detach().clone() for p in model.parameters()], step

    straight, s1 = run(None)
    resumed, s2 = run(9)
    assert s1.captures and s2.captures
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_buffers_are_refilled_for_each_batch():
    (m, o), _ = _pair()
    plan = _plan()
    seen = []
    step = graphed.GraphedStep(m, o, plan, _config(), _eager(m, o, plan), log=lambda s: None,
                               graph_factory=graphed.EagerGraph)
    body = step._body

    def watching(X, Y, update):
        seen.append(X.clone())
        return body(X, Y, update)
    step._body = watching
    X, Y = _data()
    batches = _batches(X[:96], Y[:96], 16)
    for xb, yb in batches:
        step(xb, yb)
    # the 3 warm-up steps read the batch itself; every replay reads the static buffer, refilled with its batch
    assert len(seen) == len(batches)
    for got, (xb, _) in zip(seen, batches):
        assert torch.equal(got, xb)
    assert step.x is not batches[-1][0] and torch.equal(step.x, batches[-1][0])


def test_a_new_parameter_group_a_new_batch_size_or_a_loaded_state_capture_again():
    torch.manual_seed(0)
    model = MLP(2, 1, (8,), "tanh")
    first = [p for n, p in model.named_parameters() if n.startswith("l1")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("l1")]
    for p in rest:
        p.requires_grad_(False)
    o = torch.optim.Adam(first, lr=1e-2, foreach=False)
    plan = _plan()
    step = graphed.GraphedStep(model, o, plan, _config(), _eager(model, o, plan), log=lambda s: None,
                               graph_factory=graphed.EagerGraph)
    X, Y = _data(64)
    run = lambda k: [step(X[i:i + 16], Y[i:i + 16]) for i in range(0, 16 * k, 16)]  # noqa: E731
    run(4)
    assert len(step.captures) == 1
    # --unfreeze-at: the trainable set grows by a parameter group
    for p in rest:
        p.requires_grad_(True)
    o.add_param_group({"params": rest, "lr": 1e-2})
    before = [p.detach().clone() for p in rest]
    run(4)
    assert len(step.captures) == 2
    assert all(not torch.equal(a, p) for a, p in zip(before, rest))  # the new group trains in the new graph
    # out-of-memory halving: chunks of 8 rows make a new capture
    plan.micro = 8
    run(4)
    assert [c["micro"] for c in step.captures] == [None, None, 8]
    # a resume or rollback loads the optimizer's state: the graph's state tensors are no longer the optimizer's
    o.load_state_dict(o.state_dict())
    run(4)
    assert len(step.captures) == 4
    step.invalidate()
    run(4)
    assert len(step.captures) == 5


def test_micro_batches_accumulate_to_the_whole_batchs_step():
    plan_whole, plan_chunks = _plan(), _plan(micro=8)
    (m1, o1), (m2, o2) = _pair("sgd")
    s1 = graphed.GraphedStep(m1, o1, plan_whole, _config(), _eager(m1, o1, plan_whole), log=lambda s: None,
                             graph_factory=graphed.EagerGraph)
    s2 = graphed.GraphedStep(m2, o2, plan_chunks, _config(), _eager(m2, o2, plan_chunks), log=lambda s: None,
                             graph_factory=graphed.EagerGraph)
    X, Y = _data(96)
    for _ in range(3):
        for xb, yb in _batches(X, Y, 32):
            s1(xb, yb), s2(xb, yb)
    assert s2.captures and s2.captures[0]["micro"] == 8
    _assert_same(m1, m2, rtol=1e-4, atol=1e-5)


def test_grad_clip_is_inside_the_graph():
    r = _train_both("adam", epochs=2, size=32, grad_clip=0.01)
    _assert_same(r.m1, r.m2, rtol=1e-4, atol=1e-5)
    unclipped = _train_both("adam", epochs=2, size=32)
    with pytest.raises(AssertionError):
        _assert_same(r.m2, unclipped.m2, rtol=1e-4, atol=1e-5)


def test_a_failed_capture_falls_back_to_eager_and_says_so_once():
    class Broken(graphed.EagerGraph):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    r = _train_both("adam", epochs=2, size=32, factory=Broken)
    _assert_same(r.m1, r.m2, rtol=1e-4, atol=1e-5)
    eager_lines = [m for m in r.logs if "eager" in m]
    assert eager_lines == ["training step: eager, not a CUDA graph (capture failed: operation not permitted when "
                           "stream is capturing)"]
    assert r.step.graph is None


def test_a_schedule_that_changes_sgd_momentum_leaves_the_graph_with_a_reason():
    (m1, o1), (m2, o2) = _pair("sgd")
    plan = _plan()
    logs = []
    step = graphed.GraphedStep(m2, o2, plan, _config(), _eager(m2, o2, plan), log=logs.append,
                               graph_factory=graphed.EagerGraph)
    eager = _eager(m1, o1, plan)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12) for o in (o1, o2)]
    X, Y = _data()
    for _ in range(3):
        for xb, yb in _batches(X, Y, 32):
            eager(xb, yb), step(xb, yb)
            for s in scheds:
                s.step()
    assert any("SGD's momentum" in m for m in logs)
    assert step.failed and step.graph is None
    _assert_same(m1, m2, rtol=1e-4, atol=1e-5)


def test_why_eager_names_each_reason():
    model, opt = _pair()[0]
    config = _config()
    assert graphed.why_eager(opt, _plan("cpu"), config) == "not on CUDA"
    gpu = _plan("cuda")
    assert graphed.why_eager(opt, gpu, config) is None
    assert "--cuda-graph off" in graphed.why_eager(opt, gpu, _config(cuda_graph="off"))
    assert "DDP" in graphed.why_eager(opt, SimpleNamespace(**{**vars(gpu), "ddp": True}), config)
    assert "16-mixed" in graphed.why_eager(opt, SimpleNamespace(**{**vars(gpu), "scaler": object()}), config)
    lbfgs = torch.optim.LBFGS(model.parameters())
    assert "L-BFGS" in graphed.why_eager(lbfgs, gpu, config)


def test_an_optimizer_setting_outside_the_captured_update_keeps_the_step_eager():
    model = MLP(2, 1, (8,), "tanh")
    gpu = _plan("cuda")
    assert "amsgrad" in graphed.why_eager(torch.optim.Adam(model.parameters(), amsgrad=True), gpu, _config())
    assert "nesterov" in graphed.why_eager(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True),
                                           gpu, _config())


def _eager_closure(model, optimizer, X, Y):
    """torch's usual L-BFGS closure: the reference a captured closure must replay."""
    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        return loss

    return closure


def test_the_lbfgs_closure_replays_the_eager_closures_loss_and_gradients():
    (m1, _), (m2, _) = _pair()
    X, Y = _data()
    params = list(m2.parameters())
    closure = graphed.GraphedClosure(m2, X, Y, None, params, torch.device("cpu"), log=lambda s: None,
                                     graph_factory=graphed.EagerGraph)
    closure.capture(lambda: [setattr(p, "grad", None) for p in params])
    o1 = torch.optim.LBFGS(m1.parameters(), lr=1, max_iter=5, line_search_fn="strong_wolfe")
    o2 = torch.optim.LBFGS(params, lr=1, max_iter=5, line_search_fn="strong_wolfe")

    eager = _eager_closure(m1, o1, X, Y)
    for _ in range(3):
        o1.step(eager)
        o2.step(closure)
    _assert_same(m1, m2, rtol=1e-4, atol=1e-5)
    assert closure.graph.captures == 1 and closure.graph.replays > 3
    assert closure.matches(X, params)
    params[0].requires_grad_(False)
    assert not closure.matches(X, params)


# On a GPU.

def _cuda_pair_run(kind, **kw):
    return _train_both(kind, device="cuda", factory=graphed.CudaGraph, **kw)


@cuda
@needs_gpu
@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_cuda_graph_gives_the_eager_steps_numbers(kind):
    r = _cuda_pair_run(kind, epochs=3, size=32)
    assert r.step.graph is not None and r.step.failed is None, r.logs
    # the capture runs foreach+capturable Adam (fused SGD); the eager step the run's own kernels: rounding differs
    _assert_same(r.m1, r.m2, rtol=1e-4, atol=1e-5)
    assert len(r.step.captures) == 1


@cuda
@needs_gpu
def test_cuda_graph_with_grad_clip_and_bf16():
    plan = _plan("cuda", amp=torch.bfloat16)
    r = _cuda_pair_run("adam", epochs=2, size=32, grad_clip=0.05, plan=plan)
    assert r.step.failed is None, r.logs
    _assert_same(r.m1, r.m2, rtol=2e-2, atol=2e-3)


@cuda
@needs_gpu
def test_cuda_graph_recaptures_after_an_unfreeze_and_at_a_halved_batch():
    torch.manual_seed(0)
    model = MLP(2, 1, (8, 8), "tanh").cuda()
    first = [p for n, p in model.named_parameters() if n.startswith("l1")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("l1")]
    for p in rest:
        p.requires_grad_(False)
    o = torch.optim.Adam(first, lr=1e-2, fused=True)
    plan = _plan("cuda")
    step = graphed.GraphedStep(model, o, plan, _config(), _eager(model, o, plan), log=lambda s: None)
    X, Y = _data(64, "cuda")
    for i in range(0, 64, 16):
        step(X[i:i + 16], Y[i:i + 16])
    frozen = [p.detach().clone() for p in rest]
    for i in range(0, 64, 16):
        step(X[i:i + 16], Y[i:i + 16])
    assert all(torch.equal(a, p) for a, p in zip(frozen, rest))  # frozen tensors stay bit-identical in the graph
    for p in rest:
        p.requires_grad_(True)
    o.add_param_group({"params": rest, "lr": 1e-2})
    plan.micro = 8
    for i in range(0, 64, 16):
        step(X[i:i + 16], Y[i:i + 16])
    for i in range(0, 64, 16):
        step(X[i:i + 16], Y[i:i + 16])
    assert [c["micro"] for c in step.captures] == [None, 8]
    assert all(not torch.equal(a, p) for a, p in zip(frozen, rest))


@cuda
@needs_gpu
def test_cuda_lbfgs_closure_graph_matches_eager():
    (m1, _), (m2, _) = _pair(device="cuda")
    X, Y = _data(device="cuda")
    params = list(m2.parameters())
    o1 = torch.optim.LBFGS(m1.parameters(), lr=1, max_iter=5, line_search_fn="strong_wolfe")
    o2 = torch.optim.LBFGS(params, lr=1, max_iter=5, line_search_fn="strong_wolfe")
    closure = graphed.GraphedClosure(m2, X, Y, None, params, torch.device("cuda"), log=lambda s: None)
    closure.capture(lambda: o2.zero_grad(set_to_none=True))

    eager = _eager_closure(m1, o1, X, Y)
    for _ in range(3):
        o1.step(eager)
        o2.step(closure)
    _assert_same(m1, m2, rtol=1e-4, atol=1e-5)


# The whole loop with the graphed step, on the CPU: the stand-in takes the place of the CUDA graph.

@pytest.fixture
def graphed_on_cpu(monkeypatch):
    """make_step chooses the graphed step on the CPU too, with EagerGraph for torch.cuda.CUDAGraph."""
    real = graphed.why_eager

    def why(optimizer, plan, config):
        reason = real(optimizer, SimpleNamespace(**{**vars(plan), "device": torch.device("cuda")}), config)
        return reason
    monkeypatch.setattr(graphed, "why_eager", why)
    monkeypatch.setattr(graphed, "CudaGraph", graphed.EagerGraph)


def _weights(run):
    from safetensors.torch import load_file

    return {k: v.numpy().tobytes() for k, v in load_file(run / "model.safetensors").items()}


RESUMABLE = {
    # 360 training rows in batches of 32: the last one of 8 rows (ragged); onecycle moves lr and beta1
    "adam-onecycle": ["--optimizer", "adam", "--epochs", "4", "--batch-size", "32", "--grad-clip", "1",
                      "--checkpoint-every", "5"],
    # an unfreeze adds a parameter group in epoch 2: a new capture
    "sgd-cosine-unfreeze": ["--optimizer", "sgd", "--schedule", "cosine", "--epochs", "4", "--batch-size", "48",
                            "--freeze", "l1", "--unfreeze-at", "2:l1", "--checkpoint-every", "4"],
    # three members, each its own order; (K, 32, 1) batches, the last of each epoch (K, 8, 1)
    "adam-ensemble": ["--optimizer", "adam", "--ensemble", "3", "--hidden", "16,16", "--epochs", "3",
                      "--batch-size", "32", "--grad-clip", "1", "--checkpoint-every", "5"],
}


@pytest.mark.parametrize("recipe", list(RESUMABLE))
def test_the_loop_with_the_graphed_step_resumes_to_identical_weights(graphed_on_cpu, recipe, tmp_path, monkeypatch,
                                                                   capsys):
    from nnfit import devices
    from nnfit.cli import main

    args = ["train", "--samples", "400", "--seed", "3", "--no-plots", *RESUMABLE[recipe]]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"training step captured as a CUDA graph \(batch (32|48)[,)]", err), err
    if recipe == "adam-ensemble":
        assert "(batch 32, 3 ensemble members)" in err, err
    if recipe == "sgd-cosine-unfreeze":
        assert err.count("training step captured as a CUDA graph") == 2, err  # before and after the unfreeze

    class Killed(BaseException):
        pass

    monkeypatch.setenv("NNFIT_FAULT", "kill-at-step:17")
    monkeypatch.setattr(devices, "kill_self", lambda: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        main([*args, "--quiet", "--out", str(tmp_path / "killed")])
    monkeypatch.delenv("NNFIT_FAULT")
    assert main(["resume", str(tmp_path / "killed"), "--quiet"]) == 0
    assert _weights(tmp_path / "killed") == _weights(tmp_path / "straight")


def test_the_loop_with_the_graphed_step_learns_as_the_eager_loop_does(graphed_on_cpu, capsys):
    import nnfit

    common = dict(formula="x**2 + x", domain={"x": (0, 1)}, samples=400, optimizer="adam", batch_size=32, epochs=6,
                  plots=False, seed=3)
    graph = nnfit.fit(**common)
    err = capsys.readouterr().err
    assert "captured as a CUDA graph" in err
    eager = nnfit.fit(**common, cuda_graph="off")
    err = capsys.readouterr().err
    assert "captured as a CUDA graph" not in err
    a, b = graph.summary["test"]["mse"], eager.summary["test"]["mse"]
    assert a < 1e-2 and a == pytest.approx(b, rel=0.05)  # the same math; fused and foreach kernels round apart
    assert [r["lr"] for r in graph.history] == [r["lr"] for r in eager.history]


@cuda
@needs_gpu
@pytest.mark.parametrize("settings", [
    dict(optimizer="adam", batch_size=32, epochs=6),  # onecycle: lr and beta1 change every step
    dict(optimizer="adamw", batch_size=48, epochs=5, precision="bf16", grad_clip=1.0),
    dict(optimizer="sgd", schedule="cosine", batch_size=48, epochs=5, freeze=("l1",), unfreeze_at=((2, "l1"),)),
])
def test_cuda_fit_with_the_captured_step_learns_as_the_eager_one(settings, capsys):
    import nnfit

    common = dict(formula="x**2 + x", domain={"x": (0, 1)}, samples=400, plots=False, seed=3, device="cuda",
                  **settings)
    graph = nnfit.fit(**common)
    err = capsys.readouterr().err
    assert "training step captured as a CUDA graph" in err, err
    eager = nnfit.fit(**common, cuda_graph="off")
    err = capsys.readouterr().err
    assert "eager, not a CUDA graph (--cuda-graph off)" in err and "captured" not in err, err
    a, b = graph.summary["test"]["mse"], eager.summary["test"]["mse"]
    assert a == pytest.approx(b, rel=0.2), (a, b)
    if "unfreeze_at" in settings:
        assert graph.summary.get("frozen") is None


def test_an_out_of_memory_error_in_a_capture_is_raised_for_the_loop_to_halve_the_batch():
    class OutOfMemoryInCapture(graphed.EagerGraph):
        def capture(self, fn):
            try:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            except torch.cuda.OutOfMemoryError:  # what ending a broken capture raises, over the real cause
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    (m, o), _ = _pair()
    plan = _plan()
    step = graphed.GraphedStep(m, o, plan, _config(), _eager(m, o, plan), log=lambda s: None,
                               graph_factory=OutOfMemoryInCapture)
    X, Y = _data(64)
    for i in range(3):
        step(X[16 * i:16 * i + 16], Y[16 * i:16 * i + 16])
    with pytest.raises(torch.cuda.OutOfMemoryError):
        step(X[48:], Y[48:])
    assert step.failed is None and step.graph is None  # the next call warms up and captures again


def test_the_gpu_benchmark_without_a_gpu_says_so_and_exits_cleanly():
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, on any machine
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU here" in proc.stdout and "--quick --device cpu" in proc.stdout


def test_a_tiny_lbfgs_run_on_cuda_gets_a_hint_and_a_larger_one_does_not():
    from nnfit.train import Recipe, _lbfgs_hint

    lbfgs = Recipe("lbfgs", 1.0, 800, 200, "none", 10)
    gpu = torch.device("cuda", 0)
    hint = _lbfgs_hint(lbfgs, 800, 10401, gpu)  # the tutorial's exercise
    assert hint and "800 rows x 10,401 parameters" in hint and "--device cpu" in hint
    assert _lbfgs_hint(lbfgs, 800, 10401, torch.device("cpu")) is None
    assert _lbfgs_hint(lbfgs, 100_000, 10401, gpu) is None
    assert _lbfgs_hint(Recipe("adam", 1e-3, 32, 10, "onecycle", 20), 800, 10401, gpu) is None


# Ensembles (K > 1): the stacked step captured, against the run's own eager step (train.EagerStep).

K = 3


def _stacked_run(kind, graph: bool, grad_clip=None, member_lr=None, micro=None, unfreeze_after=None, epochs=3,
                 size=32, device="cpu"):
    """Train a StackedMLP of K members with the loop's pieces (make_optimizer, Schedule, StepPlan) for
    ``epochs`` over 100 rows, each member in its own order: the eager step, or the graphed one on the
    stand-in (on CUDA: the real graph). ``unfreeze_after``: l1 starts frozen and joins as a new parameter group after that many
    steps, as --unfreeze-at does. Returns the model, the (K,) losses of every step and the step."""
    from nnfit import devices
    from nnfit import train as T

    dev = torch.device(device)
    model = StackedMLP(K, 2, 1, (16, 16), "tanh").init_members(range(K)).to(dev)
    if unfreeze_after is not None:
        model.l1.weight.requires_grad_(False), model.l1.bias.requires_grad_(False)
    lr = 0.05 if kind == "sgd" else 3e-3
    recipe = T.Recipe(kind, lr, size, epochs, "cosine" if kind == "sgd" else "onecycle", 20)
    settings = SimpleNamespace(momentum=0.9, weight_decay=1e-2 if kind == "adamw" else 1e-4)
    optimizer = T.make_optimizer([p for p in model.parameters() if p.requires_grad], recipe, settings)
    plan = T.StepPlan(devices.Context(device=dev), dev, devices.MemoryGuard(1, lambda m: None), micro=micro,
                      members=K, member_lr=None if member_lr is None else torch.tensor(member_lr, device=dev))
    eager = T.EagerStep(model, optimizer, plan, grad_clip)
    logs = []
    step = graphed.GraphedStep(model, optimizer, plan, _config(grad_clip), eager, log=logs.append,
                               graph_factory=graphed.EagerGraph if device == "cpu" else graphed.CudaGraph,
                               loss=T._mse) if graph else eager
    X, Y = _data(device=device)
    g = torch.Generator().manual_seed(2)
    schedule = T.Schedule.of(recipe, -(-100 // size))
    losses, count = [], 0
    for _ in range(epochs):
        perm = torch.stack([torch.randperm(100, generator=g) for _ in range(K)]).to(dev)  # each member its order
        Xe, Ye = X[perm], Y[perm]
        for i in range(0, 100, size):
            if count == unfreeze_after:
                model.l1.weight.requires_grad_(True), model.l1.bias.requires_grad_(True)
                T._add_group(optimizer, {"params": [model.l1.weight, model.l1.bias], "lr": lr}, recipe)
            schedule.apply(optimizer, count)
            loss = step(Xe[:, i:i + size], Ye[:, i:i + size])
            assert loss.shape == (K,)
            losses.append(loss.clone())
            count += 1
    return SimpleNamespace(model=model, losses=losses, step=step, logs=logs)


def _stacked_close(a, b):
    _assert_same(a.model, b.model, rtol=1e-4, atol=1e-5)
    for la, lb in zip(a.losses, b.losses):
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind, grad_clip, member_lr", [
    ("adam", None, None),
    ("adam", 0.05, (1.0, 0.25, 3.0)),
    ("adamw", 0.05, (1.0, 0.25, 3.0)),
    ("sgd", None, (0.5, 1.0, 2.0)),
])
def test_the_replayed_ensemble_step_gives_the_eager_steps_numbers(kind, grad_clip, member_lr):
    """K = 3 members, each its own data order, 100 rows in batches of 32 (a ragged last batch of 4 per
    epoch), a schedule moving the rate (and Adam's beta1), per-member rates and clipping: the graphed
    step's (K,) losses and weights are the eager step's."""
    eager = _stacked_run(kind, False, grad_clip, member_lr)
    replayed = _stacked_run(kind, True, grad_clip, member_lr)
    _stacked_close(eager, replayed)
    graph = replayed.step.graph
    assert replayed.step.failed is None and graph.captures == 1
    assert graph.replays == 6  # 12 steps: 3 warm-up and 3 ragged run unreplayed (the graph's math), 6 replays
    assert replayed.logs == [m for m in replayed.logs if "(batch 32, 3 ensemble members)" in m]


def test_member_rates_and_clipping_in_the_ensemble_graph_have_teeth():
    """The comparisons above would see a graph that ignored the members' rates or the clipping."""
    base = _stacked_run("adam", True)
    rated = _stacked_run("adam", True, member_lr=(1.0, 0.25, 3.0))
    clipped = _stacked_run("adam", True, grad_clip=0.05)
    for other in (rated, clipped):
        with pytest.raises(AssertionError):
            _assert_same(base.model, other.model, rtol=1e-4, atol=1e-5)
    # member 0's rate is the group's: its weights are the same as without per-member rates
    for name, p in base.model.named_parameters():
        torch.testing.assert_close(p[0], dict(rated.model.named_parameters())[name][0], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(p[1], dict(rated.model.named_parameters())[name][1])


def test_the_ensemble_graph_captures_again_after_an_unfreeze_and_matches_eager():
    eager = _stacked_run("adam", False, member_lr=(1.0, 0.5, 2.0), unfreeze_after=5)
    replayed = _stacked_run("adam", True, member_lr=(1.0, 0.5, 2.0), unfreeze_after=5)
    _stacked_close(eager, replayed)
    assert len(replayed.step.captures) == 2  # before and after the new parameter group
    start = StackedMLP(K, 2, 1, (16, 16), "tanh").init_members(range(K))
    assert not torch.equal(replayed.model.l1.weight, start.l1.weight)  # the unfrozen layer trained in the graph


def test_ensemble_micro_batches_in_the_graph_accumulate_to_the_whole_batchs_step():
    whole = _stacked_run("sgd", False, member_lr=(0.5, 1.0, 2.0))
    chunks = _stacked_run("sgd", True, member_lr=(0.5, 1.0, 2.0), micro=8)
    assert chunks.step.captures[0]["micro"] == 8
    _stacked_close(whole, chunks)


def test_why_eager_captures_an_ensemble_and_keeps_its_lbfgs_closure_apart():
    model = StackedMLP(8, 1, 1, (8,), "tanh")
    gpu = SimpleNamespace(**{**vars(_plan("cuda")), "members": 8})
    assert graphed.why_eager(torch.optim.Adam(model.parameters()), gpu, _config()) is None
    assert "L-BFGS" in graphed.why_eager(torch.optim.LBFGS(model.parameters()), gpu, _config())
    assert "DDP" in graphed.why_eager(torch.optim.Adam(model.parameters()),
                                      SimpleNamespace(**{**vars(gpu), "ddp": True}), _config())


def test_a_stacked_lbfgs_closure_replays_the_eager_closure():
    from nnfit.train import _mse

    models = [StackedMLP(K, 2, 1, (16,), "tanh").init_members(range(K)) for _ in range(2)]
    X, Y = _data()
    params = list(models[1].parameters())
    closure = graphed.GraphedClosure(models[1], X, Y, 0.5, params, torch.device("cpu"), log=lambda s: None,
                                     graph_factory=graphed.EagerGraph, loss=lambda out, Y: _mse(out, Y).sum())
    closure.capture(lambda: [setattr(p, "grad", None) for p in params])
    o1 = torch.optim.LBFGS(models[0].parameters(), lr=1, max_iter=5, line_search_fn="strong_wolfe")
    o2 = torch.optim.LBFGS(params, lr=1, max_iter=5, line_search_fn="strong_wolfe")

    def eager():
        o1.zero_grad()
        loss = _mse(models[0](X), Y).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(models[0].parameters()), 0.5, foreach=True)
        return loss

    for _ in range(3):
        o1.step(eager)
        o2.step(closure)
    _assert_same(models[0], models[1], rtol=1e-4, atol=1e-5)
    assert closure.graph.replays > 3


def test_the_loop_trains_an_ensemble_with_the_graphed_step_as_with_the_eager_one(graphed_on_cpu, capsys):
    """train() end to end with per-member rates: make_step picks the graphed step for K = 3, and the
    weights are those of the eager loop (--cuda-graph off)."""
    from nnfit.config import Config
    from nnfit.model import build_mlp
    from nnfit.progress import Reporter
    from nnfit.train import TrainData, train

    torch.manual_seed(0)
    x = torch.rand(150, 1)
    data = TrainData(x[:120], x[:120] ** 2 + x[:120], x[120:], x[120:] ** 2 + x[120:])
    config = Config(optimizer="adam", lr=3e-3, batch_size=32, epochs=3, schedule="onecycle", grad_clip=1.0,
                    ensemble=K, hidden=(16, 16), patience=100)
    lines = {}
    for mode in ("auto", "off"):
        logs = []
        reporter = Reporter(quiet=True)
        reporter.log = logs.append
        model = build_mlp(1, 1, config)
        train(model, data, config.replace(cuda_graph=mode), reporter, member_lrs=[3e-3, 1e-3, 1e-2])
        lines[mode] = (model, logs)
    (graph_model, graph_logs), (eager_model, eager_logs) = lines["auto"], lines["off"]
    assert any("captured as a CUDA graph (batch 32, 3 ensemble members)" in m for m in graph_logs), graph_logs
    assert not any("captured" in m for m in eager_logs)
    _assert_same(graph_model, eager_model, rtol=1e-4, atol=1e-5)


@cuda
@needs_gpu
@pytest.mark.parametrize("kind, grad_clip, member_lr", [("adam", 0.05, (1.0, 0.25, 3.0)), ("sgd", None, None)])
def test_cuda_ensemble_graph_gives_the_eager_steps_numbers(kind, grad_clip, member_lr):
    eager = _stacked_run(kind, False, grad_clip, member_lr, device="cuda")
    replayed = _stacked_run(kind, True, grad_clip, member_lr, device="cuda")
    assert replayed.step.failed is None and len(replayed.step.captures) == 1, replayed.logs
    _stacked_close(eager, replayed)


@cuda
@needs_gpu
def test_cuda_fit_of_an_ensemble_captures_its_step_and_learns_as_the_eager_one(capsys):
    import nnfit

    common = dict(formula="x**2 + x", domain={"x": (0, 1)}, samples=400, plots=False, seed=3, device="cuda",
                  optimizer="adam", batch_size=32, epochs=6, ensemble=4, hidden=(32, 32))
    graph = nnfit.fit(**common)
    err = capsys.readouterr().err
    assert "training step captured as a CUDA graph (batch 32, 4 ensemble members)" in err, err
    eager = nnfit.fit(**common, cuda_graph="off")
    a, b = graph.summary["test"]["mse"], eager.summary["test"]["mse"]
    assert a == pytest.approx(b, rel=0.2), (a, b)


def _train_ensemble(config, **kw):
    """train() of a K = 3 ensemble on 120 rows of x**2 + x (batches of 32: three and a ragged 24 per
    epoch); returns the model, the result and the run's log lines."""
    from nnfit.model import build_mlp
    from nnfit.progress import Reporter
    from nnfit.train import TrainData, train

    torch.manual_seed(0)
    x = torch.rand(150, 1)
    data = TrainData(x[:120], x[:120] ** 2 + x[:120], x[120:], x[120:] ** 2 + x[120:])
    logs = []
    reporter = Reporter(quiet=True)
    reporter.log = logs.append
    model = build_mlp(1, 1, config)
    result = train(model, data, config, reporter, **kw)
    return model, result, logs


def _ensemble_config(**kw):
    from nnfit.config import Config

    return Config(**{**dict(optimizer="adam", lr=3e-3, batch_size=32, epochs=3, schedule="onecycle", ensemble=K,
                            hidden=(16, 16), patience=100), **kw})


def test_an_out_of_memory_capture_of_an_ensemble_halves_the_batch_and_captures_again(graphed_on_cpu, monkeypatch):
    class OutOfMemoryOnce(graphed.EagerGraph):
        failed = []

        def capture(self, fn):
            if not self.failed:
                self.failed.append(1)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().capture(fn)

    monkeypatch.setattr(graphed, "CudaGraph", OutOfMemoryOnce)
    model, result, logs = _train_ensemble(_ensemble_config(), member_lrs=[3e-3, 1e-3, 1e-2])
    assert [(r["from"], r["to"]) for r in result.oom_retries] == [(32, 16)], result.oom_retries
    captured = [m for m in logs if "captured as a CUDA graph" in m]
    assert len(captured) == 1 and "(batch 32 in chunks of 16, 3 ensemble members)" in captured[0], logs
    eager, _, _ = _train_ensemble(_ensemble_config(cuda_graph="off"), member_lrs=[3e-3, 1e-3, 1e-2])
    _assert_same(model, eager, rtol=1e-4, atol=1e-5)  # chunks of 16 in the graph: the whole batch's steps


def test_a_rollback_in_an_ensemble_captures_the_step_again(graphed_on_cpu, monkeypatch):
    from nnfit import train as train_module

    real, calls = train_module.make_step, [0]

    def make_step(model, optimizer, plan, config):
        inner = real(model, optimizer, plan, config)
        assert isinstance(inner, graphed.GraphedStep)

        class Poisoned:
            invalidate = inner.invalidate

            def __call__(self, xb, yb):
                calls[0] += 1
                loss = inner(xb, yb)
                if calls[0] == 10:  # epoch 3's second step: inside the replayed graph's weights
                    with torch.no_grad():
                        model.l1.weight[1].fill_(float("nan"))  # member 1 only
                return loss

        return Poisoned()

    monkeypatch.setattr(train_module, "make_step", make_step)
    model, result, logs = _train_ensemble(_ensemble_config(epochs=4))
    assert result.rollbacks and result.rollbacks[0]["epoch"] == 3, logs
    captured = [m for m in logs if "captured as a CUDA graph (batch 32, 3 ensemble members)" in m]
    assert len(captured) == 2, logs  # the first capture, and one over the restored optimizer state
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert len(result.history) == 4
