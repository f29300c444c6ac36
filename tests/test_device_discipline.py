"""Device discipline without a GPU: training, resume, rollback, freezing, save/load and pickling on a
second device that CI's CPU machines have.

``Other`` is a tensor that claims to live on another device (it reports ``meta``) and computes on the
CPU underneath. Like CUDA it refuses an operation that mixes it with a CPU tensor (a CPU scalar, 0-d,
is allowed, as on CUDA); a copy between the devices is allowed. So a tensor kept on, or restored to,
the wrong device fails here as it fails on a GPU: each bug of that kind found on a GPU fails one of
these tests when it is put back (a restore that leaves the start or best weights on the CPU, a
snapshot compared across devices, a batch predicted on the CPU by a model on the device).
"""

import functools
import pickle

import numpy as np
import pytest
import torch
import torch.optim.optimizer as torch_optimizer
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import nnfit
from nnfit import devices, freeze
from nnfit.cli import main

# load_state_dict warns about copying into a "meta" parameter; the copy happens (Other.copy_ below).
pytestmark = pytest.mark.filterwarnings("ignore:.*to a meta parameter.*:UserWarning")
OTHER = torch.device("meta")  # the one device type torch lets a tensor claim without its runtime
_TO = {torch.ops.aten._to_copy.default, torch.ops.aten.to.device, torch.ops.aten.to.dtype_layout,
       torch.ops.aten.to.dtype, torch.ops.aten.to.other}
SMALL = dict(formula="x**2 + x", domain={"x": (0, 1)}, hidden=(8, 8), samples=200, test_samples=200, quiet=True,
             plots=False, device="other")


def _map(fn, x):
    """``fn`` over the tensors, devices and scalars in an operator's arguments (torch's pytree is 10x slower)."""
    if isinstance(x, (list, tuple)):
        return type(x)(_map(fn, v) for v in x)
    if isinstance(x, dict):
        return {k: _map(fn, v) for k, v in x.items()}
    return fn(x)


def _leaves(x):
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    elif isinstance(x, dict):
        yield from _leaves(list(x.values()))
    else:
        yield x


def _is_other(x) -> bool:
    return isinstance(x, torch.device) and x.type == OTHER.type


def _unwrap(t):
    return t.inner if isinstance(t, Other) else t


def _wrap(t):
    return Other(t) if type(t) is torch.Tensor else t


class Other(torch.Tensor):
    """A CPU tensor that says it is on the other device, and keeps to it as CUDA does."""

    @staticmethod
    def __new__(cls, inner):
        make = functools.partial(torch.Tensor._make_wrapper_subclass, cls, inner.size(), strides=inner.stride(),
                                 storage_offset=inner.storage_offset(), dtype=inner.dtype, device=OTHER,
                                 requires_grad=inner.requires_grad)
        if inner.is_inference() == torch.is_inference_mode_enabled():
            out = make()
        else:  # under inference_mode a view of a normal tensor is a normal tensor
            with torch.inference_mode(inner.is_inference()):
                out = make()
        out.inner = inner
        return out

    def tolist(self):
        return self.inner.tolist()

    def __repr__(self):
        return f"Other({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _TO:  # .to(): to the CPU leaves the device, anything else stays on it
            target = next((x if isinstance(x, torch.device) else x.device for x in [*args[1:], *kwargs.values()]
                           if isinstance(x, (torch.device, torch.Tensor))), None)
            out = func(*_map(_unwrap, args), **_map(_unwrap, kwargs))
            return out if target is not None and target.type == "cpu" else _wrap(out)
        if func is torch.ops.aten.copy_.default:  # copying between devices is allowed
            _unwrap(args[0]).copy_(_unwrap(args[1]))
            return args[0]
        if any(type(t) is torch.Tensor and t.dim() > 0 for t in _leaves([args, kwargs])):
            found = ", ".join(f"{t.device.type} {tuple(t.shape)}" for t in _leaves([args, kwargs])
                              if isinstance(t, torch.Tensor))
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{OTHER.type} and cpu! ({func}: {found})")
        return _map(_wrap, func(*_map(_unwrap, args), **_map(_unwrap, kwargs)))


class _Factories(TorchDispatchMode):
    """torch.zeros(..., device=OTHER), x.to(OTHER) and the like make ``Other`` tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(_is_other(x) for x in _leaves([args, kwargs])):
            return func(*args, **kwargs)
        to_cpu = lambda x: torch.device("cpu") if _is_other(x) else _unwrap(x)  # noqa: E731
        return _map(_wrap, func(*_map(to_cpu, args), **_map(to_cpu, kwargs)))


class _Literals(TorchFunctionMode):
    """torch.tensor(data, device=OTHER) builds a meta tensor without dispatching: build it on the CPU, move it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _is_other(torch.device(kwargs.get("device") or "cpu")):
            return func(*args, **{**kwargs, "device": "cpu"}).to(OTHER)
        return func(*args, **kwargs)


@pytest.fixture
def other(monkeypatch):
    """``device="other"`` trains, predicts and restores on the simulated device."""
    parse = devices.parse_device
    monkeypatch.setattr(devices, "parse_device", lambda spec: OTHER if spec == "other" else parse(spec))
    available = devices.available
    monkeypatch.setattr(devices, "available", lambda: [*available(), str(OTHER)])
    fused = torch_optimizer._get_fused_kernels_supported_devices  # fused Adam runs on the CPU underneath
    monkeypatch.setattr(torch_optimizer, "_get_fused_kernels_supported_devices", lambda: [*fused(), OTHER.type])
    with _Factories(), _Literals():
        yield


@pytest.fixture
def starts(monkeypatch):
    """Every start snapshot that movement is measured from, with the device of each parameter."""
    seen, movement = [], freeze.movement

    def spy(model, start):
        named = dict(freeze.unwrap(model).named_parameters())
        seen.append({n: (start[n].device, named[n].device) for n in named})
        return movement(model, start)

    monkeypatch.setattr(freeze, "movement", spy)
    return seen


def cpu_state(module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def on_other(module) -> bool:
    return all(p.device == OTHER for p in module.parameters())


def test_the_simulated_device_refuses_mixing_as_cuda_does(other):
    a = torch.ones(3, device=OTHER)
    assert isinstance(a, Other) and a.device == OTHER
    with pytest.raises(RuntimeError, match="same device"):
        a - torch.ones(3)
    assert float((a * torch.tensor(2.0)).sum()) == 6.0  # a CPU scalar is allowed, as on CUDA
    assert torch.equal(a.to("cpu"), torch.ones(3)) and type(a.to("cpu")) is torch.Tensor


@pytest.mark.parametrize("settings", [
    dict(optimizer="sgd", momentum=0.9, weight_decay=0.01, batch_size=32, freeze=["l1"], unfreeze_at={2: "l1"}),
    dict(optimizer="adamw", weight_decay=0.1, batch_size=32, freeze=["l1"], lr_for={"l2": 1e-2}),
    dict(optimizer="lbfgs", freeze=["l2.bias"], epochs=2),
])
def test_training_with_freezing_stays_on_the_device(other, starts, settings):
    fitted = nnfit.fit(**{"epochs": 3, **SMALL, **settings})
    assert on_other(fitted.module) and fitted.summary["device"] == str(OTHER)
    assert all(start == param == OTHER for start, param in starts[-1].values())
    rows = {r["name"]: r for r in fitted.summary["parameter_table"]}
    assert rows["l3.weight"]["moved"] > 0
    frozen = [n for n, p in fitted.module.named_parameters() if not p.requires_grad]
    assert all(rows[n]["moved"] == 0 for n in frozen)
    assert fitted.predict([[0.5]]).shape == (1,)


@pytest.mark.parametrize("args", [
    ["--optimizer", "adam", "--batch-size", "32", "--checkpoint-every", "5", "--epochs", "4"],
    ["--optimizer", "sgd", "--batch-size", "48", "--checkpoint-every", "4", "--epochs", "4",
     "--freeze", "l1", "--unfreeze-at", "2:l1"],
    ["--epochs", "2"],  # L-BFGS, saved at epoch ends
])
def test_resume_restores_onto_the_device_and_finishes_identically(other, starts, tmp_path, monkeypatch, args):
    class Killed(BaseException):
        pass

    def kill():
        raise Killed

    common = ["train", "--hidden", "8,8", "--samples", "300", "--seed", "3",
              "--device", "other", "--no-plots", "--quiet", *args]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    whole = nnfit.load(tmp_path / "whole")
    monkeypatch.setattr(devices, "kill_self", kill)
    lbfgs = "--optimizer" not in args  # one step an epoch
    monkeypatch.setenv("NNFIT_FAULT", "kill-at-step:2" if lbfgs else "kill-at-step:17")
    with pytest.raises(Killed):
        main([*common, "--out", str(tmp_path / "run")])
    monkeypatch.delenv("NNFIT_FAULT")
    starts.clear()
    assert main(["resume", str(tmp_path / "run")]) == 0
    # The resumed run measured movement from start values restored onto the parameters' device.
    assert starts and all(start == param == OTHER for start, param in starts[-1].values())
    resumed = nnfit.load(tmp_path / "run", device="other")
    assert on_other(resumed.module)
    assert {k: v.numpy().tobytes() for k, v in cpu_state(resumed.module).items()} == \
        {k: v.numpy().tobytes() for k, v in cpu_state(whole.module).items()}


def test_a_rollback_after_a_nan_loss_stays_on_the_device(other, starts, monkeypatch):
    from nnfit import train as train_module

    real, calls = train_module.EagerStep.__call__, [0]

    def step(self, xb, yb):
        calls[0] += 1
        loss = real(self, xb, yb)
        if calls[0] == 12:  # in epoch 2: its weights become NaN, and the run rolls back to epoch 1's end
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return loss

    monkeypatch.setattr(train_module.EagerStep, "__call__", step)
    fitted = nnfit.fit(epochs=3, optimizer="adam", batch_size=32, **SMALL)
    assert fitted.summary["rollbacks"][0]["epoch"] == 2
    assert on_other(fitted.module) and all(torch.isfinite(p).all() for p in fitted.module.parameters())
    assert all(start == param == OTHER for start, param in starts[-1].values())


def test_save_load_predict_on_the_device_gives_identical_numbers(other, tmp_path):
    fitted = nnfit.fit(epochs=3, optimizer="adam", batch_size=32, out=str(tmp_path / "run"), **SMALL)
    loaded = nnfit.load(tmp_path / "run", device="other")
    assert loaded.device == OTHER and on_other(loaded.module)
    X = np.linspace(0, 1, 33).reshape(-1, 1)
    assert np.array_equal(loaded.predict(X), fitted.predict(X))
    assert np.array_equal(nnfit.load(tmp_path / "run").predict(X), fitted.predict(X))  # and on the CPU
    tuned = nnfit.fit(epochs=2, optimizer="adam", batch_size=32, init_from=str(tmp_path / "run"), freeze=["l1"],
                      **SMALL)
    assert on_other(tuned.module)
    assert torch.equal(tuned.module.l1.weight.to("cpu"), loaded.module.l1.weight.to("cpu"))
    assert nnfit.inspect(tuned).rows[0]["moved"] == 0


def test_a_pickled_regressor_comes_back_on_its_device(other):
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (120, 2))
    y = X[:, 0] * X[:, 1] + X[:, 0]
    est = nnfit.Regressor(hidden=(8,), optimizer="adam", batch_size=32, epochs=2, device="other",
                          random_state=0).fit(X, y)
    assert on_other(est.model_.module)
    back = pickle.loads(pickle.dumps(est))
    assert on_other(back.model_.module)
    assert np.array_equal(back.predict(X), est.predict(X))
    back.partial_fit(X, y)
    assert on_other(back.model_.module)
