"""aten -> IR: the rules that turn each captured aten call into primitive nodes, one module per family.

A rule takes the call's arguments with every tensor already replaced by its Node and returns
a Node (or a tuple of Nodes, or a plain Python value). Rules exist for the ops models actually
hit; anything else is decomposed by torch's own decomposition table, and what is left runs in
torch as an EXTERN node (capture/dispatch.py). Each rule declares what it handles exactly
(@rule(..., dtypes=..., argument=values), see registry.Handles); a call outside that runs in torch
too, never approximately. View ops are not here: they live in capture/views.py, because they must
also say how a write through the view lands in its base.
"""

from . import attention, factories, indexing, nn, pointwise, reductions  # noqa: F401  (each registers its rules)
from .registry import (
                       HANDLES,
                       META_CHECKED,
                       RULES,
                       STRIDED_TYPES,
                       NotImplementedForDtype,
                       Unhandled,
                       count_rules,
                       scalar_type_name,
                       undeclared,
)

__all__ = ["RULES", "HANDLES", "META_CHECKED", "STRIDED_TYPES", "NotImplementedForDtype", "Unhandled", "undeclared",
           "count_rules", "scalar_type_name"]
