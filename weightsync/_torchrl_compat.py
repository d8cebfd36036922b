"""Virtual-subclass registration with TorchRL's base classes, without importing TorchRL.

TorchRL's collectors check ``isinstance(x, <its base>)``; registering our bases as virtual
subclasses makes ours pass. TorchRL is only looked up in ``sys.modules`` (importing it takes
seconds), so callers retry until it has been imported.
"""

from __future__ import annotations

import abc
import sys

__all__ = ["register_with_torchrl"]


def register_with_torchrl(module_name: str, base_name: str, cls: type) -> bool:
    """Register ``cls`` under TorchRL's ``module_name.base_name``; True once done."""
    module = sys.modules.get(module_name)
    if module is None:
        return False
    torchrl_base = getattr(module, base_name, None)
    if isinstance(torchrl_base, abc.ABCMeta):
        torchrl_base.register(cls)
    return True
