"""MP-Former mask-piloted training (Zhang et al., CVPR 2023, arXiv 2303.07336): a training-only add-on.

Each training step, ``MaskPiloting.build`` turns the batch's ground truth into ``num_groups`` groups of
``max_num`` piloting (MP) queries (``max_num`` = most targets of any image in the batch), prepended to the
matching queries:

- content: slot ``g * max_num + j`` of an image holds the label embedding of its target ``j``; each label is first
  replaced by a uniformly random class with probability ``label_noise``; slots beyond an image's targets are zero;
- positional embedding: zeros when the model has one (``model.query_pos``; MP-Former's released decoder has none,
  so there this choice does not arise), else None;
- cross-attention mask, at every piloted layer: the target's mask area-resized to the layer's resolution, every
  pixel with coverage > 1e-8 foreground; with ``point_noise`` > 0 each pixel is XOR-flipped with probability
  ``point_noise * foreground_area / (h * w)``, drawn afresh for every layer and slot; unused slots block every
  pixel, which the decoder's empty-row fix turns into attend-everywhere. ``all_layers=False`` pilots only the
  masks of decoder layers 0-3 (those made from the initial prediction and the first three layers' outputs);
  later layers use the MP queries' own predicted masks;
- self-attention mask: matching queries never see MP queries, MP groups never see each other, MP queries see the
  matching queries, a group sees all of itself. The matching queries' outputs are therefore those of a model
  without piloting.

``split_predictions`` takes the MP outputs off again; ``mask_piloting_losses`` supervises them by direct
assignment (no matching) with the same point-sampled losses. In eval mode the model ignores piloting.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MaskPilotingConfig
from ..modeling.piloting import QueryPiloting
from .criterion import Indices, compute_num_masks, prepare_targets

__all__ = [
    "MaskPiloting",
    "MaskPilotingCriterion",
    "build_mask_piloting",
    "direct_assignment",
    "ground_truth_attention_mask",
    "mask_piloting_losses",
    "self_attention_mask",
]

PILOTED_LAYERS_WITHOUT_ALL_LAYERS = 4  # decoder layers 0..3 (released code: initial prediction + layers i < 3)
COVERAGE_THRESHOLD = 1e-8


def self_attention_mask(num_groups: int, group_size: int, num_queries: int, device: torch.device | None = None) -> Tensor:
    """Bool [P + Q, P + Q], True = blocked (row attends to column), P = ``num_groups * group_size`` MP queries first."""
    num_piloted = num_groups * group_size
    total = num_piloted + num_queries
    blocked = torch.zeros(total, total, dtype=torch.bool, device=device)
    blocked[num_piloted:, :num_piloted] = True  # matching queries never see MP queries
    group = torch.arange(num_piloted, device=device) // max(group_size, 1)
    blocked[:num_piloted, :num_piloted] = group[:, None] != group[None, :]  # nor MP groups each other
    return blocked


def ground_truth_attention_mask(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Bool [N, h*w], True = blocked: ``masks`` [N, H, W] area-resized to ``size``; any coverage > 1e-8 is foreground."""
    if masks.shape[0] == 0:
        return torch.ones(0, size[0] * size[1], dtype=torch.bool, device=masks.device)
    coverage = F.interpolate(masks[:, None].float(), size=size, mode="area")
    return (coverage <= COVERAGE_THRESHOLD).flatten(1)


def direct_assignment(counts: list[int], num_groups: int, max_num: int) -> Indices:
    """Per image ``(slot_idx, target_idx)``: slot ``g * max_num + j`` <-> target ``j``, for every group ``g``."""
    indices = []
    for count in counts:
        targets = torch.arange(count, dtype=torch.int64)
        slots = torch.cat([group * max_num + targets for group in range(num_groups)]) if count else targets
        indices.append((slots, targets.repeat(num_groups)))
    return indices


class MaskPiloting(QueryPiloting):
    """The piloting queries of one training batch (``modeling.piloting.QueryPiloting``): the decoder calls
    ``extend_queries`` and ``override_attention_mask``, the model ``split_predictions`` (see the module docstring).

    Build it with :meth:`build` (or :func:`build_mask_piloting`). The label-embedding lookup happens in
    ``extend_queries``, i.e. inside the model's forward (as DDP and autocast expect)."""

    def __init__(
        self,
        masks: list[Tensor],
        noisy_labels: Tensor,
        label_embedding: nn.Embedding,
        num_groups: int = 1,
        point_noise: float = 0.0,
        all_layers: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.masks = masks
        self.counts = [int(m.shape[0]) for m in masks]
        self.num_groups = num_groups
        self.max_num = max(self.counts, default=0)
        self.num_piloted = num_groups * self.max_num
        self.point_noise = point_noise
        self.all_layers = all_layers
        self.generator = generator
        self.label_embedding = label_embedding
        device = label_embedding.weight.device
        batch_index, slot_index = [], []
        for image, (slots, _) in enumerate(direct_assignment(self.counts, num_groups, self.max_num)):
            batch_index.append(torch.full_like(slots, image))
            slot_index.append(slots)
        self.batch_index = torch.cat(batch_index).to(device)
        self.slot_index = torch.cat(slot_index).to(device)
        if noisy_labels.shape != self.slot_index.shape:
            raise ValueError(f"MaskPiloting: {noisy_labels.numel()} labels for {self.slot_index.numel()} used slots")
        self.noisy_labels = noisy_labels.to(device)
        self._clean: dict[tuple[int, int], Tensor] = {}

    @classmethod
    def build(
        cls,
        targets: list[Mapping[str, Tensor]],
        config: MaskPilotingConfig,
        label_embedding: nn.Embedding,
        generator: torch.Generator | None = None,
    ) -> "MaskPiloting | None":
        """From criterion targets (``{"labels": int64[N], "masks": [N, H, W]}`` in the padded image frame, crowd
        removed). None when the batch has no target at all (the step then runs as plain Mask2Former)."""
        if config.num_groups < 1:
            raise ValueError(f"mask_piloting.num_groups must be >= 1, got {config.num_groups}")
        if not 0.0 <= config.label_noise <= 1.0:
            raise ValueError(f"mask_piloting.label_noise must be in [0, 1], got {config.label_noise}")
        if config.point_noise < 0.0:
            raise ValueError(f"mask_piloting.point_noise must be >= 0, got {config.point_noise}")
        num_classes = label_embedding.num_embeddings
        device = label_embedding.weight.device
        labels, masks = [], []
        for image, target in enumerate(targets):
            image_labels, image_masks = target["labels"], target["masks"]
            if image_masks.dim() != 3 or image_masks.shape[0] != image_labels.shape[0]:
                raise ValueError(f"MaskPiloting: target {image} has {image_labels.shape[0]} labels but masks of "
                                 f"shape {tuple(image_masks.shape)}")
            if image_labels.numel() and (int(image_labels.min()) < 0 or int(image_labels.max()) >= num_classes):
                raise ValueError(f"MaskPiloting: target {image} has a label outside [0, {num_classes})")
            labels.append(image_labels.to(device))
            masks.append(image_masks)
        if max((m.shape[0] for m in masks), default=0) == 0:
            return None
        frames = {tuple(m.shape[-2:]) for m in masks}
        if len(frames) > 1:  # pad to the largest frame, bottom/right, as the criterion does
            height, width = max(f[0] for f in frames), max(f[1] for f in frames)
            masks = [F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in masks]
        # Slot order: per image, group by group (the order of ``direct_assignment``).
        repeated = torch.cat([image_labels.repeat(config.num_groups) for image_labels in labels])
        flip = torch.rand(repeated.shape, generator=generator, device=device) < config.label_noise
        random_labels = torch.randint(0, num_classes, repeated.shape, generator=generator, device=device)
        noisy = torch.where(flip, random_labels, repeated)
        return cls(masks, noisy, label_embedding, config.num_groups, config.point_noise, config.all_layers, generator)

    # ----- decoder hooks ---------------------------------------------------------------------------------------

    def extend_queries(self, queries: Tensor, query_pos: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """[B, Q, C] -> [B, P + Q, C] with the MP queries first; also the self-attention mask [1, 1, P+Q, P+Q]."""
        batch, num_queries, dim = queries.shape
        if batch != len(self.counts):
            raise ValueError(f"MaskPiloting: built for {len(self.counts)} images, the batch has {batch}")
        content = self.label_embedding(self.noisy_labels).to(queries.dtype)
        piloted = queries.new_zeros(batch, self.num_piloted, dim).index_put((self.batch_index, self.slot_index), content)
        queries = torch.cat([piloted, queries], dim=1)
        if query_pos is not None:
            query_pos = torch.cat([query_pos.new_zeros(batch, self.num_piloted, dim), query_pos], dim=1)
        blocked = self_attention_mask(self.num_groups, self.max_num, num_queries, queries.device)
        return queries, query_pos, blocked[None, None]

    def pilots_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` gets ground-truth attention masks for the MP queries."""
        return self.all_layers or layer < PILOTED_LAYERS_WITHOUT_ALL_LAYERS

    def attention_mask(self, size: tuple[int, int]) -> Tensor:
        """Bool [B, P, h*w], True = blocked: ground-truth masks at ``size`` with fresh point noise."""
        clean = self._clean.get(size)
        if clean is None:
            device = self.label_embedding.weight.device
            per_slot = torch.ones(len(self.counts), self.max_num, size[0] * size[1], dtype=torch.bool, device=device)
            for image, masks in enumerate(self.masks):
                per_slot[image, : masks.shape[0]] = ground_truth_attention_mask(masks.to(device), size)
            clean = self._clean[size] = per_slot.repeat(1, self.num_groups, 1)
        if self.point_noise <= 0:
            return clean
        foreground_area = (~clean).sum(-1, keepdim=True)
        probability = self.point_noise * foreground_area / clean.shape[-1]
        flip = torch.rand(clean.shape, generator=self.generator, device=clean.device) < probability
        return clean ^ flip  # unused slots have no foreground, hence no flips: they stay fully blocked

    def override_attention_mask(self, blocked: Tensor, size: tuple[int, int], layer: int) -> Tensor:
        """Replace the MP rows of the cross-attention mask [B, 1, P + Q, h*w] for a piloted ``layer``."""
        if not self.pilots_layer(layer):
            return blocked
        piloted = self.attention_mask(size).unsqueeze(1)
        return torch.cat([piloted, blocked[:, :, self.num_piloted:]], dim=2)

    def split_predictions(self, predictions: list[tuple[Tensor, Tensor]]) -> tuple[list[tuple[Tensor, Tensor]], dict]:
        """Matching-query predictions, and the MP ones as ``{"pred_logits", "pred_masks", "aux_outputs",
        "num_groups", "max_num"}`` (slot ``g * max_num + j`` <-> target ``j``)."""
        count = self.num_piloted
        matching = [(logits[:, count:], masks[:, count:]) for logits, masks in predictions]
        piloted = [{"pred_logits": logits[:, :count], "pred_masks": masks[:, :count]} for logits, masks in predictions]
        return matching, {**piloted[-1], "aux_outputs": piloted[:-1], "num_groups": self.num_groups,
                          "max_num": self.max_num}


def build_mask_piloting(
    model: nn.Module, targets: list[Mapping[str, Tensor]], config: MaskPilotingConfig,
    generator: torch.Generator | None = None,
) -> MaskPiloting | None:
    """``MaskPiloting`` for ``model`` (DDP-wrapped or not) when ``config.enabled`` and the model is in training
    mode; None otherwise, or when the batch has no target."""
    model = getattr(model, "module", model)
    if not config.enabled or not model.training:
        return None
    label_embedding = getattr(getattr(model, "transformer_decoder", None), "label_embed", None)
    if label_embedding is None:
        raise ValueError("mask_piloting.enabled needs a model built with model.mask_piloting=true (the label "
                         "embedding of the piloting queries) and the masked decoder")
    return MaskPiloting.build(targets, config, label_embedding, generator)


def mask_piloting_losses(
    piloted: Mapping[str, Any] | None,
    targets: list[Mapping[str, Tensor]],
    criterion: nn.Module,
    num_masks: float | None = None,
    class_loss: bool = True,
    num_aux: int = 0,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Weighted ``loss_ce_mp``, ``loss_mask_mp``, ``loss_dice_mp`` (final MP prediction) and ``..._mp_i`` (aux i)
    via ``criterion.loss_for_assignment`` with the direct assignment: CE over all MP slots (unused ones toward
    no-object), mask/dice divided by ``num_masks * num_groups``. ``class_loss=False`` drops the CE terms.
    ``piloted`` None (no MP output): zeros for the final and ``num_aux`` aux predictions."""
    kinds = ("ce", "mask", "dice") if class_loss else ("mask", "dice")
    deep = getattr(criterion, "deep_supervision", True)
    if piloted is None:
        zero = criterion.empty_weight.new_zeros(())
        suffixes = [""] + ([f"_{i}" for i in range(num_aux)] if deep else [])
        return {f"loss_{kind}_mp{suffix}": zero.clone() for suffix in suffixes for kind in kinds}
    pred_logits = piloted["pred_logits"]
    num_groups, max_num = int(piloted["num_groups"]), int(piloted["max_num"])
    prepared = prepare_targets(list(targets), criterion.num_classes, pred_logits.shape[0], pred_logits.device)
    if num_masks is None:
        num_masks = compute_num_masks(prepared, pred_logits.device)
    indices = direct_assignment([len(t["labels"]) for t in prepared], num_groups, max_num)
    sets = [(piloted, "")]
    if deep:
        sets += [(aux, f"_{i}") for i, aux in enumerate(piloted.get("aux_outputs") or [])]
    losses = {}
    for outputs, suffix in sets:
        terms = criterion.loss_for_assignment(outputs["pred_logits"], outputs["pred_masks"], prepared, indices,
                                              num_masks * num_groups, generator)
        losses.update({f"loss_{kind}_mp{suffix}": terms[f"loss_{kind}"] for kind in kinds})
    return losses


class MaskPilotingCriterion(nn.Module):
    """``SetCriterion`` plus the MP losses: a drop-in criterion (same ``forward`` signature and result layout)
    for models whose outputs carry ``piloted`` predictions."""

    def __init__(self, criterion: nn.Module, class_loss: bool = True) -> None:
        super().__init__()
        self.criterion = criterion
        self.class_loss = class_loss

    @property
    def num_classes(self) -> int:
        return self.criterion.num_classes

    @property
    def matcher(self) -> nn.Module:
        return self.criterion.matcher

    def forward(
        self, outputs: Any, targets: list[dict], return_indices: bool = False, generator: torch.Generator | None = None,
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[Indices]]:
        result = self.criterion(outputs, targets, return_indices=return_indices, generator=generator)
        losses, indices = result if return_indices else (result, None)
        if isinstance(outputs, Mapping):
            piloted, num_aux = outputs.get("piloted"), len(outputs.get("aux_outputs") or [])
        else:
            piloted, num_aux = getattr(outputs, "piloted", None), len(outputs.aux_outputs or [])
        losses = {**losses, **mask_piloting_losses(piloted, targets, self.criterion, class_loss=self.class_loss,
                                                   num_aux=num_aux, generator=generator)}
        return (losses, indices) if return_indices else losses
