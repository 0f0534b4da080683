"""Measuring one workload under one backend: time, kernels, bytes, compile time and numerics.

Numbers and where they come from:
  time       median and quartiles over repeated runs after warm-up (CUDA events on a GPU, perf_counter on CPU)
  kernels    GPU: CUDA kernels seen by torch.profiler in one run. CPU: eager = aten ops that are not
             views (a dispatch-mode counter); lazygraph = stats() triton_kernels + extern_calls;
             torch.compile = the launches in the programs inductor wrote (its kernels, extern matmuls and
             aten fallbacks, each call once per run).
  bytes      modeled. eager: inputs + outputs of every counted aten op (what eager PyTorch really
             launches; lazygraph's own eager_bytes models its primitive ops, which overstates fused
             aten kernels such as native_layer_norm, so it is kept in `extra` only). lazygraph: the
             dump summaries' fused_bytes. torch.compile: inductor's num_bytes_accessed, where it counts.
  cold/warm  the first call (capture + compile + run) and the second, with new inputs of the same shapes.
  error      max |out - ref| / max |ref| per output against eager in float64; above tolerance -> FAIL.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import signal
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before lazygraph imports triton

import lazygraph  # noqa: E402

from .suite import BACKENDS, Step, Unavailable, Workload  # noqa: E402

# an output's error (relative to its largest magnitude) allowed for each dtype; a backend may also
# be up to ERROR_MARGIN times as far off as eager in that dtype is
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-10}
ERROR_MARGIN = 10.0


@dataclass
class Options:
    repeat: int = 10
    warmup: int = 2
    time_budget_s: float = 10.0  # stop repeating a measurement after this long (at least 3 runs)
    torch_compile: bool = True
    compile_timeout_s: float | None = None  # CPU only: give up on a torch.compile cold call after this


@dataclass
class Result:
    workload: str
    size: str
    dtype: str
    backend: str
    status: str = "ok"  # ok | FAIL (numerics) | error (raised) | n/a (backend unavailable)
    reason: str = ""
    median_s: float | None = None
    p25_s: float | None = None
    p75_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    runs: int = 0
    speedup: float | None = None  # over eager; None when FAIL
    cold_s: float | None = None
    warm_s: float | None = None
    kernels: int | None = None
    kernels_source: str = ""
    bytes: int | None = None
    bytes_source: str = ""
    gbps: float | None = None
    copy_fraction: float | None = None
    max_error: float | None = None
    tolerance: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- timing ----------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds one call takes, all device work included."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float | None:
    """Bytes per second of a large on-device copy (read + write): the roofline for memory-bound work."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    times = [timed(lambda: dst.copy_(src), device)[0] for _ in range(12)][2:]
    return 2 * nbytes / statistics.median(times)


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise TimeoutError after `seconds` (SIGALRM: main thread, POSIX only; otherwise no limit)."""
    usable = seconds and hasattr(signal, "SIGALRM") and threading_is_main()
    if not usable:
        yield
        return

    def _alarm(signum, frame):
        raise TimeoutError(f"gave up after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# -- counting --------------------------------------------------------------------------------------

_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_local_scalar_dense", "set_", "resize_"}


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


class OpCounter(TorchDispatchMode):
    """Counts the aten ops eager PyTorch runs that launch a kernel (views and allocations do not),
    and the bytes they read and write (inputs + outputs, each op on its own: no fusion)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if not func.is_view and name not in _NO_KERNEL:
            self.ops += 1
            self.bytes += _nbytes(list(args)) + _nbytes(list(kwargs.values())) + _nbytes(out)
        return out


def count_cuda_kernels(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _dump_summaries(fn: Callable[[], Any]) -> tuple[list[dict], str]:
    """Run fn with lazygraph's dumps on: the summary.json of every graph it ran, and what went wrong."""
    import json

    folder = tempfile.mkdtemp(prefix="lazygraph-bench-")
    problem = ""
    lazygraph.dump(dir=folder)
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a broken dump must not hide the timings
        problem = re.sub(r"run-\d+", "run-N", _reason(e).replace(folder, "DUMP"))  # one note for all runs
    finally:
        lazygraph.dump(dir=os.environ.get("LAZYGRAPH_DUMP") or None)
    summaries = []
    # run-N/ from lazy runs; compile-N/forward/ and backward/ from compile()
    for where, _, files in sorted(os.walk(folder)):
        if "summary.json" in files:
            with open(os.path.join(where, "summary.json")) as f:
                summaries.append(json.load(f))
    shutil.rmtree(folder, ignore_errors=True)
    return summaries, problem


# -- numerics --------------------------------------------------------------------------------------


def max_error(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Largest error over outputs, each relative to its reference's largest magnitude."""
    if len(outputs) != len(reference):
        return float("inf")
    worst = 0.0
    for o, r in zip(outputs, reference):
        if o.shape != r.shape:
            return float("inf")
        o, r = o.detach().to("cpu", torch.float64), r.detach().to("cpu", torch.float64)
        finite = torch.isfinite(r)
        if not torch.equal(torch.isfinite(o), finite) or not torch.equal(o[~finite], r[~finite]):
            return float("inf")
        if finite.any():
            diff = (o[finite] - r[finite]).abs().max().item()
            scale = max(r[finite].abs().max().item(), 1e-30)
            worst = max(worst, diff / scale)
    return worst


# -- one measurement -------------------------------------------------------------------------------


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _compile_context(backend: str):
    """For torch.compile: a clean slate and no on-disk caches, so the cold call really compiles."""
    if backend != "torch.compile":
        return contextlib.nullcontext()
    torch._dynamo.reset()
    stack = contextlib.ExitStack()
    with contextlib.suppress(Exception):
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config
        from torch._inductor import metrics

        metrics.reset()  # its modeled bytes then cover this workload's graphs only

        stack.enter_context(inductor_config.patch(fx_graph_cache=False))
        stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
    return stack


def measure(workload: Workload, dims: dict, dtype: torch.dtype, backend: str, device: torch.device,
            reference: list[torch.Tensor] | None, opts: Options, res: Result) -> None:
    """Fill `res` for one workload x backend. Raises on errors (the caller records them)."""
    inputs = workload.inputs(dims, dtype, device, seed=0)
    # same shapes, new values: a new graph of the same structure
    fresh = workload.inputs(dims, dtype, device, seed=1)

    def call(step: Step, xs) -> list[torch.Tensor]:
        args = step.prepare(xs)  # untimed: copies, lazy leaves
        return timed(lambda: step.finish(step.run(args)), device)

    stats0 = lazygraph.stats()
    programs0 = len(_inductor_programs())
    limit = opts.compile_timeout_s if backend == "torch.compile" and device.type != "cuda" else None
    with _compile_context(backend), time_limit(limit), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = workload.step(backend, dims, dtype, device)
        res.cold_s, first = call(step, inputs)
    # e.g. "lazygraph.compile: cannot capture ...; running GPT eagerly": the numbers are not lazygraph's
    said = sorted({str(w.message).splitlines()[0][:160] for w in caught if "lazygraph" in str(w.message)})
    res.reason = "; ".join([res.reason, *said]).strip("; ")
    if reference is not None:  # the first call's answer: every backend starts from the same state
        n = step.n_compare or len(first)
        res.max_error = max_error(first[:n], reference[:n])
    del first
    res.warm_s, _ = call(step, fresh)
    if backend == "lazygraph":
        s = lazygraph.stats()
        res.extra["compiles"] = s["compiles"] - stats0["compiles"]

    for _ in range(opts.warmup):
        call(step, inputs)
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < max(1, opts.repeat):
        times.append(call(step, inputs)[0])
        if len(times) >= 3 and time.perf_counter() - t_start > opts.time_budget_s:
            break
    times.sort()
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    res.median_s, res.p25_s, res.p75_s = statistics.median(times), q[0], q[2]
    res.min_s, res.max_s, res.runs = times[0], times[-1], len(times)

    res.reason = "; ".join(filter(None, [res.reason, step.note]))
    _count(step, lambda: workload.step(backend, dims, dtype, device), inputs, backend, device, res)
    if backend == "torch.compile":
        _count_inductor(_inductor_programs()[programs0:], res)
    del step
    _cleanup(device)


def _count(step: Step, make_step: Callable[[], Step], inputs, backend: str, device: torch.device,
           res: Result) -> None:
    """Kernels and bytes from extra untimed runs of the warm step (lazygraph's dumps: of a new one)."""

    def once():
        args = step.prepare(inputs)
        step.finish(step.run(args))

    if device.type == "cuda":
        res.kernels, res.kernels_source = count_cuda_kernels(once), "profiler"
    if backend == "eager":
        counter = OpCounter()
        with counter:
            once()
        res.extra["aten_ops"] = counter.ops
        res.extra["aten_bytes"] = counter.bytes
        if res.kernels is None:
            res.kernels, res.kernels_source = counter.ops, "aten ops"
        res.bytes, res.bytes_source = counter.bytes, "aten ops in+out"
    elif backend == "lazygraph":
        _count_lazygraph(once, lambda: make_step()(inputs), res)


def _inductor_programs() -> list:
    """The Python modules inductor has written so far (each compiled graph's wrapper is one)."""
    try:
        from torch._inductor.codecache import PyCodeCache
    except ImportError:
        return []
    return list(PyCodeCache.modules)


# a launch in an inductor wrapper's call(): a generated kernel (C++ or Triton), an extern kernel such as
# a matmul, or an aten fallback; views (reinterpret_tensor) and allocations launch nothing
_LAUNCH = re.compile(r"^\s*(?:[\w, ]+=\s*)?(?:cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|"
                     r"torch\.ops\.aten\.\w+(?:\.\w+)?)\(", re.M)


def _count_inductor(programs: list, res: Result) -> None:
    """Kernels per run from the wrappers inductor wrote for this workload (forward and backward), and
    its modeled bytes (its metrics were reset before the cold call). Its own generated_kernel_count is
    no launch count: on the CPU it counts every code variant it tried (14 for layernorm's two kernels)."""
    import inspect

    launches = 0
    for module in programs:
        call = getattr(module, "call", None)
        with contextlib.suppress(OSError, TypeError):
            launches += len(_LAUNCH.findall(inspect.getsource(call))) if call else 0
    if res.kernels is None and launches:
        res.kernels, res.kernels_source = launches, "inductor wrapper calls"
    with contextlib.suppress(ImportError):
        from torch._inductor import metrics

        if metrics.num_bytes_accessed:
            res.bytes, res.bytes_source = int(metrics.num_bytes_accessed), "inductor model"


# -- the whole suite -------------------------------------------------------------------------------


def resolve_dims(workload: Workload, spec: str) -> tuple[str, dict]:
    """spec: "small", "large", or either followed by overrides ("small,T=64,N=100"); overrides apply to
    the workloads that have that dimension. Returns (label, dims)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    preset = parts[0] if parts and "=" not in parts[0] else "small"
    if preset not in workload.sizes:
        raise ValueError(f"unknown size {preset!r} for {workload.name}; have {sorted(workload.sizes)}")
    dims = dict(workload.sizes[preset])
    for p in parts:
        if "=" in p:
            key, value = p.split("=", 1)
            if key.strip() in dims:
                dims[key.strip()] = int(value)
    label = " ".join(f"{k}={v}" for k, v in dims.items())
    return label, dims


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def _reference(workload: Workload, dims: dict, dtype: torch.dtype, device: torch.device) -> list:
    """Eager in float64 on the same input values (on the CPU if the device runs out of memory)."""
    inputs = workload.inputs(dims, dtype, device, seed=0)
    inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    step = workload.step("eager", dims, torch.float64, device)
    try:
        out = step(inputs)
    except torch.cuda.OutOfMemoryError:
        del step
        _cleanup(device)
        cpu = torch.device("cpu")
        out = workload.step("eager", dims, torch.float64, cpu)([t.to(cpu) for t in inputs])
    return [o.to("cpu") for o in out]


def run_case(workload: Workload, spec: str, dtype: torch.dtype, device: torch.device, opts: Options,
             backends: Sequence[str] = BACKENDS, disabled: dict | None = None,
             on_backend: Callable[[str], None] | None = None) -> list[Result]:
    """All backends of one workload x size x dtype. `disabled` maps backend -> reason to skip it (shared
    across cases, so one torch.compile timeout skips it from then on)."""
    disabled = {} if disabled is None else disabled
    label, dims = resolve_dims(workload, spec)
    dname = str(dtype).replace("torch.", "")
    results = [Result(workload.name, label, dname, b) for b in backends]
    reference, ref_problem = None, ""
    try:
        reference = _reference(workload, dims, dtype, device)
    except Unavailable as e:
        for r in results:
            r.status, r.reason = "n/a", str(e)
        return results
    except Exception as e:  # noqa: BLE001 - the report says what went wrong
        ref_problem = f"no float64 reference ({_reason(e)})"
    _cleanup(device)

    for res in results:
        if on_backend:
            on_backend(res.backend)
        if res.backend in disabled:
            res.status, res.reason = "n/a", disabled[res.backend]
            continue
        try:
            measure(workload, dims, dtype, res.backend, device, reference, opts, res)
        except TimeoutError as e:
            res.status, res.reason = "n/a", f"torch.compile {e}"
            disabled[res.backend] = f"skipped: an earlier {res.backend} call timed out"
        except Unavailable as e:
            res.status, res.reason = "n/a", str(e)
        except Exception as e:  # noqa: BLE001
            # torch.compile may simply not work on this machine (no compiler); other backends are bugs
            res.status = "n/a" if res.backend == "torch.compile" else "error"
            res.reason = _reason(e)
        if ref_problem:
            res.reason = "; ".join(filter(None, [res.reason, ref_problem]))
        _cleanup(device)
    _judge(results, dtype)
    return results


def _judge(results: list[Result], dtype: torch.dtype) -> None:
    """Tolerances, FAIL marks and speedups over eager (a FAIL is never a speedup)."""
    eager = next((r for r in results if r.backend == "eager" and r.status == "ok"), None)
    eager_error = eager.max_error if eager and eager.max_error is not None else 0.0
    for r in results:
        if r.status != "ok":
            continue
        r.tolerance = max(TOLERANCE.get(dtype, 1e-4), ERROR_MARGIN * eager_error)
        if r.max_error is not None and not r.max_error <= r.tolerance:
            r.status = "FAIL"
            why = f"error {r.max_error:.2e} > tolerance {r.tolerance:.1e}"
            r.reason = "; ".join(filter(None, [why, r.reason]))
        if r.status == "ok" and eager and eager.median_s and r.median_s:
            r.speedup = eager.median_s / r.median_s


def add_bandwidth(results: list[Result], copy_bw: float | None) -> None:
    """Achieved GB/s from modeled bytes and the median time, and its fraction of the copy bandwidth."""
    if copy_bw is None:
        return
    for r in results:
        if r.bytes and r.median_s:
            r.gbps = r.bytes / r.median_s / 1e9
            r.copy_fraction = r.bytes / r.median_s / copy_bw


def _count_lazygraph(once: Callable[[], Any], fresh: Callable[[], Any], res: Result) -> None:
    """Kernels from stats() over one run; bytes and the rest from the dump summaries of a fresh step
    (a new step compiles again, so lazygraph.compile writes its dumps while they are on)."""
    before = lazygraph.stats()
    once()
    after = lazygraph.stats()
    launched = {k: after[k] - before[k] for k in ("triton_kernels", "extern_calls", "graphs_run")}
    res.extra["graphs"] = launched["graphs_run"]
    res.extra["graph_breaks"] = sum(after["graph_breaks"].values()) - sum(before["graph_breaks"].values())
    summaries, problem = _dump_summaries(fresh)
    if problem:
        res.extra["dump_error"] = problem
    res.extra["programs"] = sorted({str(s.get("program", "?")) for s in summaries})
    for key in ("eager_ops", "kernels", "extern_calls", "eager_bytes", "fused_bytes", "peak_bytes"):
        if summaries and all(key in s for s in summaries):
            res.extra[key] = sum(int(s[key]) for s in summaries)
    compiled = launched["triton_kernels"] > 0 or "kernels" in res.extra
    if compiled and res.kernels is None:
        res.kernels = launched["triton_kernels"] + launched["extern_calls"]
        if not res.kernels:  # stats not counted by this program: use its own model
            res.kernels = res.extra.get("kernels", 0) + res.extra.get("extern_calls", 0)
        res.kernels_source = "lazygraph stats"
    if "fused_bytes" in res.extra:
        res.bytes, res.bytes_source = res.extra["fused_bytes"], "dump fused_bytes"
    if not compiled:
        res.reason = "reference executor (no fused program): kernels and bytes not modeled"
    elif "dump_error" in res.extra:
        res.reason = f"lazygraph.dump failed, bytes not modeled ({res.extra['dump_error']})"
