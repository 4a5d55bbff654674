"""From a batch of preprocessed inputs to embeddings: the one path every call takes to Triton.

The servicer (client calls), the label-embedding cache (prompts) and the shadow (a mirrored
call at the reference precision) all embed through an :class:`Embedder`, so the readiness
check, the chunking to ``max_batch_size``, the coalescing of concurrent calls (:mod:`.coalesce`),
the shape check and the batch metrics are written once::

    ClipService._embed_texts -> Embedder.tokenize -> Embedder.embed -> Coalescer -> Backend
    (Triton)

What is *not* here: decoding images (:mod:`.images`), routing (:mod:`.routing`), the response.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Mapping, Protocol, Sequence, Union

import numpy as np

from clipserve.calibration import average_prompts
from clipserve.endpoints import Precision, Tower

from .backend import Backend
from .coalesce import Coalescer
from .errors import ServingError
from .health import BackendState
from .metrics import Method, Phase, ServerMetrics
from .repository import Catalog, EndpointSpec


# What an endpoint runs on: pixels or token ids, or (GPU decode) padded groups of encoded files.
Batch = Union[np.ndarray, list]


class Tokenizer(Protocol):
    """What the embedder needs from :class:`clipserve.tokenizer.ClipTokenizer`."""

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Texts -> (int32 ids [n, context_length], truncated flag per text)."""
        ...


class Embedder:
    """Runs endpoints on batches, for the servicer, the label cache and the shadow.

    Args:
        catalog: the repository's endpoints.
        backend: runs the towers (Triton, or a fake in tests).
        tokenizers: text endpoint name -> its tokenizer.
        metrics: gets the formed-batch sizes, and the phase and item counts of client calls.
        state: returns the current readiness snapshot.
        coalesce: merge chunks of concurrent calls to a busy endpoint (see :mod:`.coalesce`).
        inline_chars: a call whose texts total at most this many characters is tokenized on
            the event loop; longer ones in a thread (0: always). The hop costs more than a
            short text: measured on a 2-core Xeon, one 22-character text took 18 us of CPU to
            tokenize inline and 66 us through ``asyncio.to_thread``, while tokenizing runs at
            about 0.5 us per character, so 256 characters hold the loop for ~150 us at most.
    """

    inline_chars_default = 256

    def __init__(self, *, catalog: Catalog, backend: Backend, tokenizers: Mapping[str, Tokenizer],
                 metrics: ServerMetrics, state: Callable[[], BackendState], coalesce: bool,
                 inline_chars: int = inline_chars_default):
        self.inline_chars = inline_chars
        self._catalog = catalog
        self._tokenizers = tokenizers
        self._metrics = metrics
        self._state = state
        self.coalescer = Coalescer(backend, enabled=coalesce, on_send=lambda spec, n:
                                   metrics.observe_batch(spec.tower, spec.scale,
                                                         spec.precision, n))

    def endpoint(self, scale: str, precision: Precision, tower: Tower) -> EndpointSpec:
        """The endpoint, if present and ready.

        Raises:
            ServingError: NOT_FOUND if the repository has no such endpoint; UNAVAILABLE if it
                (or all of Triton) is not ready.
        """
        spec = self._catalog.get(scale, precision, tower)
        state = self._state()
        # With GPU decode the calls go to the ensemble: it must be ready too.
        if not state.is_ready(spec.name) or not state.is_ready(spec.triton_model):
            if not state.ready_models:
                raise ServingError.unavailable("Triton is not ready; retry later")
            raise ServingError.unavailable(f"endpoint {spec.name} is not ready; retry later")
        return spec

    async def tokenize(self, spec: EndpointSpec,
                       texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Token ids (int32 [n, context_length]) and truncation flags of ``texts`` for text
        endpoint ``spec``.

        Raises:
            ServingError: FAILED_PRECONDITION if the endpoint has no tokenizer.
        """
        tokenizer = self._tokenizers.get(spec.name)
        if tokenizer is None:
            raise ServingError.failed_precondition(f"endpoint {spec.name} has no tokenizer")
        if sum(len(text) for text in texts) <= self.inline_chars:
            ids, truncated = tokenizer.encode(list(texts))
        else:  # cleaning is pure Python: long texts would stall the event loop
            ids, truncated = await asyncio.to_thread(tokenizer.encode, list(texts))
        return np.ascontiguousarray(ids, dtype=np.int32), list(truncated)

    async def run(self, spec: EndpointSpec, batch: Batch, timeout_s: float) -> np.ndarray:
        """Embeddings (float32 [n, embed_dim]) of ``batch`` from ``spec``, sent in chunks of
        its max_batch_size (concurrently, so Triton's dynamic batcher sees them together)
        through the coalescer. Records only the formed batches, not the items. A list (GPU
        decode: padded groups of encoded files) runs each group so, rows kept in order.

        Raises:
            whatever the backend raised; RuntimeError for embeddings of the wrong shape.
        """
        if isinstance(batch, list):
            if len(batch) == 1:
                return await self.run(spec, batch[0], timeout_s)
            return np.concatenate(await asyncio.gather(
                *(self.run(spec, group, timeout_s) for group in batch)))
        chunk = spec.max_batch_size or len(batch)
        if len(batch) <= chunk:  # one request: no gather, no Task
            vectors = await self.coalescer.embed(spec, batch, timeout_s)
        else:
            vectors = np.concatenate(await asyncio.gather(*(
                self.coalescer.embed(spec, batch[i:i + chunk], timeout_s)
                for i in range(0, len(batch), chunk))))
        if vectors.shape != (len(batch), spec.sidecar.embed_dim):
            raise RuntimeError(f"{spec.name} returned embeddings of shape {vectors.shape} for "
                               f"{len(batch)} items of dimension {spec.sidecar.embed_dim}")
        return np.asarray(vectors, dtype=np.float32)

    async def embed(self, method: Method, spec: EndpointSpec, batch: Batch,
                    timeout_s: float) -> np.ndarray:
        """A client call's batch through :meth:`run`, recorded as the call's Triton phase and
        as served items of ``spec``."""
        started = time.perf_counter()
        vectors = await self.run(spec, batch, timeout_s)
        self._metrics.observe_phase(method, spec.scale, spec.precision, Phase.TRITON,
                                    time.perf_counter() - started)
        self._metrics.observe_items(spec.tower, spec.scale, spec.precision, len(vectors))
        return vectors

    async def embed_prompts(self, scale: str, precision: Precision, labels: Sequence[str],
                            prompts: Sequence[str], timeout_s: float) -> np.ndarray:
        """Label embeddings (float32 [n_labels, D]) from the text endpoint at ``scale`` and
        ``precision``: label-major ``prompts`` (each label's templates together) embedded and
        averaged per label (:func:`clipserve.calibration.average_prompts`).

        Raises:
            ServingError: as :meth:`endpoint` and :meth:`tokenize`; backend errors as
                :meth:`run`.
        """
        spec = self.endpoint(scale, precision, Tower.TEXT)
        ids, _ = await self.tokenize(spec, prompts)
        vectors = await self.run(spec, ids, timeout_s)
        return average_prompts(vectors, len(labels))

    async def embed_ready(self, spec: EndpointSpec, batch: Batch,
                          timeout_s: float) -> np.ndarray:
        """:meth:`run` on ``spec`` once it is ready (UNAVAILABLE otherwise): background work
        (the shadow) that must not count as served items."""
        self.endpoint(spec.scale, spec.precision, spec.tower)
        return await self.run(spec, batch, timeout_s)
