"""Freezing and fine-tuning: frozen means frozen, and it is proven, shown and kept."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnfit
from nnfit import freeze, train
from nnfit.cli import main
from nnfit.config import Config
from nnfit.errors import NnfitError, NnfitWarning
from nnfit.model import MLP

SMALL = dict(formula="x**2 + x", hidden=(16, 16), samples=200, test_samples=500, quiet=True, plots=False)


def snapshot(module):
    """CPU copies of the parameters, wherever the module is (on a GPU machine nnfit trains on cuda:0)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters()}


class Recorder:
    """A quiet reporter that records what the model's parameters were after every epoch."""

    def __init__(self, module):
        self.module, self.after_epoch = module, []

    def epoch(self, row, improved):
        self.after_epoch.append((snapshot(self.module), {n: p.requires_grad for n, p in self.module.named_parameters()}))

    def __getattr__(self, name):  # start, tick, batch, log, finish: nothing to show
        return lambda *args, **kwargs: None


@pytest.fixture
def optimizers(monkeypatch):
    """Every optimizer the training loop builds, so that tests can look at its parameter groups."""
    built = []
    original = train.make_optimizer

    def recording(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train, "make_optimizer", recording)
    return built


# --- the tutorial's own experiment -------------------------------------------------------------------

def test_tutorial_experiment_frozen_weight_gets_no_grad_and_does_not_move():
    torch.manual_seed(0)
    model = MLP(3, 1, hidden=(2,)).double()  # the tutorial's 3 -> 2 -> 1 two-layer model
    assert freeze.freeze(model, ["l1.weight"]) == ["l1.weight"]
    assert not model.l1.weight.requires_grad and model.l1.bias.requires_grad

    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    F.mse_loss(model(x), y).backward()
    assert model.l1.weight.grad is None
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "l1.weight")

    before = snapshot(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    recipe = train.Recipe("sgd", 1.0, 8, 1, "none", 1)
    optimizer = train.make_optimizer(freeze.param_groups(model.named_parameters(), (), 1.0), recipe,
                                     Config(momentum=0.0))
    given = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert given == [id(p) for p in (model.l1.bias, model.l2.weight, model.l2.bias)]  # the frozen weight is left out
    optimizer.step()
    assert freeze.bit_identical(model.l1.weight, before["l1.weight"])
    for name in ("l1.bias", "l2.weight", "l2.bias"):  # changed by exactly -grad (lr 1)
        assert torch.equal(dict(model.named_parameters())[name], before[name] - grads[name]), name
        assert not torch.equal(dict(model.named_parameters())[name], before[name])


def test_bit_identical_is_stricter_than_equal():
    assert freeze.bit_identical(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    assert not freeze.bit_identical(torch.tensor([0.0]), torch.tensor([-0.0]))  # torch.equal says equal
    assert not freeze.bit_identical(torch.tensor([1.0]), torch.tensor([1.0 + 1e-7]))
    assert not freeze.bit_identical(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))


# --- patterns ------------------------------------------------------------------------------------

DEEP = [f"l{i}.{k}" for i in range(1, 12) for k in ("weight", "bias")]  # l1 ... l11


@pytest.mark.parametrize("pattern, expected", [
    ("l1.weight", ["l1.weight"]),                                   # an exact name
    ("l1", ["l1.weight", "l1.bias"]),                               # a layer: not l10, l11
    ("l1*", ["l1.weight", "l1.bias", "l10.weight", "l10.bias", "l11.weight", "l11.bias"]),  # a glob on layers
    ("l*.bias", [n for n in DEEP if n.endswith(".bias")]),          # a glob on names
    ("l[23]", ["l2.weight", "l2.bias", "l3.weight", "l3.bias"]),
    ("*.weight", [n for n in DEEP if n.endswith(".weight")]),
])
def test_patterns_name_exact_parameters_layers_and_globs(pattern, expected):
    assert freeze.resolve(DEEP, pattern) == expected


def test_patterns_that_match_nothing_list_the_names():
    model = MLP(1, 1, hidden=(4,))
    with pytest.raises(NnfitError, match=r"freeze='l9' matches no parameter; the parameters are: "
                                         r"l1\.weight, l1\.bias, l2\.weight, l2\.bias\."):
        freeze.freeze(model, ["l9"])
    with pytest.raises(NnfitError, match="matches no parameter"):
        freeze.freeze(model, ["L1"])  # names are case-sensitive
    assert all(p.requires_grad for p in model.parameters())  # nothing half-frozen by a failed call


def test_freezing_everything_is_an_error():
    with pytest.raises(NnfitError, match=r"freezes every parameter .*nothing to train"):
        freeze.freeze(MLP(1, 1, hidden=(4,)), ["l1", "l2"])
    with pytest.raises(NnfitError, match="nothing to train"):
        freeze.freeze(MLP(1, 1, hidden=(4,)), ["*"])


def test_cli_reports_a_bad_pattern_in_one_line(capsys, tmp_path):
    assert main(["train", "--formula", "x", "--domain", "x=0:1", "--hidden", "4", "--samples", "50",
                 "--freeze", "l7", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnfit: error: --freeze 'l7' matches no parameter; the parameters are: l1.weight")
    assert err.count("\n") == 1


def test_settings_parse_from_cli_and_api_and_round_trip():
    from nnfit.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--freeze", "l1", "--freeze", "l2.bias,l3.bias",
                                      "--unfreeze-at", "5:l1", "--unfreeze-at", "8:l2.bias",
                                      "--lr-for", "l3=0.01", "--lr-for", "l*.bias=1e-4", "--optimizer", "adam"])
    cli = config_from_args(args)
    assert cli.freeze == ("l1", "l2.bias", "l3.bias")
    assert cli.unfreeze_at == ((5, "l1"), (8, "l2.bias"))
    assert cli.lr_for == (("l3", 0.01), ("l*.bias", 1e-4))
    api = Config.from_dict({"freeze": ["l1", "l2.bias", "l3.bias"], "unfreeze_at": {5: "l1", 8: ["l2.bias"]},
                            "lr_for": {"l3": 0.01, "l*.bias": 1e-4}, "optimizer": "adam", "out": cli.out})
    assert api == cli
    assert Config.from_dict(json.loads(json.dumps(cli.to_dict()))) == cli


def test_bad_settings_are_reported_together(capsys):
    assert main(["train", "--unfreeze-at", "five:l1", "--unfreeze-at", "0:l2", "--lr-for", "l1=fast",
                 "--lr-for", "l2=-1", "--refit-scaling", "--freeze", ""]) == 2
    err = capsys.readouterr().err
    for phrase in ("--unfreeze-at must be EPOCH:PATTERN such as 5:l1, got 'five:l1'",
                   "--unfreeze-at must be EPOCH:PATTERN with a positive epoch, such as 5:l1, got 0:l2",
                   "--lr-for must be PATTERN=LR such as l3=0.01, got 'l1=fast'",
                   "positive learning rate, such as l3=0.01, got l2=-1.0",
                   "--refit-scaling only applies with --init-from RUN", "--freeze needs a pattern"):
        assert phrase in err, phrase


# --- frozen means frozen, in a full training run ------------------------------------------------------

@pytest.mark.parametrize("settings", [
    dict(optimizer="adamw", weight_decay=0.1, lr=1e-2),   # decoupled weight decay would shrink a frozen weight
    dict(optimizer="sgd", momentum=0.9, weight_decay=0.01, lr=0.05),  # momentum would carry it along
])
def test_training_run_leaves_frozen_tensors_bit_identical(settings):
    torch.manual_seed(0)
    net = MLP(1, 1, hidden=(16, 16))
    start = snapshot(net)
    model = nnfit.fit(domain={"x": (0, 1)}, model=net, freeze=["l1"], epochs=4, batch_size=32,
                      **{**SMALL, **settings})
    assert model.module is not net and all(torch.equal(p, start[n]) for n, p in net.state_dict().items())
    net = model.module  # fit trained a copy of the instance, which kept its weights
    for name in ("l1.weight", "l1.bias"):
        assert freeze.bit_identical(dict(net.named_parameters())[name], start[name])
    for name in ("l2.weight", "l2.bias", "l3.weight", "l3.bias"):
        assert not torch.equal(dict(net.named_parameters())[name].cpu(), start[name]), name
    s = model.summary
    assert s["frozen"] == "l1.weight, l1.bias (unchanged)"
    rows = {r["name"]: r for r in s["parameter_table"]}
    assert rows["l1.weight"]["moved"] == 0 and rows["l1.weight"]["grad_norm"] is None
    assert not rows["l1.bias"]["trainable"] and rows["l2.weight"]["trainable"]
    moved = torch.linalg.vector_norm(net.l2.weight.detach().cpu() - start["l2.weight"]).item()
    assert rows["l2.weight"]["moved"] == pytest.approx(moved, rel=1e-5) and moved > 0
    assert rows["l3.weight"]["grad_norm"] > 0


class MovesItsFrozenLayer(nn.Module):
    """A module that (wrongly) writes to a frozen weight in forward: nnfit must catch it."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(1, 8), nn.Linear(8, 1)

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.l1.weight.mul_(1.0001)
        return self.l2(torch.tanh(self.l1(x)))


def test_a_frozen_tensor_that_moved_raises_an_internal_error_not_a_user_error():
    with pytest.raises(freeze.FrozenTensorChanged, match=r"frozen parameter\(s\) l1.weight changed") as info:
        nnfit.fit(domain={"x": (0, 1)}, model=MovesItsFrozenLayer(), freeze=["l1.weight"], epochs=2,
                  optimizer="adam", **SMALL)
    assert not isinstance(info.value, NnfitError)  # a bug keeps its traceback in the CLI


# --- schedules and per-group learning rates -------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "lbfgs"])
def test_unfreeze_at_trains_a_layer_from_that_epoch_on(optimizer, optimizers):
    torch.manual_seed(0)
    net = MLP(1, 1, hidden=(16, 16))
    start = snapshot(net)
    recorder = Recorder(net)
    # a factory: the module it builds is trained (an instance would be copied), so the test can watch it
    model = nnfit.fit(domain={"x": (0, 1)}, model=lambda: net, reporter=recorder, freeze=["l1"], unfreeze_at={3: "l1"},
                      epochs=5, optimizer=optimizer, batch_size=64, patience=1, **SMALL)
    assert len(recorder.after_epoch) == 5  # patience 1 must not stop the run before the unfreeze
    for epoch, (values, trainable) in enumerate(recorder.after_epoch, start=1):
        l1_moved = not torch.equal(values["l1.weight"], start["l1.weight"])
        assert l1_moved == (epoch >= 3), epoch
        assert trainable["l1.weight"] == (epoch >= 3)
        assert not torch.equal(values["l2.weight"], start["l2.weight"])
    l1 = [id(net.l1.weight), id(net.l1.bias)]
    if optimizer == "lbfgs":  # one group only: rebuilt over the new parameter set
        assert len(optimizers) == 2
        assert not set(l1) & {id(p) for p in optimizers[0].param_groups[0]["params"]}
        assert set(l1) <= {id(p) for p in optimizers[1].param_groups[0]["params"]}
    else:  # the same optimizer gains a parameter group
        assert len(optimizers) == 1 and len(optimizers[0].param_groups) == 2
        assert not set(l1) & {id(p) for p in optimizers[0].param_groups[0]["params"]}
        assert [id(p) for p in optimizers[0].param_groups[1]["params"]] == l1
    rows = {r["name"]: r for r in model.summary["parameter_table"]}
    assert rows["l1.weight"]["unfrozen_at"] == 3 and rows["l1.weight"]["moved"] > 0
    assert "frozen" not in model.summary
    assert "trainable (from epoch 3)" in str(nnfit.inspect(model))


def test_unfreeze_at_must_name_frozen_parameters():
    with pytest.raises(NnfitError, match=r"unfreeze_at={2: 'l2'} names l2.weight, l2.bias, which are not frozen; "
                                         r"frozen parameters are: l1.weight, l1.bias"):
        nnfit.fit(domain={"x": (0, 1)}, freeze=["l1"], unfreeze_at={2: "l2"}, epochs=3, **SMALL)


def test_lr_for_gives_matched_parameters_their_own_group(optimizers):
    torch.manual_seed(0)
    net = MLP(1, 1, hidden=(16, 16))
    # a factory: the module it builds is trained (an instance would be copied), so the test can watch it
    nnfit.fit(domain={"x": (0, 1)}, model=lambda: net, optimizer="adam", lr=1e-3, schedule="none",
              lr_for={"l3": 1e-2, "l*.bias": 1e-4}, epochs=2, **SMALL)
    groups = optimizers[0].param_groups
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(net.l3.weight)] == 1e-2
    assert lr_of[id(net.l1.bias)] == lr_of[id(net.l2.bias)] == lr_of[id(net.l3.bias)] == 1e-4  # the last match wins
    assert lr_of[id(net.l1.weight)] == lr_of[id(net.l2.weight)] == 1e-3
    assert len(groups) == 3


def test_lr_for_follows_the_one_cycle_schedule_and_applies_to_unfrozen_groups(optimizers):
    torch.manual_seed(0)
    net = MLP(1, 1, hidden=(16, 16))
    # a factory: the module it builds is trained (an instance would be copied), so the test can watch it
    nnfit.fit(domain={"x": (0, 1)}, model=lambda: net, optimizer="adam", lr=1e-3, schedule="onecycle", freeze=["l1"],
              unfreeze_at={2: "l1"}, lr_for={"l1": 1e-2}, epochs=4, batch_size=32, **SMALL)
    groups = optimizers[0].param_groups
    assert [g["base_lr"] for g in groups] == [1e-3, 1e-2]  # the unfrozen layer got its group and its own peak
    assert groups[1]["params"] == [net.l1.weight, net.l1.bias]
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])  # and it follows the same schedule


def test_lr_for_is_refused_for_lbfgs_and_for_only_frozen_parameters():
    with pytest.raises(NnfitError, match="lbfgs takes all parameters in one group; use optimizer='adam'"):
        Config(optimizer="lbfgs", lr_for=(("l1", 0.1),))
    with pytest.raises(NnfitError, match="optimizer='auto' chose full-batch L-BFGS .* pass optimizer='adam'"):
        nnfit.fit(domain={"x": (0, 1)}, lr_for={"l1": 0.1}, epochs=1, **SMALL)
    with pytest.raises(NnfitError, match=r"lr_for={'l1': 0.1} names only frozen parameters \(l1.weight, l1.bias\)"):
        nnfit.fit(domain={"x": (0, 1)}, optimizer="adam", freeze=["l1"], lr_for={"l1": 0.1}, epochs=1, **SMALL)


# --- fine-tuning from a run ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """x**2 + x learned on [0, 1] (small network), saved."""
    out = tmp_path_factory.mktemp("freeze") / "base"
    torch.manual_seed(0)
    model = nnfit.fit(domain={"x": (0, 1)}, epochs=12, out=str(out), **SMALL)
    return model, out


@pytest.fixture(scope="module")
def tuned_run(base_run, tmp_path_factory):
    """The base run fine-tuned on [1, 2] with l1 frozen, through the CLI."""
    _, base = base_run
    out = tmp_path_factory.mktemp("freeze") / "tuned"
    code = main(["train", "--formula", "x**2 + x", "--domain", "x=1:2", "--hidden", "16,16", "--samples", "200",
                 "--test-samples", "500", "--epochs", "12", "--init-from", str(base), "--freeze", "l1",
                 "--out", str(out), "--no-plots", "--quiet"])
    assert code == 0
    return out


def test_init_from_starts_from_the_run_keeps_its_scaling_and_improves(base_run, tuned_run, capsys):
    base, _ = base_run
    tuned = nnfit.load(tuned_run)
    assert torch.equal(tuned.module.l1.weight, base.module.l1.weight.cpu())  # frozen, so still the base run's
    assert not torch.equal(tuned.module.l2.weight, base.module.l2.weight.cpu())
    assert tuned.scaling.to_dict() == base.scaling.to_dict()  # kept from the original run
    s = json.loads((tuned_run / "summary.json").read_text())
    assert s["init_from"]["run"].endswith("base") and s["init_from"]["scaling"] == "kept from the run"
    assert s["test"]["mse"] < s["init_from"]["test_before"]["mse"] / 100  # the before error is measured on [1, 2]
    x = np.random.default_rng(0).uniform(1, 2, 500)
    assert s["init_from"]["test_before"]["mse"] == pytest.approx(
        base.evaluate(X=x.reshape(-1, 1), y=x**2 + x)["mse"], rel=0.2)
    assert s["frozen"] == "l1.weight, l1.bias (unchanged)"


def test_refit_scaling_recomputes_the_statistics(base_run):
    base, out = base_run
    tuned = nnfit.fit(domain={"x": (1, 2)}, init_from=str(out), refit_scaling=True, epochs=2, **SMALL)
    assert tuned.scaling.to_dict()["x_mean"][0] == pytest.approx(1.5, abs=0.1)
    assert base.scaling.to_dict()["x_mean"][0] == pytest.approx(0.5, abs=0.1)
    assert tuned.summary["init_from"]["scaling"] == "recomputed"


def test_init_from_a_different_architecture_shows_both(base_run, capsys):
    _, out = base_run
    with pytest.raises(NnfitError) as info:
        nnfit.fit(domain={"x": (1, 2)}, init_from=str(out), epochs=2, **{**SMALL, "hidden": (8,)})
    message = str(info.value)
    assert "has a different architecture (they differ in hidden)" in message
    assert f"{out}: 1 input(s) (x) → 16 → 16 → 1 output(s), activation tanh" in message
    assert "this run: 1 input(s) (x) → 8 → 1 output(s), activation tanh" in message
    assert "Pass --hidden 16,16 to build the same network" in message
    assert main(["train", "--formula", "x*y", "--domain", "x=0:1", "--domain", "y=0:1", "--hidden", "16,16",
                 "--init-from", str(out), "--quiet", "--no-plots"]) == 2
    assert "(they differ in inputs)" in capsys.readouterr().err


def test_init_from_with_other_input_names_warns(base_run):
    _, out = base_run
    with pytest.warns(NnfitWarning, match=r"trained on inputs \(x\) and this run has \(t\)"):
        nnfit.fit(formula="t**2", domain={"t": (0, 1)}, init_from=str(out), epochs=1,
                  **{k: v for k, v in SMALL.items() if k != "formula"})


def test_unfreeze_after_the_last_epoch_is_refused():
    with pytest.raises(NnfitError, match=r"unfreeze_at={50: 'l1'} is after the last epoch \(epochs=30\)"):
        Config.from_dict({"freeze": ["l1"], "unfreeze_at": {50: "l1"}, "epochs": 30})


def test_init_from_a_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(NnfitError, match="run folder .*nowhere does not exist"):
        nnfit.fit(domain={"x": (0, 1)}, init_from=str(tmp_path / "nowhere"), **SMALL)


# --- inspect, and the freeze state across save and load --------------------------------------------

def test_inspect_cli_shows_columns_totals_and_frozen_rows(tuned_run, capsys):
    assert main(["inspect", str(tuned_run)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split("  ")[0] == "parameter"
    for column in ("shape", "elements", "state", "grad norm (last step)", "moved from start"):
        assert column in lines[0]
    l1w = next(line for line in lines if line.startswith("l1.weight"))
    assert l1w.split() == ["l1.weight", "(16,", "1)", "16", "frozen", "-", "0"]
    l2w = next(line for line in lines if line.startswith("l2.weight"))
    assert l2w.split()[3:5] == ["256", "trainable"] and float(l2w.split()[-1]) > 0
    assert lines[-1] == "trainable: 289 parameters in 4 tensor(s); frozen: 32 parameters in 2 tensor(s)"

    assert main(["inspect", str(tuned_run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"] == {"trainable": 289, "frozen": 32}
    assert [r["name"] for r in data["parameters"] if not r["trainable"]] == ["l1.weight", "l1.bias"]


def test_save_load_inspect_keeps_the_freeze_state(tuned_run, tmp_path):
    loaded = nnfit.load(tuned_run)
    assert loaded.config.freeze == ("l1",)
    assert [n for n, p in loaded.module.named_parameters() if not p.requires_grad] == ["l1.weight", "l1.bias"]
    shown = nnfit.inspect(loaded)
    assert (shown.trainable, shown.frozen) == (289, 32)
    assert [r["moved"] for r in shown.rows[:2]] == [0, 0] and shown.rows[2]["moved"] > 0
    again = loaded.save(tmp_path / "again", plots=False)
    assert json.loads((again / "model.json").read_text())["frozen"] == ["l1.weight", "l1.bias"]
    assert nnfit.inspect(again).rows == nnfit.inspect(tuned_run).rows


def test_inspect_shows_every_parameter_even_when_the_summary_lists_some(tuned_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tuned_run, run)
    summary = json.loads((run / "summary.json").read_text())
    summary["parameter_table"] = summary["parameter_table"][2:]  # l1's rows gone
    (run / "summary.json").write_text(json.dumps(summary))
    shown = nnfit.inspect(run)
    assert sorted(r["name"] for r in shown.rows) == sorted(r["name"] for r in nnfit.inspect(tuned_run).rows)
    assert (shown.trainable, shown.frozen) == (289, 32)


def test_inspect_a_module_and_bad_arguments():
    model = MLP(2, 1, hidden=(3,))
    freeze.freeze(model, ["l2.bias"])
    shown = nnfit.inspect(model)
    assert (shown.trainable, shown.frozen) == (2 * 3 + 3 + 3, 1)
    assert shown.rows[-1] == {"name": "l2.bias", "shape": [1], "numel": 1, "trainable": False,
                              "grad_norm": None, "moved": None}
    assert "(1,)" in shown.table() and "frozen" in repr(shown)
    with pytest.raises(NnfitError, match="inspect takes a run folder, a fitted model or a torch.nn.Module, got int"):
        nnfit.inspect(3)
    with pytest.raises(NnfitError, match="does not exist"):
        nnfit.inspect("no/such/run")
