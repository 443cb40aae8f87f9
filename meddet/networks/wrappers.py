"""The module inside the wrappers training puts around a network: DistributedDataParallel / DataParallel
(`.module`) and torch.compile (`._orig_mod`). One walk, used wherever a wrapped network's own attributes, state
dict or parameters are needed (detectors, pre-trained loading, freezing, checkpoints)."""

from __future__ import annotations

from torch import nn


def wrapper_chain(network: nn.Module) -> list[nn.Module]:
    """`network` and every module it wraps: DistributedDataParallel / DataParallel (`.module`), torch.compile
    (`._orig_mod`), outermost first."""
    chain = [network]
    while True:
        inner = getattr(chain[-1], "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(chain[-1], "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return chain
        chain.append(inner)


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    return wrapper_chain(network)[-1]
