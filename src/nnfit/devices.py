"""Where things run. The only module that reads the environment or asks which devices exist.

It parses device strings, builds the run's ``Context`` (one process, or one rank of a
torch.distributed group started by ``torchrun`` or ``--devices N``), decides where the data
lives, and recovers from out-of-memory errors.
"""

from __future__ import annotations

import gc
import os
import re
import resource
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch

from nnfit.errors import NnfitError
from nnfit.errors import setting as S

# cuBLAS gives bit-for-bit the same results run after run only with a fixed workspace configuration
# (NVIDIA's cuBLAS guide, "Results reproducibility"), and torch.use_deterministic_algorithms refuses
# cuBLAS calls without one. It is read when CUDA first creates a cuBLAS handle, so it is set here, when
# nnfit is imported; a value the user set is kept. 8 buffers of 4 MiB: what PyTorch documents.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

DATA_FRACTION = 0.5  # --data-on auto keeps the data on the GPU while it needs at most this share of free memory
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def gpu_count() -> int:
    """Number of CUDA GPUs; the one place to mock in tests."""
    return torch.cuda.device_count()


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def available() -> list[str]:
    """The devices that exist here, for error messages."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(gpu_count())]
    if _mps_available():
        found.append("mps")
    return found


def parse_device(spec: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` into a device that exists."""
    text = str(spec).strip().lower()
    count = gpu_count()
    if text == "auto":
        if count:
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match:
        index = int(match.group(1) or 0)
        if count == 0:
            raise NnfitError(f"device {spec!r} was asked for, but this machine has no CUDA GPU; "
                             f"devices here: {', '.join(available())}. Use {S('device', 'cpu')} or auto")
        if index >= count:
            raise NnfitError(f"device {spec!r} does not exist: this machine has {count} CUDA GPU(s); "
                             f"devices here: {', '.join(available())}")
        return torch.device("cuda", index)
    if text == "mps":
        if not _mps_available():
            raise NnfitError(f"device 'mps' is not available here; devices here: {', '.join(available())}")
        return torch.device("mps")
    raise NnfitError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps "
                     f"(devices here: {', '.join(available())})")


def where_it_was(name: str) -> torch.device:
    """The device named ``name`` (``str`` of a tensor's device) if it exists here, else the CPU: where a
    model that is copied (pickled, cloned) is restored, so that the copy predicts as the original did."""
    return torch.device(name) if name in available() else torch.device("cpu")


def parse_devices(spec: str, n: int) -> list[torch.device]:
    """The devices of ``--devices N`` workers: N GPUs on CUDA, N processes on the CPU."""
    base = parse_device(spec)
    if n == 1:
        return [base]
    if base.type == "mps":
        raise NnfitError(f"{S('devices', n)} needs CUDA GPUs or the CPU: torch.distributed has no backend for mps; "
                         f"use {S('device', 'cpu')} for CPU processes or {S('devices', '1')}")
    if base.type == "cpu":
        return [torch.device("cpu")] * n
    if re.fullmatch(r"cuda:\d+", str(spec).strip().lower()):
        raise NnfitError(f"{S('device', spec)} names one GPU, but {S('devices', n)} uses {n}; "
                         f"pass {S('device', 'cuda')} (workers take cuda:0 … cuda:N-1) or {S('devices', '1')}")
    count = gpu_count()
    if n > count:
        raise NnfitError(f"{S('devices', n)} asks for {n} GPUs, but this machine has {count}: "
                         f"{', '.join(f'cuda:{i}' for i in range(count))}; use {S('devices', count)} or fewer, "
                         f"or {S('device', 'cpu')} for {n} CPU processes")
    return [torch.device("cuda", i) for i in range(n)]


@dataclass(frozen=True)
class Context:
    """Who this process is in a run: one process, or one rank of a torch.distributed group."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # set when this process joined a process group (it then trains with DDP)
    _owns_group: bool = field(default=False, repr=False)
    _exact_before: tuple | None = field(default=None, repr=False)  # torch's settings before exact_kernels

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched() -> int:
    """World size when this process was started by torchrun or ``--devices N``, else 0."""
    if not all(name in os.environ for name in TORCHRUN_VARS):
        return 0
    return _env_int("WORLD_SIZE")


def rank() -> int:
    """This process's rank under torchrun or ``--devices N``; 0 for a single process."""
    return _env_int("RANK") if launched() else 0


FAULTS = ("kill-during-save", "kill-at-step")


def fault(kind: str) -> int | None:
    """The test hook NNFIT_FAULT=KIND:N (e.g. ``kill-during-save:3``): N when it names ``kind``, else None.

    ``kill-during-save:N`` SIGKILLs the process after the temporary file of its Nth atomic write
    is written and before it is renamed; ``kill-at-step:N`` SIGKILLs it after its Nth training step.
    """
    text = os.environ.get("NNFIT_FAULT", "")
    name, _, number = text.partition(":")
    if name != kind:
        return None
    if not number.isdigit() or int(number) < 1:
        raise NnfitError(f"NNFIT_FAULT={text!r} must be KIND:N with N a positive integer and KIND one of "
                         f"{', '.join(FAULTS)}")
    return int(number)


def kill_self() -> None:
    """SIGKILL this process: what an OOM killer or a pre-empted machine does (NNFIT_FAULT tests)."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise NnfitError(f"environment variable {name}={text!r} must be an integer (it is set by torchrun)") from None


def init_context(config) -> Context:
    """One process: the parsed ``--device``. Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK set):
    join the process group, NCCL on CUDA and gloo on the CPU, with ``cuda:LOCAL_RANK`` per worker."""
    world = launched()
    if not world:
        return exact_kernels(Context(device=parse_device(config.device)))
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if config.devices > 1 and config.devices != world:
        raise NnfitError(f"{S('devices', config.devices)} was given, but torchrun started {world} worker(s); "
                         f"drop {S('devices')} (torchrun already chose the workers) or pass {S('devices', world)}")
    spec = str(config.device).strip().lower()
    if re.fullmatch(r"cuda:\d+", spec) and world > 1:
        raise NnfitError(f"{S('device', config.device)} names one GPU, but under torchrun each worker uses "
                         f"cuda:LOCAL_RANK; pass {S('device', 'cuda')} or auto")
    base = parse_device(config.device if world == 1 or not spec.startswith("cuda") else "cuda")
    if base.type == "mps":
        raise NnfitError(f"torch.distributed has no backend for mps; run torchrun with {S('device', 'cpu')}")
    if base.type == "cuda":
        if local_rank >= gpu_count():
            raise NnfitError(f"worker with LOCAL_RANK {local_rank} needs cuda:{local_rank}, but this machine has "
                             f"{gpu_count()} GPU(s); start at most {gpu_count()} worker(s) per machine "
                             "(torchrun --nproc-per-node)")
        device, backend = (base if world == 1 else torch.device("cuda", local_rank)), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            # Workers on one machine share its cores; oversubscribed threads make everyone slower.
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, _cpu_count() // max(1, per_node)))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    return exact_kernels(Context(device=device, rank=rank, local_rank=local_rank, world_size=world,
                                 backend=backend, _owns_group=owns))


def exact_kernels(ctx: Context) -> Context:
    """On CUDA, deterministic kernels for the run (``cleanup_context`` puts the caller's settings back):
    the same seed gives bit-identical weights, and a resumed run ends bit-identical to an uninterrupted
    one, as on the CPU. An operation without a deterministic CUDA kernel (in a custom module) warns
    instead of failing. Uninitialised memory is not filled: no kernel of nnfit reads it, and the fill
    would add a launch to every allocation of a launch-bound step."""
    if ctx.device.type != "cuda":
        return ctx
    import torch.utils.deterministic

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    if not before[0]:  # a caller that asked for strict determinism keeps it
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    return replace(ctx, _exact_before=before)


def _restore_kernels(ctx: Context) -> None:
    if ctx._exact_before is not None:
        import torch.utils.deterministic

        enabled, warn_only, fill = ctx._exact_before
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def cleanup_context(ctx: Context, failed: bool = False) -> None:
    """Tear down what ``init_context`` set up: the process group, if this context created it.

    After a failure it does no collective: the other ranks may be gone, and this process must exit
    so that the launcher stops the rest.
    """
    _restore_kernels(ctx)
    if ctx.distributed and ctx._owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            if not failed and ctx.world_size > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
                # Rank 0 serves the rendezvous store. A later fit in this process must not reach the
                # store being torn down here, so every rank moves on to a fresh port chosen by rank 0.
                port = torch.tensor([free_port() if ctx.is_main else 0], device=ctx.device)
                dist.broadcast(port, 0)
                os.environ["MASTER_PORT"] = str(int(port.item()))
            dist.destroy_process_group()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# CPU threads.

LOAD_WINDOW = 0.05  # seconds of /proc/stat sampling before a multi-threaded CPU run: 5 clock ticks per core
# A core counts as free when at least this share of it was idle; a half-busy core still stalls torch's
# OpenMP barriers (sin(3x)exp(-x), 5000 samples, 2 cores, one busy process: 2 threads 4.3 s, 1 thread 1.6 s).
FREE_SHARE = 0.8


def _cpu_jiffies(cpus) -> tuple[int, int] | None:
    """(busy, total) clock ticks of the CPUs ``cpus`` from /proc/stat; None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle = values[3] + values[4]
        busy += sum(values) - idle
        total += sum(values)
    return (busy, total) if total else None


def free_cores(window: float = LOAD_WINDOW) -> float | None:
    """How many of the cores this process may run on were idle over the next ``window`` seconds
    (other processes' load, measured from /proc/stat); None where that cannot be measured."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return None
    own = os.times()
    before = _cpu_jiffies(cpus)
    time.sleep(window)
    after = _cpu_jiffies(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return None
    # This process's own threads are not load: torch's idle OpenMP workers spin for a while after the data
    # was prepared, and counted as busy they made a quiet machine look half taken.
    now = os.times()
    mine = (now.user + now.system - own.user - own.system) * os.sysconf("SC_CLK_TCK")
    busy, total = max(0.0, after[0] - before[0] - mine), after[1] - before[1]
    return len(cpus) * max(0.0, 1 - busy / total)  # busy can round to a hair above total on a full machine


def cpu_threads(asked: int | None, small: bool, ctx: Context) -> tuple[int | None, str]:
    """The CPU threads for a training run, and the line that says why.

    ``--threads N`` wins; a small network gets one thread (more only add synchronization); then
    ``OMP_NUM_THREADS`` or a DDP worker's share of the cores stay; otherwise one thread per core that
    is actually free now: threads that wait at a barrier for a core another process holds make the
    whole run several times slower. Returns (None, "") where torch's setting is left alone.
    """
    if asked:
        return asked, ""
    if ctx.device.type != "cpu":
        return None, ""
    cores = _cpu_count()
    if small:
        if cores == 1 or ctx.distributed:  # nothing to choose, or one line per worker
            return 1, ""
        return 1, f"threads: 1 of {cores} (a small network: more threads would only add synchronization)"
    if ctx.distributed or "OMP_NUM_THREADS" in os.environ or cores == 1:
        return None, ""
    free = free_cores()
    if free is None:
        return None, ""
    threads = max(1, min(cores, int(free + 1 - FREE_SHARE)))
    busy = cores - threads
    why = "the cores are free" if busy == 0 else (
        f"{'the other core is' if cores == 2 else f'{busy} of the cores are'} busy: about {free:.1f} free")
    return threads, f"threads: {threads} of {cores} ({why}; --threads N to choose)"


def free_port() -> int:
    """A free TCP port on this machine for the workers' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce(tensor: torch.Tensor, ctx: Context, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a tensor over all ranks, in place; a no-op in a single process."""
    if ctx.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def to_device(tensor: torch.Tensor, ctx: Context, dtype=None, device=None) -> torch.Tensor:
    """Place a tensor (data or a batch) on the run's device: the one place that moves data.

    ``device`` overrides the target: data kept in CPU memory for a GPU run is pinned, so that
    its batches can be copied with ``non_blocking=True``.
    """
    device = ctx.device if device is None else device
    out = tensor.to(device=device, dtype=dtype or tensor.dtype)
    if device.type == "cpu" and ctx.device.type == "cuda":
        out = out.pin_memory()
    return out


def place_model(model: torch.nn.Module, ctx: Context, dtype) -> torch.nn.Module:
    """Place the model on the run's device, in the run's dtype."""
    return model.to(device=ctx.device, dtype=dtype)


def data_device(data_on: str, ctx: Context, nbytes: int) -> tuple[torch.device, str]:
    """Where the training data lives, and a line that says why.

    ``auto`` keeps it on a GPU while it needs at most DATA_FRACTION of the free GPU memory;
    otherwise it stays in pinned CPU memory and each batch is copied as it is used.
    """
    size = _format_bytes(nbytes)
    if data_on == "cpu":
        where = "in pinned CPU memory" if ctx.device.type == "cuda" else "in CPU memory"
        return torch.device("cpu"), f"data: {size} kept {where} (--data-on cpu); batches are copied to {ctx.device}"
    if data_on == "device" or ctx.device.type != "cuda":
        return ctx.device, f"data: {size} on {ctx.device}"
    free = _cuda_free(ctx.device)
    if nbytes <= DATA_FRACTION * free:
        return ctx.device, (f"data: {size} on {ctx.device} (at most {DATA_FRACTION:.0%} of its "
                            f"{_format_bytes(free)} free memory)")
    return torch.device("cpu"), (f"data: {size} is more than {DATA_FRACTION:.0%} of the {_format_bytes(free)} "
                                 f"free on {ctx.device}; kept in pinned CPU memory, batches copied as they are used")


def _cuda_free(device: torch.device) -> int:
    """Free memory on a GPU, within this process's cap (torch.cuda.set_per_process_memory_fraction)."""
    free, total = torch.cuda.mem_get_info(device)
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is not None:
        allowed = int(getter(device) * total) - torch.cuda.memory_reserved(device)
        free = min(free, max(0, allowed))
    return free


def reset_peak_memory(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)


RSS = "peak resident set of the process"
CUDA_PEAK = "cuda max_memory_allocated"


def peak_memory(ctx: Context) -> dict:
    """Peak memory of this run: ``bytes``, ``human`` and ``measure``, the device's figure: on CUDA
    ``torch.cuda.max_memory_allocated``, elsewhere the process's peak resident set (CPU and MPS share
    the host's memory). On CUDA ``host`` adds the process's peak resident set in the same form.
    Under DDP each is the largest over the ranks (a collective: every rank calls it)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = rss if sys.platform == "darwin" else rss * 1024
    values = [torch.cuda.max_memory_allocated(ctx.device), rss] if ctx.device.type == "cuda" else [rss]
    suffix = ""
    if ctx.distributed:
        t = torch.tensor(values, dtype=torch.int64, device=ctx.device)  # exact: float32 rounds byte counts
        values, suffix = [int(v) for v in all_reduce(t, ctx, "max").tolist()], " (largest over the ranks)"
    entries = [{"bytes": int(v), "human": _format_bytes(v), "measure": kind + suffix}
               for v, kind in zip(values, [CUDA_PEAK, RSS] if len(values) == 2 else [RSS])]
    return {**entries[0], "host": entries[1]} if len(entries) == 2 else entries[0]


def describe_peak(peak: dict) -> str:
    """``345.3 MB (peak resident set of the process)``, with the host's figure after the GPU's."""
    text = f"{peak['human']} ({peak['measure']})"
    host = peak.get("host")
    return f"{text}; host: {host['human']} ({host['measure']})" if host else text


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# Out of memory.

def _host_memory(meminfo_key: str, pages: str) -> int | None:
    """Bytes of host memory: ``meminfo_key`` of /proc/meminfo on Linux, else sysconf's ``pages`` x the page
    size; None where neither can be read."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith(meminfo_key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_host_memory() -> int:
    """Bytes of memory that this process could still allocate: MemAvailable on Linux, the free
    physical pages elsewhere; a very large number where neither can be read."""
    free = _host_memory("MemAvailable", "SC_AVPHYS_PAGES")
    return 1 << 62 if free is None else free


def check_fits_in_memory(nbytes: int, what: str, remedy: str, free: int | None = None) -> None:
    """Refuse, before allocating, what cannot fit in the free host memory (``free``: as the caller read it)."""
    free = free_host_memory() if free is None else free
    if nbytes > free:
        raise NnfitError(f"{what} need about {_format_bytes(nbytes)} of memory, more than the "
                         f"{_format_bytes(free)} free now; {remedy}")


def total_host_memory() -> int | None:
    """Bytes of physical memory (MemTotal on Linux); None where it cannot be read."""
    return _host_memory("MemTotal", "SC_PHYS_PAGES")


def memory_of(device: torch.device) -> tuple[int, int | None]:
    """(free, total) bytes of the memory a run on ``device`` trains in: a GPU's own (free within this
    process's cap), else the host's (the CPU, and MPS, which shares the host's memory). The one place
    to mock in tests."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_free(device), torch.cuda.mem_get_info(device)[1]
    return free_host_memory(), total_host_memory()


@dataclass(frozen=True)
class MemoryEstimate:
    """What training a network needs, per member of an ensemble (``model.training_memory`` computes it).

    Every part scales with the members: K members need K times ``per_member``. ``state`` counts the
    parameters' copies (weights, gradients, the optimizer's moments, the loop's snapshots), ``rows`` the
    epoch's training rows gathered in the member's own order, ``per_row`` the activations one row of a
    (micro-)batch keeps for the backward pass.
    """

    members: int
    parameters: int  # per member
    state: int  # bytes per member
    copies: str  # what ``state`` counts, for messages
    rows: int  # bytes per member
    per_row: int  # bytes per member and row of a (micro-)batch
    batch: int  # rows per step (per worker)
    floor: int  # the fewest rows per forward pass the out-of-memory guard goes down to
    widths: tuple = ()  # hidden widths, for messages
    optimizer: str = ""

    def per_member(self, rows: int | None = None) -> int:
        """Bytes one member needs with ``rows`` rows per forward pass (default: whole batches)."""
        return self.state + self.rows + self.per_row * (self.batch if rows is None else rows)

    def total(self, rows: int | None = None) -> int:
        return self.members * self.per_member(rows)

    def largest(self, budget: int, rows: int | None = None) -> int:
        """The most members that fit in ``budget`` bytes by this estimate."""
        return max(0, int(budget) // max(1, self.per_member(rows)))

    def describe(self, rows: int | None = None) -> str:
        rows = self.batch if rows is None else rows
        return (f"{_format_bytes(self.per_member(rows))} per member: {_format_bytes(self.state)} for {self.copies} "
                f"of its {self.parameters:,} parameters, {_format_bytes(self.per_row * rows)} for the activations "
                f"of {_rows(rows)}, {_format_bytes(self.rows)} for the epoch's rows in its own order")


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def members_error(estimate: MemoryEstimate, device: torch.device, budget: int, total: int | None,
                  rows: int, where: str | None = None) -> NnfitError:
    """The one error for an ensemble that does not fit: what was asked, what it needs by the estimate,
    what the device has, and the most members that fit by the same estimate. ``where``: the out-of-memory
    error's place (a training step, evaluation), where K members did not fit in fact; the count named is
    then below K whatever the estimate says."""
    k, batch = estimate.members, estimate.batch
    hidden = S('hidden', ','.join(map(str, estimate.widths)))
    lbfgs = estimate.optimizer == "full-batch L-BFGS"
    asked = f"{S('ensemble', k)} of {hidden} with " + (f"full-batch L-BFGS on {batch} rows" if lbfgs else
                                                       f"{estimate.optimizer} at {S('batch_size', batch)}")
    smaller = f"{S('optimizer', 'adam')} with a {S('batch_size')}" if lbfgs else f"a smaller {S('batch_size')}"
    micro = "" if rows >= batch else f" in micro-batches of {_rows(rows)}"
    of = f" of {_format_bytes(total)}" if total else ""
    whole, small = estimate.largest(budget), estimate.largest(budget, rows)
    if where is None:
        head = (f"too many ensemble members for the memory: {asked} needs about "
                f"{_format_bytes(estimate.total(rows))}{' even' if micro else ''}{micro} on {device} "
                f"({estimate.describe(rows)}), and {device} has {_format_bytes(budget)} free{of}")
    else:
        whole, small = min(whole, k - 1), min(small, k - 1)
        head = (f"out of memory in {where} on {device}: {asked} did not fit{micro} (by the estimate "
                f"{_format_bytes(estimate.total(rows))}: {estimate.describe(rows)}); {device} has about "
                f"{_format_bytes(budget)} for the members (free now plus what they hold){of}")
    if whole >= 1:
        fits = f"the most members that fit by this estimate is {whole}: pass {S('ensemble', whole)}"
        if small > whole:
            fits += f" (or up to {small} in micro-batches of {_rows(rows)}, slower)"
    elif small >= 1:
        fits = (f"not one member fits whole batches of {_rows(batch)}, and at most {small} fit in micro-batches "
                f"of {_rows(rows)}: pass {S('ensemble', small)} with {smaller}")
    else:
        fits = "not one member fits"
    return NnfitError(f"{head}; {fits}, or use {smaller} or smaller widths ({S('hidden')})")


def check_members_fit(estimate: MemoryEstimate, device: torch.device, held: int, log) -> None:
    """Refuse, before training, an ensemble that cannot fit even in micro-batches of ``estimate.floor``
    rows (row halving could not save it); ``held``: bytes of the estimate already allocated there
    (the weights, on the CPU). Where it fits only in micro-batches, ``log`` says so."""
    free, total = memory_of(device)
    budget = free + held
    floor = min(estimate.floor, estimate.batch)
    if estimate.total(floor) > budget:
        raise members_error(estimate, device, budget, total, floor)
    if estimate.total() > budget:
        log(f"memory: {estimate.members} members at batch {estimate.batch} need about "
            f"{_format_bytes(estimate.total())}, more than the {_format_bytes(budget)} free on {device}; expect "
            f"out-of-memory retries in smaller micro-batches (same result, slower); --ensemble "
            f"{estimate.largest(budget)} fits whole batches")


_OOM_MESSAGES = ("MPS backend out of memory", "CUDA out of memory", "DefaultCPUAllocator: can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's ``torch.cuda.OutOfMemoryError``, or the out-of-memory message of MPS (or the CPU allocator)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def free_memory(device: torch.device) -> None:
    """Return what the caching allocator holds once nothing refers to it any more."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


# An ensemble's rows are halved after an out-of-memory error only while the activations of a micro-batch
# are at least this share of what a member needs by the estimate. Rows matter at large batches and hardly
# at small ones: K = 8 members of 1 -> 512 -> 512 -> 1 with Adam, the rows are 43% of the estimate at
# batch 1024, 16% at 256, 4% at 64 (bench/ensemble_memory.py, which also measures the estimate against a
# run's peak memory). Below the share, halving the rows again frees less than a twentieth, each retry is
# one more failed allocation, and the members are what costs: the error then names how many fit.
ROWS_STILL_MATTER = 0.1


@dataclass
class MemoryGuard:
    """Halves a batch size after an out-of-memory error, down to ``min_batch_size``, with a line per retry.

    For an ensemble (``estimate``, set by the training loop) rows are halved first, since that is exact
    (the optimizer still sees the whole batch) and a large batch's activations are much of the memory;
    once a micro-batch's activations are a small share of a member (``ROWS_STILL_MATTER``), or at the
    floor, it stops with the error that names the most members that fit by the estimate. It never trains
    fewer members than were asked for.
    """

    min_batch_size: int = 1
    log: object = print
    retries: list = field(default_factory=list)
    estimate: MemoryEstimate | None = None

    def halve(self, size: int, where: str, device: torch.device) -> int:
        free_memory(device)
        new = size // 2
        if self.estimate is not None:  # set for an ensemble only (train.memory_estimate)
            self._members_or_rows(size, new, where, device)
        if new < self.min_batch_size:
            raise NnfitError(
                f"out of memory in {where} on {device} even with a batch of {size} row(s) "
                f"(the floor is {S('min_batch_size', self.min_batch_size)}); keep the data off the GPU with "
                f"{S('data_on', 'cpu')}, use a smaller model ({S('hidden')}), or {S('precision', 'bf16')}")
        self.retries.append({"where": where, "from": size, "to": new})
        self.log(f"out of memory in {where} with a batch of {size}; retrying with {new} "
                 f"(floor --min-batch-size {self.min_batch_size})")
        return new

    def _members_or_rows(self, size: int, new: int, where: str, device: torch.device) -> None:
        estimate = self.estimate
        if new >= self.min_batch_size and estimate.per_row * size >= ROWS_STILL_MATTER * estimate.per_member(size):
            return  # halving the rows still frees a good share
        free, total = memory_of(device)
        # What this run holds now (its state and rows, by the estimate) is free to a run with fewer members.
        budget = free + estimate.members * (estimate.state + estimate.rows)
        raise members_error(estimate, device, budget, total, size, where)


def accumulator(device) -> torch.dtype:
    """The dtype for running sums of losses: float64, except on MPS, which has none."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64
