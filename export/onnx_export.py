"""Export an open_clip model's towers to ONNX (FP32) and check them against PyTorch.

We use torch.onnx's dynamo exporter (the default since torch 2.9; the TorchScript exporter
still works in 2.14 but warns that it will be removed). It honours ``dynamic_shapes``, not
``dynamic_axes``, so the batch axis is declared with ``torch.export.Dim``. Sequence length
stays fixed: open_clip builds its causal mask for the model's context length.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from clipserve import calibration as cal
from clipserve.endpoints import EMBEDDING_OUTPUT, IMAGE_INPUT, TEXT_INPUT, Tower
from clipserve.export.towers import ImageTower, TextTower

OPSET = 18
PARITY_MIN_COSINE = 0.9999  # FP32 ONNX vs PyTorch on random inputs (issue #2)
_TMP_OUTPUT = "clipserve_output"


@dataclass(frozen=True)
class TowerShapes:
    image_size: int
    context_length: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    vocab_size: int = 49408  # token ids must stay below it


def tower_shapes(model) -> TowerShapes:
    """Input sizes and normalisation of an open_clip model."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    with torch.no_grad():
        embed_dim = model.encode_text(torch.zeros(1, model.context_length, dtype=torch.int32)).shape[-1]
    vocab = getattr(model, "vocab_size", None) or getattr(getattr(model, "text", None),
                                                          "vocab_size", None) or 49408
    return TowerShapes(size, int(model.context_length), int(embed_dim),
                       tuple(cfg.get("mean", OPENAI_DATASET_MEAN)),
                       tuple(cfg.get("std", OPENAI_DATASET_STD)), int(vocab))


def random_inputs(tower: Tower, shapes: TowerShapes, batch: int, seed: int = 0) -> np.ndarray:
    """Random valid inputs: uint8 pixels, or token ids sot..text..eot then zero padding."""
    rng = np.random.default_rng(seed)
    if tower is Tower.IMAGE:
        return rng.integers(0, 256, (batch, shapes.image_size, shapes.image_size, 3), dtype=np.uint8)
    from clipserve.export.evaluate import random_token_ids

    return random_token_ids(shapes.context_length, batch, seed, shapes.vocab_size)


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new


def export_tower(model, tower: Tower, shapes: TowerShapes, path: Path) -> Path:
    """Write one tower as ONNX with the fixed tensor names and a dynamic batch axis."""
    if tower is Tower.IMAGE:
        module, input_name = ImageTower(model, shapes.mean, shapes.std).eval(), IMAGE_INPUT
    else:
        module, input_name = TextTower(model).eval(), TEXT_INPUT
    # Traced at batch 2 (batch 1 can be specialised away); other batch sizes are checked below.
    example = torch.from_numpy(random_inputs(tower, shapes, batch=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter; failures still raise
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=OPSET, verbose=False,
            input_names=[input_name], output_names=[_TMP_OUTPUT],
            dynamic_shapes={"pixels" if tower is Tower.IMAGE else "input_ids":
                            {0: torch.export.Dim("batch", min=1, max=4096)}},
        )
    proto = program.model_proto
    # The exporter names internal values after modules; open_clip's token embedding output is
    # already called "embedding", so give the graph output its fixed name only after moving
    # any such value out of the way.
    _rename_value(proto.graph, EMBEDDING_OUTPUT, "clipserve_internal_embedding")
    _rename_value(proto.graph, _TMP_OUTPUT, EMBEDDING_OUTPUT)
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    return path


def torch_embed(model, tower: Tower, shapes: TowerShapes, inputs: np.ndarray) -> np.ndarray:
    """The PyTorch reference for a tower on a batch."""
    module = ImageTower(model, shapes.mean, shapes.std) if tower is Tower.IMAGE else TextTower(model)
    with torch.no_grad():
        return module.eval()(torch.from_numpy(inputs)).numpy()


def check_parity(model, tower: Tower, shapes: TowerShapes, path: Path,
                 batches=(1, 3, 5)) -> float:
    """Minimum cosine between ONNX Runtime and PyTorch over random batches of several sizes;
    raises RuntimeError below PARITY_MIN_COSINE."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 1.0
    for i, batch in enumerate(batches):
        inputs = random_inputs(tower, shapes, batch, seed=100 + i)
        ref = torch_embed(model, tower, shapes, inputs)
        got = session.run([EMBEDDING_OUTPUT], {session.get_inputs()[0].name: inputs})[0]
        cos = cal.cosine_rows(ref, got)
        worst = min(worst, float(cos.min()))
    if not worst >= PARITY_MIN_COSINE:
        raise RuntimeError(f"{path}: ONNX output differs from PyTorch (min cosine {worst:.6f} "
                           f"< {PARITY_MIN_COSINE})")
    return worst
