"""Transformer decoders that turn queries + image memory into per-query class logits and mask logits.

- ``MaskedTransformerDecoder`` (Mask2Former): learnable query features and positions, round-robin over the
  1/32, 1/16, 1/8 maps, masked cross-attention -> self-attention -> FFN, post-norm, no dropout, a prediction from
  the initial queries and after every layer. ``query_pos=False`` drops the learnable query positional embedding:
  MP-Former's released decoder (IDEA-Research/MP-Former) removed it, for its matching and piloting queries alike.
  ``mask_piloting=True`` adds MP-Former's label embedding (a training-only parameter; see
  ``training/mask_piloting.py``).
- ``StandardTransformerDecoder`` (MaskFormer): DETR decoder on one memory map, self-attention -> cross-attention
  -> FFN, zero content queries, dropout 0.1, a prediction after every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .piloting import QueryPiloting
from .position_encoding import SinePositionEncoding


class Attention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout (``in_proj_weight``/``in_proj_bias``/
    ``out_proj``) so checkpoints map 1:1, computed with ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, blocked: Tensor | None = None) -> Tensor:
        """query [B, Lq, C], key/value [B, Lk, C]; ``blocked``: bool, True = may not attend, broadcastable to
        [B, heads, Lq, Lk]."""
        batch, num_queries, dim = query.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        heads = self.num_heads

        def split(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            return F.linear(x, weight, bias).view(batch, -1, heads, dim // heads).transpose(1, 2)

        allowed = None if blocked is None else ~blocked
        out = F.scaled_dot_product_attention(
            split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v), attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, num_queries, dim))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


class PredictionHeads(nn.Module):
    """Shared LayerNorm, then class logits (K+1) and mask embeddings dotted with ``mask_features``."""

    def __init__(self, hidden_dim: int, num_classes: int, mask_dim: int) -> None:
        super().__init__()
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, queries: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor]:
        decoded = self.decoder_norm(queries)
        class_logits = self.class_embed(decoded)
        return class_logits, mask_logits_from_embeddings(self.mask_embed(decoded), mask_features)


def mask_logits_from_embeddings(embeddings: Tensor, mask_features: Tensor) -> Tensor:
    """[B, Q, C] . [B, C, h, w] -> [B, Q, h, w], at least in fp32: summed in bf16 over C channels, the logits' sign
    flips near zero, and the sign is the mask (a small einsum next to the rest of the model)."""
    dtype = torch.promote_types(torch.promote_types(embeddings.dtype, mask_features.dtype), torch.float32)
    with torch.autocast(mask_features.device.type, enabled=False):
        return torch.einsum("bqc,bchw->bqhw", embeddings.to(dtype), mask_features.to(dtype))


def unblock_empty_rows(blocked: Tensor) -> Tensor:
    """Rows (last dim = keys) that block every key attend everywhere instead."""
    return blocked & ~blocked.all(-1, keepdim=True)


class MaskedDecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.cross_attn = Attention(dim, num_heads)
        self.cross_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.self_norm = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        # The reference re-initialises every matrix of its attention and FFN sub-layers with xavier_uniform.
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(
        self, queries: Tensor, query_pos: Tensor | None, memory: Tensor, memory_pos: Tensor,
        cross_blocked: Tensor | None, self_blocked: Tensor | None = None,
    ) -> Tensor:
        q = queries if query_pos is None else queries + query_pos
        queries = self.cross_norm(queries + self.cross_attn(q, memory + memory_pos, memory, cross_blocked))
        q = queries if query_pos is None else queries + query_pos
        queries = self.self_norm(queries + self.self_attn(q, q, queries, self_blocked))
        return self.ffn_norm(queries + self.linear2(F.relu(self.linear1(queries))))


class MaskedTransformerDecoder(nn.Module):
    """Mask2Former's multi-scale masked-attention decoder."""

    num_levels = 3  # the reference always uses three scales

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        num_layers: int = 9,
        mask_dim: int = 256,
        query_pos: bool = True,
        enforce_input_proj: bool = False,
        mask_piloting: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.position_encoding = SinePositionEncoding(hidden_dim // 2)
        self.level_embed = nn.Embedding(self.num_levels, hidden_dim)
        # The reference projects memory only when its width differs from the decoder's (or when told to).
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, 1) if in_channels != hidden_dim or enforce_input_proj else nn.Identity()
            for _ in range(self.num_levels)
        )
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        # MP-Former removes the query positional embedding; ``query_pos=False`` builds that variant.
        self.query_embed = nn.Embedding(num_queries, hidden_dim) if query_pos else None
        self.layers = nn.ModuleList(MaskedDecoderLayer(hidden_dim, num_heads, dim_feedforward) for _ in range(num_layers))
        self.heads = PredictionHeads(hidden_dim, num_classes, mask_dim)
        # MP-Former: the content of a piloting query is the embedding of its (noised) ground-truth class. Created
        # last, so that the other parameters get the same initial values as without piloting.
        self.label_embed = nn.Embedding(num_classes, hidden_dim) if mask_piloting else None

    def prepare_memory(self, multi_scale: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
        memories, positions, sizes = [], [], []
        for level, feature in enumerate(multi_scale):
            sizes.append((feature.shape[2], feature.shape[3]))
            positions.append(self.position_encoding(feature).flatten(2).transpose(1, 2))
            projected = self.input_proj[level](feature).flatten(2).transpose(1, 2)
            memories.append(projected + self.level_embed.weight[level].to(projected.dtype))
        return memories, positions, sizes

    def forward(
        self, multi_scale: list[Tensor], mask_features: Tensor, piloting: QueryPiloting | None = None,
        intermediate: bool = True,
    ) -> list[tuple[Tensor, Tensor]]:
        """multi_scale: [1/32, 1/16, 1/8] maps; returns [(class_logits, mask_logits)] for the initial queries
        and every layer (``num_layers + 1`` predictions, the last is the model's output); ``intermediate=False``
        (inference) returns only the last prediction.

        The attention masks come from ``mask_features`` resized to each level: bilinear resizing is linear per
        channel, so it commutes with the mask einsum, and the reference's resized 1/4-resolution mask logits are
        never needed between layers. The predictions are then made in one batch over all layers: one einsum with
        ``mask_features`` (and one gradient into it) instead of one per layer.

        ``piloting`` (training only; ``modeling/piloting.py``) adds MP-Former's extra queries with ground-truth
        attention masks, prepended to the matching queries (built by ``training/mask_piloting.py``).
        """
        if piloting is not None and not intermediate:
            raise ValueError("mask piloting trains every layer: it needs intermediate predictions")
        memories, positions, sizes = self.prepare_memory(multi_scale)
        batch = mask_features.shape[0]
        queries = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        query_pos = None if self.query_embed is None else self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        self_blocked = None
        if piloting is not None:
            queries, query_pos, self_blocked = piloting.extend_queries(queries, query_pos)
        level_features = [
            F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False) for size in sizes
        ]
        states = [queries]
        cross_blocked = self._cross_mask(queries, level_features[0], piloting, layer=0)
        for index, layer in enumerate(self.layers):
            level = index % self.num_levels
            queries = layer(queries, query_pos, memories[level], positions[level], cross_blocked, self_blocked)
            states.append(queries)
            if index + 1 < len(self.layers):
                next_level = (index + 1) % self.num_levels
                cross_blocked = self._cross_mask(queries, level_features[next_level], piloting, index + 1)
        if not intermediate:
            return [self.heads(queries, mask_features)]
        # [B, (layers + 1) * Q, C]: one GEMM per image whose output needs no permute; each layer's logits are views.
        num_predictions, num_queries = len(states), queries.shape[1]
        class_logits, mask_logits = self.heads(torch.cat(states, 1), mask_features)
        class_logits = class_logits.unflatten(1, (num_predictions, num_queries))
        mask_logits = mask_logits.unflatten(1, (num_predictions, num_queries))
        predictions = list(zip(class_logits.unbind(1), mask_logits.unbind(1)))
        if piloting is None and self.label_embed is not None and self.training:
            # DDP needs a gradient for every parameter in every step, also when no query was piloted.
            class_logits, mask_logits = predictions[-1]
            predictions[-1] = (class_logits + self.label_embed.weight.sum() * 0, mask_logits)
        return predictions

    def _cross_mask(self, queries: Tensor, level_features: Tensor, piloting: QueryPiloting | None,
                    layer: int) -> Tensor:
        """Bool [B, 1, Q, h*w], True = blocked: where the queries' masks at this level have probability < 0.5.

        A query whose mask is empty at this resolution would attend to nothing (NaN softmax); it attends everywhere
        instead (the reference's fix, facebookresearch/Mask2Former#125). No gradient flows through the mask.
        """
        with torch.no_grad():
            embeddings = self.heads.mask_embed(self.heads.decoder_norm(queries))
            blocked = (mask_logits_from_embeddings(embeddings, level_features).flatten(2).sigmoid() < 0.5).unsqueeze(1)
        if piloting is not None:
            # Ground-truth rows may be empty too (unused slots, point noise), hence unblocking after the override.
            blocked = piloting.override_attention_mask(blocked, tuple(level_features.shape[-2:]), layer)
        return unblock_empty_rows(blocked)


class StandardDecoderLayer(nn.Module):
    """DETR post-norm decoder layer: self-attention -> cross-attention -> FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, dropout)
        self.self_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.cross_norm = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        q = queries + query_pos
        queries = self.self_norm(queries + self.dropout(self.self_attn(q, q, queries)))
        attended = self.cross_attn(queries + query_pos, memory + memory_pos, memory)
        queries = self.cross_norm(queries + self.dropout(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(queries))))
        return self.ffn_norm(queries + self.dropout(ffn))


class StandardTransformerDecoder(nn.Module):
    """MaskFormer's decoder: unmasked cross-attention to a single memory map (res5)."""

    def __init__(
        self,
        in_channels: int = 2048,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        num_layers: int = 6,
        mask_dim: int = 256,
        dropout: float = 0.1,
        enforce_input_proj: bool = False,
    ) -> None:
        super().__init__()
        self.position_encoding = SinePositionEncoding(hidden_dim // 2)
        if in_channels != hidden_dim or enforce_input_proj:
            self.input_proj: nn.Module = nn.Conv2d(in_channels, hidden_dim, 1)
            nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
            nn.init.zeros_(self.input_proj.bias)
        else:
            self.input_proj = nn.Identity()
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(
            StandardDecoderLayer(hidden_dim, num_heads, dim_feedforward, dropout) for _ in range(num_layers)
        )
        for layer in self.layers:
            for parameter in layer.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        self.heads = PredictionHeads(hidden_dim, num_classes, mask_dim)

    def forward(
        self, multi_scale: list[Tensor], mask_features: Tensor, piloting: QueryPiloting | None = None,
        intermediate: bool = True,
    ) -> list[tuple[Tensor, Tensor]]:
        if piloting is not None:
            raise ValueError("mask piloting needs the masked-attention decoder (decoder: masked)")
        feature = multi_scale[0]
        memory_pos = self.position_encoding(feature).flatten(2).transpose(1, 2)
        memory = self.input_proj(feature).flatten(2).transpose(1, 2)
        batch = feature.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        queries = torch.zeros_like(query_pos)
        predictions = []
        for index, layer in enumerate(self.layers):
            queries = layer(queries, query_pos, memory, memory_pos)
            if intermediate or index == len(self.layers) - 1:
                predictions.append(self.heads(queries, mask_features))
        return predictions
