"""An ensemble too large for the memory: one clear error that names the most members that fit, up front
(the estimate against a mocked free memory) and after out-of-memory errors that halving the rows cannot
cure (injected on the CPU, as tests/test_memory.py does)."""

import numpy as np
import pytest
import torch

import nnfit
from nnfit import devices
from nnfit import train as train_module
from nnfit.cli import main
from nnfit.config import Config
from nnfit.errors import NnfitError
from nnfit.model import StackedMLP, build_mlp, training_memory
from nnfit.progress import Reporter
from nnfit.train import Recipe

# 1 -> 100 -> 100 -> 1, Adam at batch 64, 1000 samples of which 900 train (val_split 0.1): float32.
RUN = dict(formula="x**2 + x", domain={"x": (0, 1)}, samples=1000, optimizer="adam", batch_size=64, epochs=1,
           quiet=True, plots=False, device="cpu")
PARAMETERS = 2 * 100 + 101 * 100 + 101  # (inputs + 1) x outputs, layer by layer
TRAIN_ROWS = 900


def by_hand(rows_per_pass: int) -> int:
    """Bytes one member of RUN needs, counted here from what the loop keeps: 16 float32 copies of the
    parameters (weights, gradients, Adam's 2 moments, best and start weights, two rollback snapshots of
    weights + moments + best + start), 3 floats per unit of each layer's output per row (the linear
    map's output, the activation's, a gradient), and the epoch's (x, y) rows in the member's order."""
    return 4 * (PARAMETERS * 16 + 3 * (100 + 100 + 1) * rows_per_pass + TRAIN_ROWS * 2)


def free_memory(monkeypatch, free: int, total: int = 16 * 2**30) -> dict:
    """Mock the device's free memory; the returned dict changes it while the run goes on."""
    state = {"free": free}
    monkeypatch.setattr(devices, "memory_of", lambda device: (state["free"], total))
    return state


def test_the_estimate_counts_what_training_keeps_and_scales_with_the_members():
    four = training_memory(1, 1, (100, 100), 4, 4, moments=2, batch=64, rows=TRAIN_ROWS)
    eight = training_memory(1, 1, (100, 100), 8, 4, moments=2, batch=64, rows=TRAIN_ROWS)
    assert four.parameters == PARAMETERS
    assert four.per_member() == eight.per_member() == by_hand(64)
    assert four.per_member(16) == by_hand(16)
    assert eight.total() == 2 * four.total() and eight.total(1) == 2 * four.total(1)  # nothing is shared
    assert four.largest(10 * by_hand(64) + 1) == 10 and four.largest(by_hand(16) * 3, 16) == 3
    # The optimizer's state is counted live and in both snapshots: SGD without momentum keeps none, L-BFGS
    # its history of curvature pairs.
    model = build_mlp(1, 1, Config(ensemble=2))
    for optimizer, momentum, moments in [("sgd", 0.0, 0), ("sgd", 0.9, 1), ("adamw", 0.0, 2),
                                         ("lbfgs", 0.0, 2 * train_module.LBFGS_HISTORY + 2)]:
        recipe = Recipe(optimizer, 1e-3, 64, 1, "none", 1)
        estimate = train_module.memory_estimate(model, Config(momentum=momentum), recipe, TRAIN_ROWS)
        assert estimate.state == 4 * PARAMETERS * (10 + 3 * moments), optimizer
    assert estimate.batch == TRAIN_ROWS and estimate.rows == 0  # L-BFGS: the full batch, taken in place
    assert train_module.memory_estimate(build_mlp(1, 1, Config()), Config(), recipe, TRAIN_ROWS) is None


def test_up_front_check_names_the_most_members_that_fit_and_passes_those(monkeypatch, capsys):
    free_memory(monkeypatch, 3_000_000)
    weights = 8 * PARAMETERS * 4  # already in this memory when the check runs: built on the CPU
    budget = 3_000_000 + weights
    assert 8 * by_hand(1) > budget, "the test's premise: 8 members do not fit even one row at a time"
    largest = budget // by_hand(64)
    assert 1 <= largest < 8
    with pytest.raises(NnfitError) as caught:
        nnfit.fit(ensemble=8, **RUN)
    message = str(caught.value)
    assert message.startswith("too many ensemble members for the memory: ensemble=8 of hidden='100,100' with adam "
                              "at batch_size=64 needs about ")
    assert "even in micro-batches of 1 row on cpu" in message
    assert f"cpu has {devices._format_bytes(budget)} free of 16.0 GB" in message
    assert f"the most members that fit by this estimate is {largest}: pass ensemble={largest}" in message
    assert "a smaller batch_size or smaller widths (hidden)" in message
    cli = caught.value.cli_message()
    assert f"pass --ensemble {largest}" in cli and "--batch-size 64" in cli and "--hidden 100,100" in cli

    fitted = nnfit.fit(ensemble=largest, **{**RUN, "quiet": False})  # what the message says: it trains
    assert fitted.members == largest and len(fitted.summary["ensemble"]["best_epochs"]) == largest
    mean, std = fitted.predict(np.array([[0.5]]), return_std=True)
    assert np.isfinite(mean).all() and (std > 0).all()
    err = capsys.readouterr().err
    whole = (3_000_000 + largest * PARAMETERS * 4) // by_hand(64)
    if largest * by_hand(64) > 3_000_000 + largest * PARAMETERS * 4:  # fits, but only in micro-batches
        assert f"expect out-of-memory retries in smaller micro-batches (same result, slower); --ensemble {whole} " \
               "fits whole batches" in err


def test_oom_that_halving_rows_cannot_cure_names_the_most_members_that_fit(monkeypatch, capsys):
    memory = free_memory(monkeypatch, 2**30)  # the up-front check passes
    stacked_forward = StackedMLP.forward

    def forward(self, x):
        if torch.is_grad_enabled():  # every training step; evaluation runs under inference_mode
            memory["free"] = 200_000  # another process took the memory
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[-2]} rows")
        return stacked_forward(self, x)

    monkeypatch.setattr(StackedMLP, "forward", forward)
    with pytest.raises(NnfitError) as caught:
        nnfit.fit(ensemble=8, **{**RUN, "quiet": False})
    message = caught.value.cli_message()
    err = capsys.readouterr().err
    # Rows were halved first (exact: the optimizer still sees batches of 64), while they mattered.
    assert "out of memory in a training step with a batch of 64; retrying with 32" in err
    rows = int(message.split(" did not fit in micro-batches of ")[1].split(" rows")[0])
    assert rows < 64
    activations = 4 * 3 * 201
    assert activations * rows < 0.1 * by_hand(rows) <= activations * 2 * rows  # the stop rule, by hand
    # The members hold their state and rows (by the estimate), which a run with fewer of them may use.
    budget = 200_000 + 8 * (by_hand(64) - activations * 64)
    largest = min(7, budget // by_hand(64))
    assert largest < 7, "the test's premise: the estimate, not the cap at K - 1, decides"
    assert message.startswith("out of memory in a training step on cpu: --ensemble 8 of --hidden 100,100 with adam "
                              f"at --batch-size 64 did not fit in micro-batches of {rows} rows (by the estimate ")
    assert f"the most members that fit by this estimate is {largest}: pass --ensemble {largest}" in message
    assert f"(or up to {min(7, budget // by_hand(rows))} in micro-batches of {rows} rows, slower)" in message


def test_cli_refuses_too_many_members_in_one_line(monkeypatch, capsys, tmp_path):
    free_memory(monkeypatch, 3_000_000)
    out = tmp_path / "run"
    code = main(["train", "--formula", "x**2 + x", "--domain", "x=0:1", "--samples", "1000", "--optimizer", "adam",
                 "--batch-size", "64", "--epochs", "1", "--ensemble", "8", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("nnfit: error: too many ensemble members"), err
    largest = (3_000_000 + 8 * PARAMETERS * 4) // by_hand(64)
    assert f"pass --ensemble {largest}" in err
    assert not (out / "model.safetensors").exists()


def test_sklearn_regressor_gets_the_same_error(monkeypatch):
    free_memory(monkeypatch, 3_000_000)
    X = np.linspace(0, 1, 1000)[:, None]
    with pytest.raises(NnfitError, match=r"ensemble=8 of hidden='100,100' .* pass ensemble=\d"):
        nnfit.Regressor(ensemble=8, optimizer="adam", batch_size=64, epochs=1, device="cpu").fit(X, X[:, 0] ** 2)


def test_build_names_the_most_members_whose_state_fits_in_host_memory(monkeypatch):
    monkeypatch.setattr(devices, "free_host_memory", lambda: 2**30)
    per_member = training_memory(1, 1, (1000, 1000), 1, 4, moments=2, batch=1, rows=0).per_member()
    with pytest.raises(NnfitError) as caught:
        build_mlp(1, 1, Config(ensemble=1000, hidden=(1000, 1000)))
    parameters = 1000 * (2 * 1000 + 1001 * 1000 + 1001)
    message = caught.value.cli_message()
    assert f"--hidden 1000,1000 with --ensemble 1000 makes a network of {parameters:,} parameters" in message
    assert f"use smaller widths or fewer members (the most that fit: --ensemble {2**30 // per_member})" in message
    assert f"(the most that fit: ensemble={2**30 // per_member})" in str(caught.value)


def test_the_estimate_counts_the_copies_the_loop_keeps_alive(monkeypatch):
    """The parameters' copies of the estimate are the tensors alive at the loop's peak: while the first
    rollback point is made and the run's starting point is still held (counted with the garbage collector,
    on the CPU). A fresh run's starting point holds no optimizer state yet; the estimate counts a resumed
    run's, which does: the fresh run keeps exactly the estimate less those Adam moments."""
    import gc
    import warnings

    def live_bytes() -> int:
        gc.collect()
        storages = {}
        with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated reduce_op warns
            warnings.simplefilter("ignore", FutureWarning)
            objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
        for obj in objects:
            if obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    config = Config(ensemble=4, hidden=(256, 256), optimizer="adam", batch_size=32, epochs=2, patience=10)
    x = torch.rand(72, 1)
    data = train_module.TrainData(x[:64], x[:64] ** 2, x[64:], x[64:] ** 2)
    model = build_mlp(1, 1, config)
    estimate = train_module.memory_estimate(model, config, train_module.choose_recipe(config, 64, 1), 64)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    before, peaks = live_bytes(), []
    good = train_module.Rollback.good
    monkeypatch.setattr(train_module.Rollback, "good", lambda self, state: (peaks.append(live_bytes()),
                                                                            good(self, state)))
    train_module.train(model, data, config, Reporter(quiet=True))
    assert len(peaks) == 2
    kept = max(peaks) - before + weights  # the weights were alive before: they are one of the copies
    adam_moments_of_the_starting_point = 2 * estimate.parameters * 4
    assert kept == pytest.approx(estimate.members * (estimate.state - adam_moments_of_the_starting_point), rel=0.02)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_refuses_too_many_members_under_a_real_memory_cap(monkeypatch):
    """The check reads the GPU's own free memory, within this process's cap (the value it saw is recorded,
    not mocked), and names the most members that fit in it."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    seen = []
    real = devices.memory_of
    monkeypatch.setattr(devices, "memory_of", lambda device: seen.append(real(device)) or seen[-1])
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 64 * 2**20) / total)
    try:
        with pytest.raises(NnfitError) as caught:
            nnfit.fit(ensemble=64, hidden=(256, 256), **{**RUN, "device": "cuda"})
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    free = seen[0][0]
    assert free <= 64 * 2**20
    estimate = training_memory(1, 1, (256, 256), 64, 4, moments=2, batch=64, rows=TRAIN_ROWS)
    largest = estimate.largest(free)
    assert 1 <= largest < 64
    assert "on cuda:0" in str(caught.value) and f"pass ensemble={largest}" in str(caught.value)
