"""Randomly initialised weights in the layout of torch-fidelity's Inception-v3 (the ADM evaluator's network): the
tests' stand-in for the real weights file, which is never downloaded."""
import math

import torch

from piflow.eval import adm


def random_inception_state(seed: int) -> dict[str, torch.Tensor]:
    """torch-fidelity's Inception-v3 state dict (its converter's keys: no num_batches_tracked) with random weights
    that keep activations O(1): He-normal convolutions, near-identity batch norms, a scaled random classifier."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in adm._inception_network().state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        noise = torch.randn(value.shape, generator=generator)
        if key.endswith("conv.weight"):
            state[key] = noise * math.sqrt(2.0 / value[0].numel())
        elif key.endswith("bn.weight"):
            state[key] = 1.0 + 0.05 * noise
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            state[key] = 0.05 * noise
        elif key.endswith("running_var"):
            state[key] = 1.0 + 0.1 * noise.abs()
        elif key == "fc.weight":
            state[key] = noise * (4.0 / math.sqrt(value.shape[1]))
        else:                                   # fc.bias
            state[key] = noise
    return state
