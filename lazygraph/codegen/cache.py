"""The kernel cache: bodies on disk (Triton reads a kernel's source from its file) and in memory.

Both are keyed by the body's text (and Triton's version), never by who launches it: the
identical layers of a model load one module. A file in the cache whose text is not the text
its name was made from (changed, cut short) is rewritten, never run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import warnings
from typing import Any

from .target import INTERPRETER, Target, interpreting, quiet_interpreter
from .templates import KernelBody


def cache_dir() -> str:
    path = os.environ.get("LAZYGRAPH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lazygraph")
    os.makedirs(path, exist_ok=True)
    return path


def atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def triton_version() -> str:
    import triton

    return triton.__version__


def kernel_path(body: KernelBody) -> str:
    key = hashlib.sha256(f"{body.source}\0{triton_version()}".encode()).hexdigest()[:20]
    return os.path.join(cache_dir(), "kernels", f"{body.name}-{key}.py")


_LOCK = threading.Lock()
_MODULES: dict[str, Any] = {}  # cache file path -> its @triton.jit function
_warned_damaged = False


def forget_loaded() -> None:
    """Drop what this process loaded, as if it were a new process (the disk cache stays)."""
    global _warned_damaged
    with _LOCK:
        _MODULES.clear()
        _warned_damaged = False


def cached_file(path: str, text: str) -> None:
    """Make the cache file at `path` hold `text`. Its name is the hash of `text`, so a file there
    that holds anything else was changed or cut short: rebuilt (with one warning per process),
    never run as it is."""
    global _warned_damaged
    try:
        with open(path) as f:
            if f.read() == text:
                return
        damaged = True
    except FileNotFoundError:
        damaged = False
    except (OSError, UnicodeDecodeError):
        damaged = True
    if damaged and not _warned_damaged:
        _warned_damaged = True
        warnings.warn(f"lazygraph: the cached kernel {path} does not hold the source it was made from "
                      "(changed or truncated); rebuilding it, and any other damaged file in the cache",
                      RuntimeWarning, stacklevel=3)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, text)


def load_for(body: KernelBody, target: Target):
    """load_kernel for launches on `target`: without a CUDA device Triton's interpreter must be on."""
    if target is INTERPRETER and not interpreting():
        raise RuntimeError("lazygraph: no CUDA device, and Triton's interpreter is off "
                           "(TRITON_INTERPRET=0); unset it or set TRITON_INTERPRET=1.")
    fn = load_kernel(body)
    if target is INTERPRETER:
        quiet_interpreter()
    return fn


def load_kernel(body: KernelBody):
    """The @triton.jit function of `body`, imported from its file in the disk cache, once per process."""
    path = kernel_path(body)
    with _LOCK:
        fn = _MODULES.get(path)
        if fn is None:
            cached_file(path, body.source)
            fn = _MODULES[path] = _import(path, body.name)
    return fn


def _import(path: str, name: str):
    key = os.path.basename(path)[:-3].replace("-", "_")
    spec = importlib.util.spec_from_file_location(f"lazygraph_kernel_{key}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return getattr(module, name)
