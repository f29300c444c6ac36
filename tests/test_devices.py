"""Device strings, --devices and the DDP context, with the GPU count mocked (a table, like Lightning's)."""

import os

import pytest
import torch

from nnfit import devices
from nnfit.config import Config
from nnfit.errors import NnfitError
from nnfit.train import _rank_rows


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine has ``gpus`` CUDA GPUs and maybe MPS."""

    def set_up(gpus=0, mps=False):
        monkeypatch.setattr(devices, "gpu_count", lambda: gpus)
        monkeypatch.setattr(devices, "_mps_available", lambda: mps)

    return set_up


@pytest.mark.parametrize("spec, gpus, mps, expected", [
    ("auto", 0, False, "cpu"),
    ("auto", 2, False, "cuda:0"),
    ("auto", 0, True, "mps"),
    ("auto", 1, True, "cuda:0"),
    ("cpu", 2, True, "cpu"),
    (" CPU ", 0, False, "cpu"),
    ("cuda", 1, False, "cuda:0"),
    ("cuda:1", 2, False, "cuda:1"),
    ("mps", 0, True, "mps"),
])
def test_parse_device(machine, spec, gpus, mps, expected):
    machine(gpus, mps)
    assert devices.parse_device(spec) == torch.device(expected)


@pytest.mark.parametrize("spec, gpus, mps, message", [
    ("cuda", 0, False, "'cuda' was asked for, but this machine has no CUDA GPU; devices here: cpu. Use --device cpu"),
    ("cuda:2", 2, False, "'cuda:2' does not exist: this machine has 2 CUDA GPU(s); devices here: cpu, cuda:0, cuda:1"),
    ("mps", 1, False, "'mps' is not available here; devices here: cpu, cuda:0"),
    ("tpu", 0, True, "unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps (devices here: cpu, mps)"),
    ("cuda:x", 0, False, "unknown device 'cuda:x'"),
])
def test_parse_device_errors(machine, spec, gpus, mps, message):
    machine(gpus, mps)
    with pytest.raises(NnfitError) as err:
        devices.parse_device(spec)
    assert message in err.value.cli_message()


@pytest.mark.parametrize("spec, n, gpus, expected", [
    ("cpu", 1, 0, ["cpu"]),
    ("cpu", 4, 2, ["cpu"] * 4),
    ("auto", 3, 0, ["cpu"] * 3),
    ("auto", 2, 2, ["cuda:0", "cuda:1"]),
    ("cuda", 2, 4, ["cuda:0", "cuda:1"]),
    ("cuda:1", 1, 2, ["cuda:1"]),
])
def test_parse_devices(machine, spec, n, gpus, expected):
    machine(gpus)
    assert devices.parse_devices(spec, n) == [torch.device(d) for d in expected]


@pytest.mark.parametrize("spec, n, gpus, mps, message", [
    ("cuda", 4, 2, False, "--devices 4 asks for 4 GPUs, but this machine has 2: cuda:0, cuda:1; "
                          "use --devices 2 or fewer, or --device cpu for 4 CPU processes"),
    ("auto", 2, 1, False, "--devices 2 asks for 2 GPUs, but this machine has 1: cuda:0"),
    ("cuda", 2, 0, False, "this machine has no CUDA GPU"),
    ("cuda:1", 2, 2, False, "--device cuda:1 names one GPU, but --devices 2 uses 2"),
    ("auto", 2, 0, True, "torch.distributed has no backend for mps; use --device cpu"),
])
def test_parse_devices_errors(machine, spec, n, gpus, mps, message):
    machine(gpus, mps)
    with pytest.raises(NnfitError) as err:
        devices.parse_devices(spec, n)
    assert message in err.value.cli_message()


def test_too_many_devices_fails_before_starting_workers(machine):
    import nnfit

    machine(gpus=2)
    with pytest.raises(NnfitError, match="devices=4 asks for 4 GPUs, but this machine has 2: cuda:0, cuda:1; use devices=2 or fewer"):
        nnfit.fit(formula="x", domain={"x": (0, 1)}, device="cuda", devices=4)


def test_single_process_context_reads_no_torchrun_variables(machine, monkeypatch):
    machine(gpus=0)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = devices.init_context(Config(device="auto"))
    assert (ctx.device, ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == \
        (torch.device("cpu"), 0, 1, True, False)
    devices.cleanup_context(ctx)


def test_a_cuda_run_uses_deterministic_kernels_and_gives_the_settings_back(machine):
    import os

    import torch.utils.deterministic as deterministic

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")  # set when nnfit is imported
    machine(gpus=1)
    before = (torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory)
    ctx = devices.init_context(Config(device="cuda"))  # placing nothing: no CUDA call is made
    try:
        assert ctx.device == torch.device("cuda", 0)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not deterministic.fill_uninitialized_memory  # no extra kernel per allocation
    finally:
        devices.cleanup_context(ctx)
    assert (torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory) == before
    machine(gpus=0)
    ctx = devices.init_context(Config(device="cpu"))  # the CPU is deterministic as it is: nothing changes
    assert torch.are_deterministic_algorithms_enabled() == before[0]
    devices.cleanup_context(ctx)


def test_a_copy_goes_back_to_its_device_where_that_exists(machine):
    machine(gpus=1)
    assert devices.where_it_was("cuda:0") == torch.device("cuda", 0)
    assert devices.where_it_was("cuda:3") == torch.device("cpu")
    machine(gpus=0)
    assert devices.where_it_was("cuda:0") == devices.where_it_was("mps") == torch.device("cpu")


def _torchrun_env(monkeypatch, rank=0, world=1, local_rank=0):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(devices.free_port()))


def test_torchrun_context_joins_a_gloo_group_and_cleanup_destroys_it(monkeypatch):
    import torch.distributed as dist

    _torchrun_env(monkeypatch)
    ctx = devices.init_context(Config(device="cpu"))
    try:
        assert ctx.distributed and ctx.backend == "gloo" and ctx.is_main and ctx.device == torch.device("cpu")
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert devices.all_reduce(torch.tensor([2.0]), ctx).item() == 2.0
    finally:
        devices.cleanup_context(ctx)
    assert not dist.is_initialized()


@pytest.mark.parametrize("env, config, gpus, message", [
    ({"world": 2}, {"devices": 4}, 0, "--devices 4 was given, but torchrun started 2 worker(s)"),
    ({"world": 2, "rank": 1, "local_rank": 1}, {"device": "cuda"}, 1,
     "LOCAL_RANK 1 needs cuda:1, but this machine has 1 GPU(s)"),
    ({"world": 2}, {"device": "cuda:1"}, 2, "--device cuda:1 names one GPU, but under torchrun each worker uses"),
])
def test_torchrun_context_errors(machine, monkeypatch, env, config, gpus, message):
    machine(gpus)
    _torchrun_env(monkeypatch, **env)
    with pytest.raises(NnfitError) as err:
        devices.init_context(Config(**config))
    assert message in err.value.cli_message()


def test_bad_torchrun_variable(monkeypatch):
    _torchrun_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(NnfitError, match="WORLD_SIZE='two' must be an integer"):
        devices.init_context(Config())


@pytest.mark.parametrize("settings, message", [
    ({"devices": 0}, "--devices must be a positive integer, got 0"),
    ({"min_batch_size": 0}, "--min-batch-size must be a positive integer, got 0"),
    ({"min_batch_size": 64, "batch_size": 32}, "--min-batch-size 64 is larger than --batch-size 32"),
    ({"data_on": "gpu"}, "--data-on must be one of auto, device, cpu, got 'gpu'"),
    ({"precision": "8"}, "--precision must be one of 32, bf16, 16-mixed, got '8'"),
    ({"precision": "bf16", "dtype": "float64"}, "it needs --dtype float32"),
    ({"precision": "16-mixed", "optimizer": "lbfgs"}, "use --precision bf16 or --optimizer adam"),
    ({"devices": 4, "batch_size": 2}, "--batch-size 2 is the global batch and must be at least --devices 4"),
])
def test_device_settings_are_validated(settings, message):
    with pytest.raises(NnfitError) as err:
        Config(**settings)
    assert message in err.value.cli_message()


def test_precision_accepts_an_integer_from_python():
    assert Config.from_dict({"precision": 32}).precision == "32"


@pytest.mark.parametrize("n, batch, world", [(100, 20, 2), (101, 20, 2), (103, 16, 4), (10, 64, 2), (30, 7, 3)])
def test_rank_shards_are_disjoint_equal_slices_of_each_global_batch(n, batch, world):
    perm = torch.randperm(n)
    per_rank = batch // world
    shards = [_rank_rows(perm, per_rank, devices.Context(torch.device("cpu"), r, r, world, "gloo"))
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) == n // world
    assert len(torch.cat(shards).unique()) == world * (n // world)  # disjoint
    used = (n // world) * world
    for step, start in enumerate(range(0, used, per_rank * world)):  # each global batch, in order
        size = min(per_rank * world, used - start) // world
        pieces = [s[step * per_rank: step * per_rank + size] for s in shards]
        assert torch.equal(torch.cat(pieces), perm[start:start + size * world])


@pytest.mark.parametrize("exc, expected", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("CUDA out of memory"), False),
])
def test_out_of_memory_is_recognised(exc, expected):
    assert devices.is_out_of_memory(exc) is expected


# CPU threads: the table of choices, with the machine's cores and their load mocked.

CPU = devices.Context(device=torch.device("cpu"))


@pytest.mark.parametrize("asked, small, cores, free, env, expected, says", [
    (3, False, 2, 0.0, {}, 3, ""),                       # --threads wins, busy or not
    (None, True, 2, 2.0, {}, 1, "threads: 1 of 2 (a small network"),
    (None, False, 2, 2.0, {}, 2, "threads: 2 of 2 (the cores are free"),
    (None, False, 2, 1.9, {}, 2, "threads: 2 of 2"),
    (None, False, 2, 1.0, {}, 1, "threads: 1 of 2 (the other core is busy: about 1.0 free"),
    (None, False, 2, 0.1, {}, 1, "threads: 1 of 2 (the other core is busy"),
    (None, False, 8, 3.0, {}, 3, "threads: 3 of 8 (5 of the cores are busy"),
    (None, False, 1, 1.0, {}, None, ""),
    (None, True, 1, 1.0, {}, 1, ""),
    (None, False, 2, None, {}, None, ""),                # no /proc/stat: torch's own choice
    (None, False, 2, 1.0, {"OMP_NUM_THREADS": "2"}, None, ""),  # the user's environment decides
])
def test_cpu_threads_counts_the_cores_actually_free(monkeypatch, asked, small, cores, free, env, expected, says):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(devices, "_cpu_count", lambda: cores)
    monkeypatch.setattr(devices, "free_cores", lambda: free)
    threads, line = devices.cpu_threads(asked, small, CPU)
    assert threads == expected
    assert line.startswith(says) if says else line == ""


def test_cpu_threads_leaves_gpu_and_ddp_runs_alone(monkeypatch):
    monkeypatch.setattr(devices, "free_cores", lambda: pytest.fail("a GPU run must not sample the CPU load"))
    assert devices.cpu_threads(None, False, devices.Context(device=torch.device("cuda", 0))) == (None, "")
    worker = devices.Context(device=torch.device("cpu"), backend="gloo")
    assert devices.cpu_threads(None, False, worker) == (None, "")  # init_context gave it its share of the cores
    assert devices.cpu_threads(None, True, worker) == (1, "")  # a small network: one thread, as in one process


def _fake_proc_stat(monkeypatch, tmp_path, *readings: str) -> None:
    """/proc/stat reads ``readings`` in turn, on a process allowed on cpu0 and cpu1."""
    readings = iter(readings)
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/stat":
            target = tmp_path / "stat"
            target.write_text(next(readings))
            return real_open(target, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1})


def test_free_cores_reads_proc_stat(monkeypatch, tmp_path):
    """Two readings of /proc/stat: cpu0 busy all the time, cpu1 idle all the time -> one core free."""
    _fake_proc_stat(monkeypatch, tmp_path,
                    "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 100 0 0 0 0 0 0\nintr 1\n",
                    "cpu  0 0 0 0 0 0 0 0\ncpu0 105 0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 105 0 0 0 0 0 0\nintr 1\n")
    assert devices.free_cores(window=0) == pytest.approx(1.0)


def test_free_cores_is_never_negative_on_a_full_machine(monkeypatch, tmp_path):
    """Both cores busy the whole window, and this process's own CPU time read a hair back (float
    rounding of os.times): the busy share comes out a hair above 1, and the answer must still be 0."""
    _fake_proc_stat(monkeypatch, tmp_path,
                    "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 0 0 0 0 0 0 0\ncpu1 100 0 0 0 0 0 0 0 0 0\n",
                    "cpu  0 0 0 0 0 0 0 0\ncpu0 105 0 0 0 0 0 0 0 0 0\ncpu1 105 0 0 0 0 0 0 0 0 0\n")
    times = iter([os.times_result((1.0, 0.0, 0.0, 0.0, 0.0)), os.times_result((1.0 - 1e-12, 0.0, 0.0, 0.0, 0.0))])
    monkeypatch.setattr(devices.os, "times", lambda: next(times))
    assert devices.free_cores(window=0) == 0.0


def test_free_cores_on_this_machine_is_between_none_and_all():
    free = devices.free_cores(window=0.02)
    if free is not None:  # None only where there is no /proc/stat
        assert 0.0 <= free <= devices._cpu_count() + 1e-9


def test_a_run_says_how_many_threads_it_chose(monkeypatch):
    import nnfit
    from nnfit.progress import Reporter

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices, "_cpu_count", lambda: 2)
    lines = []
    reporter = Reporter()
    monkeypatch.setattr(reporter, "log", lines.append)
    nnfit.fit(samples=100, epochs=1, reporter=reporter)
    assert "threads: 1 of 2 (a small network: more threads would only add synchronization)" in lines


def test_auto_trains_a_small_lbfgs_fit_on_the_cpu_even_where_a_gpu_exists():
    """The tutorial's exercise trained 3.6x faster on an H200 machine's CPU than on its GPU (bench/gpu.py):
    --device auto keeps such fits on the CPU and says so; a larger fit, Adam, or --device cuda stay on the GPU."""
    from nnfit import api
    from nnfit.config import Config
    from nnfit.model import build_mlp
    from nnfit.progress import Reporter

    lines = []
    reporter = Reporter(quiet=True)
    reporter.log = lines.append
    gpu = devices.Context(device=torch.device("cuda", 0))
    module = build_mlp(1, 1, Config())  # 1-100-100-1: 10,401 parameters
    chosen = api._small_lbfgs_on_cpu(Config(), gpu, module, 900, reporter)
    assert chosen.device == torch.device("cpu") and "trains faster on the CPU" in lines[0]
    assert api._small_lbfgs_on_cpu(Config(), gpu, module, 100_000, reporter) is gpu  # too much work
    assert api._small_lbfgs_on_cpu(Config(optimizer="adam"), gpu, module, 900, reporter) is gpu
    assert api._small_lbfgs_on_cpu(Config(device="cuda"), gpu, module, 900, reporter) is gpu
    cpu = devices.Context(device=torch.device("cpu"))
    assert api._small_lbfgs_on_cpu(Config(), cpu, module, 900, reporter) is cpu
