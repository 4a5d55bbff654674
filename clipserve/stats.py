"""Statistics for deciding whether a precision is safe to ship: paired bootstrap intervals of
a metric's change from FP32, McNemar's exact test for top-1, flip rate, and the budget
verdict (safe / unsafe / inconclusive).

Export-side only (numpy + scipy; the gateway never imports it). The unit of resampling is the
test item: FP32 and the candidate precision are measured on the SAME items, so every
bootstrap resample draws one index vector and applies it to both sides. That pairing cancels
the item-to-item variation the two precisions share, and is what makes a 0.5-point change
measurable on a few hundred items at all.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType

import numpy as np
from scipy import stats as _scipy_stats

from clipserve import calibration as cal

_CHUNK_ELEMENTS = 2_000_000  # resampled index entries generated per chunk (16 MB of int64)


@dataclass(frozen=True)
class Delta:
    """A metric measured on FP32 and on a candidate precision over the same ``n`` items.

    ``delta`` is value - reference; [lo, hi] its bootstrap interval at ``confidence``
    (percentile interval of ``n_resamples`` paired resamples). ``higher_is_better`` says
    which sign of delta is harm (negative for top-1, positive for ECE)."""

    metric: str
    reference: float
    value: float
    delta: float
    lo: float
    hi: float
    n: int
    higher_is_better: bool
    confidence: float = 0.95
    n_resamples: int = 0

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of all fields."""
        return asdict(self)


def _as_arrays(side, name: str) -> tuple[np.ndarray, ...]:
    if isinstance(side, np.ndarray):
        side = (side,)
    arrays = tuple(np.asarray(a) for a in side)
    if not arrays:
        raise ValueError(f"{name} needs at least one per-item array")
    return arrays


def _index_chunks(n: int, n_resamples: int, strata: np.ndarray | None, seed: int):
    """Yield [b, n] index matrices, n_resamples rows in all; deterministic for (n, strata,
    seed). With strata, each row resamples within each stratum and keeps its size."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // max(n, 1))
    groups = None
    if strata is not None:
        groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    done = 0
    while done < n_resamples:
        b = min(rows, n_resamples - done)
        if groups is None:
            yield rng.integers(0, n, size=(b, n))
        else:
            yield np.concatenate([g[rng.integers(0, g.size, size=(b, g.size))] for g in groups],
                                 axis=1)
        done += b


def paired_bootstrap(statistic: Callable[..., float], reference, candidate, *,
                     strata: np.ndarray | None = None, n_resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95, metric: str = "", higher_is_better: bool = True,
                     vectorized: bool = False) -> Delta:
    """Paired bootstrap interval for statistic(candidate) - statistic(reference).

    Args:
        statistic: ``statistic(*arrays) -> float``, called on one side's per-item arrays
            (e.g. ``lambda conf, correct: calibration.score_ece(conf, correct)``). With
            ``vectorized=True`` it gets arrays of shape [b, n, ...] (b resamples at once) and
            must return shape [b], e.g. ``lambda x: x.mean(axis=-1)``: 10-50x faster for means.
        reference, candidate: tuples of per-item arrays (or one array), all of length n: the
            same n test items under FP32 and under the candidate, in the same order.
        strata: optional integer label per item; each resample then draws within each
            stratum separately, keeping the stratum sizes (ID vs OOD items for AUROC and
            FPR@95, whose statistic is undefined or distorted when the mix changes).
        n_resamples, seed: resample count and RNG seed (deterministic for a given seed).
        confidence: two-sided coverage of the interval (0.95 -> 2.5th and 97.5th percentile).
        metric, higher_is_better: carried into the returned :class:`Delta`.

    Interval choice: the percentile interval of the paired resampled deltas. It respects
    monotone transformations and needs nothing beyond the resamples; BCa would correct bias
    and skew but needs a jackknife (2n more statistic calls: slow for AUROC/ECE at n=2000)
    and its acceleration estimate is itself noisy at these n. The cost is slight
    under-coverage at small n (the percentile interval is about sqrt((n-1)/n) too narrow);
    tests/unit/test_stats.py measures its coverage on paired Bernoulli data. ECE's
    upward bias at small n is shared by both sides and mostly cancels in the delta.

    Raises ValueError for mismatched lengths, n < 2, a confidence outside (0, 1), fewer than
    100 resamples, or a statistic that returns a non-finite value on some resample (e.g.
    AUROC on a resample with no OOD items: pass ``strata``).
    """
    ref, cand = _as_arrays(reference, "reference"), _as_arrays(candidate, "candidate")
    lengths = {len(a) for a in ref + cand}
    if len(lengths) != 1:
        raise ValueError(f"reference and candidate arrays must all have one length (the same "
                         f"items); got lengths {sorted(lengths)}")
    n = lengths.pop()
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 items; got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    if n_resamples < 100:
        raise ValueError(f"n_resamples must be >= 100 for a percentile interval; got "
                         f"{n_resamples}")
    if strata is not None:
        strata = np.asarray(strata)
        if strata.shape != (n,):
            raise ValueError(f"strata must have one label per item, shape ({n},); got "
                             f"{strata.shape}")

    if vectorized:  # the full sample as a batch of one resample
        ref_value = float(np.asarray(statistic(*(a[None] for a in ref))).reshape(-1)[0])
        cand_value = float(np.asarray(statistic(*(a[None] for a in cand))).reshape(-1)[0])
    else:
        ref_value, cand_value = float(statistic(*ref)), float(statistic(*cand))
    deltas = []
    for idx in _index_chunks(n, n_resamples, strata, seed):
        if vectorized:
            r = np.asarray(statistic(*(a[idx] for a in ref)), dtype=np.float64)
            c = np.asarray(statistic(*(a[idx] for a in cand)), dtype=np.float64)
            if r.shape != (len(idx),) or c.shape != (len(idx),):
                raise ValueError(f"a vectorized statistic must return shape ({len(idx)},); "
                                 f"got {r.shape}")
            deltas.append(c - r)
        else:
            deltas.append(np.array([float(statistic(*(a[i] for a in cand)))
                                    - float(statistic(*(a[i] for a in ref))) for i in idx]))
    deltas = np.concatenate(deltas)
    if not np.isfinite(deltas).all():
        raise ValueError(f"the statistic was not finite on {int((~np.isfinite(deltas)).sum())} "
                         f"of {n_resamples} resamples; if it needs both groups (AUROC, FPR), "
                         f"pass strata")
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(deltas, [alpha, 1 - alpha])
    return Delta(metric=metric, reference=ref_value, value=cand_value,
                 delta=cand_value - ref_value, lo=float(lo), hi=float(hi), n=n, higher_is_better=higher_is_better, confidence=confidence,
                 n_resamples=n_resamples)


def mean_delta(reference_values, candidate_values, *, metric: str = "",
               higher_is_better: bool = True, **kwargs) -> Delta:
    """Paired bootstrap of the change in a mean of per-item values (top-1 from correct
    booleans, NLL from :func:`calibration.nll_per_item`, Brier from ``brier_per_item``).
    ``kwargs`` go to :func:`paired_bootstrap`; vectorised, so 2000 resamples take
    milliseconds."""
    ref = np.asarray(reference_values, dtype=np.float64)
    cand = np.asarray(candidate_values, dtype=np.float64)
    return paired_bootstrap(lambda x: x.mean(axis=-1), (ref,), (cand,), metric=metric,
                            higher_is_better=higher_is_better, vectorized=True, **kwargs)


def ood_delta(reference_scores, candidate_scores, is_ood, *, metric: str = "ood_auroc",
              tpr: float = cal.ID_TPR, **kwargs) -> Delta:
    """Paired, stratified (ID vs OOD kept at their sizes) bootstrap of the change in AUROC
    (``metric="ood_auroc"``, higher is better) or FPR at ``tpr`` TPR (``metric="fpr95"``,
    lower is better) of OOD scores (higher = more ID) on the same items."""
    is_ood = np.asarray(is_ood, dtype=bool)
    if metric == "ood_auroc":
        def statistic(scores, ood):
            return cal.auroc(scores[~ood], scores[ood])
        higher = True
    elif metric == "fpr95":
        def statistic(scores, ood):
            return cal.fpr_at_tpr(scores[~ood], scores[ood], tpr)
        higher = False
    else:
        raise ValueError(f"ood_delta metric must be 'ood_auroc' or 'fpr95'; got {metric!r}")
    return paired_bootstrap(statistic, (np.asarray(reference_scores), is_ood),
                            (np.asarray(candidate_scores), is_ood), strata=is_ood.astype(int),
                            metric=metric, higher_is_better=higher, **kwargs)


def mcnemar_exact(correct_reference, correct_candidate) -> dict:
    """McNemar's exact test of equal top-1 accuracy on paired items.

    ``b`` = items FP32 got right and the candidate wrong, ``c`` = the opposite; under the
    null each discordant pair is a fair coin, so p is the two-sided exact binomial test of b
    successes in b + c trials at 0.5 (scipy.stats.binomtest). p_value = 1.0 when b + c = 0.
    Returns {"p_value": float, "b": int, "c": int}. Raises ValueError for unequal lengths.
    """
    r = np.asarray(correct_reference, dtype=bool).ravel()
    c_ = np.asarray(correct_candidate, dtype=bool).ravel()
    if r.shape != c_.shape:
        raise ValueError(f"paired arrays must have equal length; got {r.size} and {c_.size}")
    b, c = int((r & ~c_).sum()), int((~r & c_).sum())
    p = 1.0 if b + c == 0 else float(_scipy_stats.binomtest(b, b + c, 0.5).pvalue)
    return {"p_value": min(p, 1.0), "b": b, "c": c}


def flip_rate(pred_reference, pred_candidate) -> float:
    """Share of items whose top-1 prediction differs between FP32 and the candidate
    (regardless of which is right). Raises ValueError for unequal or empty inputs."""
    r, c = np.asarray(pred_reference).ravel(), np.asarray(pred_candidate).ravel()
    if r.shape != c.shape or r.size == 0:
        raise ValueError(f"need two equal-length, non-empty prediction arrays; got {r.size} "
                         f"and {c.size}")
    return float((r != c).mean())


class Verdict(str, enum.Enum):
    """Whether a metric's change stays within its budget."""

    SAFE = "safe"  # the whole interval is within the budget
    UNSAFE = "unsafe"  # even the interval's best end breaks the budget
    INCONCLUSIVE = "inconclusive"  # the interval straddles the budget line: more items needed


@dataclass(frozen=True)
class BudgetItem:
    """One budget entry: its default allowance, whether it is in percentage points of a
    proportion (``points``), and the direction of the metric it limits."""

    default: float
    points: bool
    higher_is_better: bool
    meaning: str


# Defaults: how much worse than FP32 a candidate may be. Accuracy-like proportions in
# percentage POINTS (1.0 = one point of top-1 lost); the rest absolute, in the metric's units.
BUDGET_ITEMS: Mapping[str, BudgetItem] = MappingProxyType({
    "top1": BudgetItem(1.0, True, True, "zero-shot top-1 accuracy, points lost"),
    "top5": BudgetItem(1.0, True, True, "zero-shot top-5 accuracy, points lost"),
    "recall": BudgetItem(1.0, True, True, "retrieval recall@k, points lost"),
    # ~2.5 sd of a calibrated model's chance 15-bin ECE at 269 items (0.023 +- 0.008).
    "ece": BudgetItem(0.02, False, False, "15-bin expected calibration error, absolute rise"),
    "nll": BudgetItem(0.05, False, False, "mean negative log-likelihood, nats of rise"),
    "brier": BudgetItem(0.01, False, False, "mean multi-class Brier score (0-2), rise"),
    "ood_auroc": BudgetItem(0.01, False, True, "OOD detection AUROC (0-1), absolute drop"),
    "fpr95": BudgetItem(0.05, False, False, "OOD false-positive rate at 95% TPR, rise"),
})
DEFAULT_BUDGET: Mapping[str, float] = MappingProxyType(
    {k: v.default for k, v in BUDGET_ITEMS.items()})
Budget = Mapping[str, float]  # metric key (a BUDGET_ITEMS key) -> allowed harm


def parse_budget(text: str, defaults: Mapping[str, float] | None = None,
                 items: Mapping[str, BudgetItem] = BUDGET_ITEMS) -> dict[str, float]:
    """Parse ``"top1=1.0,ece=0.02"`` into a budget: ``defaults`` (the items' own defaults when
    None) with the given keys overridden. Units as in ``items`` (BUDGET_ITEMS, the offline
    report's: points for top1/top5/recall; the live A/B report passes its own).

    Raises ValueError for an unknown key (listing the valid ones), a repeated key, a
    malformed entry, or a value that is not a finite number >= 0.
    """
    budget = dict({k: v.default for k, v in items.items()} if defaults is None else defaults)
    seen = set()
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        key, sep, value = (s.strip() for s in entry.partition("="))
        if not sep or not key:
            raise ValueError(f"budget entry {entry!r} is not KEY=VALUE (e.g. top1=1.0,ece=0.02)")
        if key not in items:
            raise ValueError(f"unknown budget key {key!r}; valid keys: {', '.join(items)}")
        if key in seen:
            raise ValueError(f"budget key {key!r} is given twice")
        seen.add(key)
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"budget {key}={value!r} is not a number") from None
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"budget {key}={value} must be a finite number >= 0")
        budget[key] = number
    return budget


@dataclass(frozen=True)
class VerdictResult:
    """A :class:`Delta` judged against a budget.

    ``budget`` is as given (points when ``points``); ``boundary`` is the delta at the budget
    line in the metric's own units (-budget for higher-is-better, +budget otherwise);
    ``worst``/``best`` are the interval ends in the harmful/helpful direction; and
    ``items_needed`` estimates the total items that would decide an INCONCLUSIVE verdict
    (None when decided, or when delta sits exactly on the boundary, where no n decides it).
    """

    verdict: Verdict
    budget: float
    boundary: float
    worst: float
    best: float
    items_needed: int | None
    points: bool = False

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (verdict as its string value)."""
        d = asdict(self)
        d["verdict"] = self.verdict.value
        return d


def verdict(delta: Delta, budget: float, *, points: bool = False) -> VerdictResult:
    """Judge ``delta`` against ``budget``, the most harm allowed (>= 0).

    Harm is the move in the bad direction: a negative delta for a higher-is-better metric,
    a positive one otherwise. SAFE when the interval's worst end stays within the budget
    (a worst end exactly on the line counts as within), UNSAFE when even its best end breaks
    it, INCONCLUSIVE otherwise. ``points=True``: the metric is a proportion in [0, 1] and the
    budget is in percentage points (divided by 100).

    items_needed (INCONCLUSIVE only) is an ESTIMATE: it assumes the interval stays centred on
    the current delta and its half-width on the side facing the budget line shrinks as
    1/sqrt(n), giving n * (half_width / |delta - boundary|)^2 rounded up. A true delta near
    the line makes it large and unreliable; None when delta is exactly on the line.

    Raises ValueError for a negative or non-finite budget.
    """
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0; got {budget}")
    allowed = budget / 100.0 if points else budget
    if delta.higher_is_better:
        boundary, worst, best = -allowed, delta.lo, delta.hi
        safe, unsafe = worst >= boundary, best < boundary
    else:
        boundary, worst, best = allowed, delta.hi, delta.lo
        safe, unsafe = worst <= boundary, best > boundary
    needed = None
    if safe:
        v = Verdict.SAFE
    elif unsafe:
        v = Verdict.UNSAFE
    else:
        v = Verdict.INCONCLUSIVE
        gap = abs(delta.delta - boundary)
        if gap > 0:
            # The interval end that crosses the line: the worst end when delta is on the safe
            # side, the best end when it is on the unsafe side.
            on_safe_side = (delta.delta > boundary) == delta.higher_is_better
            half = abs((worst if on_safe_side else best) - delta.delta)
            # round() first so 300 * 9.000000000000002 is 2700, not 2701.
            needed = max(delta.n + 1, math.ceil(round(delta.n * (half / gap) ** 2, 6)))
    return VerdictResult(verdict=v, budget=float(budget), boundary=float(boundary),
                         worst=float(worst), best=float(best), items_needed=needed,
                         points=points)


def verdict_for(delta: Delta, key: str, budget: Budget = DEFAULT_BUDGET) -> VerdictResult:
    """:func:`verdict` with the allowance and units of budget key ``key`` (a BUDGET_ITEMS
    key). Raises ValueError for an unknown key or when the Delta's direction disagrees with
    the key's."""
    if key not in BUDGET_ITEMS:
        raise ValueError(f"unknown budget key {key!r}; valid keys: {', '.join(BUDGET_ITEMS)}")
    item = BUDGET_ITEMS[key]
    if delta.higher_is_better != item.higher_is_better:
        raise ValueError(f"{key} is {'higher' if item.higher_is_better else 'lower'}-is-better "
                         f"but the Delta for {delta.metric!r} says otherwise")
    return verdict(delta, budget[key], points=item.points)


def verdict_of_many(results: Iterable[VerdictResult | Verdict]) -> Verdict:
    """One verdict for an endpoint from its metrics' verdicts: UNSAFE if any is unsafe, SAFE
    if all are safe, else INCONCLUSIVE. Raises ValueError for no results (nothing measured
    is not safe)."""
    verdicts: Sequence[Verdict] = [Verdict(r.verdict if isinstance(r, VerdictResult) else r)
                                   for r in results]
    if not verdicts:
        raise ValueError("no verdicts to combine: nothing was measured")
    if Verdict.UNSAFE in verdicts:
        return Verdict.UNSAFE
    if all(v is Verdict.SAFE for v in verdicts):
        return Verdict.SAFE
    return Verdict.INCONCLUSIVE
