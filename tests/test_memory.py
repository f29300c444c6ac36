"""Memory that never blows up: OOM recovery (injected on the CPU, real on CUDA), data placement,
mixed precision, peak memory and device mismatch diagnostics."""

import json

import pytest
import torch
from torch import nn

import nnfit
from nnfit.errors import NnfitError, NnfitWarning

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL = dict(formula="x**2 + x", domain={"x": (0, 1)}, samples=400, test_samples=300, quiet=True, device="cpu")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(1, 32), nn.Linear(32, 1)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def _oom_above(module, rows):
    """The injected fault: a forward pass on more than ``rows`` rows raises CUDA's out-of-memory error."""

    def hook(_module, args):
        if args[0].shape[0] > rows:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {args[0].shape[0]} rows")

    module.register_forward_pre_hook(hook)
    return module


def _weights(model):
    return [t.detach().clone() for t in model.module.state_dict().values()]


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return nnfit.fit(model=Net(), optimizer="adam", batch_size=64, epochs=3, dtype="float64", **SMALL)


def test_oom_halves_the_batch_and_training_gives_the_same_model(reference, tmp_path, capsys):
    torch.manual_seed(0)
    with pytest.warns(NnfitWarning) as caught:
        fitted = nnfit.fit(model=_oom_above(Net(), 16), optimizer="adam", batch_size=64, epochs=3,
                           dtype="float64", out=str(tmp_path / "run"), plots=False, **{**SMALL, "quiet": False})
    assert "out of memory in prediction with a batch of 65536; retrying with 32768 (floor --min-batch-size 1)" in \
        [str(w.message) for w in caught]
    err = capsys.readouterr().err
    assert "out of memory in a training step with a batch of 64; retrying with 32 (floor --min-batch-size 1)" in err
    assert "retrying with 16 (floor" in err
    assert "out of memory in evaluation with a batch of 65536; retrying with 32768" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_batch_size"] == 16
    assert [r["to"] for r in summary["oom_retries"] if r["where"] == "a training step"] == [32, 16]
    # The optimizer still saw batches of 64: the halves' gradients are accumulated.
    for ours, theirs in zip(_weights(fitted), _weights(reference)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert [h["train_loss"] for h in fitted.history] == pytest.approx(
        [h["train_loss"] for h in reference.history], rel=1e-10)


def test_oom_recovery_in_lbfgs_keeps_the_full_batch():
    torch.manual_seed(0)
    plain = nnfit.fit(model=Net(), optimizer="lbfgs", epochs=2, dtype="float64", **SMALL)
    torch.manual_seed(0)
    with pytest.warns(NnfitWarning):
        chunked = nnfit.fit(model=_oom_above(Net(), 100), optimizer="lbfgs", epochs=2, dtype="float64", **SMALL)
    assert chunked.summary["final_batch_size"] <= 100 and chunked.summary["oom_retries"][0]["where"] == "an L-BFGS step"
    assert [h["train_loss"] for h in chunked.history] == pytest.approx(
        [h["train_loss"] for h in plain.history], rel=1e-8)


def test_oom_at_the_floor_is_a_clear_error():
    with pytest.raises(NnfitError) as err:
        nnfit.fit(model=_oom_above(Net(), 16), optimizer="adam", batch_size=64, epochs=1, min_batch_size=32, **SMALL)
    message = err.value.cli_message()
    assert "out of memory in a training step on cpu even with a batch of 32 row(s)" in message
    assert "--min-batch-size 32" in message and "--data-on cpu" in message and "smaller model" in message


def test_data_on_cpu_gives_the_same_result_as_device(reference, capsys):
    torch.manual_seed(0)
    streamed = nnfit.fit(model=Net(), optimizer="adam", batch_size=64, epochs=3, dtype="float64", data_on="cpu",
                         **{**SMALL, "quiet": False})
    assert "kept in CPU memory (--data-on cpu)" in capsys.readouterr().err
    for ours, theirs in zip(_weights(streamed), _weights(reference)):
        assert torch.equal(ours, theirs)
    assert streamed.summary["data"].endswith("batches are copied to cpu")


@pytest.mark.parametrize("precision", ["bf16", "16-mixed"])
def test_mixed_precision_trains_and_keeps_fp32_parameters(precision, tmp_path):
    out = tmp_path / precision
    fitted = nnfit.fit(optimizer="adam", batch_size=64, epochs=4, precision=precision, out=str(out), plots=False,
                       **SMALL)
    losses = [h["train_loss"] for h in fitted.history]
    assert losses[-1] < losses[0] / 3
    assert all(p.dtype == torch.float32 for p in fitted.module.parameters())
    assert json.loads((out / "model.json").read_text())["dtype"] == "float32"
    assert nnfit.load(out).summary["precision"] == precision


def test_auto_avoids_lbfgs_with_fp16():
    fitted = nnfit.fit(epochs=1, precision="16-mixed", **SMALL)
    assert fitted.summary["recipe"].startswith("adam")


def test_peak_memory_is_reported(tutorial_run):
    _model, out = tutorial_run
    summary = json.loads((out / "summary.json").read_text())
    peak = summary["peak_memory"]
    if summary["device"].startswith("cuda"):  # device auto on a GPU machine: the GPU's figure, then the host's
        assert peak["measure"] == "cuda max_memory_allocated" and peak["bytes"] > 0
        host = peak["host"]
    else:
        assert "host" not in peak
        host = peak
    assert host["bytes"] > 10 * 2**20  # at least torch itself is resident
    assert host["measure"] == "peak resident set of the process"
    from nnfit.devices import describe_peak

    shown = describe_peak(peak)
    assert shown.startswith(f"{peak['human']} ({peak['measure']})")
    assert shown.endswith(f"{host['human']} (peak resident set of the process)")


def test_device_mismatch_names_the_tensor_and_its_device():
    class Shifted(Net):
        def __init__(self):
            super().__init__()
            self.shift = torch.ones(1, device="meta")  # a plain attribute: .to() does not move it

        def forward(self, x):
            return super().forward(x) + self.shift

    with pytest.raises(NnfitError, match="a tensor of the module is on another device: shift is on meta"):
        nnfit.fit(model=Shifted(), **SMALL)


@cuda
@pytest.mark.cuda
def test_cuda_auto_keeps_small_data_on_the_gpu(capsys):
    fitted = nnfit.fit(optimizer="adam", epochs=2, **{**SMALL, "device": "cuda", "quiet": False})
    assert "data: " in capsys.readouterr().err
    assert fitted.summary["data"].startswith(tuple("0123456789")) and "on cuda:0" in fitted.summary["data"]
    assert fitted.summary["peak_memory"]["measure"] == "cuda max_memory_allocated"
    assert fitted.summary["peak_memory"]["bytes"] > 0
    assert fitted.summary["peak_memory"]["host"]["measure"] == "peak resident set of the process"


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "16-mixed"])
def test_cuda_mixed_precision(precision):
    fitted = nnfit.fit(optimizer="adam", batch_size=256, epochs=5, precision=precision,
                       **{**SMALL, "device": "cuda", "samples": 4000})
    assert fitted.history[-1]["train_loss"] < fitted.history[0]["train_loss"] / 3
    assert all(p.dtype == torch.float32 for p in fitted.module.parameters())


@cuda
@pytest.mark.cuda
def test_cuda_real_oom_recovery_and_streaming_under_a_memory_cap():
    """A real allocation cap: a batch too large for it is halved, and data larger than it is streamed."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    # The cap counts what this process already holds (earlier tests in the same process): 256 MB on top of it.
    cap = torch.cuda.memory_reserved() + 256 * 2**20
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        torch.cuda.empty_cache()
        # 80M float32 values (x and y for 40M rows) are 320 MB: more than the whole 256 MB cap.
        import pandas as pd

        x = torch.rand(40_000_000, dtype=torch.float64).numpy()
        frame = pd.DataFrame({"x": x, "y": x**2 + x})
        fitted = nnfit.fit(data=frame, target="y", hidden=(1024, 1024), optimizer="adam", batch_size=262144,
                           epochs=1, val_split=0.01, device="cuda", quiet=True, plots=False, data_on="auto")
        assert "pinned CPU memory" in fitted.summary["data"]
        assert fitted.summary["oom_retries"], "a 262144-row batch through 1024x1024 should not fit in 256 MB"
        assert fitted.summary["final_batch_size"] < 262144
        assert fitted.summary["peak_memory"]["bytes"] <= cap
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_the_peak_over_the_ranks_is_exact_to_the_byte(monkeypatch):
    """Under DDP the peak is all-reduced as integers: float32 would round 16 GiB + 1 KiB to 16 GiB."""
    import resource
    import sys
    from types import SimpleNamespace
    from nnfit import devices
    kib = 2 ** 24 + 1  # not a float32 in bytes (25 significant bits)
    maxrss = kib * (1024 if sys.platform == "darwin" else 1)  # macOS counts bytes, Linux KiB
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=maxrss))
    reduced = []
    monkeypatch.setattr(devices, "all_reduce", lambda t, ctx, op="sum": reduced.append(t.dtype) or t)
    peak = devices.peak_memory(devices.Context(torch.device("cpu"), world_size=2, backend="gloo"))
    assert reduced == [torch.int64]
    assert peak["bytes"] == kib * 1024 and "largest over the ranks" in peak["measure"]
