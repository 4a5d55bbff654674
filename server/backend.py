"""The gateway's view of the inference backend: three calls, nothing about Triton.

The servicer depends on this protocol only, so unit tests run it against a fake and
:mod:`clipserve.server.triton_client` is the one module that knows tritonclient.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """What the servicer needs from Triton."""

    async def embed(self, model: str, input_name: str, batch: np.ndarray,
                    timeout_s: float) -> np.ndarray:
        """Run ``model`` on ``batch`` (fed as ``input_name``) and return its float32
        ``embedding`` output, one row per batch item.

        Raises:
            ServingError: UNAVAILABLE (backend down, model not ready), DEADLINE_EXCEEDED,
                RESOURCE_EXHAUSTED (queue full), INTERNAL for anything else.
        """
        ...

    async def server_ready(self, timeout_s: float) -> bool:
        """Whether the backend is up and ready (False, not an exception, when unreachable)."""
        ...

    async def ready_models(self, timeout_s: float) -> frozenset[str]:
        """Names of the models that are loaded and ready (empty when unreachable)."""
        ...

    async def close(self) -> None:
        ...
