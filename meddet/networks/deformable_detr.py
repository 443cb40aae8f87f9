"""Two-stage 3D Deformable DETR with iterative box refinement over any multi-stage encoder (e.g. ResEnc-L).

Boxes are normalised `cccwhd` (centre x, y, z and size w, h, d as fractions of the input patch, axes in
array order [X, Y, Z]) produced by a sigmoid, so every predicted size is positive. Because boxes are fractions
of the patch, a model must be trained and applied (sliding window) on one patch size.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

from meddet.networks.deformable_attention import MultiScaleDeformableAttention3D
from meddet.networks.position_encoding import PositionEmbeddingSine3D, sine_embedding
from meddet.networks.resenc import RESENC_L, build_resenc_encoder
from meddet.networks.strides import check_input_size, encoder_levels

PRIOR_PROBABILITY = 0.01  # initial foreground probability of every class logit
PROPOSAL_RANGE = (0.01, 0.99)  # proposals with a coordinate outside this open range are never selected


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x to at least eps."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def _feed_forward(d_model: int, dim_feedforward: int, dropout: float) -> nn.Sequential:
    ffn = nn.Sequential(
        nn.Linear(d_model, dim_feedforward), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(dim_feedforward, d_model), nn.Dropout(dropout),
    )
    for layer in (ffn[0], ffn[3]):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return ffn


class BoxMLP(nn.Module):
    """Linear-ReLU stack d -> d -> ... -> out_features; the last layer starts at zero (prediction = reference)."""

    def __init__(self, d_model: int, out_features: int = 6, num_layers: int = 3):
        super().__init__()
        widths = [d_model] * num_layers + [out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else torch.relu(layer(x))
        return x


def _class_head(d_model: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(d_model, num_classes)
    nn.init.constant_(head.bias, -math.log((1.0 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    return head


class DeformableEncoderLayer(nn.Module):
    """Pre-norm encoder layer: x + DeformAttn(LN(x) + pos), then x + FFN(LN(x)). Shapes [B, S, d]."""

    def __init__(self, d_model: int, n_levels: int, num_heads: int, num_points: int, dim_feedforward: int,
                 dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiScaleDeformableAttention3D(d_model, n_levels, num_heads, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = _feed_forward(d_model, dim_feedforward, dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        normed = self.norm1(src)
        src = src + self.dropout1(
            self.self_attn(normed + pos, reference_points, normed, spatial_shapes, level_start_index)
        )
        return src + self.ffn(self.norm2(src))


class DeformableDecoderLayer(nn.Module):
    """Pre-norm decoder layer: query self-attention, deformable cross-attention to the encoder memory around
    each query's reference box, FFN; each a residual branch after a LayerNorm. Shapes [B, Q, d]."""

    def __init__(self, d_model: int, n_levels: int, num_heads: int, num_points: int, dim_feedforward: int,
                 dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = MultiScaleDeformableAttention3D(d_model, n_levels, num_heads, num_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.ffn = _feed_forward(d_model, dim_feedforward, dropout)

    def forward(self, tgt, query_pos, reference_boxes, memory, spatial_shapes, level_start_index):
        normed = self.norm1(tgt)
        query_key = normed + query_pos
        tgt = tgt + self.dropout1(self.self_attn(query_key, query_key, normed, need_weights=False)[0])
        tgt = tgt + self.dropout2(
            self.cross_attn(self.norm2(tgt) + query_pos, reference_boxes, memory, spatial_shapes, level_start_index)
        )
        return tgt + self.ffn(self.norm3(tgt))


class DeformableDETR(nn.Module):
    """Two-stage Deformable DETR in 3D with iterative box refinement.

    1. `encoder(x)` -> list of per-stage maps; the maps at `detection_levels` (ResEnc-L: strides 4, 8, 16, 32 with
       128/256/320/320 channels) go through a 1x1x1 conv + GroupNorm to `d_model` each (channel mapper).
    2. Tokens = flattened maps of all levels (level after level, C order over X, Y, Z), with a 3D sine position
       embedding plus a learned per-level embedding; `num_encoder_layers` pre-norm deformable encoder layers
       (reference = each token's own voxel centre), then a LayerNorm -> memory [B, S, d].
    3. Two-stage proposals: every token proposes a box centred on its voxel with size
       `proposal_base_scale * 2 ** level` (level = index in `detection_levels`) per axis; a linear + LayerNorm,
       a class-agnostic class head and a box head (delta on the inverse-sigmoid proposal) score and refine
       them ("enc_outputs"). The top `num_queries` by score become the decoder's reference boxes (detached);
       proposals with a coordinate outside (0.01, 0.99) (edge tokens of large maps, oversized high-level
       boxes) are never selected and their memory is zeroed before the proposal heads;
       the sine embedding of each box, through a linear + LayerNorm, gives the query position embedding and
       the initial query content.
       Without two-stage (`two_stage=False`), learned query embeddings and a linear layer on them give the
       queries and initial reference boxes.
    4. `num_decoder_layers` pre-norm decoder layers; after each one (output through a shared LayerNorm) a class
       head and a box head of that layer predict logits and a delta on the inverse-sigmoid reference box;
       the refined box, detached, is the next layer's reference.

    Forward: `x [B, C, X, Y, Z]`, X, Y, Z divisible by `total_stride` -> dict
        "pred_logits" [B, Q, K], "pred_boxes" [B, Q, 6] (normalised cccwhd in (0, 1)) of the last layer,
        "aux_outputs": list over the earlier decoder layers of {"pred_logits", "pred_boxes"},
        "enc_outputs" (two-stage only): {"pred_logits" [B, S, 1], "pred_boxes" [B, S, 6]} for all proposals.

    At initialisation the deformable attention ignores its query (zero offset and attention-weight layers),
    so the position and level embeddings receive all-zero gradients in the first step, non-zero ones after.

    Attributes: `encoder` (kept under this name so pre-trained `encoder.stem...` / `encoder.stages...` keys load),
    `detection_strides` (strides of the feature levels), `total_stride`, `num_queries`, `num_classes`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int = 1,
        num_queries: int = 12,
        d_model: int = 128,
        num_heads: int = 8,
        num_points: int = 4,
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        detection_levels: Sequence[int] = (2, 3, 4, 5),
        two_stage: bool = True,
        proposal_base_scale: float = 0.05,
        norm_groups: int = 32,
    ):
        super().__init__()
        encoder_channels, level_strides = encoder_levels(encoder, "DeformableDETR")
        detection_levels = tuple(int(level) for level in detection_levels)
        if (
            not detection_levels
            or list(detection_levels) != sorted(set(detection_levels))
            or detection_levels[0] < 0
            or detection_levels[-1] >= len(encoder_channels)
        ):
            raise ValueError(
                f"DeformableDETR: detection_levels {detection_levels} must be strictly increasing level indices within "
                f"0..{len(encoder_channels) - 1} (the encoder has {len(encoder_channels)} levels)"
            )
        if num_classes < 1 or num_queries < 1 or num_decoder_layers < 1 or num_encoder_layers < 0:
            raise ValueError(
                "DeformableDETR: need num_classes >= 1, num_queries >= 1, num_decoder_layers >= 1 and "
                f"num_encoder_layers >= 0, got {num_classes}, {num_queries}, {num_decoder_layers}, {num_encoder_layers}"
            )
        groups = math.gcd(int(norm_groups), int(d_model))

        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.num_queries = int(num_queries)
        self.d_model = int(d_model)
        self.detection_levels = detection_levels
        self.detection_strides = tuple(level_strides[level] for level in detection_levels)
        self.total_stride = level_strides[-1]
        self.two_stage = bool(two_stage)
        self.proposal_base_scale = float(proposal_base_scale)
        n_levels = len(detection_levels)

        self.channel_mapper = nn.ModuleList(
            nn.Sequential(nn.Conv3d(encoder_channels[level], d_model, kernel_size=1), nn.GroupNorm(groups, d_model))
            for level in detection_levels
        )
        for mapper in self.channel_mapper:
            nn.init.xavier_uniform_(mapper[0].weight)
            nn.init.zeros_(mapper[0].bias)
        self.position_embedding = PositionEmbeddingSine3D(d_model)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        nn.init.normal_(self.level_embed)

        layer_args = (d_model, n_levels, num_heads, num_points, dim_feedforward, dropout)
        self.encoder_layers = nn.ModuleList(DeformableEncoderLayer(*layer_args) for _ in range(num_encoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model)
        self.decoder_layers = nn.ModuleList(DeformableDecoderLayer(*layer_args) for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.class_heads = nn.ModuleList(_class_head(d_model, num_classes) for _ in range(num_decoder_layers))
        self.box_heads = nn.ModuleList(BoxMLP(d_model) for _ in range(num_decoder_layers))

        if self.two_stage:
            self.proposal_memory = nn.Sequential(nn.Linear(d_model, d_model), nn.LayerNorm(d_model))
            self.proposal_class_head = _class_head(d_model, 1)
            self.proposal_box_head = BoxMLP(d_model)
            self.box_embedding_features = d_model // 2 // 2 * 2  # per box coordinate, even
            self.query_from_boxes = nn.Sequential(
                nn.Linear(6 * self.box_embedding_features, 2 * d_model), nn.LayerNorm(2 * d_model)
            )
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * d_model)
            self.reference_head = nn.Linear(d_model, 6)

    # ------------------------------------------------------------------ helpers
    def _flatten_levels(self, maps: Sequence[torch.Tensor]):
        tokens, positions, shapes = [], [], []
        for level, (mapper, feature) in enumerate(zip(self.channel_mapper, maps)):
            src = mapper(feature)
            pos = self.position_embedding(src) + self.level_embed[level].view(1, -1, 1, 1, 1).to(src.dtype)
            shapes.append(tuple(int(s) for s in src.shape[2:]))
            tokens.append(src.flatten(2).transpose(1, 2))
            positions.append(pos.flatten(2).transpose(1, 2))
        starts, total = [], 0
        for x, y, z in shapes:
            starts.append(total)
            total += x * y * z
        return torch.cat(tokens, 1), torch.cat(positions, 1), shapes, starts

    @staticmethod
    def _voxel_centres(shapes, device) -> List[torch.Tensor]:
        """Per level [S_l, 3] normalised voxel centres, rows in C order over (X, Y, Z)."""
        centres = []
        for shape in shapes:
            axes = [(torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n for n in shape]
            grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
            centres.append(grid.reshape(-1, 3))
        return centres

    def _proposals(self, shapes, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Proposal boxes [S, 6] (normalised cccwhd) and a validity mask [S]."""
        boxes = []
        for level, centres in enumerate(self._voxel_centres(shapes, device)):
            size = self.proposal_base_scale * 2.0 ** level
            boxes.append(torch.cat([centres, torch.full_like(centres, size)], dim=1))
        boxes = torch.cat(boxes)
        low, high = PROPOSAL_RANGE
        valid = ((boxes > low) & (boxes < high)).all(dim=1)
        return boxes, valid

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"DeformableDETR: expected input [B, C, X, Y, Z], got shape {tuple(x.shape)}")
        check_input_size(x.shape[2:], self.total_stride, "DeformableDETR")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Dict[str, Union[torch.Tensor, list, dict]]:
        self._check_input(x)
        features = self.encoder(x)
        if not isinstance(features, (list, tuple)):
            raise TypeError("DeformableDETR: the encoder must return a list of per-stage maps (return_skips=True)")
        tokens, positions, shapes, starts = self._flatten_levels([features[level] for level in self.detection_levels])
        batch, num_tokens, _ = tokens.shape

        # encoder: every token attends around its own voxel centre on all levels
        reference_points = torch.cat(self._voxel_centres(shapes, x.device))[None, :, None, :]  # [1, S, 1, 3]
        memory = tokens
        for layer in self.encoder_layers:
            memory = layer(memory, positions, reference_points, shapes, starts)
        memory = self.encoder_norm(memory)

        outputs: Dict[str, Union[torch.Tensor, list, dict]] = {}
        if self.two_stage:
            if self.num_queries > num_tokens:
                raise ValueError(
                    f"DeformableDETR: num_queries {self.num_queries} exceeds the {num_tokens} proposal positions of a "
                    f"{tuple(x.shape[2:])} input; use fewer queries or a larger patch"
                )
            proposals, valid = self._proposals(shapes, x.device)
            proposal_memory = self.proposal_memory(memory * valid[None, :, None].to(memory.dtype))
            proposal_logits = self.proposal_class_head(proposal_memory).float()  # [B, S, 1]
            proposal_unact = self.proposal_box_head(proposal_memory).float() + inverse_sigmoid(proposals)[None]
            outputs["enc_outputs"] = {"pred_logits": proposal_logits, "pred_boxes": proposal_unact.sigmoid()}
            selection = proposal_logits[..., 0].detach().masked_fill(~valid[None], float("-inf"))
            top = selection.topk(self.num_queries, dim=1).indices  # [B, Q]
            reference_boxes = torch.gather(proposal_unact.detach(), 1, top[..., None].expand(-1, -1, 6)).sigmoid()
            query = self.query_from_boxes(sine_embedding(reference_boxes, self.box_embedding_features))
            query_pos, tgt = query.split(self.d_model, dim=-1)
        else:
            query_pos, tgt = self.query_embed.weight[None].expand(batch, -1, -1).split(self.d_model, dim=-1)
            reference_boxes = self.reference_head(query_pos).float().sigmoid()

        layer_outputs = []
        hidden = tgt
        for index, layer in enumerate(self.decoder_layers):
            hidden = layer(hidden, query_pos, reference_boxes[:, :, None, :], memory, shapes, starts)
            normed = self.decoder_norm(hidden)
            logits = self.class_heads[index](normed).float()
            boxes = (self.box_heads[index](normed).float() + inverse_sigmoid(reference_boxes)).sigmoid()
            layer_outputs.append({"pred_logits": logits, "pred_boxes": boxes})
            reference_boxes = boxes.detach()

        outputs.update(layer_outputs[-1])
        outputs["aux_outputs"] = layer_outputs[:-1]
        return outputs


def deformable_detr_resenc(
    in_channels: int = 1,
    num_classes: int = 1,
    num_queries: int = 12,
    features_per_stage: Sequence[int] = RESENC_L["features_per_stage"],
    strides: Sequence[Union[int, Sequence[int]]] = RESENC_L["strides"],
    blocks_per_stage: Sequence[int] = RESENC_L["blocks_per_stage"],
    kernel_size: int = 3,
    detection_levels: Sequence[int] = (2, 3, 4, 5),
    d_model: int = 128,
    num_encoder_layers: int = 3,
    num_decoder_layers: int = 6,
    num_heads: int = 8,
    num_points: int = 4,
    dim_feedforward: int = 1024,
    dropout: float = 0.0,
    two_stage: bool = True,
    proposal_base_scale: float = 0.05,
) -> DeformableDETR:
    """Deformable DETR on a ResEnc encoder from plain (JSON-friendly) values; defaults give the paper's
    ResEnc-L model (levels at strides 4, 8, 16, 32). A smaller encoder needs `detection_levels` that exist in it."""
    encoder = build_resenc_encoder(
        in_channels=in_channels,
        features_per_stage=features_per_stage,
        strides=strides,
        blocks_per_stage=blocks_per_stage,
        kernel_size=kernel_size,
    )
    return DeformableDETR(
        encoder,
        num_classes=num_classes,
        num_queries=num_queries,
        d_model=d_model,
        num_heads=num_heads,
        num_points=num_points,
        num_encoder_layers=num_encoder_layers,
        num_decoder_layers=num_decoder_layers,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        detection_levels=detection_levels,
        two_stage=two_stage,
        proposal_base_scale=proposal_base_scale,
    )
