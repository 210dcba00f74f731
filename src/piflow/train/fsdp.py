"""FSDP2 for LoRA students: shard the frozen base weights over ranks, keep the small trainable tensors whole.

`shard_frozen_base` applies ``torch.distributed.fsdp.fully_shard`` to every transformer block and then to the
transformer, with the trainable parameters (LoRA, heads, final norm) passed as ``ignored_params``: each rank stores
1/world of the 12B/20B base (gathered block by block during forward passes, for the student and the teacher alike),
while the trainable tensors stay ordinary replicated tensors whose gradients the training loop averages exactly as
under DDP. So checkpoints, EMA, clipping and adapters work unchanged, and the update equals DDP's (tested on CPU).
"""
from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "joint_transformer_blocks", "blocks", "layers")


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a diffusers transformer (the FSDP units)."""
    blocks: list[nn.Module] = []
    for name in BLOCK_LISTS:
        value = getattr(transformer, name, None)
        if isinstance(value, nn.ModuleList):
            blocks.extend(value)
    return blocks


def is_fsdp_module(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def shard_frozen_base(transformer: nn.Module, blocks: Optional[Iterable[nn.Module]] = None,
                      reshard_after_forward: bool = True) -> nn.Module:
    """Shard `transformer`'s frozen parameters block by block over the default process group (call after the
    LoRA adapter and the student's trainable modules exist, before the optimizer is built)."""
    import inspect

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as error:  # pragma: no cover - old torch
        raise ImportError("parallel=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6)") from error
    if "ignored_params" not in inspect.signature(fully_shard).parameters:  # pragma: no cover - old torch
        raise ImportError("parallel=fsdp needs a torch whose fully_shard takes ignored_params (tested with 2.13)")
    trainable = {param for param in transformer.parameters() if param.requires_grad}
    units = list(blocks) if blocks is not None else transformer_blocks(transformer)
    if not units:
        raise ValueError(f"{type(transformer).__name__} has none of the block lists {BLOCK_LISTS}; pass blocks=")
    for block in units:
        fully_shard(block, ignored_params={p for p in block.parameters() if p in trainable},
                    reshard_after_forward=reshard_after_forward)
    # The root group (embedders, final norm and projection: small) stays gathered after forward: the student reads
    # the tokens entering `proj_out` through a hook and discards the model output, so FSDP's pre-backward hook on
    # that output never fires to gather the root parameters again for backward.
    fully_shard(transformer, ignored_params=trainable, reshard_after_forward=False)
    return transformer
