"""Released pre-trained encoders: nnssl checkpoints (ResEnc-L) and the native-backbone MultiTalent fusion."""

from meddet.pretrained.initialize import initialize_from_pretrained
from meddet.pretrained.native import load_native_multitalent, native_encoder_state_dict
from meddet.pretrained.nnssl import (
    adapt_input_channels,
    available_stems,
    encoder_state_dict,
    load_pretrained_encoder,
    make_nnssl_checkpoint,
    read_checkpoint,
    select_stem,
)

__all__ = [
    "adapt_input_channels",
    "available_stems",
    "encoder_state_dict",
    "initialize_from_pretrained",
    "load_native_multitalent",
    "load_pretrained_encoder",
    "make_nnssl_checkpoint",
    "native_encoder_state_dict",
    "read_checkpoint",
    "select_stem",
]
