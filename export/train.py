"""Train the offline default CLIP (``digits-s``/``-m``/``-l``) on scikit-learn's digits.

The models are open_clip's own ``CLIP`` class built from a registered model config
(``export/model_configs/<name>.json``), trained with CLIP's symmetric contrastive loss. Digits
have ten classes, so a batch holds many images of the same class: every same-class
image/caption pair is treated as a positive (a soft target spread over them) instead of
open_clip's ClipLoss one-positive diagonal, which would push apart identical concepts.

``digits-siglip-*`` have the same towers plus a logit bias, and train with open_clip's
``SigLipLoss`` (sigmoid of scale * cos + bias per pair) with the same-class positives, on ids
from the WordPiece tokenizer clipserve builds (``export/families.py``). SigLIP initialises the
bias at -10 for batches of 32k pairs with one positive each; here 5 of an image's 50 captions
are positives, and at -10 the model sat at the collapsed optimum (every cosine equal, loss
16.2 for 200 steps), so the bias starts at the prior log-odds log(5/45) = -2.2.
Training is reproducible (fixed seeds, single process) and cached by a hash of the recipe.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from clipserve.export import digits

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
BUILTIN_MODELS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))
RECIPE_VERSION = 2  # bump when the training code changes what it produces
# The data split never follows the training seed: every seed of a size trains on the same
# digits and is measured on the same held-out calibration and test splits.
DATA_SEED = 0


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters; chosen so each size trains in about 1-3 minutes on 2 CPU cores.

    The 32-pixel input is 8x8 digits upsampled, so 8-pixel patches (16 tokens) see everything
    there is to see at a quarter of the cost of 4-pixel patches."""

    steps: int
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    seed: int = 0


# Wider models collapse to constant embeddings (loss stuck at the uniform value) at 2e-3;
# 5e-4 with a longer warm-up trains them.
RECIPES = {"digits-s": Recipe(steps=500), "digits-siglip-s": Recipe(steps=500),
           "digits-m": Recipe(steps=500, lr=5e-4, warmup_steps=100),
           "digits-l": Recipe(steps=500, lr=5e-4, warmup_steps=100)}


def register_builtin_configs() -> None:
    """Make ``digits-*`` known to open_clip's factory (idempotent)."""
    import open_clip

    if not set(BUILTIN_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def recipe_for(name: str, seed: int = 0) -> Recipe:
    """The recipe of built-in ``name`` with training seed ``seed`` (initial weights, batch
    order, augmentation); seed 0 is the one served by default."""
    return replace(RECIPES[name], seed=seed)


def checkpoint_path(name: str, cache_dir: Path, seed: int = 0) -> Path:
    """Where the trained weights of built-in ``name`` are cached: the file name carries a hash
    of everything that determines them, so a changed recipe or config trains anew."""
    recipe = {
        "config": json.loads((MODEL_CONFIG_DIR / f"{name}.json").read_text()),
        "recipe": asdict(recipe_for(name, seed)),
        "version": RECIPE_VERSION,
    }
    if name.startswith("digits-siglip"):  # its ids come from the committed vocabulary
        from clipserve.export import families

        recipe["tokenizer"] = hashlib.sha256(families.DIGITS_TOKENIZER.read_bytes()).hexdigest()
    key = json.dumps(recipe, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / "checkpoints" / f"{name}-{digest}.pt"


def _augment(images, generator):
    """Random shifts of up to 3 pixels and brightness in [0.8, 1.2], on a uint8 NHWC batch."""
    import torch

    n, s = images.shape[0], images.shape[1]
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (3, 3, 3, 3))
    dy, dx = torch.randint(0, 7, (2, n), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(n)])
    scale = torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2, generator=generator)
    return (out * scale).clamp(0, 255).permute(0, 2, 3, 1)


def _sigmoid_loss():
    """open_clip's SigLipLoss, fed every same-class (image, caption) pair as a positive."""
    import torch.nn.functional as F
    from open_clip.loss import SigLipLoss

    class MultiPositiveSigLipLoss(SigLipLoss):
        def forward(self, image_features, text_features, logit_scale, logit_bias, positives):
            logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)
            # SigLipLoss._loss with its +1 diagonal / -1 elsewhere labels replaced by the
            # same-class mask (the diagonal would call a caption of the same digit negative).
            return -F.logsigmoid((2 * positives - 1) * logits).sum() / image_features.shape[0]

    return MultiPositiveSigLipLoss()


def _contrastive_loss(logits, positives):
    loss_image = -(positives / positives.sum(1, keepdim=True)
                   * logits.log_softmax(1)).sum(1).mean()
    # Captions whose class is absent from this batch have no positive image: skip them.
    present = positives.sum(0) > 0
    positives_t = positives.T[present]
    loss_text = -(positives_t / positives_t.sum(1, keepdim=True)
                  * logits.T[present].log_softmax(1)).sum(1).mean()
    return (loss_image + loss_text) / 2


def train(name: str, cache_dir: Path, log=print, seed: int = 0):
    """Return open_clip model ``name`` trained on digits with training seed ``seed``, loading
    it from the cache when present. ``log`` receives progress lines."""
    import open_clip
    import torch

    from clipserve.export.towers import normalize_pixels

    register_builtin_configs()
    path = checkpoint_path(name, cache_dir, seed)
    recipe = recipe_for(name, seed)
    # Seed before the model exists: its initial weights come from the global generator.
    torch.manual_seed(recipe.seed)
    model = open_clip.create_model(name)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log(f"[train] {name}: loaded cached weights {path}")
        return model.eval()

    generator = torch.Generator().manual_seed(recipe.seed)
    data = digits.load(model.visual.image_size[0], seed=DATA_SEED)
    from clipserve.export import families

    tokenizer = families.text_tokenizer(name, model.context_length,
                                        Path(cache_dir) / "tokenizers" / name)
    # Every (class, template) caption, encoded each step: 50 texts instead of one per image.
    prompt_tokens = torch.from_numpy(tokenizer(
        [t.format(c) for c in digits.CLASS_NAMES for t in digits.PROMPTS])).long()
    sigmoid_loss = _sigmoid_loss() if model.logit_bias is not None else None
    prompt_class = torch.arange(10).repeat_interleave(len(digits.PROMPTS))
    images = torch.from_numpy(data.train.images)
    labels = torch.from_numpy(data.train.labels)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"])
    std = torch.tensor(model.visual.preprocess_cfg["std"])

    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        1.0, (step + 1) / recipe.warmup_steps) * 0.5 * (1 + np.cos(np.pi * step / recipe.steps)))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[train] {name}: {n_params / 1e6:.1f}M parameters, {recipe.steps} steps of "
        f"{recipe.batch_size} on {len(labels)} digits")
    model.train()
    start = time.monotonic()
    for step in range(recipe.steps):
        idx = torch.randint(0, len(labels), (recipe.batch_size,), generator=generator)
        pixels = normalize_pixels(_augment(images[idx], generator), mean, std)
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(prompt_tokens, normalize=True)
        positives = (labels[idx][:, None] == prompt_class[None, :]).float()  # [B, 50]
        if sigmoid_loss is not None:
            loss = sigmoid_loss(image_features, text_features, model.logit_scale.exp(),
                                model.logit_bias, positives)
        else:
            loss = _contrastive_loss(
                model.logit_scale.exp() * image_features @ text_features.T, positives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # CLIP clamps the learned temperature at 100
            model.logit_scale.clamp_(0, np.log(100))
        if step % 100 == 0 or step == recipe.steps - 1:
            bias = "" if sigmoid_loss is None else f" logit_bias {model.logit_bias.item():.2f}"
            log(f"[train] {name}: step {step + 1}/{recipe.steps} loss {loss.item():.3f} "
                f"logit_scale {model.logit_scale.exp().item():.1f}{bias} "
                f"({time.monotonic() - start:.0f}s)")
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written checkpoint
    log(f"[train] {name}: saved {path} ({time.monotonic() - start:.0f}s)")
    return model
