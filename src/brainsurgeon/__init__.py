"""brainsurgeon: prune PyTorch networks by the curvature of the loss or by classic criteria."""
from .api import prune, prune_sweep
from .engine import PruneResult
from .errors import BrainsurgeonError, MemoryBudgetError
from .registry import methods, register

__all__ = ["prune", "prune_sweep", "methods", "register", "PruneResult", "BrainsurgeonError", "MemoryBudgetError"]
__version__ = "0.1.0"
from .sparse import export_dense, load, save, to_sparse  # noqa: E402

__all__ += ["save", "load", "to_sparse", "export_dense"]
from .finetune import FineTune, finetune  # noqa: E402
from .sensitivity import sensitivity  # noqa: E402

__all__ += ["FineTune", "finetune", "sensitivity"]
from . import text  # noqa: E402  (bs.text: calibration windows and perplexity; imports no transformers)

__all__ += ["text"]
