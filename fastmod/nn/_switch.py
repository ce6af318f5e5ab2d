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
