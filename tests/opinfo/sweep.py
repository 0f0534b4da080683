"""Run one OpInfo sample eagerly, through lazygraph and in float64, and judge it.

A case is one op_db entry, one dtype and one direction ('forward'; 'backward': gradients of
sum(out * cotangent) for every input that requires grad; 'errors': the op's error inputs, bad
arguments eager rejects, which lazygraph must reject too, with eager's exception type). Its samples are the first few of
`op.sample_inputs('cpu', dtype)`, drawn under a seed of the case's own, so every process that
draws them gets the same ones.
"""

from __future__ import annotations

import contextlib
import copy
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cache
from itertools import islice
from typing import Any

import torch

import lazygraph as lg
from benchmarks.harness import time_limit  # SIGALRM: a sample stuck in the interpreter
from tests.opinfo import judge

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "bool": torch.bool,
}
SAMPLES_PER_DTYPE = 4
SAMPLE_TIMEOUT_S = 60
EAGER_RUNS_FOR_RANDOM = 8  # pooled eager runs a random op's statistics are compared with


@dataclass(frozen=True)
class Case:
    op_index: int  # into op_db
    name: str
    variant: str
    dtype: str
    direction: str  # 'forward' | 'backward' | 'errors'

    def key(self) -> tuple[str, str, str, str]:
        return (self.name, self.variant, self.dtype, self.direction)

    def label(self) -> str:
        op = self.name + (f".{self.variant}" if self.variant else "")
        return f"{op} {self.dtype} {self.direction}"


@dataclass
class Result:
    name: str
    variant: str
    dtype: str
    direction: str
    sample: int
    status: str  # 'pass' | 'wrong' | 'raises' | 'skip'
    # raises: the exception type; otherwise how it was judged: '' (values), 'random' (statistics),
    # 'uninitialised' (shapes only), 'accepted' (eager raises, lazygraph returned a value)
    error: str = ""
    detail: str = ""
    seconds: float = 0.0

    def key(self) -> tuple[str, str, str, str]:
        return (self.name, self.variant, self.dtype, self.direction)

    def as_dict(self) -> dict:
        return asdict(self)


@cache
def op_db() -> list:
    from torch.testing._internal.common_methods_invocations import op_db as db

    return db


def cases(op_filter: Callable[[Any], bool] = lambda op: True, dtypes=tuple(DTYPES),
          directions=("forward", "backward", "errors")) -> list[Case]:
    """Every (op, dtype, direction) the op supports on the CPU; backward is float32 only; the
    error inputs (which choose their own dtypes) are one case per op, labelled float32."""
    out = []
    for i, op in enumerate(op_db()):
        if not op_filter(op):
            continue
        supported = op.supported_dtypes("cpu")
        for d in dtypes:
            if "forward" in directions and DTYPES[d] in supported:
                out.append(Case(i, op.name, op.variant_test_name, d, "forward"))
        if ("backward" in directions and "float32" in dtypes and op.supports_autograd
                and torch.float32 in op.supported_backward_dtypes("cpu")):
            out.append(Case(i, op.name, op.variant_test_name, "float32", "backward"))
        if "errors" in directions and op.error_inputs_func is not None:
            out.append(Case(i, op.name, op.variant_test_name, "float32", "errors"))
    return out


def samples(case: Case, limit: int) -> list:
    op = op_db()[case.op_index]
    torch.manual_seed(zlib.crc32(case.label().encode()))
    if case.direction == "errors":
        return list(op.error_inputs("cpu"))  # a handful per op: all of them
    gen = op.sample_inputs("cpu", DTYPES[case.dtype], requires_grad=case.direction == "backward")
    return list(islice(gen, limit))


# ---------------------------------------------------------------------------------------------
# tensors inside nested arguments and results
# ---------------------------------------------------------------------------------------------


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        items = [map_tensors(v, fn) for v in value]
        if type(value) is tuple:
            return tuple(items)
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def tensors_in(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_tensors(value, found.append)
    return found


def fresh(sample) -> tuple[tuple, dict]:
    """A private copy of the sample's (args, kwargs): same strides, same aliasing between args."""
    args, kwargs = (sample.input, *sample.args), dict(sample.kwargs)
    try:
        return copy.deepcopy((args, kwargs))
    except Exception:  # deepcopy refuses non-leaf tensors
        def clone(t):
            return t.detach().clone().requires_grad_(t.requires_grad)
        return map_tensors(args, clone), map_tensors(kwargs, clone)


def to_reference(args: tuple, kwargs: dict, ref_dtype: torch.dtype) -> tuple[tuple, dict]:
    """The same arguments with floating tensors (and a floating dtype= kwarg) in `ref_dtype`."""
    def up(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.detach().to(ref_dtype).requires_grad_(t.requires_grad)
        if t.is_complex():
            return t.detach().to(torch.complex128).requires_grad_(t.requires_grad)
        return t

    kwargs = map_tensors(kwargs, up)
    if isinstance(kwargs.get("dtype"), torch.dtype) and kwargs["dtype"].is_floating_point:
        kwargs["dtype"] = ref_dtype
    return map_tensors(args, up), kwargs


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------------------------
# the three runs of one sample
# ---------------------------------------------------------------------------------------------


def cotangents(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]


def differentiable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad and (t.is_floating_point() or t.is_complex())


def forward(fn, sample, args, kwargs) -> Any:
    """The op's result, and every tensor argument after the call (in-place ops write them)."""
    out = fn(*args, **kwargs)
    return [out, tensors_in((args, kwargs))]


def backward(fn, sample, args, kwargs, lazy_cotangents: bool = False) -> Any:
    """Gradients of sum(out * cotangent) for every argument that requires grad (zeros if unused)."""
    inputs = [t for t in tensors_in((args, kwargs)) if t.requires_grad]
    outs = [o for o in tensors_in(sample.output_process_fn_grad(fn(*args, **kwargs))) if differentiable(o)]
    if not inputs or not outs:
        return None
    real = [torch.view_as_real(o.resolve_conj()) if o.is_complex() else o for o in outs]
    cots = cotangents([r.detach() for r in real])
    cots = [c.to(r.dtype) for c, r in zip(cots, real)]
    if lazy_cotangents:
        cots = [lg.lazy(c) for c in cots]
    loss = sum((r * c).sum() for r, c in zip(real, cots))
    return list(torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True))


@contextlib.contextmanager
def seeded(fn, seed: int) -> Iterator[None]:
    """Seed the RNG. OpInfo marks a random op by calling it through wrapper_set_seed (which seeds
    42 each call): swap that for one seeding `seed`, so two eager runs can differ."""
    torch.manual_seed(seed)
    names = getattr(getattr(fn, "__code__", None), "co_names", ())
    module = getattr(fn, "__globals__", {})
    if "wrapper_set_seed" not in names or "wrapper_set_seed" not in module:
        yield
        return
    original = module["wrapper_set_seed"]

    def wrapper_set_seed(op, *args, **kwargs):
        torch.manual_seed(seed)
        return op(*args, **kwargs)

    module["wrapper_set_seed"] = wrapper_set_seed
    try:
        yield
    finally:
        module["wrapper_set_seed"] = original


def run_eager(fn, sample, direction: str, seed: int = 0) -> Any:
    args, kwargs = fresh(sample)
    with seeded(fn, seed):
        return (forward if direction == "forward" else backward)(fn, sample, args, kwargs)


def lazy_aliased(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """lg.lazy of every tensor argument, keeping eager's memory sharing: tensors over one storage
    (an `out=` that overlaps an input, a broadcast `out=`) become views of one lazy base, so the
    overlap errors eager raises for them can be raised lazily too."""
    groups: dict[int, list[torch.Tensor]] = {}
    for t in tensors_in((args, kwargs)):
        if t.layout is torch.strided and not t.requires_grad and t.untyped_storage().data_ptr():
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    views: dict[int, torch.Tensor] = {}
    for group in groups.values():
        shared = len({id(t) for t in group}) > 1 or any(0 in t.stride() for t in group)
        if not shared or len({t.dtype for t in group}) > 1:
            continue
        storage = group[0].untyped_storage()
        flat = torch.empty(0, dtype=group[0].dtype).set_(storage, 0, (storage.nbytes() // group[0].element_size(),))
        base = lg.lazy(flat)
        for t in group:
            views[id(t)] = base.as_strided(t.shape, t.stride(), t.storage_offset())

    def convert(t: torch.Tensor) -> torch.Tensor:  # one lazy tensor per eager one, however often passed
        if id(t) not in views:
            views[id(t)] = lg.lazy(t)
        return views[id(t)]

    return map_tensors(args, convert), map_tensors(kwargs, convert)


def run_lazy(fn, sample, direction: str) -> Any:
    args, kwargs = fresh(sample)
    if direction == "errors":  # their point may be the memory two arguments share
        args, kwargs = lazy_aliased(args, kwargs)
    else:
        args, kwargs = map_tensors(args, lg.lazy), map_tensors(kwargs, lg.lazy)
    torch.manual_seed(0)
    # a call without tensor arguments (a factory) reaches lazygraph only through its mode
    mode = lg.lazy_mode() if not tensors_in((args, kwargs)) else contextlib.nullcontext()
    with mode:
        if direction != "backward":
            out = forward(fn, sample, args, kwargs)
        else:
            out = backward(fn, sample, args, kwargs, lazy_cotangents=True)
    return map_tensors(out, lambda t: lg.to_eager(t).detach() if lg.is_lazy(t) else t.detach())


def reference_dtype(op, dtype: torch.dtype) -> torch.dtype | None:
    if op.supports_dtype(torch.float64, "cpu"):
        return torch.float64
    if dtype in (torch.float16, torch.bfloat16) and op.supports_dtype(torch.float32, "cpu"):
        return torch.float32
    return None


def run_reference(fn, sample, direction: str, ref_dtype: torch.dtype | None) -> Any:
    if ref_dtype is None:
        return None
    args, kwargs = to_reference(*fresh(sample), ref_dtype)
    try:
        with default_dtype(ref_dtype):
            torch.manual_seed(0)
            return (forward if direction == "forward" else backward)(fn, sample, args, kwargs)
    except Exception:
        return None


def same(a: Any, b: Any) -> bool:
    """Bitwise the same result (NaNs equal): tells a random op from a deterministic one."""
    la, lb = judge.leaves(a), judge.leaves(b)
    if [p for p, _ in la] != [p for p, _ in lb]:
        return False
    for (_, x), (_, y) in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or x.layout != y.layout:
                return False
            x, y = judge.dense(x.detach()), judge.dense(y.detach())
            if not (torch.equal(x, y) or (x.is_floating_point() and bool(((x == y) | (x.isnan() & y.isnan())).all()))):
                return False
        elif type(x) is not type(y) or (x != y and x == x):
            return False
    return True


def error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:300]


def lazygraph_frame(e: BaseException) -> str:
    """The innermost frame in lazygraph's own code (where to look), else the innermost one."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/lazygraph/" in f.filename] or frames[-1:]
    if not ours:
        return "?"
    f = ours[-1]
    return f"{f.filename.split('/lazygraph/')[-1]}:{f.lineno} {f.name}"


def run_sample(case: Case, index: int, sample, timeout_s: float = SAMPLE_TIMEOUT_S) -> Result:
    op = op_db()[case.op_index]
    fn = op.op
    start = time.perf_counter()

    def result(status: str, error: str = "", detail: str = "") -> Result:
        return Result(case.name, case.variant, case.dtype, case.direction, index, status, error, detail,
                      round(time.perf_counter() - start, 3))

    if case.direction == "errors":
        return result(*judge_error_input(fn, sample, timeout_s))

    try:
        eager = run_eager(fn, sample, case.direction)
        eager_error = None
    except Exception as e:
        eager, eager_error = None, e
    if eager_error is None and eager is None:
        return result("skip", detail="no differentiable output or input")
    try:
        with time_limit(timeout_s):
            lazy = run_lazy(fn, sample, case.direction)
    except Exception as e:
        if eager_error is not None and type(e) is type(eager_error):
            return result("pass", detail=f"both raise {type(e).__name__}")
        return result("raises", type(e).__name__, f"{error_line(e)} @ {lazygraph_frame(e)}")
    if eager_error is not None:
        return result("wrong", "accepted", f"eager raises {type(eager_error).__name__}: {error_line(eager_error)}")
    if op.has_nondeterministic_output:  # uninitialised memory (empty and friends)
        why = _shapes_only(lazy, eager)
        return result("wrong" if why else "pass", "uninitialised", why or "")
    if not same(eager, run_eager(fn, sample, case.direction, seed=1)):
        runs = [eager] + [run_eager(fn, sample, case.direction, seed=s) for s in range(1, EAGER_RUNS_FOR_RANDOM)]
        why = judge.compare_random(lazy, runs)
        return result("wrong" if why else "pass", "random", why or "")
    ref = run_reference(fn, sample, case.direction, reference_dtype(op, DTYPES[case.dtype]))
    why = judge.compare(lazy, eager, ref)
    return result("wrong" if why else "pass", "", why or "")


def judge_error_input(fn, error_input, timeout_s: float) -> tuple[str, str, str]:
    """(status, error, detail) for one ErrorInput: eager must raise (else the input says nothing
    here: skip); lazygraph passes when it raises an exception of the type eager raised (or the
    type the OpInfo entry names), at the call or when the result is read. A value is WRONG."""
    sample = error_input.sample_input
    try:
        run_eager(fn, sample, "forward")
    except Exception as e:
        eager_error = e
    else:
        return "skip", "", "eager accepts this error input on the CPU"
    try:
        with time_limit(timeout_s):
            run_lazy(fn, sample, "errors")
    except Exception as e:
        if isinstance(e, (type(eager_error), error_input.error_type)):
            return "pass", "", f"both raise {type(e).__name__}"
        return "raises", type(e).__name__, (f"{error_line(e)} @ {lazygraph_frame(e)}; eager raises "
                                            f"{type(eager_error).__name__}: {error_line(eager_error)}")
    return "wrong", "accepted", f"eager raises {type(eager_error).__name__}: {error_line(eager_error)}"


def _shapes_only(lazy: Any, eager: Any) -> str | None:
    ls, es = judge.leaves(lazy), judge.leaves(eager)
    if [p for p, _ in ls] != [p for p, _ in es]:
        return "structure differs"
    for (p, l), (_, e) in zip(ls, es):
        if not isinstance(e, torch.Tensor):
            continue
        if not isinstance(l, torch.Tensor) or l.shape != e.shape or l.dtype != e.dtype:
            got = f"{l.dtype}{list(l.shape)}" if isinstance(l, torch.Tensor) else type(l).__name__
            return f"out{p}: {got} != eager {e.dtype}{list(e.shape)}"
    return None


def run_case(case: Case, limit: int = SAMPLES_PER_DTYPE, timeout_s: float = SAMPLE_TIMEOUT_S,
             on_start: Callable[[int], None] = lambda i: None) -> Iterator[Result]:
    """The results of a case's samples, one by one (on_start(i) is called before sample i)."""
    try:
        drawn = samples(case, limit)
    except Exception as e:
        yield Result(case.name, case.variant, case.dtype, case.direction, -1, "skip", type(e).__name__,
                     f"sample_inputs raised: {error_line(e)}")
        return
    for i, sample in enumerate(drawn):
        on_start(i)
        yield run_sample(case, i, sample, timeout_s)
