"""``Predictor``: images of any size and type in, semantic / instance / panoptic results out."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data.collate import pad_images, padded_size
from ..data.image_io import read_image
from ..data.label_space import LabelSpace
from ..data.transforms import resize_image, shortest_edge_size
from ..modeling.model import Mask2Former
from ..modeling.precision import autocast
from .postprocess import batch_postprocess

ImageInput = str | Path | Image.Image | np.ndarray | Tensor


def to_uint8_chw(image: ImageInput, where: str = "image") -> Tensor:
    """Path / PIL / numpy HWC (uint8, or float in [0, 1]) / tensor CHW -> uint8 RGB [3, H, W]."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ValueError(f"{where}: expected an HxWx3 array, got shape {array.shape}")
        array = array[:, :, :3]
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        return _to_uint8(tensor, where)
    if isinstance(image, Tensor):
        tensor = image
        if tensor.dim() == 2:
            tensor = tensor.unsqueeze(0).expand(3, -1, -1)
        if tensor.dim() != 3 or tensor.shape[0] != 3:
            raise ValueError(f"{where}: expected a [3, H, W] tensor, got shape {tuple(tensor.shape)}")
        return _to_uint8(tensor.cpu(), where)
    raise TypeError(f"{where}: unsupported image type {type(image).__name__} (path, PIL image, numpy array or tensor)")


def _to_uint8(tensor: Tensor, where: str) -> Tensor:
    if tensor.dtype == torch.uint8:
        return tensor
    if not tensor.is_floating_point():
        raise ValueError(f"{where}: integer images must be uint8, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{where}: image contains NaN or infinite values")
    # Floats are taken as [0, 1] (torchvision convention) unless they are clearly 0-255.
    scale = 255.0 if tensor.max() <= 1.0 else 1.0
    return (tensor * scale).round().clamp(0, 255).to(torch.uint8)


def resize_shortest_edge(image: Tensor, min_size: int | None, max_size: int | None) -> Tensor:
    """detectron2's test-time ResizeShortestEdge on a uint8 [3, H, W] image: its output size, PIL BILINEAR
    (antialiased when shrinking); ``None`` keeps the size."""
    if not min_size:
        return image
    height, width = image.shape[-2:]
    new_h, new_w = shortest_edge_size(int(height), int(width), min_size, max_size or (1 << 30))
    if (new_h, new_w) == (height, width):
        return image
    return resize_image(image, new_h, new_w)


@dataclass
class ForwardOutput:
    """A batch's model outputs with what post-processing needs: the sizes the images ran at (``image_sizes``),
    the padded batch size and the sizes to produce (``original_sizes``)."""

    outputs: Any
    image_sizes: list[tuple[int, int]]
    padded_size: tuple[int, int]
    original_sizes: list[tuple[int, int]]

    def image(self, index: int) -> ForwardOutput:
        """One image's outputs (post-processing images one by one can spread them over threads)."""
        outputs = {"pred_logits": self.outputs.pred_logits[index : index + 1],
                   "pred_masks": self.outputs.pred_masks[index : index + 1]}
        return ForwardOutput(outputs, [self.image_sizes[index]], self.padded_size, [self.original_sizes[index]])


class Predictor:
    """Run a model on images of any size.

    ``Predictor(model_or_path, task="panoptic", device="cpu")``; ``predictor(image)`` returns one result,
    ``predictor([image, ...])`` a list. Results per task:

    - semantic: ``LongTensor[H, W]`` class ids;
    - instance: ``{"masks": bool[N, H, W], "labels", "scores", "boxes" (xyxy)}``;
    - panoptic: ``(segment_map int32[H, W], segments_info)`` with ``{id, category_id, isthing, score, area}``.

    ``semantic_postprocess_before_inference``: semantic inference on logits already resized to the output size
    (the reference for panoptic/instance models) or before resizing (semantic-only models); None = the model's
    ``config.semantic_postprocess_before_inference``, which ``build_model`` sets from the training preset.
    ``mask_boxes``: instance boxes enclose the masks (False: all-zero boxes, as the original Mask2Former gives).
    """

    def __init__(
        self,
        model_or_path: Mask2Former | str | Path,
        task: str = "panoptic",
        device: str | torch.device = "cpu",
        min_size: int | None = None,
        max_size: int | None = None,
        batch_size: int = 4,
        precision: str = "fp32",
        label_space: LabelSpace | None = None,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        top_k: int = 100,
        semantic_postprocess_before_inference: bool | None = None,
        mask_boxes: bool = True,
    ) -> None:
        if task not in ("semantic", "instance", "panoptic"):
            raise ValueError(f"task must be semantic, instance or panoptic, got {task!r}")
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.device = torch.device(device)
        # A path is loaded; anything else is used as the model (a Mask2Former, or apps.onnx.OnnxModel).
        if isinstance(model_or_path, (str, Path)):
            model = Mask2Former.from_pretrained(model_or_path)
        else:
            model = model_or_path
        self.model = model.to(self.device).eval()
        if precision == "bf16" and isinstance(model, Mask2Former):
            # bf16 autocast casts every weight on every forward; cast once instead (the same values, so the same
            # outputs; ~4 % faster on Swin-T). On a copy when the caller passed the model: theirs stays fp32.
            from ..modeling.bf16_inference import cast_weights_for_bf16_autocast

            loaded_here = isinstance(model_or_path, (str, Path))
            self.model = cast_weights_for_bf16_autocast(self.model if loaded_here else copy.deepcopy(self.model))
        self.task = task
        self.min_size, self.max_size = min_size, max_size
        self.batch_size = batch_size
        self.precision = precision
        if label_space is None and model.labels is not None:
            label_space = LabelSpace.from_dict(model.labels)
        if label_space is None:
            # Without one: "class_<i>" names, every class a thing (no stuff merging is done).
            count = model.num_classes
            label_space = LabelSpace([f"class_{i}" for i in range(count)], [True] * count)
        elif label_space.num_classes != model.num_classes:
            raise ValueError(
                f"label space has {label_space.num_classes} classes but the model predicts {model.num_classes}"
            )
        #: The classes the results' contiguous ids name: the given one, the model's, or ``class_<i>`` names.
        self.label_space: LabelSpace = label_space
        self.is_thing = label_space.is_thing_tensor()
        if semantic_postprocess_before_inference is None:
            # As the model was trained (ModelConfig, saved with checkpoints): the reference's order for its tasks.
            semantic_postprocess_before_inference = bool(
                getattr(model.config, "semantic_postprocess_before_inference", False)
            )
        self.postprocess_options = dict(
            object_mask_threshold=object_mask_threshold, overlap_threshold=overlap_threshold, top_k=top_k,
            semantic_postprocess_before_inference=semantic_postprocess_before_inference, mask_boxes=mask_boxes,
        )

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Any:
        single = not isinstance(images, (list, tuple))
        results = [r[self.task] for r in self.predict_tasks([images] if single else list(images), (self.task,))]
        return results[0] if single else results

    def predict_tasks(self, images: Sequence[ImageInput], tasks: Sequence[str]) -> list[dict[str, Any]]:
        """One forward pass per batch, post-processed for each of ``tasks``: a ``{task: result}`` per image."""
        prepared = [self.prepare(image, f"image {index}") for index, image in enumerate(images)]
        # Batch only images that pad to the same size, so that a result never depends on its batch-mates'
        # padding: batched results equal single-image results.
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (_, image) in enumerate(prepared):
            groups.setdefault(self.batch_key(image), []).append(index)
        results: list[dict[str, Any]] = [{} for _ in images]
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                forwarded = self.forward_batch([prepared[i][1] for i in chunk], [prepared[i][0] for i in chunk])
                for index, result in zip(chunk, self.postprocess_batch(forwarded, tasks)):
                    results[index] = result
        return results

    def prepare(self, image: ImageInput, where: str = "image") -> tuple[tuple[int, int], Tensor]:
        """``(original (H, W), uint8 [3, h, w] image at the size the model sees)`` (``min_size`` / ``max_size``)."""
        original = to_uint8_chw(image, where)
        return (int(original.shape[-2]), int(original.shape[-1])), resize_shortest_edge(
            original, self.min_size, self.max_size)

    def batch_key(self, image: Tensor) -> tuple[int, int]:
        """The padded size a prepared image runs at: only images with the same key share a batch."""
        return padded_size(image.shape[-2:], self.model.config.size_divisibility)

    @torch.inference_mode()
    def forward_batch(self, images: list[Tensor], original_sizes: list[tuple[int, int]]) -> ForwardOutput:
        """The model on prepared images of one ``batch_key``; ``postprocess_batch`` makes the results (it may run
        in another thread, overlapping the next batch's forward)."""
        batch, padding_mask, image_sizes = pad_images(images, self.model.config.size_divisibility)
        batch, padding_mask = batch.to(self.device), padding_mask.to(self.device)
        with autocast(self.precision, self.device.type):
            outputs = self.model(self.model.normalize(batch, padding_mask), aux_outputs=False)
        outputs.pred_logits = outputs.pred_logits.float()
        outputs.pred_masks = outputs.pred_masks.float()
        return ForwardOutput(outputs, [tuple(size) for size in image_sizes], tuple(batch.shape[-2:]),
                             list(original_sizes))

    @torch.inference_mode()
    def postprocess_batch(self, forwarded: ForwardOutput, tasks: Sequence[str]) -> list[dict[str, Any]]:
        """``{task: result}`` per image of a ``forward_batch`` output, on the CPU."""
        is_thing = self.is_thing.to(self.device)
        per_task = {
            task: batch_postprocess(
                forwarded.outputs, forwarded.image_sizes, forwarded.original_sizes, task, is_thing,
                padded_size=forwarded.padded_size, **self.postprocess_options,
            )
            for task in tasks
        }
        return [{task: _to_cpu(per_task[task][i]) for task in tasks} for i in range(len(forwarded.image_sizes))]


def _to_cpu(result: Any) -> Any:
    """Tensors (also inside tuples and dicts) copied to the CPU."""
    if isinstance(result, Tensor):
        return result.cpu()
    if isinstance(result, tuple):
        return tuple(_to_cpu(r) for r in result)
    if isinstance(result, dict):
        return {k: _to_cpu(v) for k, v in result.items()}
    return result
