"""Load the native-backbone MultiTalent release (`RetinaUNet-MissingPiece-MultiTalent`) into `NNDetEncoder`.

Release layout, as the seed paper's fine-tuning code reads it (nnDetection `DetSegModel_TL_MultiTalentStem`):

- `network_weights` holds nnDetection's backbone under `backbone.levels.<s>.component.<b>.conv.weight` and
  `….norm.weight|bias`, one stem per pre-training dataset under `stem.<id>.0.weight` (conv) and
  `stem.<id>.1.weight|bias` (InstanceNorm), plus the FPN decoder and segmentation layers (not transferred).
- `nnssl_adaptation_plan` as in the nnssl format, with `key_to_stem` = `stem.<id>` of the default (CT, `351_0`)
  stem and `pretrain_num_input_channels` 1.

Fusion: nnDetection's backbone has no separate stem. In the pre-training network the stem (in -> 32 channels)
ran before a level 0 of a single 32 -> 32 block; downstream, level 0 has the usual two blocks, so the selected stem
becomes block 0 of level 0 and the checkpoint's level-0 block becomes block 1. Deeper levels map one to one. The
downstream encoder therefore has exactly nnDetection's standard layout; no extra block is needed.

Assumed here (not visible without the file): the backbone prefix is the plan's `key_to_encoder` when it has one,
else `backbone.levels`; the stem conv has no bias (the release's loader maps only `stem.<id>.0.weight` onto a
bias-free conv and checks the key sets match); level 0 of the checkpoint has exactly one block (a second one
would collide with the fused stem, so it is rejected). Our writer for this format is
`make_nnssl_checkpoint(weights, path, arch_kwargs, arch_class_name="ConvBackbone", key_to_encoder="backbone.levels",
key_to_stem="stem.351_0", keys_to_in_proj=("stem.351_0.0",))`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Dict, Optional

import torch
from torch import nn

from meddet.pretrained.nnssl import (
    PLAN_KEY,
    WEIGHTS_KEY,
    StemChoice,
    adapt_input_channels,
    detector_encoder,
    read_checkpoint,
    select_stem,
    strict_load,
)

logger = logging.getLogger("meddet.pretrained")

NATIVE_BACKBONE_PREFIX = "backbone.levels"
# the released stem is nn.Sequential(conv, norm[, activation]): numeric children, named in our blocks
_STEM_CHILD_TO_LAYER = {"0": "conv", "1": "norm"}
FUSED_IN_PROJECTION = "stages.0.0.conv"


def native_encoder_state_dict(
    checkpoint: Mapping, stem: StemChoice = None, source: str = "checkpoint"
) -> Dict[str, torch.Tensor]:
    """Selected stem + backbone levels renamed to `NNDetEncoder` names, with the stem fused into level 0.

    `stem.<id>.0.*` -> `stages.0.0.conv.*`, `stem.<id>.1.*` -> `stages.0.0.norm.*`,
    `backbone.levels.0.component.0.*` -> `stages.0.1.*`, `backbone.levels.<s>.component.<b>.*` -> `stages.<s>.<b>.*`
    for s >= 1. Other stems, the decoder and the segmentation layers are left out.
    """
    weights = checkpoint[WEIGHTS_KEY]
    stem_prefix = select_stem(checkpoint, stem, source)
    levels_prefix = checkpoint[PLAN_KEY].get("key_to_encoder") or NATIVE_BACKBONE_PREFIX
    level_key = re.compile(rf"^{re.escape(levels_prefix)}\.(\d+)\.component\.(\d+)\.(conv|norm)\.(.+)$")
    state: Dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key.startswith(stem_prefix + "."):
            child, _, rest = key[len(stem_prefix) + 1:].partition(".")
            if child not in _STEM_CHILD_TO_LAYER:
                raise ValueError(
                    f"{source}: stem key '{key}' is not under child 0 (conv) or 1 (norm) of '{stem_prefix}'; "
                    "expected a conv -> norm stem"
                )
            state[f"stages.0.0.{_STEM_CHILD_TO_LAYER[child]}.{rest}"] = value
        elif key.startswith(levels_prefix + "."):
            match = level_key.match(key)
            if match is None:
                raise ValueError(
                    f"{source}: backbone key '{key}' does not read "
                    f"'{levels_prefix}.<level>.component.<block>.(conv|norm).<tensor>'"
                )
            level, block, layer, rest = int(match[1]), int(match[2]), match[3], match[4]
            if level == 0:
                if block != 0:
                    raise ValueError(
                        f"{source}: level 0 of the pre-training backbone has a block {block} ('{key}'); the stem "
                        "fusion expects a single block there, since the stem supplies the first block of level 0"
                    )
                block = 1
            state[f"stages.{level}.{block}.{layer}.{rest}"] = value
    if not any(key.startswith("stages.1.") for key in state):
        raise ValueError(f"{source}: no nnDetection backbone weights under '{levels_prefix}'")
    return state


def load_native_multitalent(
    network: nn.Module,
    checkpoint_path: str,
    in_channels: Optional[int] = None,
    stem: StemChoice = None,
    fetch_hint: str = "",
) -> dict:
    """Strict-load a native-backbone MultiTalent checkpoint into `network.encoder` (an `NNDetEncoder`).

    Same contract as `meddet.pretrained.nnssl.load_pretrained_encoder`: the selected stem (None = the plan's
    CT stem) is fused in as block 0 of level 0, a single-channel stem is spread over `in_channels` (None = read
    off the encoder), everything outside the encoder is untouched, any name/shape mismatch raises ValueError with
    the file, the first offending key and both shapes. Returns and logs {"tensors", "parameters", "checkpoint",
    "stem"}.
    """
    path = os.fspath(checkpoint_path)
    checkpoint = read_checkpoint(path, fetch_hint)
    encoder = detector_encoder(network)
    stem_prefix = select_stem(checkpoint, stem, path)
    state = native_encoder_state_dict(checkpoint, stem_prefix, path)
    if in_channels is None:
        target = encoder.state_dict()
        if f"{FUSED_IN_PROJECTION}.weight" not in target:
            raise ValueError(
                f"{path}: the network's encoder has no '{FUSED_IN_PROJECTION}.weight'; is it an NNDetEncoder?"
            )
        in_channels = int(target[f"{FUSED_IN_PROJECTION}.weight"].shape[1])
    state = adapt_input_channels(state, [FUSED_IN_PROJECTION], in_channels)
    tensors, parameters = strict_load(encoder, state, path)
    report = {"tensors": tensors, "parameters": parameters, "checkpoint": path, "stem": stem_prefix}
    logger.info(
        "loaded %d pre-trained tensors (%.2f M parameters) into the native encoder from %s (stem '%s' fused into "
        "level 0, %d input channels)",
        tensors, parameters / 1e6, path, stem_prefix, in_channels,
    )
    return report
