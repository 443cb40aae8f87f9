"""Load released nnssl pre-training checkpoints into a detector's ResEnc encoder.

Checkpoint format (the released `checkpoint_final.pth` files, loadable with `torch.load(weights_only=True)`):
a plain dict with

- `network_weights`: state dict of the whole pre-training network, e.g. dynamic-network-architectures'
  `ResidualEncoderUNet` (`encoder.stem…`, `encoder.stages…`, `decoder.…`, and `decoder.encoder.…` because the
  decoder holds a reference to the encoder), or an encoder plus a projection head (VoCo). Module aliases make
  one tensor appear under several names: `…convs.0.conv.weight` is `…convs.0.all_modules.0.weight`.
- `nnssl_adaptation_plan`: `architecture_plans` {`arch_class_name` ("ResEncL"), `arch_kwargs` (dict or None)},
  `pretrain_plan` {`configurations`: {name: {`patch_size`, `spacing`, `normalization_schemes`, …}}},
  `pretrain_num_input_channels` (1), `recommended_downstream_patchsize`, `key_to_encoder` ("encoder.stages"),
  `key_to_stem` ("encoder.stem"), `keys_to_in_proj` (module names of the stem's first conv under every alias),
  optionally `key_to_lpe` (vision transformers only).
- optional `citations`, and anything else (ignored).

Transfer (as the release's fine-tuning code does it): the keys under `key_to_stem` and `key_to_encoder` lose that
prefix and are strict-loaded into the encoder's `stem` and `stages`; everything else starts from its own
initialisation. When the target has C input channels and the stem was pre-trained on one, the stem's first conv
weight is repeated C times along the input-channel axis and divided by C, so a C-channel input with identical
channels gives the single-channel response.

Several stems (MultiTalent): the released MultiTalent checkpoints hold one stem per pre-training dataset as
siblings, `encoder.stem.<id>.…` (ResEnc) or `stem.<id>.…` (nnDetection's native backbone); the plan's
`key_to_stem` names the default one (the CT stem, id `351_0`), and another is chosen by its prefix (the release's
`stem_override`, e.g. `encoder.stem.004`). Here `stem=` takes that prefix, the bare id, or an index into
`available_stems`. Stems are recognised as the siblings of the default stem with the same tensor names; the stem's
input-projection names are the plan's `keys_to_in_proj` with the default stem's prefix replaced by the chosen one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from meddet.networks.wrappers import unwrap

logger = logging.getLogger("meddet.pretrained")

WEIGHTS_KEY = "network_weights"
PLAN_KEY = "nnssl_adaptation_plan"
# the encoder's submodules that receive the stem and the stages (as in dynamic-network-architectures' ResidualEncoder)
STEM_NAME = "stem"
STAGES_NAME = "stages"

StemChoice = Union[None, int, str]


# ---------------------------------------------------------------------------------------------- reading


def fetch_instructions(path: str, fetch_hint: str = "") -> str:
    """How to get a missing checkpoint: the bundle download command (bundle = parent of the `models` folder the
    file belongs in, when it does) and, if given, the caller's hint (e.g. the download URL)."""
    directory = os.path.dirname(os.path.abspath(path))
    bundle = os.path.dirname(directory) if os.path.basename(directory) == "models" else "<bundle directory>"
    text = f"fetch it with `python -m monai.bundle download_large_files --bundle_path {bundle}`"
    if fetch_hint:
        text += f" (source: {fetch_hint})"
    return text


def read_checkpoint(path: str, fetch_hint: str = "") -> dict:
    """Read a released nnssl checkpoint: `torch.load(path, map_location="cpu", weights_only=True)` and checks.

    Raises FileNotFoundError (saying how to fetch the file) when it does not exist, and ValueError naming the file
    when it cannot be read, is not a dict, or lacks `network_weights` / `nnssl_adaptation_plan`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pre-trained checkpoint '{path}' does not exist; {fetch_instructions(path, fetch_hint)}"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated downloads and Git LFS pointer files end up here
        raise ValueError(
            f"pre-trained checkpoint '{path}' cannot be read with torch.load(weights_only=True) ({error}); if it is a "
            f"partial download or a Git LFS pointer, {fetch_instructions(path, fetch_hint)}"
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"pre-trained checkpoint '{path}' holds a {type(checkpoint).__name__}, not a dict; an nnssl checkpoint "
            f"is a dict with '{WEIGHTS_KEY}' and '{PLAN_KEY}'"
        )
    missing = [key for key in (WEIGHTS_KEY, PLAN_KEY) if key not in checkpoint]
    if missing:
        raise ValueError(
            f"pre-trained checkpoint '{path}' has no {' or '.join(repr(k) for k in missing)} (its keys: "
            f"{sorted(map(str, checkpoint))}); expected the nnssl release format"
        )
    for key in (WEIGHTS_KEY, PLAN_KEY):
        if not isinstance(checkpoint[key], Mapping):
            raise ValueError(
                f"pre-trained checkpoint '{path}': '{key}' is a {type(checkpoint[key]).__name__}, not a dict"
            )
    return dict(checkpoint)


def _plan_entry(checkpoint: Mapping, key: str, source: str):
    plan = checkpoint[PLAN_KEY]
    value = plan.get(key)
    if not value:
        raise ValueError(f"{source}: the adaptation plan has no '{key}' (plan keys: {sorted(map(str, plan))})")
    return value


# ---------------------------------------------------------------------------------------------- stems


def _children(weights: Mapping, parent: str) -> Dict[str, set]:
    """For every direct child of `parent` (a key prefix, '' for the top level): the set of its relative key names."""
    head = parent + "." if parent else ""
    children: Dict[str, set] = {}
    for key in weights:
        if key.startswith(head):
            name, _, rest = key[len(head):].partition(".")
            if rest:
                children.setdefault(head + name, set()).add(rest)
    return children


def available_stems(checkpoint: Mapping, source: str = "checkpoint") -> List[str]:
    """Prefixes of every stem in the checkpoint, in storage order; the plan's `key_to_stem` is one of them.

    A single-stem checkpoint gives `["encoder.stem"]`; a MultiTalent one e.g.
    `["encoder.stem.351_0", "encoder.stem.004", …]`.
    """
    default = _plan_entry(checkpoint, "key_to_stem", source)
    children = _children(checkpoint[WEIGHTS_KEY], default.rpartition(".")[0])
    if default not in children:
        raise ValueError(f"{source}: no weights under the plan's key_to_stem '{default}'")
    structure = children[default]
    return [prefix for prefix, names in children.items() if names == structure]


def select_stem(checkpoint: Mapping, stem: StemChoice = None, source: str = "checkpoint") -> str:
    """Prefix of the stem to load: the plan's default for None, else by prefix, bare id or index."""
    default = _plan_entry(checkpoint, "key_to_stem", source)
    if stem is None or stem == "":
        return default
    stems = available_stems(checkpoint, source)
    ids = [prefix.rpartition(".")[2] for prefix in stems]
    listing = f"available stems: {ids} (prefixes {stems}; default '{default}')"
    if isinstance(stem, int) and not isinstance(stem, bool):
        if not -len(stems) <= stem < len(stems):
            raise ValueError(f"{source}: stem index {stem} is out of range; {listing}")
        return stems[stem]
    if isinstance(stem, str):
        if stem in stems:
            return stem
        if stem in ids:
            return stems[ids.index(stem)]
    raise ValueError(f"{source}: unknown stem {stem!r}; {listing}")


def _in_projection_names(checkpoint: Mapping, stem_prefix: str, source: str) -> List[str]:
    """Module names of the chosen stem's first conv under every alias, relative to the stem ('convs.0.conv', …)."""
    default = _plan_entry(checkpoint, "key_to_stem", source)
    keys = checkpoint[PLAN_KEY].get("keys_to_in_proj") or (
        f"{default}.convs.0.conv", f"{default}.convs.0.all_modules.0"
    )
    names = []
    for key in keys:
        if not (key == default or key.startswith(default + ".")):
            raise ValueError(f"{source}: keys_to_in_proj entry '{key}' does not lie under key_to_stem '{default}'")
        names.append(key[len(default) + 1:])
    return names


# ---------------------------------------------------------------------------------------------- state dicts


def encoder_state_dict(
    checkpoint: Mapping, stem: StemChoice = None, source: str = "checkpoint"
) -> Dict[str, torch.Tensor]:
    """The chosen stem and the encoder stages, renamed to the encoder's own names (`stem.…`, `stages.…`).

    Every alias name is kept (dynamic-network-architectures' encoder registers the same aliases, so the result
    strict-loads into it); the decoder's references to the encoder (`decoder.encoder.…`), other stems, the
    decoder and projection heads are left out.
    """
    weights = checkpoint[WEIGHTS_KEY]
    stem_prefix = select_stem(checkpoint, stem, source)
    encoder_prefix = _plan_entry(checkpoint, "key_to_encoder", source)
    state: Dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key.startswith(stem_prefix + "."):
            state[f"{STEM_NAME}.{key[len(stem_prefix) + 1:]}"] = value
        elif key.startswith(encoder_prefix + "."):
            state[f"{STAGES_NAME}.{key[len(encoder_prefix) + 1:]}"] = value
    if not any(key.startswith(STAGES_NAME + ".") for key in state):
        raise ValueError(f"{source}: no weights under the plan's key_to_encoder '{encoder_prefix}'")
    return state


def adapt_input_channels(
    state: Mapping[str, torch.Tensor], in_proj_keys: Sequence[str], channels: int
) -> Dict[str, torch.Tensor]:
    """Fit a single-channel input projection to `channels` input channels; returns a new dict.

    `in_proj_keys` are module names of the same conv under every alias (their `.weight` entries are changed;
    the bias is per output channel and stays). The weight `[O, 1, kx, ky, kz]` becomes
    `[O, C, kx, ky, kz]` = repeated C times along axis 1 and divided by C, one tensor for all alias names.
    A weight that already has `channels` input channels is returned unchanged.
    """
    channels = int(channels)
    if channels < 1:
        raise ValueError(f"adapt_input_channels: channels must be >= 1, got {channels}")
    weight_keys = [key if key.endswith(".weight") else f"{key}.weight" for key in in_proj_keys]
    present = [key for key in weight_keys if key in state]
    if not present:
        raise ValueError(
            f"adapt_input_channels: none of the input-projection weights {weight_keys} is in the state dict"
        )
    weight = state[present[0]]
    adapted = dict(state)
    if weight.shape[1] == channels:
        return adapted
    if weight.shape[1] != 1:
        raise ValueError(
            f"adapt_input_channels: '{present[0]}' has {weight.shape[1]} input channels; only a single-channel input "
            f"projection can be spread over {channels} channels"
        )
    repeated = weight.repeat(1, channels, *([1] * (weight.ndim - 2))) / channels
    for key in present:
        adapted[key] = repeated
    return adapted


# ---------------------------------------------------------------------------------------------- loading


def detector_encoder(network: nn.Module) -> nn.Module:
    """`network.encoder` of a (possibly wrapped) detector network."""
    encoder = getattr(unwrap(network), "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise TypeError(
            f"{type(unwrap(network)).__name__} has no 'encoder' submodule; pre-trained weights are loaded into "
            "network.encoder"
        )
    return encoder


def strict_load(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> Tuple[int, int]:
    """Strict-load `state` into `module` after checking every name and shape.

    On a mismatch raises ValueError naming `source`, the first offending key (in the module's order, then the
    checkpoint's extra keys) and both shapes. Returns (distinct tensors loaded, values in them): aliases of one
    tensor count once.
    """
    target = module.state_dict(keep_vars=True)
    problem = None
    for key, tensor in target.items():
        if key not in state:
            problem = (key, "missing", tuple(tensor.shape))
        elif tuple(state[key].shape) != tuple(tensor.shape):
            problem = (key, tuple(state[key].shape), tuple(tensor.shape))
        if problem:
            break
    if problem is None:
        extra = [key for key in state if key not in target]
        if extra:
            problem = (extra[0], tuple(state[extra[0]].shape), "missing")
    if problem:
        key, checkpoint_shape, network_shape = problem
        raise ValueError(
            f"pre-trained checkpoint '{source}' does not fit the network's {type(module).__name__}: first mismatch at "
            f"'{key}': checkpoint shape {checkpoint_shape}, network shape {network_shape} (is the architecture the "
            "one the checkpoint was pre-trained with?)"
        )
    module.load_state_dict(state, strict=True)
    distinct = {id(tensor): tensor for tensor in target.values()}
    return len(distinct), sum(tensor.numel() for tensor in distinct.values())


def _input_channels(target: Mapping[str, torch.Tensor], weight_keys: Sequence[str], source: str) -> int:
    for key in weight_keys:
        if key in target:
            return int(target[key].shape[1])
    raise ValueError(f"{source}: the network's encoder has none of the input-projection weights {list(weight_keys)}")


def load_pretrained_encoder(
    network: nn.Module,
    checkpoint_path: str,
    in_channels: Optional[int] = None,
    stem: StemChoice = None,
    fetch_hint: str = "",
) -> dict:
    """Strict-load a released nnssl checkpoint's stem + stages into `network.encoder`; nothing else changes.

    Args:
        network: detector holding its encoder as `network.encoder` (DDP / compile wrappers are unwrapped).
        checkpoint_path: released `checkpoint_final.pth` (or one written by `make_nnssl_checkpoint`).
        in_channels: input channels of the network; None reads them off the encoder's first conv.
        stem: stem to load from a multi-stem checkpoint (prefix, id or index); None = the plan's default.
        fetch_hint: where to get the file, added to the error when it is missing.

    Returns (and logs to `meddet.pretrained`) {"tensors", "parameters", "checkpoint", "stem"}: distinct tensors
    and values loaded, the file, and the stem prefix used.
    """
    path = os.fspath(checkpoint_path)
    checkpoint = read_checkpoint(path, fetch_hint)
    encoder = detector_encoder(network)
    stem_prefix = select_stem(checkpoint, stem, path)
    state = encoder_state_dict(checkpoint, stem_prefix, path)
    in_proj = [f"{STEM_NAME}.{name}" for name in _in_projection_names(checkpoint, stem_prefix, path)]
    if in_channels is None:
        in_channels = _input_channels(encoder.state_dict(), [f"{key}.weight" for key in in_proj], path)
    state = adapt_input_channels(state, in_proj, in_channels)
    tensors, parameters = strict_load(encoder, state, path)
    report = {"tensors": tensors, "parameters": parameters, "checkpoint": path, "stem": stem_prefix}
    logger.info(
        "loaded %d pre-trained tensors (%.2f M parameters) into the encoder from %s (stem '%s', %d input channels)",
        tensors, parameters / 1e6, path, stem_prefix, in_channels,
    )
    return report


# ---------------------------------------------------------------------------------------------- writing


def make_nnssl_checkpoint(
    network_weights: Mapping[str, torch.Tensor],
    path: str,
    arch_kwargs: Optional[Mapping],
    arch_class_name: str = "ResEncL",
    key_to_encoder: str = "encoder.stages",
    key_to_stem: str = "encoder.stem",
    keys_to_in_proj: Optional[Sequence[str]] = None,
    pretrain_patch_size: Sequence[int] = (160, 160, 160),
    pretrain_spacing: Optional[Sequence[float]] = (1.0, 1.0, 1.0),
    normalization_schemes: Sequence[str] = ("ZScoreNormalization",),
    configuration_name: str = "onemmiso",
    recommended_downstream_patchsize: Sequence[int] = (160, 160, 160),
    pretrain_num_input_channels: int = 1,
    citations: Optional[Sequence[Mapping]] = None,
    arch_kwargs_requiring_import: Optional[Sequence[str]] = None,
    extra: Optional[Mapping] = None,
) -> str:
    """Write `network_weights` as a checkpoint in the nnssl release format (see the module docstring); returns path.

    `keys_to_in_proj` defaults to the ResEnc stem's first conv under both of its names. The pre-training plan is
    reduced to one configuration (`configuration_name`: patch size, spacing, normalisation); VoCo's release, for
    example, has a 192x192x64 pre-training patch. `arch_kwargs_requiring_import` lists the `arch_kwargs` entries
    that are dotted class names; `extra` adds top-level entries (e.g. `trainer_name`, `current_epoch`). Only plain
    Python values and tensors are written, so `torch.load(weights_only=True)` reads it back. The file is written
    to a temporary name and renamed, so an interrupted write never leaves a truncated checkpoint behind.
    """
    if keys_to_in_proj is None:
        keys_to_in_proj = (f"{key_to_stem}.convs.0.conv", f"{key_to_stem}.convs.0.all_modules.0")
    plan = {
        "architecture_plans": {
            "arch_class_name": str(arch_class_name),
            "arch_kwargs": None if arch_kwargs is None else _plain(arch_kwargs),
            "arch_kwargs_requiring_import": (None if arch_kwargs_requiring_import is None
                                             else [str(k) for k in arch_kwargs_requiring_import]),
        },
        "pretrain_plan": {
            "configurations": {
                str(configuration_name): {
                    "patch_size": [int(s) for s in pretrain_patch_size],
                    "spacing": None if pretrain_spacing is None else [float(s) for s in pretrain_spacing],
                    "normalization_schemes": [str(n) for n in normalization_schemes],
                }
            }
        },
        "pretrain_num_input_channels": int(pretrain_num_input_channels),
        "recommended_downstream_patchsize": [int(s) for s in recommended_downstream_patchsize],
        "key_to_encoder": str(key_to_encoder),
        "key_to_stem": str(key_to_stem),
        "keys_to_in_proj": [str(k) for k in keys_to_in_proj],
        "key_to_lpe": None,
    }
    checkpoint = {WEIGHTS_KEY: dict(network_weights), PLAN_KEY: plan}
    if citations is not None:
        checkpoint["citations"] = [_plain(c) for c in citations]
    for key, value in (extra or {}).items():
        checkpoint[str(key)] = _plain(value)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.fspath(path) + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return os.fspath(path)


def _plain(value):
    """Nested dicts / sequences of JSON-like values -> plain dicts and lists (safe for weights_only loading)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"make_nnssl_checkpoint: {value!r} ({type(value).__name__}) is not a plain JSON-like value")
