"""benchmarks.build_time: every depth recorded first, then built in turn each round (so a machine
that speeds up or slows down meanwhile affects the builds of a round alike); the depths' ratio is
the median of the rounds' ratios."""

from __future__ import annotations

import re

from benchmarks import build_time


def test_depths_are_built_in_turn_and_the_fastest_build_counts(monkeypatch):
    order = []
    walls = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 6.0, 4.0])}

    def fake(graph):
        order.append(graph)
        wall = next(walls[graph])
        return wall, wall / 2

    monkeypatch.setattr(build_time, "build_seconds", fake)
    times = build_time.build_times({1: "a", 2: "b"}, repeat=3)
    assert order == ["a", "b"] * 3
    assert times == {1: [(3.0, 1.5), (1.0, 0.5), (2.0, 1.0)], 2: [(5.0, 2.5), (6.0, 3.0), (4.0, 2.0)]}
    # paired by round: 5/3, 6/1, 4/2 -> the median is 2 (the best builds' ratio would be 4)
    assert build_time.depth_ratio(times, 1, 2) == 2.0


def test_tiny_model_at_two_depths(capsys):
    build_time.main(["--config", "tiny", "--layers", "1", "3", "--repeat", "2"])
    out = capsys.readouterr().out
    nodes = {int(d): int(n) for d, n in re.findall(r"(\d+) layers: (\d+) IR nodes, program built in", out)}
    assert set(nodes) == {1, 3} and nodes[3] > nodes[1]
    assert "best of 2" in out
    ratio = re.search(r"3 layers take ([\d.]+)x the CPU time of 1 \(median of 2 rounds", out)
    assert ratio and float(ratio.group(1)) > 0
