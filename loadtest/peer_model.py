"""Write a random-weight Hugging Face CLIP directory for the peer server (no hub access).

Run by the peer's own virtualenv interpreter, so it imports only the standard library, torch
and transformers, never clipserve::

    python peer_model.py OUT_DIR --bpe bpe_simple_vocab_16e6.txt.gz [--arch ViT-B-32]

The architecture matches open_clip's config of the same name (GELU, not QuickGELU), the
tokenizer is CLIP's byte-level BPE rebuilt from the BPE merges file that open_clip ships (the
same vocabulary and merges as OpenAI's), and the image processor is CLIP's eval transform
(shortest side to 224 bicubic, centre crop, CLIP mean/std).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

# open_clip model_configs/<name>.json, restated in transformers' terms.
ARCHITECTURES = {
    "ViT-B-32": dict(embed_dim=512, image_size=224, patch_size=32, vision_width=768,
                     vision_layers=12, vision_heads=12, text_width=512, text_layers=12,
                     text_heads=8, context_length=77, vocab_size=49408),
    "ViT-B-16": dict(embed_dim=512, image_size=224, patch_size=16, vision_width=768,
                     vision_layers=12, vision_heads=12, text_width=512, text_layers=12,
                     text_heads=8, context_length=77, vocab_size=49408),
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer_files(bpe_gz: Path, out: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt from open_clip's BPE file, built the way its SimpleTokenizer
    builds its vocabulary (49408 entries)."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_path, merges_path


def build(out: Path, bpe_gz: Path, arch: str = "ViT-B-32", seed: int = 0) -> None:
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizerFast)

    a = ARCHITECTURES[arch]
    out.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        projection_dim=a["embed_dim"],
        text_config=dict(vocab_size=a["vocab_size"], hidden_size=a["text_width"],
                         intermediate_size=4 * a["text_width"],
                         num_attention_heads=a["text_heads"],
                         num_hidden_layers=a["text_layers"],
                         max_position_embeddings=a["context_length"], hidden_act="gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        vision_config=dict(hidden_size=a["vision_width"], intermediate_size=4 * a["vision_width"],
                           num_attention_heads=a["vision_heads"],
                           num_hidden_layers=a["vision_layers"], image_size=a["image_size"],
                           patch_size=a["patch_size"], hidden_act="gelu"),
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)

    tok_dir = out / "_bpe"
    tok_dir.mkdir(exist_ok=True)
    vocab, merges = write_tokenizer_files(bpe_gz, tok_dir)
    tokenizer = CLIPTokenizerFast(vocab_file=str(vocab), merges_file=str(merges),
                                  model_max_length=a["context_length"],
                                  pad_token="<|endoftext|>")
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": a["image_size"]}, resample=3,
        do_center_crop=True, crop_size={"height": a["image_size"], "width": a["image_size"]},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    (out / "clipserve-peer.json").write_text(json.dumps({"arch": arch, "seed": seed}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--bpe", type=Path, required=True)
    parser.add_argument("--arch", default="ViT-B-32", choices=sorted(ARCHITECTURES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.out, args.bpe, args.arch, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
