"""PyTorch's own OpInfo samples (op_db) run through lazygraph and judged against eager and float64.

`python3 -m tests.opinfo --workers 2` runs the whole sweep; tests/opinfo/test_opinfo.py runs a fast
slice in the default test command, and the whole sweep when LAZYGRAPH_OPINFO=full.
"""
