"""A program specialised on lent input values (a causal mask per layer) keeps one snapshot per
distinct value to check later runs against, and still notices when one of the inputs changes."""

from __future__ import annotations

import math

import torch

import lazygraph as lg
from lazygraph.runtime import CompiledProgram


def _attend(x, keep):
    s = (x @ x.transpose(-2, -1)) * (1.0 / math.sqrt(x.shape[-1]))
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ x


def _two_layers(x, first, second):
    return _attend(_attend(x, first), second).sum(-1)


def test_equal_masks_share_a_snapshot_and_a_changed_one_is_noticed():
    torch.manual_seed(0)
    t = 9
    x = torch.randn(2, t, 5)
    masks = [torch.ones(t, t, dtype=torch.bool).tril() for _ in range(2)]  # one buffer per layer, equal values
    graph = lg.graph(_two_layers(lg.lazy(x), *(lg.lazy(m) for m in masks)))
    program = CompiledProgram(graph)
    snapshots = [slot[0] for slot in program.assumed.values()]
    assert len(snapshots) == 2 and snapshots[0] is snapshots[1]  # one copy of the causal mask
    assert all(s.data_ptr() not in (m.data_ptr() for m in masks) for s in snapshots)
    inputs = [n.value for n in graph.inputs]
    second = next(i for i, v in enumerate(inputs) if v.data_ptr() == masks[1].data_ptr())
    (out,) = program.run(inputs)
    torch.testing.assert_close(out, _two_layers(x, *masks), rtol=1e-5, atol=1e-5)
    banded = masks[1] & torch.ones(t, t, dtype=torch.bool).triu(-2)
    (out,) = program.run(inputs[:second] + [banded] + inputs[second + 1:])
    torch.testing.assert_close(out, _two_layers(x, masks[0], banded), rtol=1e-5, atol=1e-5)
    masks[0][3, 0] = False  # in place: the snapshot is a copy, so this is noticed too
    (out,) = program.run(inputs)
    torch.testing.assert_close(out, _two_layers(x, masks[0], masks[1]), rtol=1e-5, atol=1e-5)
