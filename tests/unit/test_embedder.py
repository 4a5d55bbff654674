"""The Embedder on its own (fake backend, no servicer): readiness, chunking, shape check,
prompt averaging, and which calls count as served items."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from clipserve.calibration import average_prompts
from clipserve.endpoints import Precision, Tower
from clipserve.server.embedder import Embedder
from clipserve.server.errors import ServingError
from clipserve.server.health import BackendState
from clipserve.server.metrics import Method, ServerMetrics
from clipserve.server.repository import Catalog

from .test_server_service import (DIM, MAX_BATCH, SCALE, FakeBackend, FakeTokenizer,
                                  text_vector, write_repository)


class Rig:
    def __init__(self, root):
        self.catalog = Catalog.from_repository(write_repository(root))
        self.backend = FakeBackend()
        self.registry = CollectorRegistry()
        self.state = BackendState(True, frozenset(s.name for s in self.catalog))
        tokenizers = {s.name: FakeTokenizer() for s in self.catalog if s.tower is Tower.TEXT}
        self.embedder = Embedder(catalog=self.catalog, backend=self.backend,
                                 tokenizers=tokenizers,
                                 metrics=ServerMetrics(self.registry, self.catalog.scales),
                                 state=lambda: self.state, coalesce=True)

    def spec(self, tower: Tower, precision: Precision = Precision.FP32):
        return self.catalog.get(SCALE, precision, tower)

    def items(self, tower: Tower) -> float:
        return self.registry.get_sample_value(
            "clipserve_items_total",
            {"tower": tower.value, "scale": SCALE, "precision": "fp32"}) or 0


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path / "repo")


async def test_a_batch_over_max_batch_size_goes_in_chunks_and_comes_back_in_order(rig):
    spec = rig.spec(Tower.TEXT)
    ids, _ = await rig.embedder.tokenize(spec, [f"text {i}" for i in range(2 * MAX_BATCH + 1)])
    vectors = await rig.embedder.embed(Method.EMBED_TEXTS, spec, ids, timeout_s=5.0)
    assert vectors.dtype == np.float32 and vectors.shape == (2 * MAX_BATCH + 1, DIM)
    np.testing.assert_array_equal(vectors, np.stack([text_vector(row) for row in ids]))
    assert sorted(shape[0] for _, _, shape, _ in rig.backend.calls) == [1, MAX_BATCH, MAX_BATCH]
    assert rig.items(Tower.TEXT) == 2 * MAX_BATCH + 1


async def test_background_runs_do_not_count_as_served_items(rig):
    spec = rig.spec(Tower.TEXT)
    ids, _ = await rig.embedder.tokenize(spec, ["a", "b"])
    await rig.embedder.run(spec, ids, timeout_s=5.0)
    await rig.embedder.embed_ready(spec, ids, timeout_s=5.0)
    assert len(rig.backend.calls) == 2 and rig.items(Tower.TEXT) == 0


async def test_an_endpoint_that_is_not_ready_is_unavailable_and_never_called(rig):
    spec = rig.spec(Tower.IMAGE)
    rig.state = BackendState(True, frozenset({rig.spec(Tower.TEXT).name}))
    with pytest.raises(ServingError) as info:
        await rig.embedder.embed_ready(spec, np.zeros((1, 16, 16, 3), np.uint8), 5.0)
    assert info.value.code.name == "UNAVAILABLE" and spec.name in info.value.message
    rig.state = BackendState(False, frozenset())
    with pytest.raises(ServingError, match="Triton is not ready"):
        rig.embedder.endpoint(SCALE, Precision.FP32, Tower.IMAGE)
    assert rig.backend.calls == []


async def test_embeddings_of_the_wrong_shape_are_an_error_not_an_answer(rig):
    async def short(model, input_name, batch, timeout_s):
        return np.zeros((len(batch), DIM - 1), np.float32)

    rig.backend.embed = short
    spec = rig.spec(Tower.TEXT)
    ids, _ = await rig.embedder.tokenize(spec, ["a"])
    with pytest.raises(RuntimeError, match="shape"):
        await rig.embedder.run(spec, ids, 5.0)


async def test_prompts_are_embedded_by_the_text_endpoint_and_averaged_per_label(rig):
    labels, prompts = ("cat", "dog"), ["a cat", "the cat", "a dog", "the dog"]
    got = await rig.embedder.embed_prompts(SCALE, Precision.INT8, labels, prompts, 5.0)
    ids, _ = FakeTokenizer().encode(prompts)
    expected = average_prompts(np.stack([text_vector(row) for row in ids]), len(labels))
    np.testing.assert_array_equal(got, expected)
    assert {model for model, *_ in rig.backend.calls} == {rig.spec(Tower.TEXT,
                                                                   Precision.INT8).name}


async def test_a_text_endpoint_without_a_tokenizer_is_a_failed_precondition(rig):
    bare = Embedder(catalog=rig.catalog, backend=rig.backend, tokenizers={},
                    metrics=ServerMetrics(CollectorRegistry(), rig.catalog.scales),
                    state=lambda: rig.state, coalesce=True)
    with pytest.raises(ServingError) as info:
        await bare.tokenize(rig.spec(Tower.TEXT), ["a"])
    assert info.value.code.name == "FAILED_PRECONDITION"


async def test_short_texts_are_tokenized_inline_and_long_ones_in_a_thread(rig):
    import threading

    threads = []

    class Recording(FakeTokenizer):
        def encode(self, texts):
            threads.append(threading.current_thread())
            return super().encode(texts)

    spec = rig.spec(Tower.TEXT)
    rig.embedder._tokenizers = {spec.name: Recording()}
    limit = rig.embedder.inline_chars
    short = ["a" * (limit // 2), "b" * (limit - limit // 2)]  # exactly the budget: inline
    long = ["a" * (limit // 2), "b" * (limit - limit // 2 + 1)]
    ids_short, cut_short = await rig.embedder.tokenize(spec, short)
    ids_long, cut_long = await rig.embedder.tokenize(spec, long)
    assert threads[0] is threading.current_thread()
    assert threads[1] is not threading.current_thread()
    # The same answer either way.
    expected = FakeTokenizer().encode(short)
    np.testing.assert_array_equal(ids_short, expected[0])
    assert cut_short == list(expected[1])
    assert ids_long.dtype == np.int32 and ids_long.shape[0] == 2
