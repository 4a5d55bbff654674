"""What a precision costs on an evaluation suite, measured against FP32 on the same items.

The export (``clipserve export``) and the re-evaluation of an existing repository
(``clipserve evaluate``) share this module: both hand it one image and one text session per
precision (onnxruntime, or anything with ``run``/``get_inputs``), an evaluation suite
(:mod:`clipserve.export.datasets`) and the tokenized prompts, and get back report rows with a
paired-bootstrap interval on every delta against FP32, McNemar's exact test and the flip rate
for top-1, and a verdict per endpoint against a budget (:mod:`clipserve.stats`).

Two rows per precision, as the report has always had them:
- image rows: the image tower at this precision scored against class embeddings from the text
  tower at the same precision (the pair a request routed to this precision uses). Their
  temperature, OOD threshold and feature-space OOD state go into the image endpoint's sidecar.
- text rows: the text tower at this precision against FP32 image embeddings, isolating what
  quantizing the text tower does.

Everything fitted (temperature, thresholds, kNN bank, class means) is fitted on the suite's
calibration split; everything reported is measured on its test split, OOD, shift and
retrieval sets. Bootstrap intervals resample test items with the fitted values held fixed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np

from clipserve import calibration as cal
from clipserve import stats
from clipserve.endpoints import Precision, Tower
from clipserve.export.evaluate import embed

FEATURE_SCORES = ("knn", "mahalanobis")
OOD_SCORES = ("mcm", *FEATURE_SCORES)
# Metrics whose values are proportions reported (and budgeted) in percentage points.
POINT_METRICS = {"top1", "top5", "shift_top1"} | {
    f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}


# -- embedding ------------------------------------------------------------------------------

def embed_many(sessions: dict, source, image_size: int, batch_size: int = 32,
               progress=None) -> dict:
    """Run every session in ``sessions`` ({key: session}) over one image source, decoding each
    batch once: {key: float32 [n, D]}. Decoding large folders costs more than small towers."""
    out = {key: [] for key in sessions}
    names = {key: s.get_inputs()[0].name for key, s in sessions.items()}
    for pixels in source.batches(image_size, batch_size, progress=progress):
        for key, session in sessions.items():
            out[key].append(session.run(None, {names[key]: pixels})[0])
    return {key: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
            for key, parts in out.items()}


def class_embeddings(prompt_embeddings: np.ndarray, n_classes: int) -> np.ndarray:
    """CLIP's prompt ensembling over class-major [n_classes * n_templates, D] embeddings: the
    gateway's own :func:`clipserve.calibration.average_prompts`, so offline fits see the label
    embeddings the server scores against."""
    return cal.average_prompts(prompt_embeddings, n_classes)


@dataclass
class ImageEmbeddings:
    """One image tower's embeddings of every image set of a suite."""

    calibration: np.ndarray
    test: np.ndarray
    ood: dict[str, np.ndarray] = field(default_factory=dict)
    shift: dict[str, np.ndarray] = field(default_factory=dict)
    retrieval: np.ndarray | None = None


def embed_suite_images(sessions: dict, suite, image_size: int, say=print) -> dict:
    """{key: ImageEmbeddings} for every image session, decoding each image once."""
    def run(name, source):
        start = time.monotonic()
        total = len(source)

        def progress(done, total_=total, last=[0.0]):
            now = time.monotonic()
            if now - last[0] > 5 or done == total_:
                last[0] = now
                say(f"[eval] {name}: {done}/{total_} images ({now - start:.0f}s)")
        return embed_many(sessions, source, image_size,
                          progress=progress if total > 2000 else None)

    labelled = suite.labelled
    calib = run(f"{labelled.name} calibration", labelled.calibration.images)
    test = run(f"{labelled.name} test", labelled.test.images)
    ood = {name: run(name, source) for name, (source, _) in suite.ood.items()}
    shift = {name: run(name, split.images) for name, split in suite.shift.items()}
    retrieval = run("retrieval", suite.retrieval.images) if suite.retrieval else None
    return {key: ImageEmbeddings(
        calibration=calib[key], test=test[key],
        ood={n: e[key] for n, e in ood.items()}, shift={n: e[key] for n, e in shift.items()},
        retrieval=None if retrieval is None else retrieval[key]) for key in sessions}


# -- per-item scores of one (image tower, text tower) pair -------------------------------------

@dataclass
class PairScores:
    """Per-item arrays for one pair on the suite's items, plus what was fitted for it."""

    labels: np.ndarray
    pred: np.ndarray
    correct: np.ndarray
    top5: np.ndarray | None
    confidence: np.ndarray  # at the fitted T (what is served)
    confidence_native: np.ndarray | None  # at the model's own logit scale
    nll: np.ndarray
    brier: np.ndarray
    id_scores: dict[str, np.ndarray]  # score name -> [n_test]; higher = more ID
    ood_scores: dict[str, dict[str, np.ndarray]]  # set -> score -> [n_set]
    shift: dict[str, tuple[np.ndarray, np.ndarray]]  # set -> (correct, confidence)
    retrieval: dict[str, np.ndarray]  # "i2t_r@1" -> per-query hits
    temperature: float
    temperature_at_bound: bool
    thresholds: dict[str, float]
    ood_states: dict[str, dict]
    scoring: cal.Scoring | None = None  # the fitted rule (temperature is its T)


def _as_scoring(value) -> cal.Scoring | None:
    if value is None or isinstance(value, cal.Scoring):
        return value
    return cal.Scoring("softmax", float(value))


def pair_scores(images: ImageEmbeddings, classes: np.ndarray, suite, *,
                native_temperature, shared_temperature,
                captions: np.ndarray | None = None, knn_k: int = 10,
                rule: str = "softmax") -> PairScores:
    """Score one pair: ``images`` from one image tower, ``classes`` [C, D] (and retrieval
    ``captions``) from one text tower, under scoring rule ``rule`` ("softmax" or "sigmoid",
    :class:`clipserve.calibration.Scoring`), whose parameters are fitted on the calibration
    split. ``shared_temperature`` is FP32's fitted T (or its fitted Scoring), so MCM AUROC can
    be compared across precisions at one T (MCM's ranking depends on T);
    ``native_temperature`` the model's own (a T, or a Scoring such as SigLIP's own scale and
    bias)."""
    cal_labels = suite.labelled.calibration.labels
    labels = suite.labelled.test.labels
    cos_cal = cal.label_cosines(images.calibration, classes)
    cos_test = cal.label_cosines(images.test, classes)
    fitted, at_bound = cal.fit_scoring_checked(rule, cos_cal, cal_labels)
    temperature = fitted.temperature
    probs = fitted.probabilities(cos_test)
    pred = cos_test.argmax(1)
    n_classes = classes.shape[0]
    top5 = None
    if n_classes > 5:
        top5 = cal.correct_per_item(cos_test, labels, k=5)
    nll = fitted.nll_per_item(cos_test, labels)
    brier = cal.brier_from_probs(probs, labels)

    knn_state = cal.fit_knn(images.calibration, k=knn_k)
    maha_state = cal.fit_mahalanobis(images.calibration, cal_labels)
    shared = _as_scoring(shared_temperature) or fitted
    native = _as_scoring(native_temperature)

    def scores(emb):
        cos = cal.label_cosines(emb, classes)
        return {"mcm": fitted.max_probability(cos),
                "mcm_shared_t": shared.max_probability(cos),
                "knn": cal.score_knn(knn_state, emb),
                "mahalanobis": cal.score_mahalanobis(maha_state, emb)}

    # The feature scores' states are fitted on the calibration items, so those items' own
    # scores are in-sample (a kNN bank holds the item itself; a Mahalanobis fit in 192
    # dimensions from ~27 items per class sits close to them): a threshold on them flagged
    # 23% of held-out digits instead of 5%. Their thresholds come from out-of-fold scores.
    cal_scores = {"mcm": fitted.max_probability(images.calibration @ classes.T),
                  **out_of_fold_scores(images.calibration, cal_labels, knn_k)}
    thresholds = {name: cal.fit_ood_threshold(cal_scores[name]) for name in OOD_SCORES}
    shift = {}
    for name, emb in images.shift.items():
        cos = cal.label_cosines(emb, classes)
        split_labels = suite.shift[name].labels
        shift[name] = (cal.correct_per_item(cos, split_labels),
                       fitted.probabilities(cos).max(1))
    retrieval = {}
    if images.retrieval is not None and captions is not None:
        from clipserve.export import datasets

        hits = datasets.recall_at_k(images.retrieval, captions, suite.retrieval.caption_image)
        for direction, per_k in (("i2t", hits.image_to_text), ("t2i", hits.text_to_image)):
            retrieval.update({f"{direction}_r@{k}": np.asarray(h, bool) for k, h in per_k.items()})
    return PairScores(
        labels=labels, pred=pred, correct=pred == labels, top5=top5, confidence=probs.max(1),
        confidence_native=(native.probabilities(cos_test).max(1) if native else None),
        nll=nll, brier=brier, id_scores=scores(images.test),
        ood_scores={name: scores(emb) for name, emb in images.ood.items()},
        shift=shift, retrieval=retrieval, temperature=temperature,
        temperature_at_bound=at_bound, thresholds=thresholds,
        ood_states={"knn": knn_state, "mahalanobis": maha_state}, scoring=fitted)



OOF_FOLDS = 10


def out_of_fold_scores(embeddings: np.ndarray, labels: np.ndarray, knn_k: int,
                       folds: int = OOF_FOLDS, seed: int = 0) -> dict[str, np.ndarray]:
    """kNN and Mahalanobis scores of each calibration item from states fitted without it:
    ``folds`` stratified folds (each class spread evenly, seeded), each scored by a state
    fitted on the other folds (kNN with k scaled to the fold's bank, so the k-th neighbour's
    radius stands for the full bank's). A threshold on these keeps about ``cal.ID_TPR`` of
    *new* ID items, where an in-sample threshold keeps far fewer."""
    labels = np.asarray(labels)
    fold = np.empty(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        fold[members] = np.arange(len(members)) % folds
    out = {"knn": np.empty(len(labels)), "mahalanobis": np.empty(len(labels))}
    for f in range(folds):
        held, fit = fold == f, fold != f
        if not held.any():
            continue
        # The k-th neighbour's radius follows k / bank size: a fold's bank has (folds-1)/folds
        # of the items, so it uses that share of k to stand for the full bank's k-th radius.
        k = max(1, min(int(fit.sum()), round(knn_k * fit.sum() / len(labels))))
        out["knn"][held] = cal.score_knn(cal.fit_knn(embeddings[fit], k=k), embeddings[held])
        out["mahalanobis"][held] = cal.score_mahalanobis(
            cal.fit_mahalanobis(embeddings[fit], labels[fit]), embeddings[held])
    return out

# -- summary values and paired deltas --------------------------------------------------------

def _ood_arrays(s: PairScores, score: str, sets) -> tuple[np.ndarray, np.ndarray]:
    ood = np.concatenate([s.ood_scores[n][score] for n in sets])
    return (np.concatenate([s.id_scores[score], ood]),
            np.concatenate([np.zeros(len(s.id_scores[score]), bool), np.ones(len(ood), bool)]))


def _auroc(values, is_ood):
    return cal.auroc(values[~is_ood], values[is_ood])


def _fpr95(values, is_ood):
    return cal.fpr_at_tpr(values[~is_ood], values[is_ood])


def _mean(values):  # vectorised: [resamples, n] -> [resamples]
    return np.asarray(values, np.float64).mean(axis=-1)


MEAN = "mean"  # marks a metric whose statistic is the mean of one per-item array


def metric_inputs(s: PairScores, suite) -> dict[str, tuple[tuple, object, bool, np.ndarray | None]]:
    """{metric: (per-item arrays, statistic or MEAN, higher_is_better, strata)} for one pair.
    The same metric on two pairs takes the same items, so deltas can be bootstrapped paired."""
    m = {
        "top1": ((s.correct,), MEAN, True, None),
        "ece": ((s.confidence, s.correct), cal.score_ece, False, None),
        "nll": ((s.nll,), MEAN, False, None),
        "brier": ((s.brier,), MEAN, False, None),
    }
    if s.top5 is not None:
        m["top5"] = ((s.top5,), MEAN, True, None)
    if s.confidence_native is not None:
        m["ece_native"] = ((s.confidence_native, s.correct), cal.score_ece, False, None)
    if suite.ood:
        all_sets = list(suite.ood)
        for score in ("mcm", "mcm_shared_t", *FEATURE_SCORES):
            suffix = "" if score == "mcm" else f"_{score}"
            values, is_ood = _ood_arrays(s, score, all_sets)
            m[f"ood_auroc{suffix}"] = ((values, is_ood), _auroc, True, is_ood.astype(int))
            if score == "mcm":
                m["fpr95"] = ((values, is_ood), _fpr95, False, is_ood.astype(int))
        for kind in ("near", "far"):
            sets = [n for n, (_, k) in suite.ood.items() if k == kind]
            if sets:
                values, is_ood = _ood_arrays(s, "mcm", sets)
                m[f"ood_auroc_{kind}"] = ((values, is_ood), _auroc, True, is_ood.astype(int))
    if s.shift:
        correct = np.concatenate([c for c, _ in s.shift.values()])
        conf = np.concatenate([p for _, p in s.shift.values()])
        m["shift_top1"] = ((correct,), MEAN, True, None)
        m["shift_ece"] = ((conf, correct), cal.score_ece, False, None)
    for name, hits in s.retrieval.items():
        m[name] = ((hits,), MEAN, True, None)
    return m


def summary(s: PairScores, suite) -> dict:
    """Point values of every metric, per OOD set and score, per shift set, flagged rates."""
    out = {metric: float(np.mean(arrays[0]) if stat == MEAN else stat(*arrays))
           for metric, (arrays, stat, _, _) in metric_inputs(s, suite).items()}
    out["zero_shot_top1"] = out["top1"]
    out["ece_calibrated"] = out["ece"]
    out["ece"] = out.get("ece_native", out["ece"])  # the model's own logit scale, as before
    out["temperature"] = s.temperature
    out["temperature_at_bound"] = s.temperature_at_bound
    out["ood_threshold"] = s.thresholds["mcm"]
    out["ood_thresholds"] = dict(s.thresholds)
    out["ood_auroc_by_set"] = {
        name: {score: cal.auroc(s.id_scores[score], scores[score]) for score in scores}
        for name, scores in s.ood_scores.items()}
    out["flagged_rate_id"] = float((s.id_scores["mcm"] < s.thresholds["mcm"]).mean())
    out["flagged_rate_id_by_score"] = {
        score: float((s.id_scores[score] < s.thresholds[score]).mean()) for score in OOD_SCORES}
    out["flagged_rate_by_set"] = {
        name: {score: float((scores[score] < s.thresholds[score]).mean()) for score in OOD_SCORES}
        for name, scores in s.ood_scores.items()}
    out["shift_by_set"] = {name: {"top1": float(c.mean()), "n": int(len(c))}
                           for name, (c, _) in s.shift.items()}
    return out


def paired_deltas(ref: PairScores, cand: PairScores, suite, *, n_resamples: int,
                  seed: int) -> dict[str, stats.Delta]:
    """Every metric's delta (candidate - FP32) with its paired bootstrap interval."""
    ref_in, cand_in = metric_inputs(ref, suite), metric_inputs(cand, suite)
    deltas = {}
    for metric, (arrays, statistic, higher, strata) in cand_in.items():
        mean = statistic == MEAN
        deltas[metric] = stats.paired_bootstrap(
            _mean if mean else statistic, ref_in[metric][0], arrays, strata=strata,
            n_resamples=n_resamples, seed=seed, metric=metric, higher_is_better=higher,
            vectorized=mean)
    return deltas


def judge(deltas: dict[str, stats.Delta], budget: dict[str, float]) -> dict:
    """The verdict of one endpoint: every budgeted metric it has, then the combination."""
    per_metric = {}
    for metric, delta in deltas.items():
        key = "recall" if "_r@" in metric else metric
        if key in budget:
            per_metric[metric] = stats.verdict_for(delta, key, budget)
    if not per_metric:
        return {"verdict": stats.Verdict.INCONCLUSIVE.value, "metrics": {}, "items_needed": None}
    overall = stats.verdict_of_many(per_metric.values())
    needed = [v.items_needed for v in per_metric.values()
              if v.verdict is stats.Verdict.INCONCLUSIVE and v.items_needed]
    return {"verdict": overall.value,
            "metrics": {m: v.to_dict() for m, v in per_metric.items()},
            "deciding": [m for m, v in per_metric.items() if v.verdict is overall],
            "items_needed": max(needed) if overall is stats.Verdict.INCONCLUSIVE and needed
            else None}


def flips(ref: PairScores, cand: PairScores) -> dict:
    return {"flip_rate": stats.flip_rate(ref.pred, cand.pred),
            "mcnemar": stats.mcnemar_exact(ref.correct, cand.correct)}


# -- what the gateway's live scoring reads --------------------------------------------------

OOD_STATE_FILENAME = "ood_state.npz"


def build_suite(config, *, builtin: bool):
    """The evaluation suite named by ``config``'s eval_data/ood_data/retrieval_data/shift_data
    (an ExportConfig or EvaluateConfig): the user's data when given, else the built-in digits,
    whose ``domain_measured`` is true only for the built-in (digit) models."""
    from clipserve.export import datasets

    if config.eval_data:
        return datasets.EvalSuite.from_paths(
            eval_data=config.eval_data, ood_data=config.ood_data or None,
            retrieval_data=config.retrieval_data or None, shift_data=config.shift_data or None)
    if config.ood_data or config.retrieval_data or config.shift_data:
        raise ValueError("--ood-data, --retrieval-data and --shift-data need --eval-data "
                         "(the labelled in-distribution set they are compared with)")
    return dataclasses.replace(datasets.builtin_digits_suite(), domain_measured=builtin)


def describe_suite(suite) -> str:
    """One line naming every set a report was measured on."""
    parts = [suite.labelled.source]
    if suite.ood:
        parts.append("OOD: " + ", ".join(f"{n} ({o.kind}, {len(o.images)})"
                                         for n, o in suite.ood.items()))
    if suite.shift:
        parts.append(f"shift: {len(suite.shift)} sets ({', '.join(suite.shift)})")
    if suite.retrieval:
        parts.append(suite.retrieval.source)
    return "; ".join(parts)


def choose_ood_score(configured: str, suite, fp32_row: dict) -> str:
    """The live OOD score: as configured, or (auto) the best pooled AUROC of FP32 among the
    scores, MCM when there is no OOD data to choose on."""
    if configured != "auto":
        return configured
    if not suite.ood:
        return "mcm"
    aurocs = {score: fp32_row.get("ood_auroc" + ("" if score == "mcm" else f"_{score}"))
              for score in OOD_SCORES}
    return max((s for s in aurocs if aurocs[s] is not None), key=lambda s: aurocs[s])


def native_scoring(evaluation: dict, rule: str = "softmax") -> cal.Scoring | None:
    """The model's own scoring from a sidecar's ``evaluation`` (what
    :func:`image_sidecar_fields` recorded): None when it was not recorded."""
    evaluation = evaluation or {}
    if rule == "sigmoid" and evaluation.get("native_logit_scale"):
        return cal.Scoring.sigmoid(evaluation["native_logit_scale"],
                                   evaluation.get("native_logit_bias") or 0.0)
    t = evaluation.get("native_temperature")
    return cal.Scoring("softmax", t) if t and rule == "softmax" else None


def _scoring_fields(rule: str, scoring: cal.Scoring | None) -> dict:
    sigmoid = scoring is not None and scoring.rule == "sigmoid"
    return {"scoring": rule, "logit_scale": scoring.scale if sigmoid else None,
            "logit_bias": scoring.bias if sigmoid else None}


def image_sidecar_fields(suite, fitted, precision: Precision, live_score: str,
                         native_temperature, fitted_by: str) -> dict:
    """The sidecar fields an image endpoint's live scoring reads. Without data from the
    model's own domain, nothing is fitted: the gateway then leaves live OOD scoring off.
    ``native_temperature``: the model's own T, or its own :class:`clipserve.calibration.Scoring`
    (whose rule the sidecar records even when nothing is fitted)."""
    labelled = suite.labelled
    native = _as_scoring(native_temperature)
    rule = native.rule if native else "softmax"
    evaluation = {"data": describe_suite(suite), "domain_measured": bool(suite.domain_measured),
                  "n_calibration": int(len(labelled.calibration.labels)),
                  "n_test": int(len(labelled.test.labels)), "fitted_by": fitted_by,
                  "native_temperature": native.temperature if native else None}
    if rule == "sigmoid":
        evaluation.update(native_logit_scale=native.scale, native_logit_bias=native.bias)
    if not suite.domain_measured:
        evaluation["note"] = ("quality was not measured on this model's domain; fit labels, "
                              "temperature and OOD threshold with --eval-data")
        return {"evaluation": evaluation, "temperature": None, "ood_threshold": None,
                "labels": None, "prompts": None, "ood_score": None, "ood_state": None,
                **_scoring_fields(rule, None)}
    scores = fitted[precision]
    return {"evaluation": evaluation, "temperature": scores.temperature,
            **_scoring_fields(rule, scores.scoring),
            "ood_threshold": scores.thresholds[live_score], "ood_score": live_score,
            "ood_state": OOD_STATE_FILENAME if live_score in FEATURE_SCORES else None,
            "labels": list(labelled.class_names), "prompts": list(labelled.templates)}


# -- the whole suite for one model -------------------------------------------------------------

@dataclass
class ModelEvaluation:
    """Report rows of one model (all precisions x towers) and what to write into sidecars."""

    rows: list[dict]
    fitted: dict[Precision, PairScores]  # image-row pairs, for the image sidecars


def count_parameters(onnx_path) -> int:
    """Parameters of an FP32 ONNX tower: elements of its float initializers."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return int(sum(math.prod(t.dims) for t in model.graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT))


def evaluate_model(*, scale: str, sessions: dict, suite, prompt_ids: np.ndarray,
                   caption_ids: np.ndarray | None, probe_ids: np.ndarray, image_size: int,
                   native_temperature, budget: dict[str, float],
                   n_resamples: int = 2000, seed: int = 0, say=print) -> ModelEvaluation:
    """Measure every precision in ``sessions`` ({(Precision, Tower): session}; FP32 must be
    there) on ``suite``. ``prompt_ids``: the class x template prompts, class-major;
    ``caption_ids``: the retrieval captions; ``probe_ids``: extra token ids (random) for the
    text towers' fidelity; ``native_temperature``: the model's own T, or its own
    :class:`clipserve.calibration.Scoring`, whose rule (softmax or sigmoid) every pair is
    scored and fitted with. Returns rows carrying point values, deltas with intervals, flips
    and the verdict per endpoint."""
    native = _as_scoring(native_temperature)
    rule = native.rule if native else "softmax"
    precisions = sorted({p for p, _ in sessions}, key=list(Precision).index)
    if Precision.FP32 not in precisions:
        raise ValueError("evaluation needs the FP32 endpoints as the reference")
    n_classes = len(suite.labelled.class_names)
    images = embed_suite_images({p: sessions[p, Tower.IMAGE] for p in precisions}, suite,
                                image_size, say)
    classes, captions, text_probe = {}, {}, {}
    for p in precisions:
        text = sessions[p, Tower.TEXT]
        prompts = embed(text, prompt_ids)
        classes[p] = class_embeddings(prompts, n_classes)
        captions[p] = None if caption_ids is None else embed(text, caption_ids)
        text_probe[p] = np.concatenate([prompts, embed(text, probe_ids)])
    fp32 = Precision.FP32
    pairs = {(p, Tower.IMAGE): (images[p], classes[p], captions[p]) for p in precisions}
    pairs.update({(p, Tower.TEXT): (images[fp32], classes[p], captions[p]) for p in precisions})
    shared_t = None
    scored = {}
    for key in [(fp32, Tower.IMAGE)] + [k for k in pairs if k != (fp32, Tower.IMAGE)]:
        img, cls, cap = pairs[key]
        scored[key] = pair_scores(img, cls, suite, native_temperature=native,
                                  shared_temperature=shared_t, captions=cap, rule=rule)
        if key == (fp32, Tower.IMAGE):
            shared_t = scored[key].scoring
    rows = []
    for p in precisions:
        for tower in Tower:
            s = scored[p, tower]
            ref = scored[fp32, tower]
            row = {"precision": p.value, "tower": tower.value, "n_test": int(len(s.labels)),
                   "n_calibration": int(len(suite.labelled.calibration.labels)),
                   "scoring": rule, **summary(s, suite)}
            if rule == "sigmoid" and tower is Tower.IMAGE:
                row["logit_bias"] = s.scoring.bias
            row.update(_fidelity(images, classes, p, tower, text_probe))
            row.update(_output_formats(images[p], text_probe[p], len(prompt_ids), tower))
            if p is not fp32:
                deltas = paired_deltas(ref, s, suite, n_resamples=n_resamples, seed=seed)
                row["deltas"] = {m: d.to_dict() for m, d in deltas.items()}
                row.update(flips(ref, s))
                row["verdict"] = judge(deltas, budget)
            else:
                row["verdict"] = {"verdict": "reference", "metrics": {}, "items_needed": None}
            if tower is Tower.TEXT:  # the text tower's own T is not served
                row.update(temperature=None, ood_threshold=None)
            rows.append(row)
            say(f"[eval] {scale} {p.value} {tower.value}: top-1 {row['top1']:.3f} "
                f"ECE(T) {row['ece_calibrated']:.3f} verdict {row['verdict']['verdict']}")
    return ModelEvaluation(rows=rows, fitted={p: scored[p, Tower.IMAGE] for p in precisions})


def _output_formats(images: ImageEmbeddings, text_probe: np.ndarray, n_prompts: int,
                    tower: Tower) -> dict:
    """The int8 output ranges this endpoint's sidecar serves with (fitted on calibration
    images, or on the text probe), and what each output format costs: recall@10 of each
    format's neighbours against float32's, and bytes per vector (test images searched among
    calibration images; prompts among the random-id texts)."""
    from clipserve import formats

    if tower is Tower.IMAGE:
        queries, corpus = images.test, images.calibration
    else:
        queries, corpus = text_probe[:n_prompts], text_probe[n_prompts:]
    params = formats.fit_output_formats(corpus if tower is Tower.IMAGE else text_probe)
    return {"output_format_params": params,
            "output_formats": formats.format_report(queries, corpus, params,
                                                    k=min(10, len(corpus)))}


def _fidelity(images, classes, p, tower, text_probe) -> dict:
    """Cosine of each embedding to FP32's on the same inputs: images over the test and OOD
    sets; texts over ``text_probe`` ({precision: embeddings of prompts + random ids})."""
    fp32 = Precision.FP32
    if tower is Tower.IMAGE:
        def stack(e):
            return np.concatenate([e.test, *e.ood.values()])
        cos = cal.cosine_rows(stack(images[p]), stack(images[fp32]))
    else:
        cos = cal.cosine_rows(text_probe[p], text_probe[fp32])
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "finite": bool(np.isfinite(cos).all())}
