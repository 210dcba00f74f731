"""The fused GM rollout (the default) gives the plain-PyTorch rollout, values and gradients."""
import pytest
import torch

from piflow.kernels import gm_rollout_library
from piflow.policies import GMFlowPolicy, gmflow
from piflow.rollout import rollout

needs_kernel = pytest.mark.skipif(gm_rollout_library() is None, reason="no C compiler for the fused GM kernel")


def _policy(batch, components, channels, spatial, seed=0, requires_grad=False, sigma_src=None):
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(batch, components, channels, *spatial, generator=gen).requires_grad_(requires_grad)
    logits = torch.randn(batch, components, 1, *spatial, generator=gen).requires_grad_(requires_grad)
    logstds = (torch.rand(batch, generator=gen) - 1.5).requires_grad_(requires_grad)
    x_src = torch.randn(batch, channels, *spatial, generator=gen)
    if sigma_src is None:
        sigma_src = 0.5 + 0.5 * torch.rand(batch, generator=gen)
    policy = GMFlowPolicy(means, logstds, torch.log_softmax(logits, dim=1), x_src, sigma_src)
    return policy, (means, logits, logstds)


def _eager(fn):
    with gmflow.fused_rollout(False):
        return fn()


@needs_kernel
@pytest.mark.parametrize("batch,components,channels,spatial", [
    (3, 5, 3, (4, 4)),       # images, 16 pixels per sample: blocks inside one sample
    (11, 8, 2, ()),          # 2-D points: one pixel per sample, blocks span samples, a short last block
    (2, 1, 4, (3, 5)),       # K = 1
    (5, 32, 4, (2, 3, 3)),   # video-shaped, K = 32
])
def test_fused_rollout_matches_eager(batch, components, channels, spatial):
    policy, _ = _policy(batch, components, channels, spatial)
    sigma_dst = torch.linspace(0.0, 0.4, batch)                  # per-sample substep counts differ
    with torch.no_grad():
        assert policy.fixed_batch
        fused = rollout(policy, policy.x_src, policy.sigma_src.flatten(), sigma_dst, total_substeps=64, shift=3.0)
        eager = _eager(lambda: rollout(policy, policy.x_src, policy.sigma_src.flatten(), sigma_dst,
                                       total_substeps=64, shift=3.0))
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_fused_rollout_handles_dropped_components_and_temperature():
    """GM dropout (−∞ logits) and a sharp temperature (large logits) stay exact in the kernel's exp."""
    policy, _ = _policy(6, 8, 3, (4, 4), seed=1)
    policy = policy.dropout(0.6, generator=torch.Generator().manual_seed(0)).temperature(0.3)
    assert bool(torch.isinf(policy.logits).any())
    with torch.no_grad():
        fused = rollout(policy, policy.x_src, policy.sigma_src.flatten(), 0.0, total_substeps=128)
        eager = _eager(lambda: rollout(policy, policy.x_src, policy.sigma_src.flatten(), 0.0, total_substeps=128))
    assert bool(torch.isfinite(fused).all())
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_fused_rollout_gradients_equal_eager_autograd():
    policy, leaves = _policy(4, 6, 3, (3, 3), seed=2, requires_grad=True)
    sigma_dst = torch.tensor([0.2, 0.5, 0.0, 0.6])
    weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(3))
    fused = rollout(policy, policy.x_src, policy.sigma_src.flatten(), sigma_dst, total_substeps=32)
    grads = torch.autograd.grad((fused * weight).sum(), leaves)
    policy_again, leaves_again = _policy(4, 6, 3, (3, 3), seed=2, requires_grad=True)
    eager = _eager(lambda: rollout(policy_again, policy_again.x_src, policy_again.sigma_src.flatten(), sigma_dst,
                                   total_substeps=32))
    eager_grads = torch.autograd.grad((eager * weight).sum(), leaves_again)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_fused_rollout_gradient_matches_finite_differences():
    """d loss / d θ of the fused rollout against central differences of the fused rollout itself (float32)."""
    policy, (means, logits, logstds) = _policy(2, 3, 2, (2,), seed=4, requires_grad=True,
                                               sigma_src=torch.tensor([1.0, 0.8]))
    x_src, sigma_src = policy.x_src, policy.sigma_src.flatten()
    weight = torch.randn(2, 2, 2, generator=torch.Generator().manual_seed(5))

    def loss(m, lg, ls):
        built = GMFlowPolicy(m, ls, torch.log_softmax(lg, dim=1), x_src, sigma_src)
        return (rollout(built, x_src, sigma_src, torch.tensor([0.3, 0.1]), total_substeps=16) * weight).sum()

    grads = torch.autograd.grad(loss(means, logits, logstds), (means, logits, logstds))
    step = 1e-2
    with torch.no_grad():
        for leaf, grad in zip((means, logits, logstds), grads):
            flat = leaf.detach().clone().reshape(-1)
            for index in range(flat.numel()):
                values = []
                for sign in (1, -1):
                    shifted = flat.clone()
                    shifted[index] += sign * step
                    args = [shifted.reshape(leaf.shape) if other is leaf else other.detach()
                            for other in (means, logits, logstds)]
                    values.append(float(loss(*args)))
                numeric = (values[0] - values[1]) / (2 * step)
                assert abs(numeric - float(grad.reshape(-1)[index])) <= 2e-3 + 2e-3 * abs(numeric), \
                    (leaf.shape, index, numeric, float(grad.reshape(-1)[index]))


def test_fused_rollout_can_be_turned_off():
    policy, _ = _policy(2, 3, 2, (2, 2))
    gmflow.set_fused_rollout(False)
    try:
        assert not gmflow.fused_rollout_enabled() and not policy.fixed_batch
        with gmflow.fused_rollout(True):
            assert gmflow.fused_rollout_enabled()
        assert not gmflow.fused_rollout_enabled()          # the block restores the previous setting
    finally:
        gmflow.set_fused_rollout(True)
    assert gmflow.fused_rollout_enabled()


@needs_kernel
def test_fused_rollout_split_over_threads_matches_one_thread():
    """The pixels split into per-thread ranges (whole 8-pixel blocks, one range crossing samples) change nothing."""
    policy, _ = _policy(5, 4, 3, (15, 15), seed=6)                    # 1125 pixels: ranges of 376, 376, 373
    sigma_dst = torch.tensor([0.0, 0.2, 0.4, 0.1, 0.3])
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            with torch.no_grad():
                outputs.append(rollout(policy, policy.x_src, policy.sigma_src.flatten(), sigma_dst,
                                       total_substeps=32))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    eager = _eager(lambda: rollout(policy, policy.x_src, policy.sigma_src.flatten(), sigma_dst, total_substeps=32))
    torch.testing.assert_close(outputs[0], eager, rtol=1e-5, atol=1e-5)
