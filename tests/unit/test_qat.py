"""Quantization-aware training (export/qat.py): its fake quantizers round as the deployed
onnxruntime quantizers do, the attention rewrite computes what nn.MultiheadAttention does, the
gated distillation loss picks KL or CE per item, the served-graph rule, and bad input."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from clipserve.export import qat, quantize


def _matmul_model(weight: np.ndarray, path):
    """Y = X @ W with a constant W [K, N]."""
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", n])],
        [numpy_helper.from_array(weight.astype(np.float32), "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _dequantized_weight(path, k):
    """What a quantized MatMul graph multiplies by: its output for the identity input."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": np.eye(k, dtype=np.float32)})[0]


@pytest.mark.parametrize("k,block", [(64, 32), (48, 16), (40, 32)])
def test_int4_fake_quant_is_the_grid_matmulnbits_rounds_to(tmp_path, k, block):
    """Symmetric RTN at accuracy_level 0 (float activations, so the identity input is exact):
    the fake quantizer's weights equal the ones MatMulNBits dequantizes, K not a multiple of
    the block included."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.05, (k, 24)).astype(np.float32)
    weight[3, 5] = 0.4  # an outlier decides its block's scale
    src = _matmul_model(weight, tmp_path / "w.onnx")
    quantize.to_int4(src, tmp_path / "w4.onnx", block_size=block, accuracy_level=0)
    ort_weight = _dequantized_weight(tmp_path / "w4.onnx", k)
    ours = qat.fake_int4_blocks(torch.from_numpy(weight), 0, block, symmetric=True).numpy()
    np.testing.assert_allclose(ours, ort_weight, rtol=0, atol=1e-6)
    assert not np.allclose(ours, weight, atol=1e-4)  # it did quantize


def test_int8_fake_quant_is_the_grid_of_static_qdq_weights(tmp_path):
    """Per output channel symmetric int8, as to_int8_static writes the weight's
    DequantizeLinear (full range: this test passes reduce_range=False explicitly)."""
    rng = np.random.default_rng(1)
    weight = rng.normal(0, 0.05, (32, 16)).astype(np.float32)
    src = _matmul_model(weight, tmp_path / "w.onnx")
    batches = [rng.normal(0, 1, (8, 32)).astype(np.float32) for _ in range(4)]
    quantize.to_int8_static(src, tmp_path / "w8.onnx", "X", batches, reduce_range=False)
    model = onnx.load(tmp_path / "w8.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
              and inits.get(n.input[0]) is not None and inits[n.input[0]].dtype == np.int8)
    q, scale = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
    ort_weight = q * scale.reshape(1, -1)
    ours = qat.fake_int8_per_channel(torch.from_numpy(weight), 1).numpy()
    np.testing.assert_allclose(ours, ort_weight, rtol=0, atol=1e-7)


def test_activation_fake_quant_has_ort_grid_and_masks_gradient_outside():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 3.0], requires_grad=True)
    y = qat.fake_uint8_activation(x, -1.0, 2.0)
    scale = 3.0 / 255
    zp = round(1.0 / scale)
    expected = (np.clip(np.round(x.detach().numpy() / scale) + zp, 0, 255) - zp) * scale
    np.testing.assert_allclose(y.detach().numpy(), expected, atol=1e-6)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("masked", [False, True])
def test_attention_rewrite_matches_multihead_attention(masked):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    wrapper = qat._attention_module()(mha)
    x = torch.randn(3, 5, 16)
    mask = torch.full((5, 5), float("-inf")).triu(1) if masked else None
    want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    got = wrapper(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _tiny_clip():
    import open_clip

    from clipserve.export import train

    train.register_builtin_configs()
    torch.manual_seed(0)
    return open_clip.create_model("digits-s").eval()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_instrument_quantizes_and_strip_restores_the_float_model(precision):
    model = _tiny_clip()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = torch.randn(2, 3, 32, 32)
    ref = model.encode_image(pixels, normalize=True).detach()
    done = qat.instrument(model, qat.Scheme(precision))
    if precision == "int8":
        assert len(done.points) > 0
        qat._calibrate(model, done.points, pixels, torch.zeros(2, 16, dtype=torch.long))
        assert all(p.mode == "quant" for p in done.points if p.lo != p.hi)
    fake = model.encode_image(pixels, normalize=True).detach()
    cos = torch.nn.functional.cosine_similarity(fake, ref).min()
    assert 0.5 < cos < 1.0 - 1e-7  # quantized, not broken
    qat.strip(model, done)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(model.encode_image(pixels, normalize=True), ref)


def test_distillation_is_gated_by_teacher_confidence():
    teacher = torch.tensor([[10.0, 0.0, 0.0], [0.1, 0.0, 0.0]])  # confident, unsure
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    labels = torch.tensor([0, 1])
    loss, share = qat.distillation_loss(student, teacher, labels, gate=0.9)
    pt = teacher.softmax(-1)
    kl0 = (pt[0] * (pt[0].log() - student[0].log_softmax(-1))).sum()
    ce1 = torch.nn.functional.cross_entropy(student[1:], labels[1:])
    torch.testing.assert_close(loss, (kl0 + ce1) / 2)
    assert share == 0.5
    _, none = qat.distillation_loss(student, teacher, labels, gate=1.01)
    assert none == 0.0


def _d(delta, lo, hi):
    return {"delta": delta, "lo": lo, "hi": hi}


def test_served_rule_prefers_qat_only_when_not_worse():
    even = {"top1": _d(0.01, -0.01, 0.03), "ece": _d(0.0, -0.01, 0.01),
            "ood_auroc": _d(0.0, -0.01, 0.01)}
    assert qat.choose_served(even)[0] == "qat"
    worse_ece = dict(even, ece=_d(0.02, 0.01, 0.03))
    choice, why = qat.choose_served(worse_ece)
    assert choice == "ptq" and "ece" in why
    lower_top1 = dict(even, top1=_d(-0.004, -0.02, 0.01))
    assert qat.choose_served(lower_top1)[0] == "ptq"
    # a gain beyond its interval outweighs a top-1 point estimate inside its own
    better_ood = dict(lower_top1, ood_auroc=_d(0.011, 0.005, 0.017))
    choice, why = qat.choose_served(better_ood)
    assert choice == "qat" and "better than PTQ beyond the 95% interval on ood_auroc" in why
    better_ece = dict(lower_top1, ece=_d(-0.02, -0.03, -0.01))  # lower ECE is better
    assert qat.choose_served(better_ece)[0] == "qat"
    # ... but never a loss beyond its interval
    assert qat.choose_served(dict(better_ood, ece=_d(0.02, 0.01, 0.03)))[0] == "ptq"


def test_qat_on_an_open_clip_model_without_images_is_refused_clearly(tmp_path, capsys):
    from clipserve.cli import main

    rc = main(["export", "--models", "RN50::none", "--precisions", "fp32,int4", "--qat",
               "--repository", str(tmp_path / "repo"), "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--qat on RN50::none needs your images" in err
    assert "--eval-data" in err and "--train-data" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("kwargs,message", [
    ({"qat": True, "qat_precisions": ("fp16",)}, "cannot be fine-tuned"),
    ({"qat": True, "precisions": ("fp32", "int8"), "qat_precisions": ("int4",)},
     "does not export"),
    ({"train_data": "somewhere"}, "add --qat"),
    ({"qat": True, "qat_gate": 1.5}, "--qat-gate"),
    ({"qat": True, "precisions": ("fp32", "fp16")}, "add one to --precisions"),
])
def test_config_rejects_bad_qat_flags(kwargs, message):
    from clipserve.export.config import ExportConfig

    with pytest.raises(ValueError, match=message):
        ExportConfig(**kwargs)


def test_train_data_folder_is_loaded_whole_with_its_own_classes(tmp_path):
    """--train-data: every image of the folder (both of its split halves), its class folders
    as labels, at the model's input size."""
    from PIL import Image

    from clipserve.export.config import ExportConfig
    from clipserve.export.models import ModelSpec

    for name, shade in (("cat", 40), ("dog", 200)):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 12), (shade, i * 50, 0)).save(tmp_path / "train" / name / f"{i}.png")
    config = ExportConfig(models="RN50::none", precisions=("fp32", "int4"), qat=True,
                          train_data=str(tmp_path / "train"))
    data = qat.training_data(ModelSpec("RN50", "none"), config, suite=None, image_size=16)
    assert data.images.shape == (6, 16, 16, 3) and data.images.dtype == np.uint8
    assert sorted(data.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert data.class_names == ("cat", "dog") and "train" in data.source
    assert data.prompts[0].count("cat") == 1


def test_the_student_is_quantized_by_the_method_its_fake_quantizers_mimic():
    from clipserve.export import qat, recipes

    # auto may keep HQQ or another calibrator for the untrained model; the student must get the
    # recipe that deploys exactly what it trained against
    int4 = qat.Scheme("int4", block_size=32, symmetric=True)
    assert int4.method() == "rtn-sym-b32-a4"
    assert qat.Scheme("int4", block_size=64, symmetric=False).method() == "rtn-asym-b64-a4"
    int8 = qat.Scheme("int8")
    assert int8.method() == "static-p99.99"
    recipes.int8_candidates(int8.method())  # both names parse as pinned methods
    recipes.int4_candidates(int4.method(), 32)
