"""The export stage's one config object. Light to import: ``clipserve --help`` and
``clipserve serve`` load it without torch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from clipserve.endpoints import Precision
from clipserve.export.recipes import INT4_AUTO_CANDIDATES, INT8_AUTO_CANDIDATES

BACKENDS = ("python", "onnxruntime", "openvino")
# --runtime: what the python backend's model.py runs (export/runtimes.py); auto measures.
RUNTIME_CHOICES = ("auto", "onnxruntime", "openvino")
INT4_BLOCK_SIZE = 32
OOD_SCORE_CHOICES = ("auto", "mcm", "knn", "mahalanobis")
# Every endpoint's max_batch_size (the gateway reads it back from config.pbtxt).
MAX_BATCH_SIZE = 64
# Long enough to gather concurrent single-image requests into a batch on a CPU, short
# against the tens of milliseconds a ViT-B image takes.
MAX_QUEUE_DELAY_US = 2000
# --model-warmup: the data of Triton's warm-up samples (repository.ServingPolicy).
WARMUP_DATA = ("zero", "random", "none")


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clipserve")


@dataclass(frozen=True)
class EvaluationData:
    """What the quality of each precision is measured on, and against what budget: shared by
    ``clipserve export`` and ``clipserve evaluate``."""

    eval_data: str = field(default="", metadata={
        "help": "labelled image folder (one sub-folder per class; optional labels.json, "
                "templates.txt): INT8 calibration, temperature, OOD threshold and the report "
                "use it. Empty: the built-in digits (meaningful only for the built-in models)"})
    ood_data: str = field(default="", metadata={
        "help": "unlabelled out-of-distribution folders, NAME=DIR,... (near=DIR, far=DIR name "
                "their kind); each reported on its own and pooled"})
    retrieval_data: str = field(default="", metadata={
        "help": "CSV or JSONL of image path + caption: image->text and text->image recall@k"})
    shift_data: str = field(default="", metadata={
        "help": "covariate-shifted labelled folder (same classes as --eval-data, other "
                "conditions). The built-in digits generate their own"})
    budget: str = field(default="", metadata={
        "help": "what each endpoint may lose against FP32, e.g. top1=1.0,ece=0.02 (points for "
                "accuracies and recall, absolute otherwise). Empty: clipserve.stats defaults"})
    bootstrap: int = field(default=2000, metadata={
        "help": "paired bootstrap resamples per interval (>= 1000)"})
    ood_score: str = field(default="auto", metadata={
        "help": "live OOD score written to image sidecars: mcm, knn, mahalanobis, or auto (the "
                "best FP32 pooled AUROC on --ood-data; mcm without OOD data)"})

    def _check_evaluation(self) -> None:
        if self.bootstrap < 1000:
            raise ValueError(f"bootstrap needs >= 1000 resamples for a 95% interval, got "
                             f"{self.bootstrap}")
        if self.ood_score not in OOD_SCORE_CHOICES:
            raise ValueError(f"unknown ood score {self.ood_score!r}; valid: "
                             f"{', '.join(OOD_SCORE_CHOICES)}")
        from clipserve import stats

        stats.parse_budget(self.budget)  # raises ValueError naming the valid keys


@dataclass(frozen=True)
class ExportConfig(EvaluationData):
    """Everything ``clipserve export`` takes (flags, or ``CLIPSERVE_<FIELD>`` env vars)."""

    models: str = field(default="digits-s,digits-m,digits-l", metadata={
        "help": "comma-separated NAME[::WEIGHTS]: a built-in (digits-s/m/l) or an open_clip "
                "architecture with a pretrained tag, checkpoint path or 'none'"})
    models_file: str = field(default="", metadata={
        "help": "file with one NAME[::WEIGHTS] per line; replaces --models"})
    tokenizer: str = field(default="", metadata={
        "help": "folder with the Hugging Face tokenizer files (tokenizer.json, "
                "tokenizer_config.json) of a model that needs one (SigLIP, SigLIP2); empty: "
                "the local Hugging Face cache. Nothing is downloaded"})
    precisions: tuple[str, ...] = field(default=("fp32", "fp16", "int8", "int4"), metadata={
        "help": "comma-separated precisions to export"})
    repository: str = field(default="model_repository", metadata={
        "help": "Triton model repository to write"})
    cache_dir: str = field(default_factory=_default_cache_dir, metadata={
        "help": "where trained checkpoints and intermediate ONNX files are cached"})
    backend: str = field(default="python", metadata={
        "help": "Triton backend: 'python' (onnxruntime in Triton's Python backend; runs on the "
                "CPU tritonserver of nvidia-pytriton), 'onnxruntime' (NVIDIA's GPU images) or "
                "'openvino' (NVIDIA's OpenVINO backend in their CPU/x86 images: "
                "k8s/overlays/cpu-openvino)"})
    tensorrt: bool = field(default=False, metadata={
        "help": "with --backend onnxruntime: enable the TensorRT accelerator where it applies; "
                "int8 endpoints then get TensorRT-ready symmetric int8 Q/DQ graphs (zero "
                "points 0, convolutions included, float biases)"})
    gpu_decode: bool = field(default=False, metadata={
        "help": "with --backend onnxruntime: also write, per image endpoint, a DALI model "
                "(Triton's DALI backend: nvJPEG decode, resize, crop on the GPU) and an "
                "ensemble E_encoded that takes the encoded files; the sidecar tells the "
                "gateway to send bytes there instead of decoding on its CPU"})
    runtime: str = field(default="auto", metadata={
        "help": "with --backend python: the CPU runtime of each endpoint: 'onnxruntime', "
                "'openvino', or 'auto' (measure both per precision on this machine, keep the "
                "faster one that agrees with onnxruntime, record why in the sidecar and "
                "config.pbtxt). bf16 always runs on openvino"})
    allow_emulated_bf16: bool = field(default=False, metadata={
        "help": "export bf16 even on a CPU without AVX512_BF16/AMX, where it is emulated and "
                "slower than fp32 (otherwise such a CPU skips bf16 with a message)"})
    int4_block_size: int = field(default=INT4_BLOCK_SIZE, metadata={
        "help": "INT4 block size (power of two >= 16) of the --int4-method auto candidates "
                "that compare algorithms"})
    int8_method: str = field(default="auto", metadata={
        "help": "INT8 method: 'auto' (build and measure " + ", ".join(INT8_AUTO_CANDIDATES)
                + " on the calibration split; keep the best inside --budget, the fastest "
                "among equals) or one method: dynamic, static-CAL[-sym][-pertensor] with CAL "
                "minmax, entropy or a percentile pNN.NN"})
    int4_method: str = field(default="auto", metadata={
        "help": "INT4 method: 'auto' (measure " + ", ".join(INT4_AUTO_CANDIDATES)
                + " and choose as for int8) or one ALG[-sym|-asym]-bBLOCK-aLEVEL[-keep8|-keepfp] "
                "(ALG rtn, hqq, gptq; LEVEL a0 weight-only, a4 int8 compute; keep8/keepfp: "
                "token embedding and output projection at 8 bits / float)"})
    int8_float_nodes_max: int = field(default=8, metadata={
        "help": "INT8 mixed precision: when the kept static method is not inside --budget on "
                "the calibration split, leave the fewest (at most this many) of its most "
                "sensitive nodes in float that bring it inside; 0 never does"})
    throughput_batch: int = field(default=32, metadata={
        "help": "batch size of the offline throughput measurement"})
    throughput_seconds: float = field(default=1.0, metadata={
        "help": "seconds per throughput measurement"})
    seeds: int = field(default=1, metadata={
        "help": "built-in models: train and evaluate this many seeds per size for the scale "
                "study (seed 0 is the one served)"})
    # How Triton runs each endpoint, written into its config.pbtxt (repository.ServingPolicy).
    instances: int = field(default=1, metadata={
        "help": "Triton model instances per endpoint (instance_group count)"})
    max_queue_delay_us: int = field(default=MAX_QUEUE_DELAY_US, metadata={
        "help": "dynamic batching: microseconds Triton waits for more requests to batch"})
    preferred_batch_sizes: tuple[str, ...] = field(default=(), metadata={
        "help": "dynamic batching: comma-separated batch sizes sent without waiting out the "
                f"delay (each 1..{MAX_BATCH_SIZE}); empty: Triton's default"})
    model_warmup: str = field(default="zero", metadata={
        "help": "Triton model_warmup samples run before a model reports ready: 'zero', "
                "'random' (image towers; text towers use zeros) or 'none'"})
    warmup_batch_sizes: tuple[str, ...] = field(default=("1", str(MAX_BATCH_SIZE)), metadata={
        "help": "batch sizes of the warm-up samples; each costs one inference of that batch "
                "per instance while the model loads (seconds at 64 for ViT-B on a 2-core CPU)"})
    intra_op_threads: int = field(default=0, metadata={
        "help": "python backend: onnxruntime intra-op threads, OpenVINO INFERENCE_NUM_THREADS "
                "(0: one per core); GPU backend: intra_op_thread_count"})
    inter_op_threads: int = field(default=1, metadata={
        "help": "onnxruntime inter-op threads (above 1 runs the graph with ORT_PARALLEL); "
                "GPU backend: inter_op_thread_count; OpenVINO: not used"})
    # Quantization-aware training (export/qat.py); validated by _check_qat.
    qat: bool = field(default=False, metadata={
        "help": "also fine-tune each model with fake quantization matching the deployed "
                "scheme (distilled from FP32), quantize it with the same quantizer, measure it "
                "beside the post-training one on the same test split and serve the better "
                "(recorded in the sidecar's quantization.qat). Built-in models train on the "
                "digits training split; open_clip models need --eval-data or --train-data"})
    qat_precisions: tuple[str, ...] = field(default=(), metadata={
        "help": "with --qat: the precisions to fine-tune (int8, int4; each must be exported). "
                "Empty: whichever of int8 and int4 --precisions exports"})
    qat_steps: int = field(default=0, metadata={
        "help": "with --qat: optimizer steps per precision (0: the recipe's default)"})
    qat_gate: float = field(default=0.5, metadata={
        "help": "with --qat: teacher max probability at or above which its logits are "
                "distilled; items below it learn from their label instead"})
    train_data: str = field(default="", metadata={
        "help": "with --qat: labelled image folder (one sub-folder per class) to fine-tune "
                "on. Empty: the built-in digits training split, or --eval-data's calibration "
                "split for open_clip models"})
    allow_spinning: bool = field(default=False, metadata={
        "help": "python backend with onnxruntime: let idle worker threads spin "
                "(session.intra_op/inter_op.allow_spinning). Off: spinning burns the cores "
                "the gateway needs; OpenVINO has no such setting"})

    def __post_init__(self):
        for p in self.precisions:
            Precision.parse(p)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.tensorrt and self.backend != "onnxruntime":
            raise ValueError("--tensorrt applies to NVIDIA's onnxruntime backend: add "
                             f"--backend onnxruntime (got --backend {self.backend})")
        if self.gpu_decode and self.backend != "onnxruntime":
            raise ValueError("--gpu-decode needs NVIDIA's GPU images (Triton's DALI backend): "
                             f"add --backend onnxruntime (got --backend {self.backend})")
        if self.runtime not in RUNTIME_CHOICES:
            raise ValueError(f"unknown runtime {self.runtime!r}; valid: {', '.join(RUNTIME_CHOICES)}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        self._check_evaluation()
        b = self.int4_block_size
        if b < 16 or b & (b - 1):
            raise ValueError(f"int4 block size must be a power of two >= 16, got {b}")
        self._check_methods()
        self.serving_policy()  # raises ValueError on a bad batching, warm-up or thread flag
        self._check_qat()

    def _check_qat(self) -> None:
        if not self.qat:
            if self.train_data:
                raise ValueError("--train-data is what --qat fine-tunes on: add --qat")
            return
        if not {"int8", "int4"} & set(self.precisions):
            raise ValueError("--qat fine-tunes for int8 or int4: add one to --precisions "
                             f"(got {','.join(self.precisions)})")
        for p in self.qat_precisions:
            if p not in ("int8", "int4"):
                raise ValueError(f"--qat-precisions: {p!r} cannot be fine-tuned; valid: int8, int4")
            if p not in self.precisions:
                raise ValueError(f"--qat-precisions names {p}, which --precisions does not "
                                 f"export ({','.join(self.precisions)})")
        if self.tensorrt and "int8" in self.qat_precisions:
            raise ValueError("--qat int8 mimics the CPU's uint8 Q/DQ scheme, not --tensorrt's "
                             "symmetric int8: use --qat-precisions int4 with --tensorrt")
        if self.qat_steps < 0 or not 0.0 <= self.qat_gate <= 1.0:
            raise ValueError(f"--qat-steps must be >= 0 and --qat-gate in [0, 1], got "
                             f"{self.qat_steps} and {self.qat_gate}")

    def _check_methods(self) -> None:
        from clipserve.export import recipes

        recipes.int8_candidates(self.int8_method)  # raises ValueError naming the grammar
        recipes.int4_candidates(self.int4_method, self.int4_block_size)
        if self.int8_float_nodes_max < 0:
            raise ValueError(f"int8 float nodes max must be >= 0, got {self.int8_float_nodes_max}")

    def serving_policy(self) -> "ServingPolicy":
        """The export flags that say how Triton runs each endpoint.

        Raises:
            ValueError: a batch size that is not an integer in 1..max_batch_size, or another
                out-of-range value (the message names the flag).
        """
        from clipserve.export.repository import ServingPolicy

        def sizes(flag, values):
            try:
                return tuple(int(v) for v in values)
            except ValueError:
                raise ValueError(f"--{flag}: comma-separated integers, got "
                                 f"{','.join(values)!r}") from None

        return ServingPolicy(
            instances=self.instances, max_queue_delay_us=self.max_queue_delay_us,
            preferred_batch_sizes=sizes("preferred-batch-sizes", self.preferred_batch_sizes),
            model_warmup=self.model_warmup,
            warmup_batch_sizes=sizes("warmup-batch-sizes", self.warmup_batch_sizes),
            intra_op_threads=self.intra_op_threads, inter_op_threads=self.inter_op_threads,
            allow_spinning=self.allow_spinning)

    def model_specs(self) -> list["ModelSpec"]:
        from clipserve.export import models

        if self.models_file:
            return models.read_models_file(Path(self.models_file))
        return models.parse_models(self.models)


@dataclass(frozen=True)
class EvaluateConfig(EvaluationData):
    """Everything ``clipserve evaluate`` takes (flags, or ``CLIPSERVE_<FIELD>`` env vars)."""

    repository: str = field(default="model_repository", metadata={
        "help": "the Triton model repository written by `clipserve export`"})
    scales: tuple[str, ...] = field(default=(), metadata={
        "help": "comma-separated scales to evaluate. Empty: every scale with FP32 endpoints"})
    write_sidecars: bool = field(default=False, metadata={
        "help": "fit temperature, OOD threshold and labels to this evaluation set and write "
                "them as a new sidecar revision of each image endpoint"})
    out: str = field(default="", metadata={
        "help": "folder for evaluation.{md,json,png}. Empty: the repository"})

    def __post_init__(self):
        self._check_evaluation()
