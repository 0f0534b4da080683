"""Shared hypothesis strategies: random "op soups" to compare any execution path against eager.

A soup is a random chain of tensor ops (pointwise, where, casts, reductions, softmax, matmul,
reshape/permute/slice/expand) over random broadcastable shapes with size-1, odd and zero-size
dims and non-contiguous inputs. It is built by running each candidate op eagerly on the real
inputs, so every step is known to be valid and values stay in a tame range; the result is a plain
callable that replays the same steps on any tensors (eager, lazy, compiled).

    @given(soups())
    def test_x(soup):
        expected = soup.fn(*soup.inputs)
        got = soup.fn(*[lg.lazy(t) for t in soup.inputs])

Outside hypothesis, `random_soup(seed)` builds one from a plain random.Random.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

# -- the choices a soup makes, from hypothesis (shrinkable) or from random.Random --------------


class Chooser:
    """The few kinds of choice a soup makes; subclasses draw them from different sources."""

    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[self.integer(0, len(seq) - 1)]

    def chance(self, p: float) -> bool:
        return self.integer(0, 999) < int(p * 1000)


class HypothesisChooser(Chooser):
    def __init__(self, draw):
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))


class RandomChooser(Chooser):
    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


# -- soups -------------------------------------------------------------------------------------

Ref = tuple[str, int]  # ("in", i): the i-th input; ("v", j): the j-th step's result


@dataclass
class Step:
    text: str  # readable, e.g. "v3 = maximum(v1, in2)"
    apply: Callable[..., Any]  # (*operand tensors) -> tensor
    operands: list[Ref]


@dataclass
class Soup:
    """`fn(*inputs)` replays the steps and returns a tuple of tensors (the last value, maybe more)."""

    inputs: list[torch.Tensor]
    steps: list[Step] = field(default_factory=list)
    outputs: list[Ref] = field(default_factory=list)

    def fn(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values: list[torch.Tensor] = []

        def get(ref: Ref) -> torch.Tensor:
            return tensors[ref[1]] if ref[0] == "in" else values[ref[1]]

        for s in self.steps:
            values.append(s.apply(*[get(r) for r in s.operands]))
        return tuple(get(r) for r in self.outputs)

    def __repr__(self) -> str:
        ins = ", ".join(f"in{i}: {_describe(t)}" for i, t in enumerate(self.inputs))
        body = "\n  ".join(s.text for s in self.steps)
        outs = ", ".join(_name(r) for r in self.outputs)
        return f"Soup({ins})\n  {body}\n  return {outs}"


def _name(ref: Ref) -> str:
    return f"{ref[0]}{ref[1]}"


def _describe(t: torch.Tensor) -> str:
    dt = str(t.dtype).replace("torch.", "")
    layout = "" if t.is_contiguous() else f" strides={t.stride()}"
    return f"{dt}{list(t.shape)}{layout}"


DIM_SIZES = (1, 1, 2, 3, 5, 6, 7)  # size-1, odd and non-power-of-two; 0 is added rarely


def _shape(c: Chooser, rank: int | None = None) -> tuple[int, ...]:
    rank = c.integer(1, 4) if rank is None else rank
    return tuple(0 if c.chance(0.04) else c.pick(DIM_SIZES) for _ in range(rank))


def _broadcast_partner(c: Chooser, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts against `shape`: some dims set to 1, maybe leading dims dropped."""
    drop = c.integer(0, len(shape)) if c.chance(0.3) else 0
    return tuple(1 if c.chance(0.3) else d for d in shape[drop:])


def make_input(c: Chooser, gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape`; often non-contiguous (a transposed or strided view of a bigger one)."""
    def fill(s):
        if dtype == torch.bool:
            return torch.rand(s, generator=gen) > 0.5
        if dtype.is_floating_point:
            return (torch.randn(s, generator=gen) * 2).to(dtype)
        return torch.randint(-5, 6, s, generator=gen, dtype=dtype)

    kind = c.pick(["contiguous", "contiguous", "transposed", "sliced"]) if len(shape) else "contiguous"
    if kind == "transposed" and len(shape) >= 2:
        i, j = c.integer(0, len(shape) - 1), c.integer(0, len(shape) - 1)
        s = list(shape)
        s[i], s[j] = s[j], s[i]
        return fill(tuple(s)).transpose(i, j)
    if kind == "sliced":
        axis = c.integer(0, len(shape) - 1)
        s = list(shape)
        s[axis] = 2 * shape[axis] + 1
        return fill(tuple(s))[(slice(None),) * axis + (slice(1, None, 2),)]
    return fill(shape)


# op tables: name -> callable; every one keeps values in a tame range for random inputs
UNARY = {
    "neg": torch.neg, "abs": torch.abs, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "sin": torch.sin,
    "cos": torch.cos, "relu": torch.relu, "gelu": F.gelu,
    "log_abs1": lambda x: torch.log(x.abs() + 1), "sqrt_abs": lambda x: torch.sqrt(x.abs()),
    "exp_clamped": lambda x: torch.exp(x.clamp(-4, 4)), "square": torch.square,
    "floor": torch.floor, "erf": torch.erf, "silu": F.silu, "rsqrt_abs1": lambda x: torch.rsqrt(x.abs() + 1),
}
BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "maximum": torch.maximum, "minimum": torch.minimum,
    "div_safe": lambda a, b: a / (b.abs() + 1), "add_alpha": lambda a, b: torch.add(a, b, alpha=0.5),
}
COMPARE = {"gt": torch.gt, "lt": torch.lt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne}
INT_BINARY = {"add": torch.add, "mul": torch.mul, "sub": torch.sub, "maximum": torch.maximum}


class _Builder:
    def __init__(self, c: Chooser, seed: int):
        self.c = c
        self.gen = torch.Generator().manual_seed(seed)
        self.soup = Soup(inputs=[])
        self.values: list[torch.Tensor] = []

    def new_input(self, shape, dtype=torch.float32) -> Ref:
        self.soup.inputs.append(make_input(self.c, self.gen, tuple(shape), dtype))
        return ("in", len(self.soup.inputs) - 1)

    def get(self, ref: Ref) -> torch.Tensor:
        return self.soup.inputs[ref[1]] if ref[0] == "in" else self.values[ref[1]]

    def add(self, text: str, apply: Callable, operands: list[Ref]) -> Ref | None:
        """Run the step eagerly; keep it if valid, bounded and not a silent type change."""
        try:
            with torch.no_grad():
                out = apply(*[self.get(r) for r in operands])
        except (RuntimeError, IndexError, ValueError):
            return None
        if out.is_floating_point() and out.numel() and out.abs().nan_to_num(0, 0, 0).max() > 1e4:
            return None  # keep magnitudes tame so reduction order never matters much
        self.values.append(out)
        ref = ("v", len(self.values) - 1)
        names = ", ".join(_name(r) for r in operands)
        line = f"{_name(ref)} = {text.format(names)} -> {_describe(out)}"
        self.soup.steps.append(Step(line, apply, operands))
        return ref

    # -- one random step on the current value ----------------------------------------------------

    def step(self, cur: Ref) -> Ref | None:
        c, x = self.c, self.get(cur)
        kind = c.pick(["unary", "unary", "binary", "binary", "scalar", "compare", "where", "cast", "reduce",
                       "softmax", "matmul", "reshape", "permute", "slice", "expand", "int"])
        if not x.is_floating_point() and kind not in ("cast", "compare", "where", "int", "reshape",
                                                       "permute", "slice"):
            return self.add("{}.float()", lambda a: a.float(), [cur])
        if kind == "unary":
            name = c.pick(sorted(UNARY))
            return self.add(f"{name}({{}})", UNARY[name], [cur])
        if kind == "binary":
            name = c.pick(sorted(BINARY))
            other = self.partner(x)
            if c.chance(0.5):
                return self.add(f"{name}({{}})", BINARY[name], [cur, other])
            return self.add(f"{name}({{}}) [swapped]", lambda a, b, f=BINARY[name]: f(b, a), [cur, other])
        if kind == "scalar":
            s = c.pick([2, -1, 0.5, 3.25, 1e-3])
            op = c.pick(["add", "mul", "rsub", "pow2"])
            fns = {"add": lambda a: a + s, "mul": lambda a: a * s, "rsub": lambda a: s - a,
                   "pow2": lambda a: a ** 2}
            return self.add(f"{op}({{}}, {s})", fns[op], [cur])
        if kind == "compare":
            name = c.pick(sorted(COMPARE))
            other = self.partner(x, dtype=c.pick([x.dtype, torch.int64, torch.int32]))
            return self.add(f"{name}({{}})", COMPARE[name], [cur, other])
        if kind == "where":
            cond = self.new_input(_broadcast_partner(c, tuple(x.shape)), torch.bool)
            other = self.partner(x)
            if c.chance(0.3):
                return self.add("where({}, 0.0)", lambda a, m: torch.where(m, a, 0.0), [cur, cond])
            return self.add("where({})", lambda a, m, b: torch.where(m, a, b), [cur, cond, other])
        if kind == "cast":
            to = c.pick([torch.float32, torch.float64, torch.int32, torch.bool])
            if to in (torch.int32,) and x.is_floating_point():
                return self.add("round({}).to(int32)", lambda a: torch.round(a).to(torch.int32), [cur])
            return self.add(f"{{}}.to({to})", lambda a, to=to: a.to(to), [cur])
        if kind == "int":
            if x.is_floating_point():
                return None
            other = self.partner(x, dtype=c.pick([torch.int32, torch.int64]))
            name = c.pick(sorted(INT_BINARY))
            return self.add(f"int_{name}({{}})", INT_BINARY[name], [cur, other])
        if kind == "reduce":
            return self.reduce(cur, x)
        if kind == "softmax":
            if x.ndim == 0:
                return None
            dim = c.integer(-x.ndim, x.ndim - 1)
            if c.chance(0.5):
                return self.add(f"softmax({{}}, dim={dim})", lambda a: torch.softmax(a, dim), [cur])
            return self.add(f"log_softmax({{}}, dim={dim})", lambda a: torch.log_softmax(a, dim), [cur])
        if kind == "matmul":
            if x.ndim == 0 or not c.chance(0.5):
                return None
            k = c.pick([1, 3, 4, 5])
            w_shape = (x.shape[-1],) if c.chance(0.2) else (x.shape[-1], k)
            w = self.new_input(w_shape, x.dtype)
            return self.add("matmul({})", torch.matmul, [cur, w])
        return self.movement(kind, cur, x)

    def partner(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> Ref:
        """Another operand broadcastable with x: an earlier value of the same shape, or a new input."""
        dtype = dtype or x.dtype
        same = [("v", j) for j, v in enumerate(self.values) if v.shape == x.shape and v.dtype == dtype]
        if same and self.c.chance(0.3):
            return self.c.pick(same)
        return self.new_input(_broadcast_partner(self.c, tuple(x.shape)), dtype)

    def reduce(self, cur: Ref, x: torch.Tensor) -> Ref | None:
        c = self.c
        name = c.pick(["sum", "mean", "amax", "sum_all", "amin"])
        keep = c.chance(0.5)
        if name == "sum_all":
            return self.add("sum({})", torch.sum, [cur])
        if x.ndim == 0:
            return None
        dims = sorted({c.integer(0, x.ndim - 1) for _ in range(c.integer(1, x.ndim))})
        fn = {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax, "amin": torch.amin}[name]
        text = f"{name}({{}}, dim={dims}, keepdim={keep})"
        return self.add(text, lambda a: fn(a, dims, keepdim=keep), [cur])

    def movement(self, kind: str, cur: Ref, x: torch.Tensor) -> Ref | None:
        c, shape = self.c, tuple(x.shape)
        if kind == "reshape":
            if len(shape) >= 2 and c.chance(0.5):
                i = c.integer(0, len(shape) - 2)  # merge two neighbours
                new = shape[:i] + (shape[i] * shape[i + 1],) + shape[i + 2:]
            elif c.chance(0.5):
                new = (-1,)
            else:
                new = (1,) + shape  # unsqueeze via reshape
            return self.add(f"{{}}.reshape({new})", lambda a: a.reshape(new), [cur])
        if kind == "permute":
            if len(shape) < 2:
                return None
            if c.chance(0.5):
                i, j = c.integer(0, len(shape) - 1), c.integer(0, len(shape) - 1)
                return self.add(f"{{}}.transpose({i}, {j})", lambda a: a.transpose(i, j), [cur])
            dims = list(range(len(shape)))
            for k in range(len(dims) - 1, 0, -1):  # Fisher-Yates with the chooser
                m = c.integer(0, k)
                dims[k], dims[m] = dims[m], dims[k]
            return self.add(f"{{}}.permute({dims})", lambda a: a.permute(dims), [cur])
        if kind == "slice":
            if not shape:
                return None
            axis = c.integer(0, len(shape) - 1)
            start = c.integer(0, max(shape[axis] - 1, 0))
            stop = c.pick([None, -1, shape[axis]])
            step = c.pick([1, 1, 2, 3])
            idx = (slice(None),) * axis + (slice(start, stop, step),)
            return self.add(f"{{}}[{':, ' * axis}{start}:{stop}:{step}]", lambda a: a[idx], [cur])
        if kind == "expand":
            ones = [i for i, d in enumerate(shape) if d == 1]
            if not ones:
                return self.add("{}.unsqueeze(0).expand(2, ...)",
                                lambda a: a.unsqueeze(0).expand(2, *a.shape), [cur])
            i = c.pick(ones)
            new = list(shape)
            new[i] = c.pick([2, 3, 5])
            return self.add(f"{{}}.expand({new})", lambda a: a.expand(*new), [cur])
        return None


def build_soup(c: Chooser, seed: int, min_steps: int = 3, max_steps: int = 10) -> Soup:
    b = _Builder(c, seed)
    dtype = torch.float32 if c.chance(0.85) else c.pick([torch.int64, torch.int32, torch.bool])
    cur = b.new_input(_shape(c), dtype)
    n = c.integer(min_steps, max_steps)
    tries = 0
    while len(b.soup.steps) < n and tries < 10 * n:
        tries += 1
        nxt = b.step(cur)
        if nxt is not None:
            cur = nxt
    outputs = [cur]
    if len(b.values) > 1 and c.chance(0.4):
        outputs.append(("v", c.integer(0, len(b.values) - 2)))  # an intermediate as a second output
    b.soup.outputs = outputs
    return b.soup


@st.composite
def soups(draw, min_steps: int = 3, max_steps: int = 10) -> Soup:
    """A hypothesis strategy of Soups (shrinks towards fewer, simpler steps)."""
    c = HypothesisChooser(draw)
    return build_soup(c, draw(st.integers(0, 2**16)), min_steps, max_steps)


def random_soup(seed: int, min_steps: int = 3, max_steps: int = 10) -> Soup:
    """A Soup from a plain seed (for parametrized tests outside hypothesis)."""
    return build_soup(RandomChooser(random.Random(seed)), seed, min_steps, max_steps)


def assert_same(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], rtol: float = 1e-4,
                atol: float = 1e-5, msg: str = "") -> None:
    """Same count, shapes, dtypes and values (NaN equal to NaN) as eager."""
    assert len(got) == len(expected), msg
    for i, (g, e) in enumerate(zip(got, expected)):
        where = f"output {i}: {msg}"
        assert tuple(g.shape) == tuple(e.shape), f"shape {tuple(g.shape)} != {tuple(e.shape)}; {where}"
        assert g.dtype == e.dtype, f"dtype {g.dtype} != {e.dtype}; {where}"
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, w=where: f"{m}\n{w}")
