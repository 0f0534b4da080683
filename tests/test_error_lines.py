"""A run error names the line that recorded *this* graph, even when its program was built (and
cached) from an earlier graph of the same structure recorded elsewhere."""

import inspect

import pytest
import torch

import lazygraph as lg
from lazygraph.reference import IndexOutOfRange
from lazygraph.runtime import clear_cache, using_backend


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_cached_programs_error_names_this_graphs_line(backend):
    clear_cache()
    table = torch.randn(4, 3)
    with using_backend(backend):
        # indices computed lazily: checked when the graph runs, not while recording
        lg.to_eager(lg.lazy(table)[lg.lazy(torch.tensor([0, 1])) * 3] * 2)  # builds and caches the program
        out = lg.lazy(table)[lg.lazy(torch.tensor([1, 2])) * 3] * 2  # the same structure, another line
        line = inspect.currentframe().f_lineno - 1
        with pytest.raises(IndexOutOfRange, match=rf"recorded at test_error_lines.py:{line}\b"):
            lg.to_eager(out)
