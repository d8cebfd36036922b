"""weightsync: fast, consistent weight synchronisation between a trainer and its workers.

The public surface mirrors TorchRL's ``torchrl.weight_update`` (schemes, transports, weight
strategies) and its legacy weight updaters, so switching is a change of imports. The bytes
are moved by a compiled engine (``weightsync.ops``) with a pure-torch fallback;
:func:`backend_info` says which path is active and why.
"""

from weightsync import errors, ops
from weightsync.engine import CopyPlan, backend_info
from weightsync.errors import *  # noqa: F403

__version__ = "0.1.0"

__all__ = ["CopyPlan", "backend_info", "errors", "ops", *errors.__all__]
