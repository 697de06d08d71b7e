"""What torch.compile needs to know about rmi_fast's Python, declared without importing torch's compiler.

``torch.compiler.assume_constant_result`` imports ``torch._dynamo`` when it is called, which takes about 2 s: as
a decorator at module level it was all of ``import rmi_fast``'s cost beyond ``import torch``. The decorator only
sets one attribute on the function, so this module sets it directly; tests/test_compile.py checks that the public
decorator still sets exactly that attribute, and that compiled graphs still dispatch through the marked functions.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

#: The attribute torch._dynamo.assume_constant_result sets (torch/_dynamo/decorators.py).
CONSTANT_RESULT_MARK = "_dynamo_marked_constant"


def constant_result(fn: F) -> F:
    """torch.compiler.assume_constant_result(fn), without importing torch._dynamo: while tracing, torch.compile runs
    ``fn`` eagerly and takes its result as a constant of the graph."""
    setattr(fn, CONSTANT_RESULT_MARK, True)
    return fn
