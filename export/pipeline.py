"""The export stage: open_clip model -> FP32 ONNX towers -> other precisions -> quality
report -> Triton model repository. ``export(config)`` is the whole job."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from clipserve.endpoints import Precision, Sidecar, Tower, endpoint_name
from clipserve.export import digits, evaluate, models, quantize, report, repository, runtimes
from clipserve.export.config import ExportConfig
from clipserve.export import onnx_export as ox


REPORT_NOTES = [
    "Evaluation data: scikit-learn's digits (held-out test split, 15%), resized to each model's "
    "input; the temperature and OOD threshold are fitted on a separate 15% calibration split.",
    "Image rows: the image tower at this precision scored against class embeddings from the text "
    "tower at the same precision (the pair a request routed to this precision uses). Their "
    "temperature and OOD threshold are stored in the image endpoint's clipserve.json.",
    "Text rows: the text tower at this precision against FP32 image embeddings, isolating what "
    "quantizing the text tower does (it shifts the logit scale); their T is fitted the same way "
    "but not served, so it is left out.",
    "ECE: 15 equal-width bins, with the model's own logit scale, then with the fitted T. OOD: MCM "
    "score (max softmax of cos/T); ID = test digits, OOD = rendered letters (near) + noise and "
    "textures (far); threshold keeps 95% of calibration digits.",
    "cosine: each tower's embeddings against the FP32 ONNX tower on the same inputs (images: test "
    "+ OOD sets; texts: prompts + random token sequences). items/s: the endpoint's runtime "
    "(onnxruntime or OpenVINO, see quantization.runtime) in-process on this machine's CPU at a "
    "fixed batch, all cores; compare ratios within one run.",
]


class _Clock:
    def __init__(self, log):
        self.log, self.start = log, time.monotonic()

    def __call__(self, message: str) -> None:
        self.log(f"[export {time.monotonic() - self.start:6.1f}s] {message}")


def _tower_inputs(tower: Tower, shapes, data: digits.DigitsData, prompt_ids: np.ndarray):
    """Inputs for fidelity (probe), static calibration and throughput of one tower."""
    if tower is Tower.IMAGE:
        probe = np.concatenate([data.test.images, data.ood_near, data.ood_far])
        return probe, data.calibration.images
    probe = np.concatenate([prompt_ids, ox.random_inputs(Tower.TEXT, shapes, 64, seed=7)])
    return probe, probe


def _calibration_batches(inputs: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """Equal-sized batches for static INT8 calibration (ORT stacks them). ORT's percentile
    calibrator keeps every activation of every batch in memory, so the number of images
    shrinks with their area: 256 at 32 px, 80 at 224 px (about 2 GB for ViT-B/32)."""
    pixels = int(np.prod(inputs.shape[1:3])) if inputs.ndim == 4 else 0
    limit = 256 if not pixels else max(batch, min(256, 4_000_000 // pixels))
    n = min(len(inputs), limit) // batch * batch
    return [inputs[i:i + batch] for i in range(0, n, batch)]


def _make_variants(fp32: dict, work: Path, precisions, config, shapes, data, prompt_ids, say):
    """ONNX files for every requested precision: {(precision, tower): (path, quantization)}."""
    variants = {(Precision.FP32, t): (fp32[t], {"method": "fp32"}) for t in Tower}
    for tower in Tower:
        probe, calibration = _tower_inputs(tower, shapes, data, prompt_ids)
        reference = evaluate.embed(evaluate.make_session(fp32[tower]), probe)
        optimized = quantize.optimize(fp32[tower], work / f"fp32opt_{tower.value}.onnx")
        fidelity = evaluate.cosine_to_reference(
            evaluate.embed(evaluate.make_session(optimized), probe), reference).min()
        if fidelity < ox.PARITY_MIN_COSINE:  # a fusion that changes results is not used
            say(f"{tower.value}: optimizer changed outputs (min cos {fidelity:.6f}); quantizing "
                "the unoptimized graph")
            optimized = fp32[tower]
        for precision in precisions:
            dst = work / f"{precision.value}_{tower.value}.onnx"
            if precision is Precision.BF16:  # the FP32 graph; OpenVINO computes it in bf16
                variants[precision, tower] = (fp32[tower], {"method": "bf16-runtime"})
            elif precision is Precision.FP16:
                variants[precision, tower] = (dst, quantize.to_fp16(fp32[tower], dst))
            elif precision is Precision.INT4:
                variants[precision, tower] = (dst, quantize.to_int4(
                    optimized, dst, block_size=config.int4_block_size))
            elif precision is Precision.INT8:
                candidates = {
                    "int8-dynamic": (work / f"int8dyn_{tower.value}.onnx", None),
                    "int8-static-qdq": (work / f"int8qdq_{tower.value}.onnx", None),
                }
                infos = {
                    "int8-dynamic": quantize.to_int8_dynamic(optimized, candidates["int8-dynamic"][0]),
                    "int8-static-qdq": quantize.to_int8_static(
                        optimized, candidates["int8-static-qdq"][0],
                        evaluate.make_session(optimized).get_inputs()[0].name,
                        _calibration_batches(calibration)),
                }
                speed_batch = probe[:config.throughput_batch]

                def measure(name):
                    session = evaluate.make_session(candidates[name][0])
                    cos = evaluate.cosine_to_reference(evaluate.embed(session, probe), reference)
                    return (float(cos.mean()),
                            evaluate.throughput(session, speed_batch, config.throughput_seconds),
                            evaluate.batch_invariant(session, probe[:16]))

                chosen = quantize.choose_int8(infos, measure)
                say(f"{tower.value} int8: kept {chosen} " + ", ".join(
                    f"{n}: cos {i['cosine_calibration']:.5f} {i['items_per_s']:.0f}/s "
                    f"{'batch-invariant' if i['batch_invariant'] else 'varies with batch'}"
                    for n, i in infos.items()))
                shutil.copyfile(candidates[chosen][0], dst)
                info = dict(infos[chosen], candidates={
                    n: {k: i[k] for k in ("cosine_calibration", "items_per_s", "batch_invariant")}
                    for n, i in infos.items()})
                variants[precision, tower] = (dst, info)
    return variants


def export_model(spec: models.ModelSpec, precisions: list[Precision], config: ExportConfig,
                 tokenizer_json: Path, say) -> list[dict]:
    """Export, quantize, evaluate and write one model's endpoints; returns its report rows."""
    import open_clip

    model = models.load(spec, Path(config.cache_dir), log=say)
    shapes = ox.tower_shapes(model)
    native_temperature = float(1.0 / model.logit_scale.detach().exp())
    work = Path(config.cache_dir) / "work" / spec.scale
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    fp32 = {}
    for tower in Tower:
        fp32[tower] = ox.export_tower(model, tower, shapes, work / f"fp32_{tower.value}.onnx")
        parity = ox.check_parity(model, tower, shapes, fp32[tower])
        say(f"{spec.scale} {tower.value}: exported FP32 ONNX, min cosine to PyTorch {parity:.6f}")

    data = digits.load(shapes.image_size)
    tokenizer = open_clip.get_tokenizer(spec.name)
    prompts = [t.format(c) for c in digits.CLASS_NAMES for t in digits.PROMPTS]
    prompt_ids = tokenizer(prompts).numpy().astype(np.int32)
    variants = _make_variants(fp32, work, precisions, config, shapes, data, prompt_ids,
                              lambda m: say(f"{spec.scale} {m}"))

    # Every tower runs once over its probe set (images: test + OOD; texts: prompts + random
    # ids); the image tower also over the calibration split. Everything below reuses these.
    probes = {t: _tower_inputs(t, shapes, data, prompt_ids)[0] for t in Tower}
    served = {key: ("onnxruntime", None) for key in variants}
    if config.backend == "python":
        for (p, t), (path, quantization) in variants.items():
            runtime, options, info = runtimes.plan_runtime(
                config.runtime, path, p, probes[t][:config.throughput_batch],
                config.throughput_seconds)
            served[p, t] = (runtime, options)
            quantization["runtime"] = info
            say(f"{spec.scale} {p.value} {t.value}: runtime {options['runtime_choice']}")
    sessions = {key: runtimes.make_session(path, served[key][0], key[0]) if served[key][1]
                else evaluate.make_session(path) for key, (path, _) in variants.items()}
    evaluated = sorted({Precision.FP32, *precisions}, key=list(Precision).index)
    probe_emb = {(p, t): evaluate.embed(sessions[p, t], probes[t]) for p in evaluated for t in Tower}
    n_test, n_near = len(data.test.images), len(data.ood_near)
    images, classes = {}, {}
    for p in evaluated:
        emb = probe_emb[p, Tower.IMAGE]
        images[p] = evaluate.EvalImages(
            evaluate.embed(sessions[p, Tower.IMAGE], data.calibration.images),
            emb[:n_test], emb[n_test:n_test + n_near], emb[n_test + n_near:])
        classes[p] = evaluate.class_embeddings(probe_emb[p, Tower.TEXT][:len(prompt_ids)],
                                               len(digits.CLASS_NAMES))

    rows = []
    for precision in precisions:
        for tower in Tower:
            path, quantization = variants[precision, tower]
            got = probe_emb[precision, tower]
            cos = evaluate.cosine_to_reference(got, probe_emb[Precision.FP32, tower])
            if tower is Tower.IMAGE:  # the served pair: both towers at this precision
                metrics = evaluate.classification_metrics(
                    images[precision], classes[precision], data.calibration.labels,
                    data.test.labels, native_temperature)
            else:  # the text tower's own effect, against FP32 images
                metrics = evaluate.classification_metrics(
                    images[Precision.FP32], classes[precision], data.calibration.labels,
                    data.test.labels, native_temperature)
                metrics.update(temperature=None, ood_threshold=None)
            speed = evaluate.throughput(sessions[precision, tower], probes[tower][:config.throughput_batch],
                                        config.throughput_seconds)
            row = {
                "model": spec.scale, "source": spec.source, "precision": precision.value,
                "tower": tower.value, "endpoint": endpoint_name(spec.scale, precision, tower),
                "size_bytes": path.stat().st_size, "cosine_mean": float(cos.mean()),
                "cosine_min": float(cos.min()), "finite": bool(np.isfinite(got).all()),
                **metrics, "items_per_s": speed, "throughput_batch": config.throughput_batch,
                "quantization": quantization,
            }
            if not row["finite"]:
                raise quantize.QuantizationError(
                    f"{row['endpoint']}: produced NaN or inf embeddings")
            rows.append(row)
            say(f"{row['endpoint']}: cos {row['cosine_mean']:.5f} (min {row['cosine_min']:.5f}) "
                f"top-1 {row['zero_shot_top1']:.3f} ECE {row['ece']:.3f}->"
                f"{row['ece_calibrated']:.3f} AUROC {row['ood_auroc']:.3f} {speed:.0f}/s")

    for row in rows:
        precision, tower = Precision(row["precision"]), Tower(row["tower"])
        image_row = next(r for r in rows if r["precision"] == row["precision"] and r["tower"] == "image")
        sidecar = Sidecar(
            scale=spec.scale, precision=precision.value, tower=tower.value,
            embed_dim=shapes.embed_dim, source=spec.source,
            image_size=shapes.image_size if tower is Tower.IMAGE else None,
            context_length=shapes.context_length if tower is Tower.TEXT else None,
            temperature=image_row["temperature"] if tower is Tower.IMAGE else None,
            ood_threshold=image_row["ood_threshold"] if tower is Tower.IMAGE else None,
            quantization=row["quantization"],
            labels=list(digits.CLASS_NAMES) if tower is Tower.IMAGE else None,
            prompts=list(digits.PROMPTS) if tower is Tower.IMAGE else None,
        )
        repository.write_endpoint(Path(config.repository), variants[precision, tower][0], sidecar,
                                  backend=config.backend, tensorrt=config.tensorrt,
                                  tokenizer_json=tokenizer_json,
                                  runtime=served[precision, tower][0],
                                  runtime_options=served[precision, tower][1])
    say(f"{spec.scale}: wrote {len(rows)} endpoints to {config.repository}")
    return rows


def export(config: ExportConfig, log=print) -> list[dict]:
    """Run the export for every model in ``config``; returns the report rows and writes
    report.json/.md/.png into the repository."""
    from clipserve.tokenizer import write_tokenizer_json

    say = _Clock(log)
    specs = config.model_specs()
    precisions = [Precision.parse(p) for p in config.precisions]
    from clipserve import cpu as cpu_info
    machine = cpu_info.detect()
    say(f"CPU: {machine.describe()}")
    if Precision.BF16 in precisions:
        keep, why = runtimes.bf16_plan(machine, config.allow_emulated_bf16, config.backend)
        say(f"bf16: {why}")
        precisions = [p for p in precisions if keep or p is not Precision.BF16]
    repo = Path(config.repository)
    repo.mkdir(parents=True, exist_ok=True)
    tokenizer_json = write_tokenizer_json(Path(config.cache_dir) / "tokenizer.json")
    say(f"exporting {', '.join(s.source for s in specs)} at "
        f"{', '.join(p.value for p in precisions)} into {repo}")
    rows = []
    for i, spec in enumerate(specs, 1):
        say(f"model {i}/{len(specs)}: {spec.source}")
        rows += export_model(spec, precisions, config, tokenizer_json, say)
    notes = REPORT_NOTES + [f"CPU: {machine.describe()}", f"Config: {dataclasses.asdict(config)}"]
    paths = report.write(rows, repo, notes)
    say(f"report: {paths['md']} {paths['json']} {paths['png']}")
    return rows
