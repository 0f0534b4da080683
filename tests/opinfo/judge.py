"""Is lazygraph's result as good as eager's? Each function returns None when it is, else why not.

Floating values are judged against a float64 run of the same sample (the reference): lazygraph may
be off from the reference by k times what eager is off, plus a floor of about an ulp of the output
dtype, elementwise, or else in norm with a bound on the worst element. So a result closer to
float64 than eager always passes (|l - r| <= |e - r| gives |l - r| <= K|e - r|), and a bf16/fp16
result rounded at other points than eager's passes as long as it is about as accurate.
"""

from __future__ import annotations

import math
from typing import Any

import torch

K = 2.0  # lazygraph may be off from float64 by K times eager's own error

# The floor: torch.testing.assert_close's defaults (about 1-2 ulp for bf16/fp16, ~10 for float32).
FLOOR = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


def leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """(path, leaf) for every non-container value, in order; containers are lists, tuples, dicts."""
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        out = []
        for i, v in enumerate(value):
            out += leaves(v, f"{path}[{i}]")
        return out if value else [(path, type(value)())]
    if isinstance(value, dict):
        out = []
        for k in sorted(value, key=str):
            out += leaves(value[k], f"{path}[{k!r}]")
        return out
    return [(path, value)]


def compare(lazy: Any, eager: Any, ref: Any = None) -> str | None:
    """Compare two results leaf by leaf; `ref` (same structure, float64) when there is one."""
    ls, es = leaves(lazy), leaves(eager)
    if [p for p, _ in ls] != [p for p, _ in es]:
        return f"structure differs: {[p for p, _ in ls]} != eager {[p for p, _ in es]}"
    rs = leaves(ref) if ref is not None else []
    if [p for p, _ in rs] != [p for p, _ in es]:
        rs = [(p, None) for p, _ in es]
    for (path, l), (_, e), (_, r) in zip(ls, es, rs):
        why = compare_leaf(l, e, r)
        if why:
            return f"out{path}: {why}"
    return None


def compare_leaf(l: Any, e: Any, r: Any) -> str | None:
    if isinstance(e, torch.Tensor) or isinstance(l, torch.Tensor):
        if not (isinstance(e, torch.Tensor) and isinstance(l, torch.Tensor)):
            return f"{type(l).__name__} where eager has {type(e).__name__}"
        return compare_tensor(l, e, r if isinstance(r, torch.Tensor) else None)
    if isinstance(e, float) and isinstance(l, float):
        if (math.isnan(e) and math.isnan(l)) or math.isclose(l, e, rel_tol=1e-6, abs_tol=1e-9):
            return None
        return f"{l!r} != eager {e!r}"
    if type(l) is not type(e) or l != e:
        return f"{l!r} != eager {e!r}"
    return None


def dense(t: torch.Tensor) -> torch.Tensor:
    t = t.to_dense() if t.layout != torch.strided else t
    t = t.resolve_conj().resolve_neg()
    return torch.view_as_real(t) if t.is_complex() else t


def compare_tensor(l: torch.Tensor, e: torch.Tensor, r: torch.Tensor | None) -> str | None:
    if l.shape != e.shape:
        return f"shape {tuple(l.shape)} != eager {tuple(e.shape)}"
    if l.dtype != e.dtype:
        return f"dtype {l.dtype} != eager {e.dtype}"
    if l.layout != e.layout:
        return f"layout {l.layout} != eager {e.layout}"
    dtype = e.dtype
    l, e = dense(l.detach()), dense(e.detach())
    if not e.is_floating_point():
        if torch.equal(l, e):
            return None
        bad = tuple((l != e).nonzero()[0].tolist())
        return (f"{int((l != e).sum())} of {e.numel()} differ (exact dtype); first at {list(bad)}: "
                f"{l[bad].item()} != eager {e[bad].item()}")
    ln, en = l.double(), e.double()
    if not torch.equal(ln.isnan(), en.isnan()):
        return f"NaN at {int((ln.isnan() != en.isnan()).sum())} positions where eager differs"
    rn = None
    if r is not None and r.shape == e.shape:
        r = dense(r.detach())
        if r.is_floating_point():
            rn = r.double()
    return judge_float(ln, en, rn, FLOOR.get(dtype.to_real() if dtype.is_complex else dtype, FLOOR[torch.float32]))


def judge_float(ln: torch.Tensor, en: torch.Tensor, rn: torch.Tensor | None, floor: tuple[float, float]) -> str | None:
    """ln, en (float64 copies of lazygraph's and eager's values, NaN positions equal), rn the
    float64 reference or None."""
    rtol, atol = floor
    same = (ln == en) | ln.isnan()
    if bool(same.all()):
        return None
    if rn is None:  # no reference: lazygraph against eager within the floor
        rn = en
    usable = rn.isfinite()
    base = torch.where(usable, rn, en)  # where the reference overflowed, judge against eager
    l_err = torch.where(same, 0.0, (ln - base).abs())
    e_err = torch.where(usable, (en - rn).abs(), 0.0)
    allowed = K * e_err + atol + rtol * base.abs().nan_to_num(posinf=0.0, neginf=0.0)
    # an element where eager overflowed and the reference did not: lazygraph cannot do worse
    ok = same | (l_err <= allowed) | (e_err.isinf())
    if bool(ok.all()):
        return None
    # in norm (rounding at other points than eager): lazygraph's total error within K times eager's,
    # and its worst element within 4 times eager's worst, so one gross element never hides in a norm
    finite = ln.isfinite() & en.isfinite() & usable
    if bool((ok | finite).all()):
        l_fin, e_fin = (ln - base)[finite].abs(), (en - base)[finite].abs()
        floor_fin = (atol + rtol * base[finite].abs())
        norm_ok = float(l_fin.norm()) <= K * float(e_fin.norm()) + atol * math.sqrt(l_fin.numel())
        worst_ok = bool((l_fin <= 4 * e_fin.max() + floor_fin).all())
        if norm_ok and worst_ok:
            return None
    idx = tuple((~ok).nonzero()[0].tolist())
    worst = float(torch.where(ok, 0.0, (ln - en).abs().nan_to_num(posinf=math.inf)).max())
    return (f"{int((~ok).sum())} of {ln.numel()} elements off; first at {list(idx)}: {ln[idx].item():.6g} "
            f"vs eager {en[idx].item():.6g}, float64 {base[idx].item():.6g}; max |lazy - eager| {worst:.3g}")


def compare_random(lazy: Any, eager_runs: list[Any]) -> str | None:
    """A random op: same structure, shapes and dtypes as eager; values only as simple statistics
    against the pooled values of several eager runs: range, mean, finiteness, and an implausibly
    constant result. (No spread test: channel dropout correlates elements, cauchy has no std.)"""
    ls = leaves(lazy)
    runs = [leaves(run) for run in eager_runs]
    if [p for p, _ in ls] != [p for p, _ in runs[0]]:
        return f"structure differs: {[p for p, _ in ls]} != eager {[p for p, _ in runs[0]]}"
    for i, (path, l) in enumerate(ls):
        es = [run[i][1] for run in runs]
        why = random_leaf(l, es)
        if why:
            return f"out{path}: {why}"
    return None


def random_leaf(l: Any, es: list[Any]) -> str | None:
    e = es[0]
    if not isinstance(e, torch.Tensor):
        return None if type(l) is type(e) else f"{type(l).__name__} where eager has {type(e).__name__}"
    if not isinstance(l, torch.Tensor):
        return f"{type(l).__name__} where eager has a tensor"
    if l.shape != e.shape or l.dtype != e.dtype:
        return f"{l.dtype}{list(l.shape)} != eager {e.dtype}{list(e.shape)}"
    if l.numel() == 0:
        return None
    lv = dense(l.detach()).double().flatten()
    ev = torch.cat([dense(x.detach()).double().flatten() for x in es])
    if bool(ev.isfinite().all()) and not bool(lv.isfinite().all()):
        return "non-finite values where eager has none"
    lv, ev = lv[lv.isfinite()], ev[ev.isfinite()]
    if lv.numel() == 0 or ev.numel() == 0:
        return None
    lo, hi = float(ev.min()), float(ev.max())
    span = hi - lo
    slack = 0.5 * span + 1e-6 * (1 + max(abs(lo), abs(hi)))
    if float(lv.min()) < lo - slack or float(lv.max()) > hi + slack:
        return f"values in [{float(lv.min()):.4g}, {float(lv.max()):.4g}], eager's in [{lo:.4g}, {hi:.4g}]"
    n = lv.numel()
    mean, std = float(ev.mean()), float(ev.std()) if ev.numel() > 1 else 0.0
    if abs(float(lv.mean()) - mean) > 6 * std / math.sqrt(n) + 1e-6 * (1 + abs(mean)):
        return f"mean {float(lv.mean()):.4g}, eager's {mean:.4g} (std {std:.3g}, n {n})"
    # a constant result no eager run gave, and unlikely under eager's distribution of values
    if n >= 2 and bool((lv == lv[0]).all()) and not any(bool((x == lv[0]).all()) for x in es):
        p = float((ev == lv[0]).double().mean())
        if p**n < 1e-6:
            return f"all {n} values are {float(lv[0]):.4g}; eager draws that value with frequency {p:.3g}"
    return None
