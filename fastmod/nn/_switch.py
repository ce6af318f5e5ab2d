"""The ``use_kernels`` switch shared by fastmod's modules."""
from __future__ import annotations

from fastmod import backends


class KernelSwitch:
    """Mixin: ``use_kernels`` (default True) selects fast paths; ``FASTMOD_KERNELS=0``
    overrides it globally.  ``backend`` is what the module passes to ops."""

    use_kernels: bool = True

    @property
    def backend(self) -> str | None:
        return None if (self.use_kernels and backends.kernels_enabled()) else "reference"


def set_use_kernels(model, on: bool):
    """Set ``use_kernels`` on every fastmod module inside ``model`` (a whole network
    on its kernels or on its reference path); returns ``model``."""
    for m in model.modules():
        if isinstance(m, KernelSwitch):
            m.use_kernels = on
    return model
