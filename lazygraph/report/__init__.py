"""Readers for lazygraph dump folders: a terminal summary (show), what one pass changed (diff) and a
self-contained HTML report (html). `python -m lazygraph {show,diff,html} DIR` is the entry point.

Everything here reads files only; it never imports torch, so a dump can be read anywhere.
"""

from .load import Dump, GraphText, Run, load_dump, parse_graph_text

__all__ = ["Dump", "GraphText", "Run", "load_dump", "parse_graph_text"]
