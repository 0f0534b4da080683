"""The multi-GPU simulator: GPT-2 costed from the IR, split by the stage pass, one row per GPU count."""

import re

from benchmarks.simulate import model_units, rows, simulate
from lazygraph.passes.stages import balanced_split, pipeline_step_seconds


def test_simulator_rows_and_the_modelled_steps():
    u = model_units("small", micro_batch=2, seq=64)
    assert len(u.costs) == 12 + 2 and len(set(u.costs[1:-1])) == 1  # embeddings, 12 alike blocks, head
    assert u.cuts == [2 * 2 * 64 * 768 * 2] * 13  # a bf16 hidden state forward and its gradient back
    one = simulate(u, 1, 1, batch=16, micro_batch=2)
    assert one.seconds == sum(u.costs) * 8 and one.bubble == 0.0  # 8 micro-batches, no communication
    pp = simulate(u, 1, 4, batch=16, micro_batch=2)
    assert pp.seconds > pipeline_step_seconds(balanced_split(u.costs, u.cuts, 4, 450e9), 8)  # + tied embedding
    assert pp.bubble == 3 / (8 + 3)
    assert simulate(u, 1, 15, batch=16, micro_batch=2) is None  # more stages than units
    table = rows(["small"], [1, 4], batch=16, micro_batch=2, seq=64)
    assert table[0].startswith("| model | GPUs | ideal linear") and len(table) == 4
    assert re.match(r"\| GPT-2 small \| 1 \| [\d,.]+ \| [\d,.]+, 100% \| [\d,.]+, 100%, 0% \| — \|", table[2])
    assert re.match(r"\| GPT-2 small \| 4 \| .* \| 2x2: [\d,.]+, \d+%, \d+% \|", table[3])
