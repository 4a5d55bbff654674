"""The export stage: open_clip model -> FP32 ONNX towers -> other precisions -> quality
report -> Triton model repository. ``export(config)`` is the whole job."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from clipserve import calibration as cal
from clipserve import stats
from clipserve.endpoints import Precision, Sidecar, Tower, endpoint_name
from clipserve.export import (evaluate, families, gpu_decode, models, ptq, quality, quantize,
                              report, repository, runtimes)
from clipserve.export.config import ExportConfig
from clipserve.export import onnx_export as ox


class _Clock:
    def __init__(self, log):
        self.log, self.start = log, time.monotonic()

    def __call__(self, message: str) -> None:
        self.log(f"[export {time.monotonic() - self.start:6.1f}s] {message}")


def _calibration_batches(inputs: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """Equal-sized batches for static INT8 calibration (ORT stacks them). ORT's percentile
    calibrator keeps every activation of every batch in memory, so the number of images
    shrinks with their area: 256 at 32 px, 80 at 224 px (about 2 GB for ViT-B/32)."""
    pixels = int(np.prod(inputs.shape[1:3])) if inputs.ndim == 4 else 0
    limit = 256 if not pixels else max(batch, min(256, 4_000_000 // pixels))
    n = min(len(inputs), limit) // batch * batch
    return [inputs[i:i + batch] for i in range(0, n, batch)]


def _calibration_indices(suite, limit: int = 256) -> np.ndarray:
    """An even spread of ``limit`` items over the calibration split (never the test split)."""
    n = len(suite.labelled.calibration.images)
    return np.unique(np.linspace(0, n - 1, min(limit, n)).astype(int))


def _calibration_pixels(suite, image_size: int, limit: int = 256) -> np.ndarray:
    """Images of the calibration split for static INT8 calibration and for choosing between
    INT8/INT4 methods (:func:`_calibration_indices`)."""
    return suite.labelled.calibration.images.load(image_size, _calibration_indices(suite, limit))


def _make_variants(fp32: dict, work: Path, precisions, config, probes: dict, say,
                   labelled: dict):
    """ONNX files for every requested precision: {(precision, tower): (path, quantization)}.
    ``probes`` holds, per tower, the calibration inputs: static INT8 calibrates on them and
    the INT8/INT4 methods are chosen by measurements on them (the test split stays unseen);
    ``labelled``: the image probe's labels, the prompt count and the class count
    (:class:`ptq.CalibrationProbe`)."""
    variants = {(Precision.FP32, t): (fp32[t], {"method": "fp32"}) for t in Tower}
    built = {}

    def candidate_probe():  # FP32 on the calibration split, for choosing INT8/INT4 methods
        if "probe" not in built:
            built["probe"] = ptq.CalibrationProbe.build(
                {t: evaluate.make_session(fp32[t]) for t in Tower}, probes[Tower.IMAGE],
                labelled["labels"], probes[Tower.TEXT], labelled["n_prompts"],
                labelled["n_classes"], labelled.get("rule", "softmax"))
        return built["probe"]

    for tower in Tower:
        probe = probes[tower]
        reference = evaluate.embed(evaluate.make_session(fp32[tower]), probe)
        optimized = quantize.optimize(fp32[tower], work / f"fp32opt_{tower.value}.onnx")
        fidelity = cal.cosine_rows(
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
                variants[precision, tower] = (dst, ptq.int4_endpoint(
                    optimized, dst, tower, candidate_probe(), _calibration_batches(probe),
                    config, stats.parse_budget(config.budget), work, say))
            elif precision is Precision.INT8 and config.tensorrt:
                # TensorRT's explicit int8 mode takes only symmetric Q/DQ: the one candidate.
                info = quantize.to_int8_tensorrt(
                    optimized, dst, evaluate.make_session(optimized).get_inputs()[0].name,
                    _calibration_batches(probe))
                say(f"{tower.value} int8: TensorRT-ready symmetric Q/DQ ({', '.join(info['ops'])}"
                    f"); quality measured on onnxruntime's CPU provider")
                variants[precision, tower] = (dst, info)
            elif precision is Precision.INT8:
                variants[precision, tower] = (dst, ptq.int8_endpoint(
                    optimized, dst, tower, candidate_probe(), _calibration_batches(probe),
                    config, stats.parse_budget(config.budget), work, say))
    return variants


def _quantization_aware(model, spec, config, shapes, tokenizer, work, variants, probes, suite,
                        ids, native_temperature, labelled_probe, session_for, say) -> None:
    """--qat: fine-tune, quantize through :func:`_make_variants` (the same quantizers), measure
    beside PTQ on the same test split, each on the runtime its endpoint is served with
    (``session_for(precision, tower, path)``), and keep the better graph in ``variants``."""
    from clipserve.export import qat

    prompt_ids, caption_ids, probe_ids = ids
    qat.run_stage(model, spec=spec, config=config, shapes=shapes, tokenizer=tokenizer,
                  work=work, variants=variants, probes=probes, suite=suite,
                  prompt_ids=prompt_ids, caption_ids=caption_ids, probe_ids=probe_ids,
                  native_temperature=native_temperature, session_for=session_for,
                  make_variants=lambda *a: _make_variants(*a, labelled_probe), say=say)


def evaluate_spec(spec: models.ModelSpec, precisions: list[Precision], config: ExportConfig,
                  say, seed: int = 0) -> tuple[dict, dict]:
    """Export one model (one training seed of a built-in) to ONNX at every precision and
    measure it. Returns (context for writing endpoints, the ModelEvaluation)."""
    model = models.load(spec, Path(config.cache_dir), log=say, seed=seed)
    shapes = ox.tower_shapes(model)
    native_temperature = families.native_scoring(model)  # softmax T, or sigmoid scale/bias
    tag = spec.scale if seed == 0 else f"{spec.scale}-seed{seed}"
    work = Path(config.cache_dir) / "work" / tag
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    fp32 = {}
    for tower in Tower:
        fp32[tower] = ox.export_tower(model, tower, shapes, work / f"fp32_{tower.value}.onnx")
        parity = ox.check_parity(model, tower, shapes, fp32[tower])
        say(f"{tag} {tower.value}: exported FP32 ONNX, min cosine to PyTorch {parity:.6f}")

    suite = quality.build_suite(config, builtin=spec.weights == models.BUILTIN_WEIGHTS)
    labelled = suite.labelled
    tokenizer = families.text_tokenizer(spec.name, shapes.context_length, work / "tokenizer",
                                        config.tokenizer)
    prompt_ids = tokenizer([t.format(c) for c in labelled.class_names
                            for t in labelled.templates])
    caption_ids = tokenizer(list(suite.retrieval.captions)) if suite.retrieval else None
    probe_ids = ox.random_inputs(Tower.TEXT, shapes, 64, seed=7)
    probes = {Tower.IMAGE: _calibration_pixels(suite, shapes.image_size),
              Tower.TEXT: np.concatenate([prompt_ids, probe_ids])}
    calibration_labels = np.asarray(labelled.calibration.labels)[_calibration_indices(suite)]
    labelled_probe = {"labels": calibration_labels, "n_prompts": len(prompt_ids),
                      "n_classes": len(labelled.class_names), "rule": native_temperature.rule}
    variants = _make_variants(fp32, work, precisions, config, probes,
                              lambda m: say(f"{tag} {m}"), labelled_probe)
    evaluated = sorted({Precision.FP32, *precisions}, key=list(Precision).index)
    # Each endpoint is measured on the runtime it will be served with, the QAT stage's
    # PTQ-vs-QAT comparison included: the runtime is planned on the PTQ graph, and a QAT graph
    # (the same recipe, the same operators) that replaces it is served on the same runtime.
    served = {key: ("onnxruntime", None) for key in variants}
    if config.backend == "python":
        for (p, t), (path, quantization) in variants.items():
            runtime, options, info = runtimes.plan_runtime(
                config.runtime, path, p, probes[t][:config.throughput_batch],
                config.throughput_seconds, config.intra_op_threads,
                inter_op_threads=config.inter_op_threads, allow_spinning=config.allow_spinning)
            served[p, t] = (runtime, options)
            quantization["runtime"] = info
            say(f"{tag} {p.value} {t.value}: runtime {options['runtime_choice']}")
    elif config.backend == "openvino":  # NVIDIA's backend: OpenVINO with its defaults
        from clipserve import cpu as cpu_info
        from clipserve.export import openvino_backend

        machine = cpu_info.detect()
        for (p, t), (path, quantization) in variants.items():
            note = openvino_backend.precision_note(p, machine)
            served[p, t] = ("openvino", {
                "openvino_precision_hint": "bf16" if p is Precision.BF16 else "",
                "openvino_streams": "1", "note": note})
            quantization["runtime"] = {"chosen": "openvino", "computes": note,
                                       "why": "--backend openvino (NVIDIA's openvino backend)",
                                       "openvino": runtimes.openvino_version()}
        say(f"{tag}: NVIDIA's openvino backend; fp32 computes as: "
            f"{openvino_backend.precision_note(Precision.FP32, machine)}")

    def served_session(p, t, path=None):
        path = variants[p, t][0] if path is None else path
        runtime, options = served[p, t]
        if options is None:
            return evaluate.make_session(path)
        if config.backend == "openvino":  # the backend's own settings, not the python one's
            return runtimes.Session(path, runtime, options)
        return runtimes.make_session(path, runtime, p, config.intra_op_threads,
                                     inter_op_threads=config.inter_op_threads,
                                     allow_spinning=config.allow_spinning)

    if config.qat and seed == 0:
        _quantization_aware(model, spec, config, shapes, tokenizer, work, variants, probes, suite,
                            (prompt_ids, caption_ids, probe_ids), native_temperature,
                            labelled_probe, served_session, lambda m: say(f"{tag} {m}"))
    sessions = {(p, t): served_session(p, t) for p in evaluated for t in Tower}
    result = quality.evaluate_model(
        scale=tag, sessions=sessions, suite=suite, prompt_ids=prompt_ids,
        caption_ids=caption_ids, probe_ids=probe_ids, image_size=shapes.image_size,
        native_temperature=native_temperature, budget=stats.parse_budget(config.budget),
        n_resamples=config.bootstrap, seed=0, say=say)
    params = {t: quality.count_parameters(fp32[t]) for t in Tower}
    by_key = {(r["precision"], r["tower"]): r for r in result.rows}
    for p in evaluated:
        for tower in Tower:
            path, quantization = variants[p, tower]
            row = by_key[p.value, tower.value]
            if not row["finite"]:
                raise quantize.QuantizationError(
                    f"{endpoint_name(spec.scale, p, tower)}: produced NaN or inf embeddings")
            row.update({
                "model": spec.scale, "source": spec.source, "seed": seed,
                "endpoint": endpoint_name(spec.scale, p, tower),
                "params_image": params[Tower.IMAGE], "params_text": params[Tower.TEXT],
                "size_bytes": path.stat().st_size, "quantization": quantization,
                "data": quality.describe_suite(suite), "domain_measured": suite.domain_measured,
                "items_per_s": evaluate.throughput(
                    sessions[p, tower], (probes[tower])[:config.throughput_batch],
                    config.throughput_seconds),
                "throughput_batch": config.throughput_batch,
            })
    context = {"spec": spec, "shapes": shapes, "variants": variants, "suite": suite,
               "native_temperature": native_temperature, "served": served,
               "tokenizer": tokenizer}
    return context, result


def _ood_state_writer(sidecar: Sidecar, live_score: str, fitted: dict, precision: Precision):
    """write_endpoint's ``finish``: the feature-space OOD state the sidecar names, if any
    (``fitted``: the evaluation's per-precision fits; read only when a state is named)."""
    if not sidecar.ood_state:
        return None
    state = fitted[precision].ood_states[live_score]
    return lambda directory: cal.save_ood_state(directory / sidecar.ood_state, live_score, state)


def write_model(context: dict, result, precisions, config: ExportConfig, tokenizer_json: Path,
                live_score: str, say) -> None:
    """Write one model's endpoints (config, ONNX, sidecar, OOD state) into the repository."""
    spec, shapes, suite = context["spec"], context["shapes"], context["suite"]
    # The model's own tokenizer (families.text_tokenizer); CLIP BPE when absent or when it
    # has no file of its own.
    text_tokenizer = context.get("tokenizer")
    tokenizer_sidecar = text_tokenizer.sidecar if text_tokenizer else {}
    tokenizer_json = (text_tokenizer and text_tokenizer.json_path) or tokenizer_json
    for row in result.rows:
        precision, tower = Precision(row["precision"]), Tower(row["tower"])
        fields = {}
        if tower is Tower.IMAGE:
            fields = quality.image_sidecar_fields(suite, result.fitted, precision, live_score,
                                          context["native_temperature"], "clipserve export")
        sidecar = Sidecar(
            scale=spec.scale, precision=precision.value, tower=tower.value,
            embed_dim=shapes.embed_dim, source=spec.source,
            image_size=shapes.image_size if tower is Tower.IMAGE else None,
            context_length=shapes.context_length if tower is Tower.TEXT else None,
            quantization=row["quantization"], output_formats=row["output_format_params"],
            gpu_decode=(gpu_decode.sidecar_field(endpoint_name(spec.scale, precision, tower))
                        if config.gpu_decode and tower is Tower.IMAGE else {}),
            tokenizer=tokenizer_sidecar if tower is Tower.TEXT else {},
            **fields)
        repository.write_endpoint(
            Path(config.repository), context["variants"][precision, tower][0], sidecar,
            backend=config.backend, tensorrt=config.tensorrt, tokenizer_json=tokenizer_json,
            runtime=context["served"][precision, tower][0],
            runtime_options=context["served"][precision, tower][1],
            policy=config.serving_policy(),
            finish=_ood_state_writer(sidecar, live_score, result.fitted, precision))
        name = endpoint_name(spec.scale, precision, tower)
        if sidecar.gpu_decode:
            gpu_decode.write(Path(config.repository), name, sidecar, config.max_queue_delay_us)
        else:
            gpu_decode.remove(Path(config.repository), name)
    say(f"{spec.scale}: wrote {len(result.rows)} endpoints to {config.repository}")


def export_model(spec: models.ModelSpec, precisions: list[Precision], config: ExportConfig,
                 tokenizer_json: Path, say) -> list[dict]:
    """Export, quantize, evaluate and write one model's endpoints; with ``config.seeds`` > 1
    a built-in model's other seeds are evaluated too (report and scale study only). Returns
    its report rows."""
    def requested(rows):  # FP32 is always measured (the reference), listed only if asked
        return [r for r in rows if Precision(r["precision"]) in precisions]

    context, result = evaluate_spec(spec, precisions, config, say)
    fp32_image = next(r for r in result.rows if r["precision"] == "fp32" and r["tower"] == "image")
    live_score = quality.choose_ood_score(config.ood_score, context["suite"], fp32_image)
    result.rows[:] = requested(result.rows)
    write_model(context, result, precisions, config, tokenizer_json, live_score, say)
    rows = [dict(r, live_ood_score=live_score) for r in result.rows]
    seeds = config.seeds if spec.weights == models.BUILTIN_WEIGHTS else 1
    for seed in range(1, seeds):
        say(f"{spec.scale}: seed {seed + 1}/{seeds} (scale study; not served)")
        rows += requested(evaluate_spec(spec, precisions, config, say, seed=seed)[1].rows)
    return rows


def export(config: ExportConfig, log=print) -> list[dict]:
    """Run the export for every model in ``config``; returns the report rows and writes
    report.json/.md/.png into the repository."""
    from clipserve.tokenizer import write_tokenizer_json

    say = _Clock(log)
    specs = config.model_specs()
    families.preflight([s.name for s in specs], config.tokenizer)  # fails before any work

    from clipserve.export import qat

    qat.check_data(specs, config)  # --qat on an open_clip model needs the user's images
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
    budget = stats.parse_budget(config.budget)
    notes = report.notes(rows, config=dataclasses.asdict(config), budget=budget)
    paths = report.write(rows, repo, [f"- CPU: {machine.describe()}", *notes], budget)
    say(f"report: {paths['md']} {paths['json']} {paths['png']}")
    return rows
