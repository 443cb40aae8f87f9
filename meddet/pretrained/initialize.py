"""What a bundle's `initialize` calls: the released checkpoint's loader chosen by the network's encoder.

Kept apart from the two loaders (`nnssl` for ResEnc checkpoints, `native` for the nnDetection-backbone
MultiTalent fusion, which builds on `nnssl`) so that neither imports the other's dispatcher.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from torch import nn

from meddet.networks.nndet_backbone import NNDetEncoder
from meddet.pretrained.native import load_native_multitalent
from meddet.pretrained.nnssl import StemChoice, detector_encoder, load_pretrained_encoder

logger = logging.getLogger(__name__)


def initialize_from_pretrained(
    network: nn.Module,
    checkpoint_path: Optional[str],
    in_channels: int = 1,
    stem: StemChoice = None,
    fetch_hint: str = "",
    missing_hint: str = "",
) -> Optional[dict]:
    """What a bundle's `initialize` calls: load pre-trained encoder weights, or nothing for a scratch bundle.

    An empty or None `checkpoint_path` does nothing and returns None. A set path must exist (FileNotFoundError
    otherwise, saying how to get it: `missing_hint` when given, e.g. how to pre-train a smoke-size checkpoint, else
    the download command with `fetch_hint`): a pre-trained bundle never silently trains from scratch. Networks on
    nnDetection's native encoder (`NNDetEncoder`) get the native MultiTalent fusion
    (`meddet.pretrained.native.load_native_multitalent`), all others `load_pretrained_encoder`.
    """
    if checkpoint_path is None or not str(checkpoint_path).strip():
        logger.info("no pre-trained checkpoint configured; the network keeps its own initialisation")
        return None
    if missing_hint and not os.path.isfile(os.fspath(checkpoint_path)):
        raise FileNotFoundError(f"pre-trained checkpoint '{checkpoint_path}' does not exist; {missing_hint}")
    if isinstance(detector_encoder(network), NNDetEncoder):
        return load_native_multitalent(
            network, checkpoint_path, in_channels=in_channels, stem=stem, fetch_hint=fetch_hint
        )
    return load_pretrained_encoder(network, checkpoint_path, in_channels=in_channels, stem=stem, fetch_hint=fetch_hint)
