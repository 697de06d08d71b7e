"""rmi_fast: fused mutual-information bounds and worst-case MI training of adversarially robust representations."""
from .functional import MINE, available_backends, infonce_loss, mi_bound, nt_xent_loss
from .backends import BackendUnavailable

__version__ = "0.1.0"

__all__ = ["MINE", "BackendUnavailable", "available_backends", "infonce_loss", "mi_bound", "nt_xent_loss",
           "__version__"]
