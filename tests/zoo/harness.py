"""Run one zoo case: the same model trained eagerly and under lazygraph.compile, side by side.

Each case is a model built from a small random config and the inputs of one training call. The
harness deep-copies the model twice (eager, compiled), runs forward + loss + backward + an AdamW
step three times on each with the same inputs, and compares everything a training step produces:
logits, loss, every gradient, every buffer, and the parameters after the last step. It also
records what the compiled side ran (lazygraph.stats()) and whether later calls with the same
shapes recorded anything. Nothing raises here: failures are collected in a Result, so one run of a
case answers all three zoo tests (values, replay, fusion) and the report.
"""

from __future__ import annotations

import copy
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.testing import assert_close

import lazygraph

STEPS = 3
# fp32 throughout. Eager and compiled sum in different orders (fused reductions, flash attention's
# online softmax), so values agree to a few ulps times the reduction length, not bit for bit.
TOL = {"rtol": 1e-4, "atol": 1e-5}
# Adam divides by sqrt(v): a gradient that is rounding noise on both sides (~1e-9) becomes a +-lr
# step with the default eps=1e-8. eps=1e-6 keeps such noise below the tolerance; lr=1e-3 is a
# typical fine-tuning rate.
ADAMW = {"lr": 1e-3, "eps": 1e-6, "weight_decay": 0.01}
# counters that must not move once a signature is compiled: a replay records and builds nothing
REPLAY_COUNTERS = ("nodes_recorded", "compiles", "recompiles")


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]  # called under torch.manual_seed(0)
    inputs: Callable[[], tuple[tuple, dict]]  # (args, kwargs) of one training call
    attention: bool = False  # has softmax attention: must run as flash-attention kernels


@dataclass
class Result:
    mismatches: list[str] = field(default_factory=list)  # "step 1 grad of w: max abs diff ..."
    error: str | None = None  # the compiled side raised: "backward: IndexError: ..."
    warnings: list[str] = field(default_factory=list)  # lazygraph's own (fell back to eager, ...)
    recorded_again: dict[str, int] = field(default_factory=dict)  # counter -> growth after step 0
    stats: dict[str, Any] = field(default_factory=dict)  # lazygraph.stats() after all steps
    seconds: float = 0.0  # wall clock, both sides
    cpu_seconds: float = 0.0  # this process's CPU time: comparable on a busy machine

    @property
    def ran_eagerly(self) -> bool:
        fell_back = any("eagerly" in w for w in self.warnings)
        return fell_back or (self.error is None and self.stats.get("graphs_run", 0) == 0)


def logits_and_loss(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face models return a ModelOutput; the torch.nn wrappers here return a pair."""
    if hasattr(out, "logits"):
        return out.logits, out.loss
    return out


def _diff(what: str, actual: torch.Tensor, expected: torch.Tensor, **tol: float) -> str | None:
    """None when close, else one line naming the tensor and how far it is."""
    try:
        assert_close(actual, expected, **tol)
        return None
    except AssertionError as e:
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            return f"{what}: {str(e).splitlines()[0]}"
        a, b = actual.detach().double(), expected.detach().double()
        abs_diff = (a - b).abs()
        bad = int((~torch.isclose(a, b, **tol, equal_nan=True)).sum())
        return (f"{what}: {bad}/{a.numel()} off, max abs diff {abs_diff.max().item():.2g} "
                f"(expected max |x| {b.abs().max().item():.2g})")


def _unwrapped(named) -> dict[str, torch.Tensor]:
    """The compiled module holds the model as its child `_orig_mod`: names without that prefix."""
    return {name.removeprefix("_orig_mod."): t for name, t in named}


def _compare_state(step: str, eager: torch.nn.Module, compiled: torch.nn.Module, grads: bool) -> list[str]:
    out = []
    c_params = _unwrapped(compiled.named_parameters())
    for name, pe in eager.named_parameters():
        pc = c_params[name]
        if grads:
            if (pe.grad is None) != (pc.grad is None):
                out.append(f"{step} grad of {name}: eager {'None' if pe.grad is None else 'set'}, "
                           f"compiled {'None' if pc.grad is None else 'set'}")
            elif pe.grad is not None:
                out.append(_diff(f"{step} grad of {name}", pc.grad, pe.grad, **TOL))
        else:
            out.append(_diff(f"{step} parameter {name}", pc.detach(), pe.detach(), **TOL))
    c_buffers = _unwrapped(compiled.named_buffers())
    for name, be in eager.named_buffers():
        out.append(_diff(f"{step} buffer {name}", c_buffers[name], be, **TOL))
    return [m for m in out if m]


def _counters(names: tuple[str, ...]) -> dict[str, int]:
    s = lazygraph.stats()
    return {k: s[k] for k in names}


def run_case(case: Case) -> Result:
    start, cpu_start = time.perf_counter(), time.process_time()
    res = Result()
    torch.manual_seed(0)
    model = case.build().train()
    eager = copy.deepcopy(model)
    compiled = lazygraph.compile(copy.deepcopy(model))
    opt_e = torch.optim.AdamW(eager.parameters(), **ADAMW)
    opt_c = torch.optim.AdamW(compiled.parameters(), **ADAMW)
    lazygraph.reset_stats()
    after_first: dict[str, int] = {}
    stage = "forward"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for step in range(STEPS):
                args, kwargs = case.inputs()
                stage = f"step {step} forward"
                logits_c, loss_c = logits_and_loss(compiled(*args, **kwargs))
                logits_e, loss_e = logits_and_loss(eager(*args, **kwargs))
                res.mismatches += [m for m in (_diff(f"step {step} logits", logits_c, logits_e, **TOL),
                                               _diff(f"step {step} loss", loss_c, loss_e, **TOL)) if m]
                stage = f"step {step} backward"
                loss_c.backward()
                loss_e.backward()
                res.mismatches += _compare_state(f"step {step}", eager, compiled, grads=True)
                stage = f"step {step} optimizer"
                for opt in (opt_c, opt_e):
                    opt.step()
                    opt.zero_grad()
                if step == 0:
                    after_first = _counters(REPLAY_COUNTERS)
            res.mismatches += _compare_state(f"after {STEPS} steps", eager, compiled, grads=False)
        except Exception as e:  # noqa: BLE001 - a crash is a finding, reported with where it happened
            frame = traceback.extract_tb(e.__traceback__)[-1]
            res.error = f"{stage}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} " \
                        f"(at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"
    res.warnings = sorted({str(w.message).splitlines()[0] for w in caught if "lazygraph" in str(w.message)})
    res.stats = lazygraph.stats()
    if after_first:
        now = _counters(REPLAY_COUNTERS)
        res.recorded_again = {k: now[k] - after_first[k] for k in REPLAY_COUNTERS if now[k] != after_first[k]}
    res.seconds, res.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return res


# ---------------------------------------------------------------------------------------------
# the three verdicts on a Result: each returns what is wrong, [] when all is well
# ---------------------------------------------------------------------------------------------

# externs that must not run in torch: a no-op f32 -> f32 cast and a view, each of which splits
# fusion around every norm (issue 10)
FORBIDDEN_EXTERNS = ("aten.to.dtype", "aten.flatten.using_ints")


def value_problems(res: Result) -> list[str]:
    """Trains exactly like eager, through lazygraph (not a silent fall back to eager)."""
    out = [f"crash in {res.error}"] if res.error else []
    if res.ran_eagerly:
        out.append("ran eagerly: " + "; ".join(w for w in res.warnings if "eagerly" in w))
    return out + res.mismatches


def replay_problems(res: Result) -> list[str]:
    """Calls after the first, with the same shapes, replay: nothing recorded, compiled or re-traced."""
    if res.error or res.ran_eagerly:
        return ["did not get to a replay"]
    return [f"{k} grew by {v} after the first step" for k, v in res.recorded_again.items()]


def fusion_problems(res: Result, case: Case) -> list[str]:
    """Attention runs as flash-attention kernels, every kernel builds, no needless externs."""
    s, out = res.stats, []
    if res.error or res.ran_eagerly:
        out.append("did not run compiled to the end")
    if case.attention and s.get("flash_attention", 0) == 0:
        out.append("no flash-attention launches")
    if s.get("kernel_fallbacks", 0):
        out.append(f"{s['kernel_fallbacks']} kernel fallbacks")
    out += [f"{s['extern_ops'][op]} extern {op}" for op in FORBIDDEN_EXTERNS if op in s.get("extern_ops", {})]
    return out
