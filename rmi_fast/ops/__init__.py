"""Autograd Functions (registered with torch.library) over the kernel contract of :mod:`rmi_fast.ops.spec`."""
from .pairwise import pair_reduce
from .spec import PairSpec

__all__ = ["PairSpec", "pair_reduce"]
