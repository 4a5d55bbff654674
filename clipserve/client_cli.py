"""``clipserve embed`` and ``clipserve classify``: the gateway from a terminal, via
:mod:`clipserve.client`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("CLIPSERVE_TARGET", "127.0.0.1:50051"),
                        help="gateway gRPC host:port [env CLIPSERVE_TARGET]")
    parser.add_argument("--precision", help="x-clip-precision (fp32, fp16, int8, int4)")
    parser.add_argument("--scale", help="x-clip-scale")
    parser.add_argument("--routing-key", help="x-clip-routing-key (sticky A/B arm)")
    parser.add_argument("--api-key", default=os.environ.get("CLIPSERVE_API_KEY"),
                        help="API key [env CLIPSERVE_API_KEY]")
    parser.add_argument("--ca-file", type=Path, help="PEM CA bundle to trust (enables TLS)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``embed`` and ``classify`` on the ``clipserve`` subcommand parser."""
    embed = sub.add_parser("embed", help="embed images and texts; print image-text similarities",
                           description="Each argument that is an existing file is an image, "
                                       "any other a text.")
    embed.add_argument("items", nargs="+", help="image files and texts")
    _common(embed)
    embed.set_defaults(run=run_embed)
    classify = sub.add_parser("classify", help="zero-shot classify images with an OOD flag")
    classify.add_argument("images", nargs="+", type=Path, help="image files")
    classify.add_argument("--labels", default="",
                          help="comma-separated labels (empty: the endpoint's own set)")
    classify.add_argument("--prompt-templates", default="",
                          help="comma-separated templates with {} for the label")
    _common(classify)
    classify.set_defaults(run=run_classify)


def _client(args):
    from clipserve.client import Client

    root = args.ca_file.read_bytes() if args.ca_file else None
    return Client(args.target, args.api_key, tls=args.tls, root_certificates=root,
                  timeout_s=args.timeout)


def _route(args) -> dict:
    return {"precision": args.precision, "scale": args.scale, "routing_key": args.routing_key}


def _fail(command: str, exc) -> int:
    import grpc

    if isinstance(exc, grpc.RpcError):
        print(f"clipserve {command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
    else:
        print(f"clipserve {command}: {exc}", file=sys.stderr)
    return 1


def run_embed(args) -> int:
    """Embed the arguments and print the served endpoints and a similarity table."""
    import grpc

    images = [item for item in args.items if Path(item).is_file()]
    texts = [item for item in args.items if not Path(item).is_file()]
    try:
        with _client(args) as client:
            img = client.embed_images(images, timeout_s=args.timeout, **_route(args)) \
                if images else None
            # Texts go to the arm the images went to, so the similarities compare like with like.
            route = _route(args)
            if img is not None:
                scale, precision, _ = img.endpoint.split("_")
                route.update(scale=scale, precision=precision)
            txt = client.embed_texts(texts, timeout_s=args.timeout, **route) if texts else None
    except (grpc.RpcError, OSError, ValueError) as exc:
        return _fail("embed", exc)
    for result, what in ((img, "images"), (txt, "texts")):
        if result is not None:
            print(f"{what}: {result.endpoint} (dim {result.vectors.shape[1]})")
    if img is not None and txt is not None:
        sims = img.vectors @ txt.vectors.T
        width = max(len(Path(i).name) for i in images)
        print(f"{'cosine':{width}s}  " + "  ".join(f"{t[:24]!r}" for t in texts))
        for name, row in zip(images, sims):
            print(f"{Path(name).name:{width}s}  " + "  ".join(
                f"{v:{max(len(repr(t[:24])), 6)}.3f}" for v, t in zip(row, texts)))
    else:
        result = img or txt
        names = images or texts
        sims = result.vectors @ result.vectors.T
        for name, row in zip(names, sims):
            print(f"{str(name)[:30]:30s}  " + " ".join(f"{v:.3f}" for v in row))
    return 0


def run_classify(args) -> int:
    """Classify the images and print probabilities, the top label and the OOD flag."""
    import grpc

    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    templates = [s.strip() for s in args.prompt_templates.split(",") if s.strip()]
    try:
        with _client(args) as client:
            result = client.classify(args.images, labels, prompt_templates=templates,
                                     timeout_s=args.timeout, **_route(args))
    except (grpc.RpcError, OSError, ValueError) as exc:
        return _fail("classify", exc)
    print(f"endpoint: {result.endpoint}  request id: {result.request_id}  "
          f"OOD threshold: {result.ood_threshold:.3f}")
    for path, probs, top, score, ood in zip(args.images, result.probabilities,
                                            result.top_labels, result.ood_scores,
                                            result.out_of_distribution):
        order = np.argsort(-probs)[:5]
        shown = ", ".join(f"{result.labels[i]} {probs[i]:.3f}" for i in order)
        print(f"{path.name}: {top}  ({shown})  ood_score {score:.3f}"
              f"{'  OUT OF DISTRIBUTION' if ood else ''}")
    return 0
