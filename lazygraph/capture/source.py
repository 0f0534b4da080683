"""Source lines: the first frame outside torch and lazygraph is the user's line that recorded a node."""

from __future__ import annotations

import os
import sys

import torch

_LIB_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))


# filename -> None if internal, else its basename (one dict lookup per frame on the hot path)
_internal_cache: dict[str, str | None] = {}


def _user_name(filename: str) -> str | None:
    r = _internal_cache.get(filename, False)
    if r is False:
        internal = filename.startswith(_LIB_DIRS) or filename.startswith("<frozen")
        r = _internal_cache[filename] = None if internal else os.path.basename(filename)
    return r


def is_internal(filename: str) -> bool:
    return _user_name(filename) is None


def user_source() -> str | None:
    f = sys._getframe(2)
    names = _internal_cache
    while f is not None:
        # _user_name inlined: this walk runs once per recorded op, over ~7 frames
        filename = f.f_code.co_filename
        name = names.get(filename, False)
        if name is False:
            name = _user_name(filename)
        if name is not None:
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return None
