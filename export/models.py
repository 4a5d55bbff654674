"""Which models to export, and loading them.

A model is written ``NAME::WEIGHTS``: NAME is an open_clip architecture (``ViT-B-32``,
``RN50``, ...) or a built-in offline default (``digits-s``, ``digits-m``, ``digits-l``);
WEIGHTS is an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``), a local checkpoint
path, or ``none`` for random initialisation (tests, benchmarks). Built-ins take no WEIGHTS:
they are trained here on first use and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipserve.endpoints import scale_name
from clipserve.export import train

BUILTIN_WEIGHTS = "builtin"


class ModelSpecError(ValueError):
    """A model name or its weights cannot be used."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    weights: str

    @property
    def scale(self) -> str:
        """The scale in endpoint names."""
        return scale_name(self.name)

    @property
    def source(self) -> str:
        return f"{self.name}::{self.weights}"


def _known_architectures() -> list[str]:
    import open_clip

    train.register_builtin_configs()
    return sorted(open_clip.list_models())


def parse_model(text: str) -> ModelSpec:
    """Parse one ``NAME[::WEIGHTS]``; raises ModelSpecError for an unknown architecture
    (listing the known ones) or an open_clip architecture given without weights."""
    name, _, weights = text.strip().partition("::")
    name, weights = name.strip(), weights.strip()
    if name in train.BUILTIN_MODELS:
        if weights not in ("", BUILTIN_WEIGHTS):
            raise ModelSpecError(f"{name} is a built-in model trained by clipserve; "
                                 f"write it without '::{weights}'")
        return ModelSpec(name, BUILTIN_WEIGHTS)
    known = _known_architectures()
    if name not in known:
        raise ModelSpecError(
            f"unknown model {name!r}. Built-in: {', '.join(train.BUILTIN_MODELS)}. "
            f"open_clip architectures: {', '.join(known)}")
    if not weights:
        import open_clip

        tags = [tag for arch, tag in open_clip.list_pretrained() if arch == name]
        raise ModelSpecError(
            f"{name} needs weights: {name}::TAG (pretrained tags: {', '.join(tags) or 'none'}), "
            f"{name}::/path/to/checkpoint.pt, or {name}::none for random initialisation")
    return ModelSpec(name, weights)


def parse_models(text: str) -> list[ModelSpec]:
    """Parse a comma-separated list of model specs."""
    specs = [parse_model(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise ModelSpecError("no model given")
    return specs


def read_models_file(path: Path) -> list[ModelSpec]:
    """One spec per line; blank lines and '#' comments are ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ModelSpecError(f"cannot read models file {path}: {exc}") from exc
    return parse_models(",".join(line.split("#", 1)[0] for line in lines))


def load(spec: ModelSpec, cache_dir: Path, log=print, seed: int = 0):
    """The PyTorch model for ``spec``, in eval mode on the CPU. ``seed`` picks a built-in's
    training seed (other models have one set of weights).

    Raises ModelSpecError when weights cannot be read or fetched.
    """
    import open_clip

    if spec.weights == BUILTIN_WEIGHTS:
        return train.train(spec.name, cache_dir, log=log, seed=seed)
    if seed:
        raise ModelSpecError(f"{spec.source}: only built-in models train other seeds")
    if spec.weights == "none":
        log(f"[model] {spec.name}: random initialisation")
        return open_clip.create_model(spec.name).eval()
    path = Path(spec.weights).expanduser()
    looks_like_path = path.suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in spec.weights
    if looks_like_path and not path.is_file():
        raise ModelSpecError(f"checkpoint {path} for {spec.name} does not exist")
    try:
        model = open_clip.create_model(spec.name, pretrained=str(path) if looks_like_path
                                       else spec.weights, cache_dir=str(Path(cache_dir) / "hub"))
    except Exception as exc:  # open_clip raises many types for bad files and failed downloads
        if looks_like_path:
            raise ModelSpecError(f"cannot load checkpoint {path} into {spec.name}: {exc}") from exc
        raise ModelSpecError(
            f"cannot get pretrained weights {spec.weights!r} for {spec.name}: {exc}. Without "
            "network access, download the checkpoint elsewhere and pass its path "
            f"({spec.name}::/path/to/open_clip_pytorch_model.bin)") from exc
    log(f"[model] {spec.name}: loaded {spec.weights}")
    return model.eval()
