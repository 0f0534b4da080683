"""Where generated kernels run: the target's block-size policy, and Triton's interpreter on the CPU.

Kernels run on the GPU where there is one, and in Triton's interpreter otherwise (lazygraph sets
TRITON_INTERPRET=1 on import when there is no CUDA device). The interpreter keeps a launch's
state in module globals, so interpreted launches go one at a time (`launching`, `serialised`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..passes.loops import LoopProgram


@dataclass(frozen=True)
class Target:
    """Block-size policy. The interpreter pays per program instance, so it gets bigger blocks."""

    name: str
    max_pointwise_block: int
    max_tile: int  # XBLOCK * RBLOCK bound

    @staticmethod
    def current() -> Target:
        return GPU if torch.cuda.is_available() else INTERPRETER


GPU = Target("cuda", 1024, 4096)
INTERPRETER = Target("interpreter", 16384, 65536)


# RBLOCK of a row walked in a loop (rows longer than loops.PERSISTENT_MAX_RED)
LOOP_RBLOCK = 1024


def pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def block_sizes(program: LoopProgram, target: Target) -> tuple[int, int]:
    sp = program.space
    if not sp.axes:
        return min(target.max_pointwise_block, pow2(sp.rows)), 1
    rblock = pow2(sp.red) if program.persistent else min(LOOP_RBLOCK, pow2(sp.red))
    xblock = max(1, min(pow2(sp.rows), target.max_tile // rblock))
    return xblock, rblock


def quiet_interpreter() -> None:
    """Triton's interpreter checks every int32 add and mul for overflow (a debug aid that GPU
    builds only run in debug mode); it costs about 40% of interpreted time. Our index math is
    sized to fit (int64 where a buffer needs it), so switch the check off."""
    try:
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        if getattr(builder.options, "sanitize_overflow", False):
            builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
    except Exception:  # an interpreter without this knob: nothing to switch off
        pass


# Triton's interpreter keeps a launch's state (grid index, patched triton.language) in module
# globals, so two kernels interpreted at once corrupt each other. GPU launches take no lock.
_INTERPRETER_LOCK = threading.RLock()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("0", "", "false")


@contextlib.contextmanager
def launching():
    """Around Triton kernel launches: when interpreted, one at a time, with triton.language ready."""
    if not interpreting():
        yield
        return
    with _INTERPRETER_LOCK:
        interpretable_language()
        yield


def launch_interpreted(fn, grid, *args) -> None:
    """Launch a jitted kernel in Triton's interpreter: masked-off lanes compute log(0), max of
    all-NaN padding and the like, which eager never sees, so numpy's warnings are silenced."""
    import numpy as np

    with launching(), np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fn[grid](*args)


def serialised(fn):
    """Decorator for a function that launches Triton kernels (see launching())."""
    @functools.wraps(fn)
    def launch(*args, **kwargs):
        with launching():
            return fn(*args, **kwargs)

    return launch


_language_interpretable = False


def interpretable_language() -> None:
    """Make triton.language's own @triton.jit helpers (tl.sum, tl.max, ...) interpretable.

    triton.jit decides at decoration time whether a function is compiled or interpreted. When
    triton was imported before lazygraph set TRITON_INTERPRET=1 (`import transformers` and
    torch.compile import it), those helpers were made for the compiler, and an interpreted kernel
    calling them fails ("Cannot call @triton.jit'd outside of the scope of a kernel"). Rebuild them
    as the interpreter would have, in every triton.language module, so identity checks inside
    Triton (`combine_fn is tl.standard._argmax_combine...`) still hold."""
    global _language_interpretable
    with _INTERPRETER_LOCK:
        if _language_interpretable:
            return
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        made: dict[int, Any] = {}
        for name, module in list(sys.modules.items()):
            if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
                continue
            for attr, value in list(vars(module).items()):
                if type(value) is JITFunction:
                    if id(value) not in made:
                        made[id(value)] = InterpretedFunction(value.fn)
                    setattr(module, attr, made[id(value)])
        _language_interpretable = True

