"""Post-training quantization chosen by measurement.

Each INT8/INT4 candidate (:mod:`clipserve.export.recipes`) is built, then measured on the
evaluation suite's calibration split (never its test split, which the report measures
afterwards): cosine of its embeddings to FP32's, zero-shot top-1 and ECE (at a temperature
fitted on the same items) against FP32 with paired bootstrap intervals, the verdict of those
two against the export's budget, items/s, batch invariance and file size. :func:`choose`
then keeps the best candidate inside the budget, the fastest among equals.

:func:`mixed_precision` leaves the fewest INT8 nodes in float that bring an endpoint inside
the budget, ordered by a per-node sensitivity pass.

The calibration split also calibrates the static candidates, so these figures are in-sample
for activation ranges: they rank candidates; the report's test-split figures judge the one
kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from clipserve import calibration as cal
from clipserve import stats
from clipserve.endpoints import Tower
from clipserve.export.evaluate import embed

# Candidates whose mean cosine to FP32 is within this of the best are "equal": the faster
# one wins. INT4 candidates differ more from each other, so their band is wider.
TOLERANCE = {"int8": 5e-4, "int4": 1e-3}
# Among equally faithful candidates the faster one wins only by this factor: 1 s speed runs on
# a shared 2-core machine moved by 2-3x between exports (digits-s static-p99.99 3831 then 3345
# then 3116 items/s beside others at 1300-4600).
SPEED_MARGIN = 1.1
# Bootstrap resamples for the candidates' intervals (the report's own use --bootstrap).
CANDIDATE_RESAMPLES = 1000
# The metrics judged on the calibration split (the cheap ones: one labelled set, no OOD).
CANDIDATE_METRICS = ("top1", "ece")
VERDICT_RANK = {"safe": 0, "inconclusive": 1, "unsafe": 2}
# The mixed-precision sensitivity pass builds one graph per node: it ranks them by the cosine
# on this many calibration items (the verdict of each step uses them all).
SENSITIVITY_ITEMS = 32


@dataclass
class CalibrationProbe:
    """What candidates are measured on: the calibration split seen by FP32.

    images: calibration pixels; labels: their classes; text: prompt ids (class-major,
    ``n_prompts`` rows) followed by extra token ids; fp32_images/fp32_text: FP32's embeddings
    of them; n_classes: labels in the prompt set; rule: the model's scoring rule (softmax or
    sigmoid), fitted per candidate for its ECE."""

    images: np.ndarray
    labels: np.ndarray
    text: np.ndarray
    n_prompts: int
    n_classes: int
    fp32_images: np.ndarray
    fp32_text: np.ndarray
    rule: str = "softmax"

    @classmethod
    def build(cls, fp32_sessions: dict, images, labels, text, n_prompts, n_classes,
              rule: str = "softmax"):
        return cls(images=images, labels=np.asarray(labels), text=text, n_prompts=n_prompts,
                   n_classes=n_classes, fp32_images=embed(fp32_sessions[Tower.IMAGE], images),
                   fp32_text=embed(fp32_sessions[Tower.TEXT], text), rule=rule)

    def inputs(self, tower: Tower) -> np.ndarray:
        return self.images if tower is Tower.IMAGE else self.text

    def _classes(self, text_embeddings):
        return cal.average_prompts(text_embeddings[:self.n_prompts], self.n_classes)

    def _per_item(self, image_embeddings, classes):
        cosines = cal.label_cosines(image_embeddings, classes)
        scoring, _ = cal.fit_scoring_checked(self.rule, cosines, self.labels)
        correct = cosines.argmax(1) == self.labels
        return correct, scoring.max_probability(cosines)

    def quality(self, tower: Tower, embeddings: np.ndarray, budget: dict,
                n_resamples: int = CANDIDATE_RESAMPLES) -> dict:
        """Figures of one candidate tower from its embeddings of ``inputs(tower)``: the image
        tower is scored against FP32's class embeddings, the text tower's class embeddings
        against FP32's images (each isolates its own tower)."""
        reference = self.fp32_images if tower is Tower.IMAGE else self.fp32_text
        cos = cal.cosine_rows(embeddings, reference)
        fp32_classes = self._classes(self.fp32_text)
        ref_correct, ref_conf = self._per_item(self.fp32_images, fp32_classes)
        if tower is Tower.IMAGE:
            correct, conf = self._per_item(embeddings, fp32_classes)
        else:
            correct, conf = self._per_item(self.fp32_images, self._classes(embeddings))
        deltas = {
            "top1": stats.mean_delta(ref_correct, correct, metric="top1",
                                     n_resamples=n_resamples, seed=0),
            "ece": stats.paired_bootstrap(cal.score_ece, (ref_conf, ref_correct),
                                          (conf, correct), metric="ece",
                                          higher_is_better=False, n_resamples=n_resamples,
                                          seed=0)}
        from clipserve.export.quality import judge

        verdict = judge(deltas, {k: v for k, v in budget.items() if k in CANDIDATE_METRICS})
        return {"cosine_calibration": round(float(cos.mean()), 6),
                "cosine_min": round(float(cos.min()), 6),
                "finite": bool(np.isfinite(embeddings).all()),
                "top1": round(float(correct.mean()), 4),
                "deltas": {m: {k: round(v, 5) if isinstance(v, float) else v
                               for k, v in d.to_dict().items()} for m, d in deltas.items()},
                "verdict": verdict["verdict"], "n_calibration": int(len(self.labels))}


def choose(figures: dict[str, dict], tolerance: float) -> tuple[str, str]:
    """The candidate to keep, and why, from each candidate's figures (those with an
    ``error`` are skipped).

    Order of preference: batch-invariant candidates (a served embedding must not depend on
    which requests share its batch; dynamic quantization takes one scale per batch), then the
    best verdict against the budget on the calibration split (safe, then inconclusive, then
    unsafe), then among those the best mean cosine to FP32; candidates within ``tolerance``
    of that cosine count as equal and the fastest of them wins if it is at least
    SPEED_MARGIN times as fast as the most faithful one (else the most faithful does).

    Raises ValueError when no candidate has figures."""
    ok = {n: f for n, f in figures.items() if "error" not in f and f.get("finite", True)}
    if not ok:
        raise ValueError("no candidate could be built and measured: " + "; ".join(
            f"{n}: {f.get('error', 'non-finite output')}" for n, f in figures.items()))
    pool = {n: f for n, f in ok.items() if f.get("batch_invariant", True)} or ok
    rank = min(VERDICT_RANK.get(f.get("verdict"), 1) for f in pool.values())
    pool = {n: f for n, f in pool.items() if VERDICT_RANK.get(f.get("verdict"), 1) == rank}
    best = max(f["cosine_calibration"] for f in pool.values())
    equals = [n for n, f in pool.items() if f["cosine_calibration"] >= best - tolerance]
    faithful = max(equals, key=lambda n: pool[n]["cosine_calibration"])
    fastest = max(equals, key=lambda n: pool[n]["items_per_s"])
    # a speed lead inside the noise of a short run on a shared CPU does not decide
    chosen = (fastest if pool[fastest]["items_per_s"] >= SPEED_MARGIN * pool[faithful]["items_per_s"]
              else faithful)
    verdict = pool[chosen].get("verdict", "not judged")
    n_in = sum(1 for f in ok.values() if f.get("verdict") == "safe")
    speed = (f"fastest of {len(equals)} equal ({pool[chosen]['items_per_s']:.0f} items/s, "
             f">= {SPEED_MARGIN:g}x the most faithful)" if chosen != faithful else
             f"most faithful of {len(equals)} equal (none >= {SPEED_MARGIN:g}x faster)")
    why = (f"{verdict} on the calibration split ({n_in} of {len(ok)} candidates safe); "
           f"cosine {pool[chosen]['cosine_calibration']:.5f} within {tolerance:g} of the best "
           f"{best:.5f} among {len(pool)}; {speed}")
    if len(pool) < len(ok) and any(not f.get("batch_invariant", True) for f in ok.values()):
        why += "; batch-invariant candidates preferred"
    return chosen, why


def search(names: list[str], build: Callable[[str], tuple], measure: Callable[[object], dict],
           tolerance: float, pinned: bool, say=print) -> tuple[str, object, dict]:
    """Build and measure each candidate in ``names``, keep one with :func:`choose`.

    build(name) -> (path, info); measure(path) -> figures. A candidate that fails to build or
    run is recorded with its error and skipped. Returns (name, path, sidecar info: the
    chosen candidate's info plus ``choice`` = mode, why, seconds and every candidate's
    figures)."""
    start = time.monotonic()
    figures, built = {}, {}
    for name in names:
        t0 = time.monotonic()
        try:
            path, info = build(name)
            figures[name] = dict(measure(path), seconds=round(time.monotonic() - t0, 2))
            built[name] = (path, info)
        except Exception as exc:  # an ORT quantizer that cannot handle this graph
            figures[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                             "seconds": round(time.monotonic() - t0, 2)}
            say(f"  {name}: failed ({figures[name]['error']})")
            if pinned:  # the user's own choice cannot be built: a clear error, no traceback
                from clipserve.export.quantize import QuantizationError

                raise QuantizationError(f"{name}: {figures[name]['error']}") from exc
            continue
        f = figures[name]
        say(f"  {name}: cos {f['cosine_calibration']:.5f} top-1 Δ "
            f"{f['deltas']['top1']['delta'] * 100:+.1f} pts {f['verdict']} "
            f"{f['items_per_s']:.0f}/s {f['size_bytes'] / 1e6:.2f} MB ({f['seconds']:.1f}s)")
    chosen, why = choose(figures, tolerance)
    if pinned:
        why = "pinned by the method flag; " + why
    path, info = built[chosen]
    info = dict(info, choice={"mode": "pinned" if pinned else "auto", "chosen": chosen,
                              "why": why, "seconds": round(time.monotonic() - start, 1),
                              "candidates": figures})
    return chosen, path, info


def mixed_precision(nodes: list[str], quantize_excluding: Callable[[list[str]], object],
                    measure: Callable[[object], dict], in_budget: Callable[[dict], bool],
                    max_float: int, say=print,
                    rank: Callable[[object], float] | None = None) -> tuple[list[str] | None, dict]:
    """The fewest of ``nodes`` to leave in float so that ``in_budget(measure(graph))``.

    Sensitivity pass: each node alone left in float (``quantize_excluding([node])``) and the
    mean cosine to FP32 it gains over the fully quantized graph. Then the k most sensitive
    nodes are left in float for k = 1 .. ``max_float`` until the endpoint is inside the
    budget. ``rank(graph)``: the cosine the sensitivity pass uses (default: ``measure``'s; the
    export passes a cheaper one on fewer items, since the pass costs one graph per node).
    Returns (the nodes, or None when ``max_float`` nodes do not suffice; a record of the
    sensitivities and each step)."""
    rank = rank or (lambda graph: measure(graph)["cosine_calibration"])
    base = rank(quantize_excluding([]))
    gains = {}
    for node in nodes:
        gains[node] = rank(quantize_excluding([node])) - base
    order = sorted(nodes, key=lambda n: gains[n], reverse=True)
    record = {"base_cosine": base, "sensitivity": {n: round(gains[n], 7) for n in order},
              "steps": []}
    for k in range(1, min(max_float, len(order)) + 1):
        graph = quantize_excluding(order[:k])
        figures = measure(graph)
        record["steps"].append({"float_nodes": order[:k], "verdict": figures.get("verdict"),
                                "cosine_calibration": figures["cosine_calibration"]})
        say(f"  mixed precision: {k} node(s) in float -> {figures.get('verdict')} "
            f"(cos {figures['cosine_calibration']:.5f})")
        if in_budget(figures):
            return order[:k], record
    return None, record


# -- the export's use: one INT8 or INT4 endpoint chosen among candidates ----------------------

def _measurer(tower: Tower, probe: CalibrationProbe, budget: dict, speed_batch: np.ndarray,
              seconds: float, speed: bool = True):
    from pathlib import Path

    from clipserve.export import evaluate

    def measure(path) -> dict:
        session = evaluate.make_session(path)
        inputs = probe.inputs(tower)
        figures = probe.quality(tower, embed(session, inputs), budget)
        figures["size_bytes"] = Path(path).stat().st_size
        if speed:
            figures["items_per_s"] = round(evaluate.throughput(session, speed_batch, seconds), 1)
            figures["batch_invariant"] = evaluate.batch_invariant(session, inputs[:16])
        return figures
    return measure


def int8_endpoint(src, dst, tower: Tower, probe: CalibrationProbe, batches: list, config,
                  budget: dict, work, say=print) -> dict:
    """The INT8 graph of one tower at ``dst``, by ``config.int8_method`` (auto: measure
    :func:`recipes.int8_candidates` and choose), then mixed precision when the kept static
    method is not inside the budget. Returns the sidecar's quantization info."""
    import shutil

    from clipserve.export import evaluate, quantize, recipes

    input_name = evaluate.make_session(src).get_inputs()[0].name
    names = recipes.int8_candidates(config.int8_method)

    def cache(recipe):
        if recipe.dynamic:
            return None
        return work / f"calib_{recipe.calibrator}{'-sq' if recipe.smooth else ''}_{tower.value}.json"

    def build(name):
        recipe = recipes.Int8Recipe.parse(name)
        path = work / f"int8_{name}_{tower.value}.onnx"
        return path, quantize.to_int8(src, path, recipe, input_name, batches,
                                      calibration_cache=cache(recipe))

    say(f"{tower.value} int8: {len(names)} candidate(s) ({config.int8_method})")
    measure = _measurer(tower, probe, budget, probe.inputs(tower)[:config.throughput_batch],
                        config.throughput_seconds)
    chosen, path, info = search(names, build, measure, TOLERANCE["int8"],
                                pinned=config.int8_method != "auto", say=say)
    recipe = recipes.Int8Recipe.parse(chosen)
    figures = info["choice"]["candidates"][chosen]
    if figures["verdict"] != "safe" and not recipe.dynamic and config.int8_float_nodes_max:
        import onnx

        nodes = quantize.quantizable_nodes(onnx.load(src))
        mixed = work / f"int8_mixed_{tower.value}.onnx"

        def quantize_excluding(excluded):
            quantize.to_int8(src, mixed, recipe, input_name, batches,
                             nodes_to_exclude=excluded, calibration_cache=cache(recipe))
            return mixed
        start = time.monotonic()
        few = probe.inputs(tower)[:SENSITIVITY_ITEMS]
        reference = (probe.fp32_images if tower is Tower.IMAGE else probe.fp32_text)[:len(few)]

        def rank(path):
            from clipserve.export import evaluate

            got = embed(evaluate.make_session(path), few)
            return float(cal.cosine_rows(got, reference).mean())
        kept, record = mixed_precision(
            nodes, quantize_excluding, _measurer(tower, probe, budget, None, 0, speed=False),
            lambda f: f["verdict"] == "safe", config.int8_float_nodes_max, say=say, rank=rank)
        record["seconds"] = round(time.monotonic() - start, 1)
        record["why"] = (f"{chosen} was {figures['verdict']} against the budget on the "
                         "calibration split; nodes ranked by the mean cosine to FP32 each "
                         "gains alone in float")
        if kept is None:
            record["result"] = (f"{config.int8_float_nodes_max} nodes in float did not bring "
                                "it inside the budget; kept fully quantized")
        else:
            quantize_excluding(kept)
            path = work / f"int8_{chosen}+float_{tower.value}.onnx"
            shutil.copyfile(mixed, path)
            name = f"{chosen}+{len(kept)}float"
            info["choice"]["candidates"][name] = measure(path)
            info["choice"]["chosen"] = name
            info["float_nodes"] = kept
            record["result"] = (f"{len(kept)} node(s) left in float bring it inside the budget: "
                                + ", ".join(kept))
            info["candidate"] = name
        info["mixed_precision"] = record
        say(f"{tower.value} int8 mixed precision: {record['result']}")
    shutil.copyfile(path, dst)
    say(f"{tower.value} int8: kept {info['choice']['chosen']} ({info['choice']['why']}; "
        f"{info['choice']['seconds']:.0f}s)")
    return info


def int4_endpoint(src, dst, tower: Tower, probe: CalibrationProbe, batches: list, config,
                  budget: dict, work, say=print) -> dict:
    """The INT4 graph of one tower at ``dst``, by ``config.int4_method`` (auto: measure
    :func:`recipes.int4_candidates` and choose). Returns the sidecar's quantization info."""
    import shutil

    from clipserve.export import evaluate, quantize, recipes

    input_name = evaluate.make_session(src).get_inputs()[0].name
    names = recipes.int4_candidates(config.int4_method, config.int4_block_size)

    def build(name):
        path = work / f"int4_{name}_{tower.value}.onnx"
        return path, quantize.to_int4_recipe(src, path, recipes.Int4Recipe.parse(name),
                                             input_name, batches)

    say(f"{tower.value} int4: {len(names)} candidate(s) ({config.int4_method})")
    measure = _measurer(tower, probe, budget, probe.inputs(tower)[:config.throughput_batch],
                        config.throughput_seconds)
    chosen, path, info = search(names, build, measure, TOLERANCE["int4"],
                                pinned=config.int4_method != "auto", say=say)
    shutil.copyfile(path, dst)
    say(f"{tower.value} int4: kept {chosen} ({info['choice']['why']}; "
        f"{info['choice']['seconds']:.0f}s)")
    return info
