"""Runtimes for exported models: one ``ExportedModel`` per runtime (onnxruntime, OpenVINO), each reading the file
written by ``mask2former export`` and its ``<stem>.yaml`` sidecar, each called like ``Mask2Former`` (normalised
images in, ``Mask2FormerOutput`` out), so that the ``Predictor``, ``evaluate``, ``predict`` and ``serve`` run them
unchanged.

A missing optional package is a one-line ``ImportError`` naming the extra to install (``missing_extra``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from ..config import ModelConfig, from_dict
from ..modeling.model import Mask2Former, Mask2FormerOutput

RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
# The pip extra that brings each optional package.
EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx", "openvino": "openvino", "nncf": "openvino"}
# OpenVINO's element-type names for --precision, and back.
_OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}
_FROM_OPENVINO = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}

log = logging.getLogger(__name__)


def missing_extra(package: str, needed_for: str) -> ImportError:
    """The one-line error for an optional package that is not installed."""
    extra = EXTRAS.get(package, package)
    return ImportError(f"{needed_for} needs the '{package}' package, which is not installed: "
                       f"pip install \"mask2former[{extra}]\"")


def import_optional(package: str, needed_for: str) -> Any:
    """``import package``, or ``missing_extra``'s error."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as error:
        if error.name is not None and error.name.split(".")[0] != package:
            raise  # the package is there but one of its own dependencies is broken: show that error as it is
        raise missing_extra(package, needed_for) from None


def default_runtime(path: str | Path) -> str:
    """OpenVINO IR (``.xml``) runs on OpenVINO; anything else on onnxruntime."""
    return "openvino" if Path(path).suffix == ".xml" else "onnxruntime"


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.parent / f"{path.stem}.yaml"


class ExportedModel:
    """What every runtime shares: the sidecar (model config, labels, file precision), normalisation, the
    ``Mask2Former``-like surface the ``Predictor`` uses, and the output handling. Subclasses implement ``_run``.

    Files from ``export`` take any size (the graph pads to ``size_divisibility`` itself). Files written before
    dynamic sizes (a sidecar with ``input_size``) are run as before: inputs zero-padded up to that one size.

    ``precision`` is what runs: ``int8`` for a quantised file, else the runtime's own inference precision."""

    training = False
    runtime = ""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        sidecar = sidecar_path(path)
        if not path.exists():
            raise FileNotFoundError(f"exported model {path} does not exist")
        if not sidecar.exists():
            raise FileNotFoundError(f"{sidecar} is missing: it holds the model config written by `mask2former export`")
        document = yaml.safe_load(sidecar.read_text())
        if not isinstance(document, dict) or "model" not in document:
            raise ValueError(f"{sidecar}: not a `mask2former export` sidecar (no 'model' key)")
        self.path = path
        self.config: ModelConfig = from_dict(ModelConfig, document["model"], "model")
        self.labels = document.get("labels")
        #: The file's own precision: fp32, or int8 for a quantised file.
        self.file_precision = str(document.get("precision", "fp32"))
        self.precision = self.file_precision
        # Only the old fixed-size files carry ``input_size``.
        self.input_size = None if document.get("dynamic_size") else tuple(document["input_size"])
        self.pixel_mean = torch.tensor(self.config.pixel_mean).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(self.config.pixel_std).view(1, 3, 1, 1)

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [B, 3, H, W] -> (pred_logits, pred_masks) arrays."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def describe(self) -> str:
        """One line: the file, the runtime and the precision that runs."""
        return f"{self.path} on {self.runtime}, precision {self.precision}"

    def normalize(self, images: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return Mask2Former.normalize(self, images, padding_mask)  # same arithmetic as the PyTorch model

    def to(self, *args, **kwargs) -> "ExportedModel":
        return self

    def eval(self) -> "ExportedModel":
        return self

    def train(self, mode: bool = True) -> "ExportedModel":
        return self

    def pad_to_export_size(self, images: Tensor) -> Tensor:
        """Fixed-size (old) files only: zero-pad normalised images bottom/right to their one input size."""
        height, width = images.shape[-2:]
        if height > self.input_size[0] or width > self.input_size[1]:
            raise ValueError(
                f"image batch of {height}x{width} is larger than the ONNX model's input size "
                f"{self.input_size[0]}x{self.input_size[1]}: re-export it (exports now take any size)"
            )
        return F.pad(images, (0, self.input_size[1] - width, 0, self.input_size[0] - height))

    def __call__(self, images: Tensor, aux_outputs: bool = False) -> Mask2FormerOutput:
        """Only the final prediction exists in the exported graph; ``aux_outputs`` is accepted for the Predictor.
        Returns masks for the padded input (multiples of ``size_divisibility``), as ``Mask2Former.forward``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        height, width = int(images.shape[-2]), int(images.shape[-1])
        images = images.detach().cpu().float()
        if self.input_size is not None:
            logits, masks = self._run(self.pad_to_export_size(images).numpy())
            masks = torch.from_numpy(np.asarray(masks))[..., : height // 4, : width // 4]
            return Mask2FormerOutput(torch.from_numpy(np.asarray(logits)), masks)
        logits, masks = self._run(images.contiguous().numpy())
        divisor = max(self.config.size_divisibility, 1)
        padded = (height + (-height) % divisor, width + (-width) % divisor)
        return Mask2FormerOutput(torch.from_numpy(np.asarray(logits)), torch.from_numpy(np.asarray(masks)),
                                 image_size=(height, width), padded_size=padded)


class OnnxRuntimeModel(ExportedModel):
    """An exported ``.onnx`` file on onnxruntime, at the file's precision (fp32 or int8: onnxruntime's CPU provider
    has no bf16 kernels for an fp32 graph, so ``precision="bf16"`` is refused rather than silently run in fp32).

    ``threads``: intra-op threads (None: its default); ``spinning``: let idle pool threads spin (faster only on
    otherwise idle cores)."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 spinning: bool = False, precision: str = "fp32") -> None:
        onnxruntime = import_optional("onnxruntime", "running an exported model on onnxruntime")
        if precision != "fp32":
            raise ValueError(f"onnxruntime runs {path} at the precision it was exported with; --precision {precision} "
                             f"needs --runtime openvino (or a PyTorch --checkpoint)")
        super().__init__(path)
        if self.path.suffix == ".xml":
            raise ValueError(f"{path} is OpenVINO IR: run it with --runtime openvino")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            # Idle pool threads sleep instead of spinning: with PyTorch's threads, post-processing or other
            # processes on the same cores, spinning made a 2-thread session 2-3x slower here (benchmarks/deploy.py).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(self.path), sess_options=options, providers=providers or ["CPUExecutionProvider"])

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, masks = self.session.run(None, {"images": images})
        return logits, masks


def openvino_precision(compiled: Any) -> str:
    """The inference precision a compiled OpenVINO model runs at (fp32, bf16, fp16), read back from the model."""
    element = compiled.get_property("INFERENCE_PRECISION_HINT")
    name = element.get_type_name() if hasattr(element, "get_type_name") else str(element)
    return _FROM_OPENVINO.get(name, name)


class OpenVinoModel(ExportedModel):
    """An exported ``.onnx`` file (read directly) or OpenVINO IR ``.xml`` on OpenVINO's CPU plugin.

    ``precision`` sets ``INFERENCE_PRECISION_HINT`` explicitly (OpenVINO's own default is bf16 on CPUs with AMX or
    AVX-512 bf16, f32 elsewhere); the precision that runs is read back from the compiled model, and a log line says
    so when it differs from the request (bf16 on a CPU without native bf16 runs f32). A quantised (int8) file runs
    int8 where NNCF put quantisers, at that precision elsewhere. ``threads``: ``INFERENCE_NUM_THREADS`` (None: all
    cores). The latency hint: one stream, all threads on one request, as the Predictor calls it."""

    runtime = "openvino"

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = "fp32") -> None:
        openvino = import_optional("openvino", "running an exported model on OpenVINO")
        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO runs at precision {' or '.join(PRECISIONS)}, got {precision!r}")
        super().__init__(path)
        core = openvino.Core()
        properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision],
                                      "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            properties["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", properties)
        self.requested_precision = precision
        self.inference_precision = openvino_precision(self.compiled)
        self.precision = (f"int8 ({self.inference_precision} elsewhere)" if self.file_precision == "int8"
                          else self.inference_precision)
        if self.inference_precision != precision:
            log.warning("OpenVINO: %s requested, %s runs: this CPU has no native %s (CPU flags: %s; native bf16 "
                        "needs avx512_bf16 or amx_bf16)", precision, self.inference_precision, precision,
                        cpu_isa_flags() or "none of avx2/avx512/amx")
        self.request = self.compiled.create_infer_request()

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # share_outputs=False (the default): the arrays are copies, not views of buffers the next call reuses.
        results = self.request.infer({0: images}, share_outputs=False)
        return results[self.compiled.output(0)], results[self.compiled.output(1)]


def cpu_isa_flags() -> str:
    """The CPU flags that decide bf16 / int8 speed (AVX-512, AMX, VNNI, bf16), from /proc/cpuinfo ('' elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            wanted = [f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2")) or "bf16" in f]
            return " ".join(sorted(set(wanted)))
    return ""


def load_exported(path: str | Path, runtime: str | None = None, precision: str = "fp32",
                  threads: int | None = None) -> ExportedModel:
    """The exported model at ``path`` on ``runtime`` (None: OpenVINO for ``.xml``, onnxruntime otherwise)."""
    runtime = runtime or default_runtime(path)
    if runtime == "onnxruntime":
        return OnnxRuntimeModel(path, threads=threads, precision=precision)
    if runtime == "openvino":
        return OpenVinoModel(path, threads=threads, precision=precision)
    raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
