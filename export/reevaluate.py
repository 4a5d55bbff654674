"""``clipserve evaluate``: measure every endpoint of an existing repository on your data.

No re-export and no torch: each endpoint's ``model.onnx`` runs in onnxruntime, texts are
tokenized with the repository's own ``tokenizer.json``, and the same measurement as the
export (:mod:`clipserve.export.quality`) writes ``evaluation.{md,json,png}``. With
``--write-sidecars`` the image endpoints get a new sidecar revision fitted to the evaluation
set's labels (temperature, OOD threshold and state, labels, prompts); the previous one is kept
as ``clipserve.r<N>.json``. A running gateway picks the new revision up on SIGHUP.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

from clipserve import calibration as cal
from clipserve import stats
from clipserve.endpoints import (SIDECAR_FILENAME, TOKENIZER_FILENAME, Precision, Sidecar, Tower,
                                 endpoint_name)
from clipserve.export import evaluate, quality, report
from clipserve.export.config import EvaluateConfig


def _sidecars(repository: Path) -> dict[str, Sidecar]:
    if not repository.is_dir():
        raise ValueError(f"model repository {repository} is not a directory")
    found = {child.name: Sidecar.read(child) for child in sorted(repository.iterdir())
             if (child / SIDECAR_FILENAME).is_file()}
    if not found:
        raise ValueError(f"{repository} holds no clipserve endpoint (no */{SIDECAR_FILENAME})")
    return found


def _scales(sidecars: dict[str, Sidecar], wanted: tuple[str, ...]) -> list[str]:
    have = sorted({s.scale for s in sidecars.values()})
    for scale in wanted:
        if scale not in have:
            raise ValueError(f"scale {scale!r} is not in the repository; it has {', '.join(have)}")
    scales = list(wanted) or have
    for scale in scales:
        for tower in Tower:
            if endpoint_name(scale, Precision.FP32, tower) not in sidecars:
                raise ValueError(f"{scale}: evaluation compares against FP32, and "
                                 f"{endpoint_name(scale, Precision.FP32, tower)} is missing")
    return scales


_RUNTIME = re.compile(r'key:\s*"runtime"\s*value:\s*{\s*string_value:\s*"([a-z]+)"')


def served_session(endpoint: Path, precision: Precision):
    """The endpoint's model on the runtime its config.pbtxt serves it with (OpenVINO's bf16
    is measured as bf16, not as the FP32 graph under onnxruntime)."""
    from clipserve.export import runtimes

    match = _RUNTIME.search((endpoint / "config.pbtxt").read_text())
    runtime = match.group(1) if match else "onnxruntime"
    path = endpoint / "1" / "model.onnx"
    if runtime == "onnxruntime":
        return evaluate.make_session(path)
    return runtimes.make_session(path, runtime, precision)


def write_sidecar_revision(endpoint: Path, fields: dict, live_score: str, states: dict) -> Sidecar:
    """Write ``fields`` into ``endpoint``'s sidecar as the next revision, keeping the previous
    one as ``clipserve.r<N>.json`` (and the OOD state file beside it)."""
    old = Sidecar.read(endpoint)
    shutil.copyfile(endpoint / SIDECAR_FILENAME, endpoint / f"clipserve.r{old.revision}.json")
    new = dataclasses.replace(old, **fields, revision=old.revision + 1)
    if new.ood_state:
        cal.save_ood_state(endpoint / new.ood_state, live_score, states[live_score])
    new.write(endpoint)
    return new


def evaluate_repository(config: EvaluateConfig, log=print) -> list[dict]:
    """Evaluate every (selected) scale of ``config.repository``; returns the report rows."""
    from clipserve.tokenizer import load_tokenizer

    repository = Path(config.repository)
    sidecars = _sidecars(repository)
    budget = stats.parse_budget(config.budget)
    rows = []
    for scale in _scales(sidecars, config.scales):
        mine = {(Precision(s.precision), Tower(s.tower)): (name, s)
                for name, s in sidecars.items() if s.scale == scale}
        precisions = sorted({p for p, t in mine if (p, Tower.IMAGE) in mine and (p, Tower.TEXT)
                             in mine}, key=list(Precision).index)
        image_car = mine[Precision.FP32, Tower.IMAGE][1]
        text_name, text_car = mine[Precision.FP32, Tower.TEXT]
        suite = quality.build_suite(config, builtin=image_car.source.endswith("::builtin"))
        if config.write_sidecars and not suite.domain_measured:
            raise ValueError(f"{scale} is not a built-in digits model: --write-sidecars fits "
                             "labels and thresholds to --eval-data, the labelled folder of "
                             "your model's domain")
        tokenizer = load_tokenizer(repository / text_name / TOKENIZER_FILENAME,
                                   text_car.context_length, text_car.tokenizer)

        def ids(texts):
            return tokenizer.encode(list(texts))[0]

        labelled = suite.labelled
        prompt_ids = ids(t.format(c) for c in labelled.class_names for t in labelled.templates)
        caption_ids = ids(suite.retrieval.captions) if suite.retrieval else None
        probe_ids = evaluate.random_token_ids(text_car.context_length, 64, seed=7)
        sessions = {key: served_session(repository / name, key[0])
                    for key, (name, _) in mine.items() if key[0] in precisions}
        native_t = quality.native_scoring(image_car.evaluation, image_car.scoring)
        log(f"[evaluate] {scale}: {', '.join(p.value for p in precisions)} on {quality.describe_suite(suite)}")
        result = quality.evaluate_model(
            scale=scale, sessions=sessions, suite=suite, prompt_ids=prompt_ids,
            caption_ids=caption_ids, probe_ids=probe_ids, image_size=image_car.image_size,
            native_temperature=native_t, budget=budget, n_resamples=config.bootstrap, say=log)
        params = {t: quality.count_parameters(repository / mine[Precision.FP32, t][0] / "1" /
                                              "model.onnx") for t in Tower}
        fp32_image = next(r for r in result.rows if (r["precision"], r["tower"]) == ("fp32", "image"))
        live_score = quality.choose_ood_score(config.ood_score, suite, fp32_image)
        for row in result.rows:
            name, car = mine[Precision(row["precision"]), Tower(row["tower"])]
            row.update({"model": scale, "source": car.source, "seed": 0, "endpoint": name,
                        "params_image": params[Tower.IMAGE], "params_text": params[Tower.TEXT],
                        "size_bytes": (repository / name / "1" / "model.onnx").stat().st_size,
                        "quantization": car.quantization, "data": quality.describe_suite(suite),
                        "domain_measured": suite.domain_measured, "live_ood_score": live_score})
        rows += result.rows
        if config.write_sidecars:
            for p in precisions:
                name, _ = mine[p, Tower.IMAGE]
                fields = quality.image_sidecar_fields(suite, result.fitted, p, live_score,
                                                      native_t, "clipserve evaluate")
                new = write_sidecar_revision(repository / name, fields, live_score,
                                             result.fitted[p].ood_states)
                log(f"[evaluate] {name}: sidecar revision {new.revision} ({len(new.labels)} "
                    f"labels, T {new.temperature:.4f}, {live_score} threshold "
                    f"{new.ood_threshold:.4f})")
    out = Path(config.out or repository)
    out.mkdir(parents=True, exist_ok=True)
    paths = report.write(rows, out, report.notes(rows, config=dataclasses.asdict(config),
                                                 budget=budget), budget, stem="evaluation")
    log(f"[evaluate] report: {paths['md']} {paths['json']} {paths['png']}")
    return rows

