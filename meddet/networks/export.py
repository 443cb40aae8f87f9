"""Export view of the detection networks: the same weights, a flat tuple of tensors as output.

The networks return dicts (Retina U-Net: lists of per-level maps next to a tensor; Deformable DETR: nested
dicts of auxiliary outputs). MONAI 1.6.1's `ckpt_export` cannot export them as they are:
- default (`torch.jit.script`): fails on dynamic-network-architectures' residual blocks ("Module
  'BasicBlockD' has no attribute 'skip'") for the ResEnc networks, and on `Sequence[...]` annotations
  (`UNetFPN.forward`) for the nnDetection backbone;
- `--use_trace True`, also with `--converter_kwargs "{'strict': False}"`: "Dictionary inputs to traced
  functions must have consistent type. Found List[Tensor] and Tensor" (the DETR dict mixes tensors, a list
  and a dict the same way).
Wrapping the network in `TupleOutputNetwork` and tracing it works for all three families:

    python -m monai.bundle ckpt_export --net_id export_network_def --filepath models/model.ts \
        --ckpt_file models/model.pt --config_file configs/inference.json \
        --use_trace True --input_shape "[1, 1, 128, 128, 128]"

with the config key `"export_network_def": {"_target_": "meddet.networks.export.TupleOutputNetwork",
"network": "@network_def"}`. The wrapper loads the plain network's `model.pt` keys as they are (a
load-state-dict pre-hook adds its `network.` prefix), so no checkpoint conversion is needed.

ONNX (`python -m monai.bundle onnx_export` with the same `--net_id`, `--use_trace True` and `--input_shape`;
needs the `onnx`, `onnxscript` and `onnxruntime` packages, which meddet does not install) works for all three
families with torch 2.14's default exporter (torch.export, opset 20): the 5D `grid_sample` of the deformable
attention becomes ONNX `GridSample`, which onnxruntime runs on 5D inputs. Retina U-Net also exports with
dynamic batch and spatial axes (`--converter_kwargs "{'input_names': ['image'], 'dynamic_axes':
{'image': {0: 'batch', 2: 'x', 3: 'y', 4: 'z'}}}"`).

Output layouts (eval mode, what inference needs):
    Retina U-Net: `(classification_0, ..., classification_{L-1}, box_regression_0, ..., box_regression_{L-1})`,
        shapes as in `RetinaUNet.forward` (L = number of detection levels), followed by `segmentation` only for
        a network built with `segmentation_at_inference=True` (the branch is skipped in eval mode otherwise).
    Deformable DETR: `(pred_logits [B, Q, K], pred_boxes [B, Q, 6])` of the last decoder layer; the auxiliary
        and two-stage proposal outputs only serve the training losses and are left out.
`tuple_to_network_outputs` turns such a tuple back into the network's dict (without the left-out entries).

What a trace fixes: Python-level shape logic runs once at trace time. Retina U-Net is fully convolutional
(transposed-convolution upsampling), so its trace serves any input whose sides are multiples of the total
stride. Deformable DETR's token grid, voxel centres and proposal boxes are built from the traced input's
shape, so its trace is valid for that input shape only: export it at the bundle's `patch_size` (the model
is trained and applied on that one patch size anyway, see `meddet.networks.deformable_detr`).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

RETINA_UNET = "retina_unet"
DEFORMABLE_DETR = "deformable_detr"
WRAPPED_PREFIX = "network."


def network_outputs_to_tuple(outputs: dict) -> Tuple[torch.Tensor, ...]:
    """A network's output dict -> the flat export tuple (layouts in the module docstring)."""
    if "classification" in outputs and "box_regression" in outputs:
        classification, regression = list(outputs["classification"]), list(outputs["box_regression"])
        if len(classification) != len(regression):
            raise ValueError(
                f"network_outputs_to_tuple: {len(classification)} classification maps but {len(regression)} "
                "box_regression maps; a Retina U-Net gives one of each per detection level"
            )
        segmentation = (outputs["segmentation"],) if outputs.get("segmentation") is not None else ()
        return (*classification, *regression, *segmentation)
    if "pred_logits" in outputs and "pred_boxes" in outputs:
        return outputs["pred_logits"], outputs["pred_boxes"]
    raise ValueError(
        f"network_outputs_to_tuple: unknown output keys {sorted(outputs)}; expected a Retina U-Net "
        "('classification', 'box_regression', 'segmentation') or Deformable DETR ('pred_logits', 'pred_boxes')"
    )


def tuple_to_network_outputs(
    outputs: Sequence[torch.Tensor], family: str
) -> Dict[str, Union[torch.Tensor, List[torch.Tensor]]]:
    """The export tuple of `family` (`"retina_unet"` or `"deformable_detr"`) -> the network's output dict."""
    outputs = list(outputs)
    if family == RETINA_UNET:
        if len(outputs) < 2:
            raise ValueError(
                "tuple_to_network_outputs: a Retina U-Net export gives 2 * levels tensors (+ 1 with segmentation), "
                f"got {len(outputs)}"
            )
        levels = len(outputs) // 2
        rebuilt = {"classification": outputs[:levels], "box_regression": outputs[levels:2 * levels]}
        if len(outputs) % 2:
            rebuilt["segmentation"] = outputs[-1]
        return rebuilt
    if family == DEFORMABLE_DETR:
        if len(outputs) != 2:
            raise ValueError(
                f"tuple_to_network_outputs: a Deformable DETR export gives 2 tensors, got {len(outputs)}"
            )
        return {"pred_logits": outputs[0], "pred_boxes": outputs[1]}
    raise ValueError(f"tuple_to_network_outputs: family must be '{RETINA_UNET}' or '{DEFORMABLE_DETR}', got {family!r}")


def _add_wrapped_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs) -> None:
    """Load-state-dict pre-hook: keys of the bare network (`encoder...`) become `network.encoder...`."""
    wrapped = prefix + WRAPPED_PREFIX
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(wrapped)]:
        state_dict[wrapped + key[len(prefix):]] = state_dict.pop(key)


class TupleOutputNetwork(nn.Module):
    """`network(x)` as a flat tuple of tensors, for `torch.jit.trace` and ONNX export.

    Args:
        network: a `RetinaUNet` or `DeformableDETR` (any module whose output dict
            `network_outputs_to_tuple` knows).

    Forward: `x [B, C, X, Y, Z]` -> tuple of tensors (layouts in the module docstring).
    `load_state_dict` accepts both the bare network's keys (`models/model.pt`) and the wrapper's own
    (`network.`-prefixed) keys. `detection_strides`, `num_classes` and `family` are exposed for tools that
    read them from the exported module's source network.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.detection_strides = tuple(getattr(network, "detection_strides", ()))
        self.num_classes = int(getattr(network, "num_classes", 0))
        self.family = DEFORMABLE_DETR if hasattr(network, "num_queries") else RETINA_UNET
        self.register_load_state_dict_pre_hook(_add_wrapped_prefix)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return network_outputs_to_tuple(self.network(x))
