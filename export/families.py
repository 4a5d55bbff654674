"""Model families: which tokenizer and which scoring rule each open_clip model needs, and
whether clipserve can export it.

open_clip models differ in two ways the rest of the export must follow:

- **Tokenizer.** CLIP models use open_clip's BPE (``SimpleTokenizer``, written for the gateway
  by :func:`clipserve.tokenizer.write_tokenizer_json`). SigLIP, SigLIP2 and the multilingual
  models name a Hugging Face tokenizer (``text_cfg.hf_tokenizer_name``); the export writes
  that tokenizer's own ``tokenizer.json``, framed as open_clip's ``HFTokenizer`` calls it
  (truncation and padding to the context length), and the cleaning it runs first
  (``tokenizer_kwargs.clean``) goes into the text sidecar. The built-in ``digits-siglip-*``
  models use a WordPiece vocabulary clipserve builds itself (:func:`build_digits_tokenizer`).
- **Scoring rule.** A model with a ``logit_bias`` (``init_logit_bias`` in its config) was
  trained with the sigmoid loss: it is scored with sigmoid(scale * cos + bias) per label
  (:class:`clipserve.calibration.Scoring`); every other with a softmax over labels.

Families whose text tower is a Hugging Face ``transformers`` model (``text_cfg.hf_model_name``:
the xlm-roberta, mt5, nllb and roberta towers) are refused at once, naming the family.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipserve import calibration as cal

TOKENIZER_DIR = Path(__file__).parent / "tokenizers"
DIGITS_TOKENIZER = TOKENIZER_DIR / "digits-wordpiece.json"
DIGITS_TOKENIZER_CLEAN = "canonicalize"  # SigLIP's cleaning: lowercase, no punctuation
DIGITS_VOCAB_SIZE = 256
# [PAD] is id 0 like CLIP's padding, [UNK] 1; [EOS] is the last id, so the text tower finds
# it by argmax over the ids as CLIP's does (digits-siglip-s keeps digits-s's text tower).
DIGITS_SPECIAL_TOKENS = ("[PAD]", "[UNK]")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # the first is required


class FamilyError(ValueError):
    """A model cannot be exported: unsupported family or missing tokenizer files."""


@dataclass(frozen=True)
class TextTokenizer:
    """What the export tokenizes with and writes for the gateway.

    ``encode(texts)`` gives int32 ids [n, context_length] exactly as the model was trained;
    ``json_path`` is the file the text endpoints get as ``tokenizer.json``; ``sidecar`` the
    text sidecar's ``tokenizer`` field (empty for CLIP BPE)."""

    encode: object
    json_path: Path | None
    sidecar: dict = field(default_factory=dict)

    def __call__(self, texts) -> np.ndarray:
        return self.encode(list(texts))


def _model_config(name: str) -> dict:
    import open_clip

    from clipserve.export import train

    train.register_builtin_configs()
    return open_clip.get_model_config(name) or {}


def family_of(name: str) -> str:
    """A short family name for messages and the support matrix: clip, siglip, hf-text."""
    cfg = _model_config(name)
    text = cfg.get("text_cfg", {})
    if text.get("hf_model_name"):
        return "hf-text"
    if text.get("hf_tokenizer_name") or "init_logit_bias" in cfg:
        return "siglip"
    return "clip"


def check_supported(name: str) -> None:
    """Raise FamilyError naming the family when ``name`` cannot be exported: a text tower
    built from a Hugging Face ``transformers`` model, or a tokenizer mode open_clip adds its
    own framing to."""
    cfg = _model_config(name)
    text = cfg.get("text_cfg", {})
    if text.get("hf_model_name"):
        raise FamilyError(
            f"{name}: its text tower is the Hugging Face transformers model "
            f"{text['hf_model_name']!r} (family hf-text: the xlm-roberta, mt5, nllb and roberta "
            "towers); clipserve exports open_clip's own text towers only. Supported families: "
            "CLIP (BPE tokenizer, softmax) and SigLIP/SigLIP2 (Hugging Face tokenizer, sigmoid)")
    mode = (text.get("tokenizer_kwargs") or {}).get("tokenizer_mode")
    if mode:
        raise FamilyError(f"{name}: open_clip tokenizer_mode {mode!r} is not supported by "
                          "clipserve's gateway tokenizer")


def native_scoring(model) -> cal.Scoring:
    """The scoring rule ``model`` was trained with, at its own parameters: sigmoid(scale *
    cos + bias) for a model with a logit bias (SigLIP), softmax(cos * scale) otherwise."""
    scale = float(model.logit_scale.detach().exp())
    bias = getattr(model, "logit_bias", None)
    if bias is not None:
        return cal.Scoring.sigmoid(scale, float(bias.detach().reshape(-1)[0]))
    return cal.Scoring("softmax", 1.0 / scale)


# -- Hugging Face tokenizers --------------------------------------------------------------

def _reference_encoder(tokenizer, context_length: int, clean: str, strip_sep_id=None):
    """The export's tokenizer: open_clip's own cleaning function, then the tokenizer with
    the truncation and padding transformers sets for ``padding='max_length',
    truncation=True, max_length=context_length`` (the call open_clip's HFTokenizer makes)."""
    from open_clip.tokenizer import get_clean_fn

    clean_fn = get_clean_fn(clean)

    def encode(texts):
        encodings = tokenizer.encode_batch([clean_fn(t) for t in texts])
        ids = np.array([e.ids for e in encodings], dtype=np.int32).reshape(
            len(texts), context_length)
        if strip_sep_id is not None:
            ids[ids == strip_sep_id] = 0
        return ids
    return encode


# transformers rebuilds these fast tokenizers' post-processor from tokenizer_config.json's
# add_bos_token/add_eos_token when it loads them (update_post_processor), whatever
# tokenizer.json says: SigLIP2's Gemma tokenizer is one.
_BOS_EOS_CLASSES = ("GemmaTokenizer", "GemmaTokenizerFast", "LlamaTokenizer",
                    "LlamaTokenizerFast")


def _tokenizer_config(directory: Path | None) -> dict:
    path = None if directory is None else directory / "tokenizer_config.json"
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _apply_bos_eos(tokenizer, config: dict) -> None:
    from tokenizers import processors

    if config.get("tokenizer_class") not in _BOS_EOS_CLASSES:
        return
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
    single, specials = "$A", []
    if add_bos and bos:
        single, specials = f"{bos} {single}", [(bos, tokenizer.token_to_id(bos))]
    if add_eos and eos:
        single, specials = f"{single} {eos}", specials + [(eos, tokenizer.token_to_id(eos))]
    if any(i is None for _, i in specials):
        raise FamilyError(f"tokenizer_config.json names special tokens {specials} that are not "
                          "in tokenizer.json's vocabulary")
    tokenizer.post_processor = processors.TemplateProcessing(single=single,
                                                             special_tokens=specials)


def _framed(source_json: Path, context_length: int, pad_token: str, dst: Path,
            config: dict | None = None):
    """Write ``source_json`` framed for the gateway to ``dst``; return the unframed
    tokenizer (post-processor as transformers loads it) and the pad id."""
    from tokenizers import Tokenizer

    from clipserve.tokenizer import frame_hf_tokenizer

    def load():
        tokenizer = Tokenizer.from_file(str(source_json))
        _apply_bos_eos(tokenizer, config or {})
        return tokenizer

    tokenizer = load()
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise FamilyError(f"{source_json}: the pad token {pad_token!r} is not in its vocabulary")
    frame_hf_tokenizer(tokenizer, context_length, pad_id, pad_token)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dst))
    return load(), pad_id


def build_digits_tokenizer(path: Path = DIGITS_TOKENIZER) -> Path:
    """Build the built-in SigLIP's WordPiece tokenizer with the ``tokenizers`` library and
    write it as a tokenizers JSON: whitespace pre-tokenizer, a WordPiece model whose
    vocabulary is every word of the digits prompts and labels (canonicalized, as training
    tokenizes them) plus each lowercase letter and digit as a word start and as a "##"
    continuation (so any other lowercase word splits into known pieces; other characters give
    [UNK]), and an end-of-sequence post-processor.

    The vocabulary is enumerated, not learned with ``tokenizers``' WordPieceTrainer: that
    trainer breaks frequency ties in hash order, and two runs on this corpus gave different
    vocabularies. Deterministic: the committed file is this function's output."""
    from open_clip.tokenizer import get_clean_fn
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from clipserve.export import digits

    clean = get_clean_fn(DIGITS_TOKENIZER_CLEAN)
    words = {w for c in digits.CLASS_NAMES for t in digits.PROMPTS for w in clean(t.format(c)).split()}
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = sorted(words | set(chars)) + [f"##{c}" for c in chars]
    vocab = {token: i for i, token in enumerate([*DIGITS_SPECIAL_TOKENS, *pieces, "[EOS]"])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A [EOS]", special_tokens=[("[EOS]", vocab["[EOS]"])])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def _hf_cache_repo(tokenizer_name: str) -> Path:
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                  "huggingface"), "hub")
    return Path(hub) / ("models--" + tokenizer_name.replace("/", "--"))


def _hf_cache_dirs(tokenizer_name: str) -> list[Path]:
    snapshots = _hf_cache_repo(tokenizer_name) / "snapshots"
    return sorted(snapshots.glob("*")) if snapshots.is_dir() else []


def _pad_token(directory: Path, tokenizer_json: Path) -> str:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.is_file():
            pad = json.loads(path.read_text()).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad:
                return pad
    padding = json.loads(tokenizer_json.read_text()).get("padding") or {}
    if padding.get("pad_token"):
        return padding["pad_token"]
    raise FamilyError(f"{directory}: no pad token in tokenizer_config.json, "
                      "special_tokens_map.json or tokenizer.json's padding section")


def find_hf_tokenizer(name: str, tokenizer_name: str, tokenizer_dir: str = "") -> Path:
    """The folder holding ``tokenizer_name``'s ``tokenizer.json``: ``tokenizer_dir`` when
    given, else a snapshot in the local Hugging Face hub cache.

    Raises FamilyError naming the missing files and ``--tokenizer DIR`` when there is none
    (nothing is downloaded)."""
    candidates = [Path(tokenizer_dir).expanduser()] if tokenizer_dir else _hf_cache_dirs(
        tokenizer_name)
    for directory in candidates:
        if (directory / HF_TOKENIZER_FILES[0]).is_file():
            return directory
    where = (f"--tokenizer {tokenizer_dir}" if tokenizer_dir else
             f"the Hugging Face cache ({_hf_cache_repo(tokenizer_name)})")
    raise FamilyError(
        f"{name} tokenizes with the Hugging Face tokenizer {tokenizer_name!r}, and its files "
        f"are missing: {HF_TOKENIZER_FILES[0]} (and {HF_TOKENIZER_FILES[1]} for the pad token) "
        f"not found in {where}. Download them where the hub can be reached, e.g. "
        f"`huggingface-cli download {tokenizer_name} {' '.join(HF_TOKENIZER_FILES)} "
        f"--local-dir DIR`, then pass --tokenizer DIR")


def text_tokenizer(name: str, context_length: int, work: Path,
                   tokenizer_dir: str = "") -> TextTokenizer:
    """The tokenizer model ``name`` was trained with, and the file the gateway gets.

    Args:
        name: an open_clip architecture or built-in.
        context_length: the text tower's sequence length.
        work: folder for the framed tokenizer JSON.
        tokenizer_dir: ``--tokenizer DIR`` (a Hugging Face tokenizer folder), or empty.
    Raises:
        FamilyError: an unsupported family, or a Hugging Face tokenizer whose files are
            missing (the message says which and how to supply them).
    """
    check_supported(name)
    text_cfg = _model_config(name).get("text_cfg", {})
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    if name.startswith("digits-siglip"):
        source, clean, pad_token = DIGITS_TOKENIZER, DIGITS_TOKENIZER_CLEAN, "[PAD]"
        directory = None
    elif text_cfg.get("hf_tokenizer_name"):
        directory = find_hf_tokenizer(name, text_cfg["hf_tokenizer_name"], tokenizer_dir)
        source = directory / HF_TOKENIZER_FILES[0]
        clean = kwargs.get("clean", "whitespace")
        pad_token = _pad_token(directory, source)
    else:
        import open_clip

        reference = open_clip.get_tokenizer(name)
        # json_path None: the export writes the CLIP BPE JSON once for every CLIP model.
        return TextTokenizer(
            encode=lambda texts: reference(texts).numpy().astype(np.int32), json_path=None)
    dst = Path(work) / "tokenizer.json"
    tokenizer, _ = _framed(source, context_length, pad_token, dst, _tokenizer_config(directory))
    strip_sep_id = None
    if kwargs.get("strip_sep_token"):
        sep = _special_token(directory, "sep_token") if directory else None
        strip_sep_id = tokenizer.token_to_id(sep) if sep else None
    from clipserve.tokenizer import frame_hf_tokenizer

    frame_hf_tokenizer(tokenizer, context_length, tokenizer.token_to_id(pad_token), pad_token)
    spec = {"kind": "hf", "clean": clean,
            "source": text_cfg.get("hf_tokenizer_name") or "clipserve digits WordPiece"}
    if strip_sep_id is not None:
        spec["strip_sep_id"] = int(strip_sep_id)
    return TextTokenizer(encode=_reference_encoder(tokenizer, context_length, clean, strip_sep_id),
                         json_path=dst, sidecar=spec)


def preflight(names, tokenizer_dir: str = "") -> None:
    """Check, before any model is loaded, that every model in ``names`` can be exported: a
    supported family and, for a Hugging Face tokenizer, its files at hand. Raises
    FamilyError (a ValueError: the CLI prints it without a traceback)."""
    for name in names:
        check_supported(name)
        text_cfg = _model_config(name).get("text_cfg", {})
        if text_cfg.get("hf_tokenizer_name") and not name.startswith("digits-siglip"):
            directory = find_hf_tokenizer(name, text_cfg["hf_tokenizer_name"], tokenizer_dir)
            _pad_token(directory, directory / HF_TOKENIZER_FILES[0])


def _special_token(directory: Path, key: str) -> str | None:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get(key)
    return value.get("content") if isinstance(value, dict) else value
