"""Text tokenisation without torch: the token ids of ``open_clip.tokenize`` (CLIP BPE,
:class:`ClipTokenizer`) and of open_clip's ``HFTokenizer`` for models that name a Hugging Face
tokenizer (SigLIP, SigLIP2: :class:`HfTokenizer`, the tokenizer JSON with its framing, after
open_clip's cleaning). :func:`load_tokenizer` picks one from the text sidecar's ``tokenizer``.
The rest of this docstring is about the CLIP BPE.

Two halves, split by when they run:

- Export time: ``write_tokenizer_json`` reads open_clip's own ``SimpleTokenizer`` tables (BPE
  vocabulary and merge ranks, special tokens, pre-tokenizer regex) and writes them as a HF
  ``tokenizers`` JSON next to the text tower. open_clip and its ``regex`` dependency are imported
  there only.
- Serving time: ``ClipTokenizer`` cleans text in pure Python (stdlib only), runs the JSON's
  pre-tokenizer and BPE through ``tokenizers``' batch fast path, and frames the ids the way
  ``open_clip.tokenize`` does: start-of-text, ids, end-of-text, zero padding; a text that does
  not fit keeps its first ``context_length`` tokens with the last replaced by end-of-text.

What open_clip does, and how it is reproduced:

1. ``ftfy.fix_text`` (ftfy is not a serving dependency). Every deterministic ftfy step is
   re-implemented in ``_ftfy_fix_text`` with ftfy 6.3's tables and order: its HTML entity
   unescape (including the all-caps entities, and its rule that a line containing "<" and every
   line after it is not unescaped), C1 controls read as Windows-1252, Latin ligatures,
   full/half-width forms, curly quotes, line breaks, surrogates, terminal escapes, control
   characters, NFC, repeated until the text stops changing, line by line.
2. ``html.unescape`` twice, strip, collapse whitespace (``str.split``), ``str.lower``: the same
   stdlib calls.
3. The regex ``<start_of_text>|<end_of_text>|'s|'t|...|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
   (``regex`` module, IGNORECASE). The serving regex engine (Oniguruma inside ``tokenizers``)
   has older Unicode tables (about 17k code points open_clip counts as letters are not letters
   to it) and its case-insensitive mode folds "ﬆ" into "st"; so the export writes every class
   and literal character out as explicit code point ranges, computed with open_clip's own
   ``regex`` module and flags, and the serving pattern uses no flag. Quirks kept this way:
   "'ſ" is a contraction like "'s", and U+0345 (combining ypogegrammeni), which IGNORECASE
   takes out of the punctuation class without putting it in the letter class, is dropped.
4. Byte-level BPE with a ``</w>`` end-of-word suffix: the same vocabulary and merge ranks.
   A piece that is exactly ``<start_of_text>`` or ``<end_of_text>`` becomes that special id in
   open_clip (through its BPE cache); texts containing one take a slower per-piece path here.

Known divergence, on purpose: ftfy's mojibake repair (``fix_encoding``) is a heuristic and is
not reproduced. When its badness regex flags a line as UTF-8 that was decoded in a single-byte
encoding, ftfy re-decodes it ("cafÃ© au lait" -> "café au lait", "itâ€™s" -> "it's"); here such
a line is tokenised as given. Only texts where ``ftfy.fix_text(t) != ftfy.fix_text(t,
fix_encoding=False)`` can differ. ftfy is designed not to flag ordinary text (accented Latin,
Cyrillic, Greek and CJK samples were not flagged); random strings dense in Latin-1 and C1
characters are (about 15% of such strings). The tests assert that with that one ftfy step
switched off inside open_clip, its ids equal ours.

Versions: the ftfy steps are ftfy 6.3's (the tests compare with the installed ftfy). Cleaning
uses this Python's ``unicodedata`` (NFC, lowercase, width map), as open_clip does in its own
process; a serving Python with other Unicode tables than the export Python could tokenise
characters assigned between the two versions differently.
"""

from __future__ import annotations

import html
import html.entities
import json
import re
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

# The pre-tokenizer regex of open_clip 3.x SimpleTokenizer without extra special tokens.
# write_tokenizer_json refuses to run if the installed open_clip uses something else.
OPEN_CLIP_PATTERN = (
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"

# --- ftfy 6.3 fix_text, less fix_encoding (tables copied from ftfy/chardata.py) -------------

_FTFY_MAX_SEGMENT = 1_000_000  # ftfy's max_decode_length: it also cuts lines this long


def _build_html_entities() -> dict[str, str]:
    entities = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            entities["&" + name] = char
            if name == name.lower():
                upper = "&" + name.upper()
                if html.unescape(upper) == upper:
                    entities[upper] = char.upper()
    return entities


_HTML_ENTITIES = _build_html_entities()
_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_C1_CONTROL_RE = re.compile(r"[\x80-\x9f]")
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SINGLE_QUOTE_RE = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTE_RE = re.compile("[\u201c-\u201f]")
_LIGATURES = str.maketrans({
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ",
    "ǅ": "Dž", "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj",
    "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt",
    "ﬆ": "st",
})
_WIDTH_MAP = {0x3000: " "} | {
    i: unicodedata.normalize("NFKC", chr(i))
    for i in range(0xFF01, 0xFFF0)
    if unicodedata.normalize("NFKC", chr(i)) != chr(i)
}
_CONTROL_CHARS = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
     *range(0xFFF9, 0xFFFD)]
)


def _c1_as_windows_1252(match: re.Match[str]) -> str:
    # ftfy's "sloppy" windows-1252: the five bytes cp1252 leaves undefined map to themselves.
    byte = match.group(0).encode("latin-1")
    try:
        return byte.decode("cp1252")
    except UnicodeDecodeError:
        return match.group(0)


def _unescape_entity(match: re.Match[str]) -> str:
    text = match.group(0)
    if text in _HTML_ENTITIES:
        return _HTML_ENTITIES[text]
    if text.startswith("&#"):
        unescaped = html.unescape(text)
        return text if ";" in unescaped else unescaped
    return text


def _join_surrogate_pair(match: re.Match[str]) -> str:
    high, low = match.group(0)
    return chr(0x10000 + (ord(high) - 0xD800) * 0x400 + (ord(low) - 0xDC00))


def _fix_segment(text: str, unescape: bool) -> str:
    while True:
        before = text
        if unescape:
            text = _HTML_ENTITY_RE.sub(_unescape_entity, text)
        text = _C1_CONTROL_RE.sub(_c1_as_windows_1252, text)
        text = text.translate(_LIGATURES)
        text = text.translate(_WIDTH_MAP)
        text = _SINGLE_QUOTE_RE.sub("'", _DOUBLE_QUOTE_RE.sub('"', text))
        text = (text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n")
                .replace("\u2029", "\n").replace("\x85", "\n"))
        if _SURROGATE_RE.search(text):
            text = _SURROGATE_RE.sub("\ufffd", _SURROGATE_PAIR_RE.sub(_join_surrogate_pair, text))
        text = _ANSI_RE.sub("", text)
        text = text.translate(_CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def _ftfy_fix_text(text: str) -> str:
    """``ftfy.fix_text(text, fix_encoding=False)`` with ftfy 6.3's default configuration."""
    out = []
    pos = 0
    unescape = True
    while pos < len(text):
        end = text.find("\n", pos) + 1 or len(text)
        end = min(end, pos + _FTFY_MAX_SEGMENT)
        segment = text[pos:end]
        # ftfy's "auto" unescape is switched off for the first line containing "<" and, because
        # it overwrites its config, for every line after it too.
        unescape = unescape and "<" not in segment
        out.append(_fix_segment(segment, unescape))
        pos = end
    return "".join(out)


def clean_text(text: str) -> str:
    """open_clip's ``_clean_lower`` (the default SimpleTokenizer cleaning), minus mojibake repair.

    Args:
        text: raw text.
    Returns:
        the text open_clip's regex runs on: ftfy-fixed, HTML-unescaped twice, whitespace
        collapsed, lowercased.
    """
    text = html.unescape(html.unescape(_ftfy_fix_text(text))).strip()
    return " ".join(text.split()).lower()


# --- export: tokenizers JSON ----------------------------------------------------------------


def _code_point_class(code_points: list[int]) -> str:
    # Explicit ranges, so the serving regex engine's own Unicode tables never matter.
    parts = []
    start = prev = code_points[0]
    for cp in code_points[1:] + [-1]:
        if cp == prev + 1:
            prev = cp
            continue
        parts.append(f"\\x{{{start:X}}}" if start == prev else f"\\x{{{start:X}}}-\\x{{{prev:X}}}")
        start = prev = cp
    return "[" + "".join(parts) + "]"


def _explicit_pattern(pattern: str, flags: int) -> str:
    """Rewrite open_clip's pre-tokenizer regex with every class and literal character spelled
    out as the code points the ``regex`` module matches under ``flags``."""
    import regex

    every_char = "".join(chr(cp) for cp in range(0x110000) if not 0xD800 <= cp < 0xE000)
    classes: dict[str, str] = {}

    def matching(item: str) -> str:
        if item not in classes:
            cps = [ord(m.group()) for m in regex.finditer(item, every_char, flags)]
            classes[item] = _code_point_class(cps)
        return classes[item]

    alternatives = []
    for alt in pattern.split("|"):
        if alt.startswith("["):  # "[...]" or "[...]+"
            body = alt.rstrip("+")
            alternatives.append(matching(body) + alt[len(body):])
        else:  # a literal such as 're or <end_of_text>
            alternatives.append("".join(matching(regex.escape(ch)) for ch in alt))
    return "|".join(alternatives)


def write_tokenizer_json(path: Path, bpe_path: Path | None = None) -> Path:
    """Build a tokenizers-format JSON reproducing open_clip's SimpleTokenizer.

    Export-time only: imports open_clip (and its ``regex`` dependency) and scans every Unicode
    code point once (a few seconds).

    Args:
        path: where to write the JSON (parent directories are created).
        bpe_path: a BPE merges file in open_clip's format; default: the
            bpe_simple_vocab_16e6.txt.gz shipped inside the installed open_clip.
    Returns:
        ``path``.
    Raises:
        RuntimeError: the installed open_clip tokenizes with a regex other than
            ``OPEN_CLIP_PATTERN`` (IGNORECASE), so this module would not reproduce it.
    """
    import regex
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    reference = SimpleTokenizer(bpe_path=str(bpe_path or default_bpe()))
    if reference.pat.pattern != OPEN_CLIP_PATTERN or not reference.pat.flags & regex.IGNORECASE:
        raise RuntimeError(
            f"open_clip's tokenizer regex is {reference.pat.pattern!r} with flags "
            f"{reference.pat.flags}; clipserve.tokenizer reproduces {OPEN_CLIP_PATTERN!r}"
        )
    merges = sorted(reference.bpe_ranks, key=reference.bpe_ranks.__getitem__)
    pattern = _explicit_pattern(reference.pat.pattern, reference.pat.flags)
    # Written as plain JSON (not through the tokenizers builder API) so the file states exactly
    # what runs: no normalizer (clean_text does it in Python), no post-processor (framing is in
    # ClipTokenizer.encode).
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Removed",
                 "invert": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                 "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": "</w>",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": reference.encoder,
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    Tokenizer.from_file(str(path))  # fail here, at export, if tokenizers cannot load it
    return path


# --- serving --------------------------------------------------------------------------------


class ClipTokenizer:
    """open_clip token ids for batches of texts, from a ``write_tokenizer_json`` file."""

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        """Use ``from_file``; this takes an already loaded ``tokenizers.Tokenizer``.

        Raises:
            ValueError: ``context_length`` < 2 (no room for start and end of text), or the
                vocabulary lacks the special tokens.
        """
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        sot, eot = tokenizer.token_to_id(SOT_TOKEN), tokenizer.token_to_id(EOT_TOKEN)
        if sot is None or eot is None:
            raise ValueError(f"tokenizer vocabulary lacks {SOT_TOKEN} or {EOT_TOKEN}")
        self._tokenizer = tokenizer
        self.context_length = context_length
        self.sot_id: int = sot
        self.eot_id: int = eot
        self._special_ids = {SOT_TOKEN: sot, EOT_TOKEN: eot}

    @classmethod
    def from_file(cls, path: Path | str, context_length: int) -> "ClipTokenizer":
        """Load a tokenizer JSON written by ``write_tokenizer_json``.

        Args:
            path: the JSON file.
            context_length: the text tower's sequence length (77 for OpenAI CLIP).
        Raises:
            Exception: tokenizers' error if the file is missing or not a tokenizer JSON.
            ValueError: see ``__init__``.
        """
        return cls(Tokenizer.from_file(str(path)), context_length)

    def _ids_with_specials(self, cleaned: str) -> list[int]:
        # Slow path for the rare text that spells a special token: open_clip's regex yields it
        # as one piece and its BPE cache maps it to the special id; tokenizers' BPE would split it.
        ids = []
        for piece, _ in self._tokenizer.pre_tokenizer.pre_tokenize_str(cleaned):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            else:
                ids.extend(token.id for token in self._tokenizer.model.tokenize(piece))
        return ids

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Tokenise a batch exactly as ``open_clip.tokenize(texts, context_length)``.

        Args:
            texts: the texts; any length, including empty strings.
        Returns:
            int32 array [len(texts), context_length] of ids, 0-padded, and per text whether it
            was truncated (first context_length tokens kept, the last replaced by end-of-text).
        Raises:
            TypeError: ``texts`` is a single str rather than a sequence of them.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single str")
        cleaned = [clean_text(text) for text in texts]
        special = [SOT_TOKEN in text or EOT_TOKEN in text for text in cleaned]
        plain = [text for text, has in zip(cleaned, special) if not has]
        encodings = iter(self._tokenizer.encode_batch(plain, add_special_tokens=False))
        all_ids = [self._ids_with_specials(text) if has else next(encodings).ids
                   for text, has in zip(cleaned, special)]

        length = self.context_length
        out = np.zeros((len(texts), length), dtype=np.int32)
        truncated = []
        for row, ids in zip(out, all_ids):
            kept = min(len(ids), length - 2)  # room for start and end of text
            row[0] = self.sot_id
            row[1:1 + kept] = ids[:kept]
            row[1 + kept] = self.eot_id
            truncated.append(len(ids) > length - 2)
        return out, truncated


# --- Hugging Face tokenizers as data (SigLIP, multilingual open_clip models) ------------------

HF_CLEAN_FUNCTIONS = ("canonicalize", "lower", "whitespace")
_PUNCTUATION = str.maketrans("", "", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")  # string.punctuation


def hf_clean_text(text: str, clean: str) -> str:
    """open_clip's ``get_clean_fn(clean)`` (what its HFTokenizer runs before the Hugging Face
    tokenizer), stdlib only, minus ftfy's mojibake repair like :func:`clean_text`.

    - ``whitespace``: ftfy, HTML-unescape twice, strip, collapse whitespace.
    - ``lower``: the same, lowercased.
    - ``canonicalize`` (SigLIP; big_vision's ``canonicalize_text``): ftfy, HTML-unescape
      twice, strip, "_" to space, ASCII punctuation removed, lowercased, whitespace collapsed.

    Raises ValueError for another ``clean``.
    """
    basic = html.unescape(html.unescape(_ftfy_fix_text(text))).strip()
    if clean == "canonicalize":
        return " ".join(basic.replace("_", " ").translate(_PUNCTUATION).lower().split()).strip()
    if clean == "lower":
        return " ".join(basic.split()).strip().lower()
    if clean == "whitespace":
        return " ".join(basic.split()).strip()
    raise ValueError(f"unknown text cleaning {clean!r}; known: {list(HF_CLEAN_FUNCTIONS)}")


class HfTokenizer:
    """open_clip's ``HFTokenizer`` ids for batches of texts, torch- and transformers-free.

    The tokenizer JSON is the model's own Hugging Face tokenizer with the framing open_clip
    asks of it (``max_length=context_length, padding='max_length', truncation=True``) stored in
    the file: its ``truncation`` (to the context length, special tokens included) and
    ``padding`` (fixed to the context length with the pad id) sections, and its
    post-processor (e.g. SigLIP's end-of-sequence token). The cleaning open_clip runs first
    (``clean``) is done here in Python (:func:`hf_clean_text`).
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int, clean: str,
                 strip_sep_id: int | None = None):
        """Use :func:`load_tokenizer`. Raises ValueError for a file whose truncation or padding
        does not match ``context_length``, or an unknown ``clean``."""
        if clean not in HF_CLEAN_FUNCTIONS:
            raise ValueError(f"unknown text cleaning {clean!r}; known: {list(HF_CLEAN_FUNCTIONS)}")
        truncation, padding = tokenizer.truncation, tokenizer.padding
        if not truncation or truncation["max_length"] != context_length:
            raise ValueError(f"tokenizer truncation {truncation} does not cut at the context "
                             f"length {context_length}")
        if not padding or padding.get("length") != context_length:
            raise ValueError(f"tokenizer padding {padding} does not pad to the context length "
                             f"{context_length}")
        self._tokenizer = tokenizer
        self._clean = clean
        self._strip_sep_id = strip_sep_id
        self.context_length = context_length

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Token ids as open_clip's HFTokenizer gives them: int32 [len(texts), context_length]
        and per text whether it was truncated. Raises TypeError for a single str."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single str")
        cleaned = [hf_clean_text(text, self._clean) for text in texts]
        encodings = self._tokenizer.encode_batch(cleaned) if cleaned else []
        out = np.array([e.ids for e in encodings], dtype=np.int32).reshape(
            len(cleaned), self.context_length)
        if self._strip_sep_id is not None:  # open_clip's strip_sep_token: sep ids become 0
            out[out == self._strip_sep_id] = 0
        return out, [bool(e.overflowing) for e in encodings]


def frame_hf_tokenizer(tokenizer: Tokenizer, context_length: int, pad_id: int,
                       pad_token: str) -> Tokenizer:
    """Give ``tokenizer`` (in place) open_clip's framing: truncation to ``context_length``
    (special tokens included) and right padding to it with ``pad_id``; returns it."""
    tokenizer.enable_truncation(max_length=context_length)
    tokenizer.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def load_tokenizer(path: Path | str, context_length: int, spec: dict | None = None):
    """The gateway's tokenizer of a text endpoint: a :class:`ClipTokenizer` for an empty
    ``spec`` (a sidecar's ``tokenizer`` field: open_clip's CLIP BPE), an :class:`HfTokenizer`
    for ``{"kind": "hf", "clean": ..., "strip_sep_id": ...}``.

    Raises ValueError for an unknown kind; tokenizers' error for an unreadable file.
    """
    spec = spec or {}
    kind = spec.get("kind", "clip")
    if kind == "clip":
        return ClipTokenizer.from_file(path, context_length)
    if kind == "hf":
        return HfTokenizer(Tokenizer.from_file(str(path)), context_length,
                           spec.get("clean", "whitespace"), spec.get("strip_sep_id"))
    raise ValueError(f"unknown tokenizer kind {kind!r} in the sidecar; known: clip, hf")
