"""Quantization-aware training (``clipserve export --qat``): fine-tune a copy of the FP32 model
with fake quantization that matches the deployed scheme, distilled from the FP32 model, then
hand the fine-tuned float weights to the same quantizer the post-training path uses.

What the fake quantizers mirror (export/quantize.py, onnxruntime 1.3x):

- INT8 (``to_int8_static``): weights of every constant-weight MatMul/Gemm symmetric int8 per
  output channel (scale = absmax / 127, or / 64 with reduce_range); the token-embedding
  Gather's table symmetric int8 per tensor; every MatMul input an activation quantized uint8
  per tensor with a range from calibration (the 0.005% / 99.995% quantiles, as ORT's
  percentile-99.99 calibrator cuts both tails), extended to include 0. That covers the
  Linear layers, the attention projections and the attention score products (q k^T and
  probs v are MatMuls in the exported graph), and the pooled features before the projection.
- INT4 (``to_int4``, MatMulNBits RTN): weights in blocks of ``block_size`` along K (the input
  dimension of a MatMul; the embedding dimension of the token table). Symmetric as MLAS does
  it: scale = (the block's value of largest magnitude, signed) / -8, q = clamp(round(w/s),
  -8, 7); asymmetric: range extended to include 0, 16 levels, integer zero point. Activations
  are not fake-quantized: with accuracy_level 4 MatMulNBits quantizes them per block at run
  time, an error far below the weights'.

Gradients pass the rounding straight through (STE); activations outside their range get no
gradient (the clamp is not differentiable there). After training the parametrizations are
removed, leaving the latent float weights: rounding them with the deployed quantizer gives
exactly the grid the fake quantizers trained on, so the served graph is the one measured.

The loss (GRACE-style confidence-gated distillation; teacher = the frozen FP32 model):
- zero-shot logits over the label prompts (prompt-ensembled class embeddings, the teacher's
  logit scale): KL(teacher || student) at temperature ``kd_temperature`` on items where the
  teacher's max probability is at least ``gate``; cross-entropy to the ground-truth label on
  the others (a wrong or unsure teacher is not copied);
- embedding alignment: 1 - cosine between student and teacher embeddings of the images, the
  prompts and random token ids (the latter keep the text tower general beyond the prompts).
"""

from __future__ import annotations

import dataclasses

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

QAT_PRECISIONS = ("int8", "int4")
# Percentile of ORT's static INT8 calibrator (quantize.to_int8_static): 99.99, both tails cut.
ACT_PERCENTILE = 99.99
_OBSERVE_SAMPLES = 200_000  # values kept per observed batch (torch.quantile's size limit)


@dataclass(frozen=True)
class QatRecipe:
    """QAT hyper-parameters. The defaults fine-tune digits-s in a minute or two per precision
    on 2 idle CPU cores (several times that on a loaded machine)."""

    steps: int = 100
    batch_size: int = 128
    # The fake-quantized student starts within a KL of ~1e-3 of its teacher: Adam at 1e-4
    # moved it away (loss 0.0007 -> 0.016 in 100 steps on digits-s); small steps refine it.
    lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    gate: float = 0.5  # teacher max probability above which its logits are distilled
    kd_temperature: float = 1.0
    embed_weight: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Scheme:
    """The deployed scheme one QAT run mimics."""

    precision: str  # "int8" or "int4"
    block_size: int = 32  # int4
    symmetric: bool = True  # int4 weights
    reduce_range: bool = False  # int8 weights: 7-bit

    def method(self) -> str:
        """The --int8-method / --int4-method name of the quantizer that deploys exactly this
        scheme (export/recipes.py): the student is quantized with it, never with another
        method ``auto`` might prefer for the untrained model, so the served graph is the one
        the fake quantizers trained for."""
        if self.precision == "int4":
            return f"rtn-{'sym' if self.symmetric else 'asym'}-b{self.block_size}-a4"
        return f"static-p{ACT_PERCENTILE:g}"

    def describe(self) -> str:
        if self.precision == "int4":
            return (f"int4 weights, blocks of {self.block_size} along K, "
                    f"{'symmetric' if self.symmetric else 'asymmetric'} (MatMulNBits RTN)")
        return ("int8 weights per output channel" + (" (reduce_range)" if self.reduce_range
                                                     else "") +
                ", uint8 per-tensor activations at every MatMul input (calibrated ranges)")


@dataclass
class TrainingData:
    """Labelled images QAT trains on and the label prompts it distils over."""

    images: np.ndarray  # uint8 [n, S, S, 3]
    labels: np.ndarray  # int64 [n]
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    source: str
    augment: bool = False

    @property
    def prompts(self) -> list[str]:
        return [t.format(c) for c in self.class_names for t in self.templates]


@dataclass
class QatResult:
    """The fine-tuned float model and what the training did (recorded in the sidecar)."""

    model: object
    record: dict = field(default_factory=dict)


# -- fake quantizers (pure torch; checked against onnxruntime's quantizers in the tests) -------

def _ste(x, x_hat):
    return x + (x_hat - x).detach()


def fake_int8_per_channel(w, channel_axis: int, reduce_range: bool = False):
    """Symmetric int8 per channel along ``channel_axis`` (ORT's QInt8 weights: qmin=-127)."""
    import torch

    qmax = 64.0 if reduce_range else 127.0
    dims = [d for d in range(w.dim()) if d != channel_axis % w.dim()]
    absmax = w.detach().abs().amax(dim=dims, keepdim=True) if dims else w.detach().abs()
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    return _ste(w, torch.clamp(torch.round(w / scale), -qmax, qmax) * scale)


def fake_int8_per_tensor(w, reduce_range: bool = False):
    """Symmetric int8 with one scale for the whole tensor."""
    import torch

    qmax = 64.0 if reduce_range else 127.0
    absmax = w.detach().abs().max()
    scale = absmax / qmax if absmax > 0 else torch.ones_like(absmax)
    return _ste(w, torch.clamp(torch.round(w / scale), -qmax, qmax) * scale)


def fake_int4_blocks(w, k_axis: int, block_size: int, symmetric: bool = True):
    """Blockwise 4-bit along ``k_axis`` (blocks of ``block_size``; the last one zero-padded),
    as MatMulNBits' RTN quantizer (MLAS) rounds them."""
    import torch

    moved = w.movedim(k_axis, -1)
    k = moved.shape[-1]
    pad = (-k) % block_size
    x = torch.nn.functional.pad(moved, (0, pad)) if pad else moved
    blocks = x.reshape(*x.shape[:-1], -1, block_size)
    b = blocks.detach()
    if symmetric:
        idx = b.abs().argmax(dim=-1, keepdim=True)
        vmax = torch.gather(b, -1, idx)  # signed value of largest magnitude
        scale = vmax / -8.0
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        hat = torch.clamp(torch.round(blocks / scale), -8, 7) * scale
    else:
        lo = b.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = b.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / 15.0
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(-lo / scale), 0, 15)
        hat = (torch.clamp(torch.round(blocks / scale) + zp, 0, 15) - zp) * scale
    hat = hat.reshape(x.shape)[..., :k].movedim(-1, k_axis)
    return _ste(w, hat)


def fake_uint8_activation(x, lo: float, hi: float):
    """uint8 per-tensor with ORT's scale/zero point for the range [lo, hi] (0 included);
    the gradient is the identity inside the range and zero outside."""
    import torch

    rmin, rmax = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (rmax - rmin) / 255.0 or 1.0
    zp = float(np.clip(round(-rmin / scale), 0, 255))
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    hat = (q - zp) * scale
    inside = ((x >= rmin) & (x <= rmax)).to(x.dtype)
    return hat.detach() + (x - x.detach()) * inside


# -- modules that put the fake quantizers into an open_clip model ------------------------------

def _make_weight_parametrization(fn):
    import torch

    class _WeightFakeQuant(torch.nn.Module):
        def forward(self, w):
            return fn(w)

    return _WeightFakeQuant()


def _act_module():
    import torch

    class ActFakeQuant(torch.nn.Module):
        """An activation point: observes values (calibration), then fake-quantizes them."""

        def __init__(self):
            super().__init__()
            self.mode = "off"  # off | observe | quant
            self.samples = []
            self.lo, self.hi = 0.0, 0.0

        def forward(self, x):
            if self.mode == "observe":
                flat = x.detach().reshape(-1).float()
                if flat.numel() > _OBSERVE_SAMPLES:
                    gen = torch.Generator().manual_seed(len(self.samples))
                    flat = flat[torch.randint(0, flat.numel(), (_OBSERVE_SAMPLES,),
                                              generator=gen)]
                self.samples.append(flat)
                return x
            if self.mode == "quant":
                return fake_uint8_activation(x, self.lo, self.hi)
            return x

        def finish_observing(self):
            values = torch.cat(self.samples)
            cut = (100.0 - ACT_PERCENTILE) / 200.0
            self.lo = float(torch.quantile(values, cut))
            self.hi = float(torch.quantile(values, 1.0 - cut))
            self.samples = []
            self.mode = "quant"

    return ActFakeQuant()


def _attention_module():
    import torch
    import torch.nn.functional as F

    class QatSelfAttention(torch.nn.Module):
        """``nn.MultiheadAttention`` self-attention written out step by step (same result in
        float) so each MatMul input of the exported graph gets its activation quantizer:
        the block input, q, k, the attention probabilities, v and the heads' output."""

        def __init__(self, mha):
            super().__init__()
            self.mha = mha
            self.points = torch.nn.ModuleDict({n: _act_module() for n in "xqkpvo"})

        def forward(self, query, key, value, need_weights=False, attn_mask=None, **_):
            if not (query is key is value):
                raise NotImplementedError("QAT handles self-attention only")
            mha, fq = self.mha, self.points
            x = query if mha.batch_first else query.transpose(0, 1)
            n, length, width = x.shape
            heads = mha.num_heads
            qkv = F.linear(fq["x"](x), mha.in_proj_weight, mha.in_proj_bias)
            q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2)
                       for t in qkv.split(width, dim=-1))
            q = q * (width // heads) ** -0.5
            scores = fq["q"](q) @ fq["k"](k).transpose(-2, -1)
            if attn_mask is not None:
                if attn_mask.dtype == torch.bool:
                    scores = scores.masked_fill(attn_mask, float("-inf"))
                else:
                    scores = scores + attn_mask
            out = fq["p"](scores.softmax(-1)) @ fq["v"](v)
            out = out.transpose(1, 2).reshape(n, length, width)
            out = F.linear(fq["o"](out), mha.out_proj.weight, mha.out_proj.bias)
            return (out if mha.batch_first else out.transpose(0, 1)), None

    return QatSelfAttention


class _Instrumented:
    """What :func:`instrument` changed in a model, so :func:`strip` can undo it."""

    def __init__(self):
        self.parametrized = []  # (module, name)
        self.attention = []  # (parent, attribute, wrapper)
        self.hooks = []  # removable handles
        self.points = []  # activation modules


def _weight_targets(model):
    """(module, parameter name, K axis, output-channel axis) of every weight the deployed
    quantizers touch: Linear layers (x @ W^T: K = dim 1), attention in/out projections, the
    image and text projections (x @ P: K = dim 0), and the token-embedding table (its rows
    are blocked along the embedding dimension)."""
    import torch

    targets = []
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            targets.append((module, "in_proj_weight", 1, 0))
        elif isinstance(module, torch.nn.Linear):
            targets.append((module, "weight", 1, 0))
    for owner, name in ((model.visual, "proj"), (model, "text_projection")):
        value = getattr(owner, name, None)
        if isinstance(value, torch.nn.Parameter):
            targets.append((owner, name, 0, 1))
    return targets


def instrument(model, scheme: Scheme) -> _Instrumented:
    """Put fake quantizers for ``scheme`` into ``model`` in place (weights through
    ``torch.nn.utils.parametrize``; activations, for int8, through pre-forward hooks and the
    attention rewrite). Activation points start switched off: calibrate before training."""
    import torch
    from torch.nn.utils import parametrize

    done = _Instrumented()

    def add(module, name, fn):
        parametrize.register_parametrization(module, name, _make_weight_parametrization(fn))
        done.parametrized.append((module, name))

    # The exporter writes attention's out_proj on a flattened [N*L, E] input as a Gemm, which
    # MatMulNBits does not take (INT4_OPS: MatMul, Gather): at int4 it stays float.
    out_projs = {id(m.out_proj) for m in model.modules()
                 if isinstance(m, torch.nn.MultiheadAttention)}
    for module, name, k_axis, out_axis in _weight_targets(model):
        if scheme.precision == "int4" and id(module) in out_projs:
            continue
        if scheme.precision == "int4":
            add(module, name, lambda w, k=k_axis: fake_int4_blocks(
                w, k, scheme.block_size, scheme.symmetric))
        else:
            add(module, name, lambda w, a=out_axis: fake_int8_per_channel(
                w, a, scheme.reduce_range))
    embedding = getattr(model, "token_embedding", None)
    if isinstance(embedding, torch.nn.Embedding):
        if scheme.precision == "int4":
            add(embedding, "weight", lambda w: fake_int4_blocks(
                w, 1, scheme.block_size, scheme.symmetric))
        else:
            add(embedding, "weight", lambda w: fake_int8_per_tensor(w, scheme.reduce_range))
    if scheme.precision != "int8":
        return done

    wrapper_cls = _attention_module()
    for parent in list(model.modules()):
        attn = getattr(parent, "attn", None)
        if isinstance(attn, torch.nn.MultiheadAttention):
            wrapper = wrapper_cls(attn)
            parent.attn = wrapper
            done.attention.append((parent, "attn", wrapper))
            done.points += list(wrapper.points.values())
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not _inside_attention(module, done):
            point = _act_module()
            done.points.append(point)
            done.hooks.append(module.register_forward_pre_hook(
                lambda _m, args, p=point: (p(args[0]), *args[1:])))
    # Pooled features feed the projection MatMuls: quantize the final LayerNorms' outputs.
    for name in ("ln_post",):
        norm = getattr(model.visual, name, None)
        if norm is not None and isinstance(getattr(model.visual, "proj", None),
                                           torch.nn.Parameter):
            done.hooks.append(_output_point(norm, done))
    if isinstance(getattr(model, "text_projection", None), torch.nn.Parameter):
        done.hooks.append(_output_point(model.ln_final, done))
    return done


def _inside_attention(module, done: _Instrumented) -> bool:
    return any(module is wrapper.mha.out_proj for _, _, wrapper in done.attention)


def _output_point(module, done: _Instrumented):
    point = _act_module()
    done.points.append(point)
    return module.register_forward_hook(lambda _m, _args, out, p=point: p(out))


def strip(model, done: _Instrumented):
    """Remove every fake quantizer, keeping the latent float weights (what gets exported)."""
    from torch.nn.utils import parametrize

    for handle in done.hooks:
        handle.remove()
    for parent, attribute, wrapper in done.attention:
        setattr(parent, attribute, wrapper.mha)
    for module, name in done.parametrized:
        if parametrize.is_parametrized(module, name):
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    return model


# -- training ---------------------------------------------------------------------------------

def _class_embeddings(prompt_embeddings, n_classes: int):
    mean = prompt_embeddings.reshape(n_classes, -1, prompt_embeddings.shape[-1]).mean(1)
    return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def distillation_loss(student_logits, teacher_logits, labels, gate: float,
                      temperature: float = 1.0):
    """Per batch: KL(teacher || student) at ``temperature`` (times T^2) on items whose teacher
    max probability is >= ``gate``, cross-entropy to ``labels`` on the rest. Returns
    (loss, share of items distilled)."""
    import torch
    import torch.nn.functional as F

    teacher = (teacher_logits / temperature).softmax(-1)
    confident = teacher.max(-1).values >= gate
    kl = (teacher * (teacher.clamp_min(1e-12).log()
                     - F.log_softmax(student_logits / temperature, -1))).sum(-1)
    ce = F.cross_entropy(student_logits, labels, reduction="none")
    per_item = torch.where(confident, kl * temperature ** 2, ce)
    return per_item.mean(), float(confident.float().mean())


def _calibrate(student, points, pixels, text_ids, batch: int = 64):
    import torch

    for p in points:
        p.mode = "observe"
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            student.encode_image(pixels[i:i + batch], normalize=True)
        student.encode_text(text_ids, normalize=True)
    for p in points:
        if p.samples:
            p.finish_observing()
        else:
            p.mode = "off"


def train_qat(teacher, scheme: Scheme, data: TrainingData, tokenizer, *,
              mean, std, context_length: int, recipe: QatRecipe = QatRecipe(),
              log: Callable[[str], None] = print) -> QatResult:
    """Fine-tune a copy of ``teacher`` with ``scheme``'s fake quantization on ``data``;
    return the float student (fake quantizers removed) and the training record."""
    import torch

    from clipserve.export import train as builtin_train
    from clipserve.export.evaluate import random_token_ids
    from clipserve.export.towers import normalize_pixels

    start = time.monotonic()
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    teacher = teacher.eval()
    student = copy.deepcopy(teacher).eval()  # no dropout/batch norm: eval mode trains fine
    for p in teacher.parameters():
        p.requires_grad_(False)
    for name, p in student.named_parameters():  # the logits use the teacher's fixed scale
        p.requires_grad_(name not in ("logit_scale", "logit_bias"))
    mean_t, std_t = torch.tensor(mean), torch.tensor(std)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(np.asarray(data.labels, np.int64))
    n_classes = len(data.class_names)
    prompt_ids = torch.as_tensor(np.asarray(tokenizer(data.prompts)), dtype=torch.long)
    probe_ids = torch.from_numpy(random_token_ids(context_length, 64, seed=11)).to(
        prompt_ids.dtype)
    text_ids = torch.cat([prompt_ids, probe_ids])
    scale = float(teacher.logit_scale.exp())
    with torch.no_grad():
        teacher_text = teacher.encode_text(text_ids, normalize=True)
        teacher_classes = _class_embeddings(teacher_text[:len(prompt_ids)], n_classes)

    done = instrument(student, scheme)
    if done.points:  # int8: activation ranges from the training images before training
        idx = torch.linspace(0, len(images) - 1, min(256, len(images))).long()
        _calibrate(student, done.points, normalize_pixels(images[idx], mean_t, std_t), text_ids)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        1.0, (s + 1) / recipe.warmup_steps) * 0.5 * (1 + math.cos(math.pi * s / recipe.steps)))
    losses, gated, aligns = [], [], []
    log(f"[qat] {scheme.precision}: {recipe.steps} steps of {recipe.batch_size} on "
        f"{len(labels)} images ({data.source}); gate {recipe.gate}")
    for step in range(recipe.steps):
        idx = torch.randint(0, len(labels), (recipe.batch_size,), generator=generator)
        batch = images[idx]
        if data.augment:
            batch = builtin_train._augment(batch, generator)
        pixels = normalize_pixels(batch, mean_t, std_t)
        with torch.no_grad():
            teacher_image = teacher.encode_image(pixels, normalize=True)
        student_image = student.encode_image(pixels, normalize=True)
        student_text = student.encode_text(text_ids, normalize=True)
        student_classes = _class_embeddings(student_text[:len(prompt_ids)], n_classes)
        distil, share = distillation_loss(
            scale * student_image @ student_classes.T, scale * teacher_image @ teacher_classes.T,
            labels[idx], recipe.gate, recipe.kd_temperature)
        align = ((1 - (student_image * teacher_image).sum(-1)).mean()
                 + (1 - (student_text * teacher_text).sum(-1)).mean())
        loss = distil + recipe.embed_weight * align
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        gated.append(share)
        aligns.append(float(align.detach()))
        if step % 25 == 0 or step == recipe.steps - 1:
            log(f"[qat] {scheme.precision}: step {step + 1}/{recipe.steps} loss {loss.item():.4f} "
                f"(distil {distil.item():.4f}, align {align.item():.5f}, distilled "
                f"{share:.0%}) ({time.monotonic() - start:.0f}s)")
    ranges = [(p.lo, p.hi) for p in done.points if p.mode == "quant"]
    strip(student, done)
    for p in student.parameters():
        p.requires_grad_(False)
    tail = max(1, len(losses) // 10)
    record = {
        "scheme": scheme.describe(), "steps": recipe.steps, "batch_size": recipe.batch_size,
        "epochs": round(recipe.steps * recipe.batch_size / max(1, len(labels)), 2),
        "lr": recipe.lr, "gate_threshold": recipe.gate, "kd_temperature": recipe.kd_temperature,
        "embed_weight": recipe.embed_weight, "loss_first": round(float(np.mean(losses[:tail])), 5),
        "loss_last": round(float(np.mean(losses[-tail:])), 5),
        "distilled_share": round(float(np.mean(gated)), 4),
        # 1 - cos to FP32 (images + texts): what QAT closes; the total also carries the label
        # cross-entropy of the few ungated items, which is noisier than its trend.
        "align_first": round(float(np.mean(aligns[:tail])), 6),
        "align_last": round(float(np.mean(aligns[-tail:])), 6),
        "activation_points": len(ranges), "train_images": int(len(labels)),
        "data": data.source, "seconds": round(time.monotonic() - start, 1),
        "loss": "gated KL on zero-shot logits (CE to the label below the gate) + "
                "(1 - cos) image/text embedding alignment to FP32",
    }
    return QatResult(model=student.eval(), record=record)


def recipe_dict(recipe: QatRecipe) -> dict:
    return asdict(recipe)


# -- data -------------------------------------------------------------------------------------

MAX_TRAIN_IMAGES = 5000  # user images held in memory at the model's input size


def needs_user_data(spec) -> bool:
    from clipserve.export import models

    return spec.weights != models.BUILTIN_WEIGHTS


def check_data(specs, config) -> None:
    """Refuse ``--qat`` on an open_clip model when no images of the user's are given, before
    any work starts.

    Raises:
        ValueError: naming the flags that provide the images.
    """
    if not config.qat or config.eval_data or config.train_data:
        return
    missing = [s.source for s in specs if needs_user_data(s)]
    if missing:
        raise ValueError(
            f"--qat on {', '.join(missing)} needs your images to fine-tune on: pass "
            "--eval-data DIR (QAT then trains on its calibration split; the test split stays "
            "held out for the report) or --train-data DIR (an image folder with one "
            "sub-folder per class). Only the built-in digits-s/m/l train without them")


def training_data(spec, config, suite, image_size: int) -> TrainingData:
    """What QAT trains on: the digits training split for a built-in model (never the
    calibration or test split), else ``--train-data`` (every image of that folder), else the
    evaluation set's calibration split (the test split is never trained on)."""
    from clipserve.export import datasets, digits, train

    if config.train_data:
        folder = datasets.load_image_folder(config.train_data)
        parts = [folder.calibration, folder.test]
        return _load_labelled(parts, folder.class_names, folder.templates, image_size,
                              f"--train-data {config.train_data}")
    if not needs_user_data(spec):
        split = digits.load(image_size, seed=train.DATA_SEED).train
        return TrainingData(images=split.images, labels=np.asarray(split.labels, np.int64),
                            class_names=tuple(digits.CLASS_NAMES),
                            templates=tuple(digits.PROMPTS), augment=True,
                            source=f"digits training split ({len(split.labels)} images)")
    if not config.eval_data:
        check_data([spec], config)
    labelled = suite.labelled
    return _load_labelled([labelled.calibration], labelled.class_names, labelled.templates,
                          image_size, f"calibration split of {labelled.name}")


def _load_labelled(splits, class_names, templates, image_size: int, what: str) -> TrainingData:
    labels = np.concatenate([s.labels for s in splits])
    images = []
    for s in splits:
        images.append(s.images.load(image_size))
    pixels = np.concatenate(images)
    if len(labels) > MAX_TRAIN_IMAGES:
        keep = np.linspace(0, len(labels) - 1, MAX_TRAIN_IMAGES).astype(int)
        pixels, labels = pixels[keep], labels[keep]
    return TrainingData(images=pixels, labels=labels, class_names=tuple(class_names),
                        templates=tuple(templates), source=f"{what} ({len(labels)} images)")


# -- the export stage: QAT beside PTQ, measured on the same test split --------------------------

COMPARED = ("top1", "ece", "nll", "ood_auroc")
HIGHER_IS_BETTER = {"top1": True, "ece": False, "nll": False, "ood_auroc": True}


def choose_served(qat_minus_ptq: dict[str, dict]) -> tuple[str, str]:
    """Which graph is served at one precision, from the paired QAT - PTQ deltas on the test
    split ({metric: delta dict with delta/lo/hi}). PTQ when QAT is worse beyond its 95%
    interval on any compared metric. Otherwise QAT when it is better beyond its interval on
    one (measured evidence beats a point estimate: on digits-s INT4, QAT won back PTQ's lost
    OOD AUROC, +0.011 [+0.005, +0.017], while its top-1 differed by one test item inside its
    interval), else when its top-1 is at least PTQ's (point estimate). PTQ in the remaining
    case, since it needs no training and is what a re-export reproduces without data.
    Returns (choice, why)."""
    def beyond(metric, d, worse: bool) -> bool:
        higher = HIGHER_IS_BETTER.get(metric, True)
        return (d["hi"] < 0 if higher else d["lo"] > 0) if worse else \
            (d["lo"] > 0 if higher else d["hi"] < 0)
    worse = [m for m, d in qat_minus_ptq.items() if beyond(m, d, worse=True)]
    better = [m for m, d in qat_minus_ptq.items() if beyond(m, d, worse=False)]
    top1 = qat_minus_ptq.get("top1")
    if worse:
        return "ptq", (f"QAT is worse than PTQ beyond the 95% interval on {', '.join(worse)}")
    text = (f"top-1 {top1['delta'] * 100:+.1f} pts [{top1['lo'] * 100:+.1f}, "
            f"{top1['hi'] * 100:+.1f}] vs PTQ; " if top1 else "")
    if better:
        return "qat", (text + "better than PTQ beyond the 95% interval on "
                       + ", ".join(better) + ", worse beyond it on none")
    if top1 is not None and top1["delta"] < 0:
        return "ptq", (f"QAT top-1 {top1['delta'] * 100:+.1f} pts vs PTQ (interval "
                       f"[{top1['lo'] * 100:+.1f}, {top1['hi'] * 100:+.1f}]): not better")
    return "qat", text + "no compared metric worse beyond its interval"


def run_stage(model, *, spec, config, shapes, tokenizer, work, variants: dict, probes: dict,
              suite, prompt_ids, caption_ids, probe_ids, native_temperature,
              make_variants: Callable, say, session_for: Callable | None = None) -> dict:
    """QAT for each precision in ``config.qat_precisions`` that was exported: train, export the
    student to FP32 ONNX, quantize it with ``make_variants`` (the pipeline's own PTQ path),
    measure PTQ and QAT against FP32 on the same test split, and put the chosen graph into
    ``variants`` (in place). ``session_for(precision, tower, path)`` opens a graph on the
    runtime its endpoint will be served with, so that the figures compared are the ones the
    endpoint will show (default: onnxruntime's CPU provider). Every quantization record gets a ``qat`` entry. Returns
    {precision value: that entry}."""
    from clipserve import stats
    from clipserve.endpoints import Precision, Tower
    from clipserve.export import evaluate, quality
    from clipserve.export import onnx_export as ox

    # By default every exported int8/int4; --tensorrt's symmetric int8 is not the scheme
    # the int8 fake quantizers mimic, so its int8 is left to PTQ.
    default = [p for p in QAT_PRECISIONS if not (config.tensorrt and p == "int8")]
    chosen = [Precision.parse(p) for p in config.qat_precisions or default]
    chosen = [p for p in chosen if (p, Tower.IMAGE) in variants]
    if not chosen:
        return {}
    data = training_data(spec, config, suite, shapes.image_size)
    recipe = QatRecipe(steps=config.qat_steps or QatRecipe.steps, gate=config.qat_gate)
    from clipserve.export import quantize

    students, scheme_of = {}, {}
    for p in chosen:
        scheme = Scheme(p.value, block_size=config.int4_block_size,
                        reduce_range=quantize._reduce_range(None) if p is Precision.INT8
                        else False)
        scheme_of[p] = scheme
        result = train_qat(model, scheme, data, tokenizer, mean=shapes.mean, std=shapes.std,
                           context_length=shapes.context_length, recipe=recipe, log=say)
        out = work / f"qat-{p.value}"
        out.mkdir(parents=True, exist_ok=True)
        fp32 = {t: ox.export_tower(result.model, t, shapes, out / f"fp32_{t.value}.onnx")
                for t in Tower}
        for t in Tower:
            ox.check_parity(result.model, t, shapes, fp32[t])
        pinned = dataclasses.replace(config, **{f"{p.value}_method": scheme.method()})
        made = make_variants(fp32, out, [p], pinned, probes, say)
        students[p] = ({t: made[p, t] for t in Tower}, result.record)

    if session_for is None:
        def session_for(precision, tower, path):
            return evaluate.make_session(path)

    def measure(paths):
        sessions = {(Precision.FP32, t): session_for(Precision.FP32, t,
                                                     variants[Precision.FP32, t][0])
                    for t in Tower}
        sessions.update({(p, t): session_for(p, t, paths[p][t]) for p in paths
                         for t in Tower})
        return quality.evaluate_model(
            scale=f"{spec.scale}-qat-compare", sessions=sessions, suite=suite,
            prompt_ids=prompt_ids, caption_ids=caption_ids, probe_ids=probe_ids,
            image_size=shapes.image_size, native_temperature=native_temperature,
            budget=stats.parse_budget(config.budget), n_resamples=config.bootstrap, seed=0,
            say=lambda m: None)

    ptq = measure({p: {t: variants[p, t][0] for t in Tower} for p in chosen})
    qat = measure({p: {t: students[p][0][t][0] for t in Tower} for p in chosen})
    records = {}
    for p in chosen:
        def image_deltas(evaluation):
            row = next(r for r in evaluation.rows
                       if (r["precision"], r["tower"]) == (p.value, "image"))
            return {m: row["deltas"][m] for m in COMPARED if m in row.get("deltas", {})}

        paired = quality.paired_deltas(ptq.fitted[p], qat.fitted[p], suite,
                                       n_resamples=config.bootstrap, seed=0)
        versus = {m: paired[m].to_dict() for m in COMPARED if m in paired}
        served, why = choose_served(versus)
        record = {"served": served, "why": why, "ptq": image_deltas(ptq),
                  "qat": image_deltas(qat), "qat_minus_ptq": versus,
                  "training": students[p][1]}
        records[p.value] = record
        say(f"{p.value}: serving {served.upper()} ({why})")
        for t in Tower:
            if served == "qat":
                path, info = students[p][0][t]
                info = dict(info, qat=record)
                ptq_info = variants[p, t][1]
                if "runtime" in ptq_info:  # planned on the PTQ graph; served the same way
                    info["runtime"] = dict(ptq_info["runtime"], measured_on=(
                        "the PTQ graph of the same recipe (the QAT graph replaced it)"))
                ptq_choice = ptq_info.get("choice")
                if ptq_choice:
                    # The report's candidates table keeps PTQ's search (measured against the
                    # original FP32); the student's own pinned build is measured against the
                    # fine-tuned FP32, so it is kept apart, not mixed into that table.
                    info["qat_choice"] = info.get("choice")
                    info["choice"] = dict(ptq_choice, qat_served=True, why=(
                        f"{ptq_choice['why']}; QAT served instead ({why}), quantized with "
                        f"{scheme_of[p].method()}"))
                variants[p, t] = (path, info)
            else:
                path, info = variants[p, t]
                variants[p, t] = (path, dict(info, qat=record))
    return records
