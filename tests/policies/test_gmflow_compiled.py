"""The fused (torch.compile) no-grad substep gives the plain-PyTorch rollout."""
import warnings

import torch

from piflow.policies import GMFlowPolicy, gmflow
from piflow.rollout import rollout


def test_compiled_rollout_matches_eager():
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(2, 4, 3, 4, 4, generator=gen)
    logweights = torch.log_softmax(torch.randn(2, 4, 1, 4, 4, generator=gen), dim=1)
    x_src = torch.randn(2, 3, 4, 4, generator=gen)
    policy = GMFlowPolicy(means, torch.tensor([-1.0, -0.5]), logweights, x_src, torch.tensor([1.0, 0.8]))
    with torch.no_grad():
        eager = rollout(policy, x_src, policy.sigma_src.flatten(), 0.1, total_substeps=16)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # a missing compiler falls back to eager with a warning
                assert gmflow.enable_compiled_posterior(True)
                fused = rollout(policy, x_src, policy.sigma_src.flatten(), 0.1, total_substeps=16)
        finally:
            gmflow.enable_compiled_posterior(False)
    assert not gmflow.compiled_posterior_enabled()
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
