"""Tests for piflow.policies.gmflow.GMFlowPolicy against brute-force numerical integration (float64)."""
import math

import pytest
import torch

from piflow.policies.gmflow import GMFlowPolicy, gm_posterior_x0

pytestmark = pytest.mark.usefixtures("single_thread")

def _grid(lo, hi, n):
    a1 = torch.linspace(float(lo[0]), float(hi[0]), n, dtype=torch.float64)
    a2 = torch.linspace(float(lo[1]), float(hi[1]), n, dtype=torch.float64)
    g1, g2 = torch.meshgrid(a1, a2, indexing="ij")
    return torch.stack([g1.reshape(-1), g2.reshape(-1)], dim=1)         # (n², 2)


def _log_integrand(grid, mu, logw, var, x_src, sigma_src, x_t, sigma_t):
    a_s, a_t = 1 - sigma_src, 1 - sigma_t
    d2 = ((grid[:, None, :] - mu[None]) ** 2).sum(-1)                  # (G, K)
    log_gm = torch.logsumexp(logw[None] - 0.5 * d2 / var, dim=1)       # (G,) (shared normaliser dropped)
    log_ratio = (-0.5 * ((x_t - a_t * grid) ** 2).sum(-1) / sigma_t ** 2
                 + 0.5 * ((x_src - a_s * grid) ** 2).sum(-1) / sigma_src ** 2)
    return log_gm + log_ratio


def brute_posterior_mean(mu, logw, var, x_src, sigma_src, x_t, sigma_t, lim=12.0):
    """∫ x0 q(x0|x_src) N(x_t; α_t x0, σ_t²)/N(x_src; α_s x0, σ_s²) dx0 / ∫ (same) on a 2-D grid, float64.

    mu (K, 2) x0-space means, logw (K,) (unnormalised ok), var: scalar isotropic variance, x_src/x_t (2,).
    A coarse grid on [-lim, lim]² locates the mass; a fine 161² grid over its bounding box does the integral.
    """
    args = (mu.double(), logw.double(), float(var), x_src.double(), float(sigma_src), x_t.double(),
            float(sigma_t))
    coarse = _grid((-lim, -lim), (lim, lim), 121)
    log_int = _log_integrand(coarse, *args)
    peak = log_int.max()
    border = (coarse.abs() >= lim - 1e-9).any(dim=1)
    assert float(log_int[border].max() - peak) < -60, "coarse grid does not cover the posterior"
    support = coarse[log_int > peak - 60]
    step = 2 * lim / 120
    lo, hi = support.min(0).values - 2 * step, support.max(0).values + 2 * step
    fine = _grid(lo, hi, 161)
    log_int = _log_integrand(fine, *args)
    weight = torch.exp(log_int - log_int.max())
    border = ((fine - lo).abs() < 1e-12).any(1) | ((fine - hi).abs() < 1e-12).any(1)
    assert float(weight[border].max()) < 1e-20, "fine grid does not cover the posterior"
    return (weight[:, None] * fine).sum(0) / weight.sum()


def brute_gm_mean_tempered(mu, logw, var, temperature, x_src, sigma_src, x_t, sigma_t):
    """Posterior mean of the tempered GM (weights ∝ w^(1/T), variance v·T) by brute force."""
    return brute_posterior_mean(mu, torch.log_softmax(logw.double(), 0) / temperature, var * temperature,
                                x_src, sigma_src, x_t, sigma_t)


def make_case(seed, batch=3, K=4, spatial=(), sigma_src=(0.9, 0.6, 0.35), scale=1.0):
    """A random x0-space GM per sample (and per pixel), returned as u-space network outputs."""
    g = torch.Generator().manual_seed(seed)
    C = 2
    sigma = torch.tensor(sigma_src[:batch], dtype=torch.float64)
    view = (batch, 1, 1) + (1,) * len(spatial)
    mu_x0 = torch.randn(batch, K, C, *spatial, generator=g, dtype=torch.float64) * scale
    logits = torch.randn(batch, K, 1, *spatial, generator=g, dtype=torch.float64)
    logweights = torch.log_softmax(logits, dim=1)
    s = 0.3 + 0.6 * torch.rand(batch, generator=g, dtype=torch.float64)        # u-space std per sample
    # x_src drawn from the chain: x_src = α_s·x0 + σ_s·ε with x0 near one of the means
    x_src = ((1 - sigma.reshape(batch, 1, *(1,) * len(spatial))) * mu_x0[:, 0]
             + sigma.reshape(batch, 1, *(1,) * len(spatial)) * torch.randn(batch, C, *spatial, generator=g,
                                                                         dtype=torch.float64))
    means_u = (x_src.unsqueeze(1) - mu_x0) / sigma.reshape(view)
    logstds = torch.log(s).reshape(view)
    return dict(means=means_u.float(), logstds=logstds.float(), logweights=logweights.float(),
                x_src=x_src.float(), sigma=sigma.float(), mu_x0=mu_x0, logw=logweights, var=(s * sigma) ** 2,
                gen=g)


def x0_gm_of(case):
    """The x0-space GM exactly as the policy should see it (recomputed from the float32 inputs)."""
    sigma = case["sigma"].double()
    view = (-1,) + (1,) * (case["means"].dim() - 1)
    mu = case["x_src"].double().unsqueeze(1) - sigma.reshape(view) * case["means"].double()
    var = torch.exp(2 * case["logstds"].double().reshape(-1)) * sigma ** 2
    return mu, case["logweights"].double(), var


@pytest.mark.parametrize("seed", [0])
def test_posterior_mean_matches_brute_force(seed):
    case = make_case(seed)
    policy = GMFlowPolicy(case["means"], case["logstds"], case["logweights"], case["x_src"], case["sigma"])
    mu, logw, var = x0_gm_of(case)
    g = case["gen"]
    B = 3
    for frac in (1.0, 0.97, 0.7, 0.4):
        sigma_t = case["sigma"] * frac
        # x_t: moved away from x_src (including at σ_t = σ_src, where the general formula must be used)
        x_t = ((1 - sigma_t[:, None]) / (1 - case["sigma"][:, None])) * case["x_src"] \
            + 0.3 * torch.randn(B, 2, generator=g).float()
        got = policy.x0(x_t, sigma_t)
        u_got = policy.velocity(x_t, sigma_t)
        for b in range(B):
            ref = brute_posterior_mean(mu[b], logw[b, :, 0], var[b], case["x_src"][b], float(case["sigma"][b]),
                                       x_t[b], float(sigma_t[b]))
            torch.testing.assert_close(got[b].double(), ref, rtol=0, atol=1e-4)
            u_ref = (x_t[b].double() - ref) / float(sigma_t[b])
            torch.testing.assert_close(u_got[b].double(), u_ref, rtol=0, atol=1e-4 / float(sigma_t[b]))


def test_posterior_mean_matches_brute_force_pixelwise():
    B, H, W = 2, 2, 2
    case = make_case(7, batch=B, spatial=(H, W), sigma_src=(0.8, 0.5))
    policy = GMFlowPolicy(case["means"], case["logstds"], case["logweights"], case["x_src"], case["sigma"])
    mu, logw, var = x0_gm_of(case)
    g = case["gen"]
    sigma_t = case["sigma"] * torch.tensor([0.6, 0.3])
    x_t = ((1 - sigma_t.reshape(B, 1, 1, 1)) / (1 - case["sigma"].reshape(B, 1, 1, 1))) * case["x_src"] \
        + 0.3 * torch.randn(B, 2, H, W, generator=g)
    got = policy.x0(x_t, sigma_t)
    assert got.shape == (B, 2, H, W)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                ref = brute_posterior_mean(mu[b, :, :, i, j], logw[b, :, 0, i, j], var[b],
                                           case["x_src"][b, :, i, j], float(case["sigma"][b]),
                                           x_t[b, :, i, j], float(sigma_t[b]))
                torch.testing.assert_close(got[b, :, i, j].double(), ref, rtol=0, atol=1e-4)


def test_source_state_gives_mixture_mean_fast_and_general_path():
    case = make_case(3)
    policy = GMFlowPolicy(case["means"], case["logstds"], case["logweights"], case["x_src"], case["sigma"])
    mu, logw, var = x0_gm_of(case)
    mix = (torch.softmax(logw, dim=1) * mu).sum(1)                         # Σ softmax(a)·μ_x0, float64
    # fast path (exact equality, float or (B,) sigma, the same or a copied x)
    for x_t, s in ((case["x_src"], case["sigma"]), (case["x_src"].clone(), case["sigma"].clone()),
                   (case["x_src"].clone(), case["sigma"].reshape(3, 1))):
        torch.testing.assert_close(policy.x0(x_t, s).double(), mix, rtol=0, atol=1e-5)
        torch.testing.assert_close(policy.velocity(x_t, s).double(),
                                   (case["x_src"].double() - mix) / case["sigma"].double()[:, None],
                                   rtol=0, atol=1e-4)
    # general formula with ζ = 0, ν = 0 is the same value (D = 1)
    x_src = case["x_src"]
    general = gm_posterior_x0(policy.means, policy.means_sq, policy.logits, policy.var,
                              torch.zeros(3, 1, 1), torch.zeros_like(x_src), 1e-6)
    torch.testing.assert_close(general.double(), mix, rtol=0, atol=1e-5)
    # general path just below σ_src (no exact equality) is continuous with the fast path
    s_below = case["sigma"] * (1 - 1e-7)
    assert not torch.equal(s_below, case["sigma"])
    torch.testing.assert_close(policy.x0(x_src.clone(), s_below).double(), mix, rtol=0, atol=1e-4)
    # and a float σ equal to σ_src for a 1-sample policy also takes the fast path
    single = GMFlowPolicy(case["means"][:1], case["logstds"][:1], case["logweights"][:1], x_src[:1],
                          float(case["sigma"][0]))
    torch.testing.assert_close(single.x0(x_src[:1], float(case["sigma"][0])).double(), mix[:1], rtol=0, atol=1e-5)


def test_fast_path_not_taken_when_only_sigma_matches():
    case = make_case(4)
    policy = GMFlowPolicy(case["means"], case["logstds"], case["logweights"], case["x_src"], case["sigma"])
    mu, logw, var = x0_gm_of(case)
    mix = (torch.softmax(logw, dim=1) * mu).sum(1)
    x_t = case["x_src"] + 0.2
    got = policy.x0(x_t, case["sigma"]).double()
    assert (got - mix).abs().max() > 1e-3
    for b in range(3):
        ref = brute_posterior_mean(mu[b], logw[b, :, 0], var[b], case["x_src"][b], float(case["sigma"][b]),
                                   x_t[b], float(case["sigma"][b]))
        torch.testing.assert_close(got[b], ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_low_precision_inputs(dtype, tol):
    case = make_case(5)
    low = {k: case[k].to(dtype) for k in ("means", "logstds", "logweights", "x_src")}
    policy_low = GMFlowPolicy(low["means"], low["logstds"], low["logweights"], low["x_src"], case["sigma"])
    # float32 reference built from the *same* (rounded) values
    policy_ref = GMFlowPolicy(low["means"].float(), low["logstds"].float(), low["logweights"].float(),
                              low["x_src"].float(), case["sigma"])
    assert policy_low.means.dtype == torch.float32
    x_t = (low["x_src"].float() * 0.9 + 0.1).to(dtype)
    sigma_t = case["sigma"] * 0.5
    for fn in ("x0", "velocity"):
        out = getattr(policy_low, fn)(x_t, sigma_t)
        ref = getattr(policy_ref, fn)(x_t.float(), sigma_t)
        assert out.dtype == dtype and out.shape == x_t.shape
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))


def test_dropout_never_drops_all_and_statistics():
    B, K, H, W = 4000, 4, 3, 2
    g = torch.Generator().manual_seed(0)
    means = torch.randn(B, K, 2, H, W, generator=g)
    logweights = torch.log_softmax(torch.randn(B, K, 1, H, W, generator=g), dim=1)
    policy = GMFlowPolicy(means, torch.zeros(B), logweights, torch.randn(B, 2, H, W, generator=g), 0.7)
    dropped_policy = policy.dropout(0.99, generator=torch.Generator().manual_seed(1))
    dropped = torch.isinf(dropped_policy.logits)
    assert bool((dropped_policy.logits[dropped] < 0).all())
    # one decision per (sample, component), shared over pixels
    assert bool((dropped == dropped[..., :1, :1]).all())
    per_sample = dropped[:, :, 0, 0, 0]
    assert int(per_sample.all(dim=1).sum()) == 0                 # never all components of a sample
    assert bool(torch.isfinite(dropped_policy.x0(policy.x_src + 0.1, 0.3)).all())
    # p = 0.99: a sample keeps all K with prob 0.99^K (all-dropped guard) + 0.01^K, else keeps exactly the survivors
    none_dropped = float((~per_sample).all(dim=1).float().mean())
    expected = 0.99 ** K + 0.01 ** K
    assert abs(none_dropped - expected) < 4 * math.sqrt(expected * (1 - expected) / B)
    # p = 0.3: per-(sample, component) drop rate p − p^K (Bernoulli(p) minus the guard)
    per_sample = torch.isinf(policy.dropout(0.3, generator=torch.Generator().manual_seed(2)).logits)[:, :, 0, 0, 0]
    rate, expected = float(per_sample.float().mean()), 0.3 - 0.3 ** K
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / (B * K))
    # the original policy is untouched
    assert bool(torch.isfinite(policy.logits).all())


@pytest.mark.parametrize("p", [0.0, -0.5, 1.0, 1.5])
def test_dropout_noop(p):
    case = make_case(6)
    policy = GMFlowPolicy(case["means"], case["logstds"], case["logweights"], case["x_src"], case["sigma"])
    out = policy.dropout(p, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.logits, policy.logits) and torch.equal(out.means, policy.means)
    x_t = case["x_src"] * 0.8
    assert torch.equal(out.x0(x_t, case["sigma"] * 0.5), policy.x0(x_t, case["sigma"] * 0.5))


def test_dropped_components_get_zero_posterior_weight():
    case = make_case(8, K=6)
    policy = GMFlowPolicy(case["means"], case["logstds"], case["logweights"], case["x_src"], case["sigma"])
    dropped_policy = policy.dropout(0.5, generator=torch.Generator().manual_seed(3))
    mask = torch.isinf(dropped_policy.logits[:, :, 0])                          # (B, K)
    assert bool(mask.any()) and not bool(mask.all(dim=1).any())
    mu, logw, var = x0_gm_of(case)
    sigma_t = case["sigma"] * 0.5
    x_t = case["x_src"] * 0.7 + 0.1
    got = dropped_policy.x0(x_t, sigma_t).double()
    for b in range(3):
        keep = ~mask[b]
        # brute force over the surviving components only (renormalised weights)
        ref = brute_posterior_mean(mu[b][keep], logw[b, keep, 0], var[b], case["x_src"][b],
                                   float(case["sigma"][b]), x_t[b], float(sigma_t[b]))
        torch.testing.assert_close(got[b], ref, rtol=0, atol=1e-4)
    # at the source state: mixture mean of the survivors
    mix = torch.stack([(torch.softmax(logw[b, ~mask[b], 0], 0)[:, None] * mu[b][~mask[b]]).sum(0)
                       for b in range(3)])
    torch.testing.assert_close(dropped_policy.x0(case["x_src"], case["sigma"]).double(), mix, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 1.5, 10.0])
def test_temperature_at_least_one_is_noop(temperature):
    case = make_case(9)
    policy = GMFlowPolicy(case["means"], case["logstds"], case["logweights"], case["x_src"], case["sigma"])
    hot = policy.temperature(temperature)
    assert torch.equal(hot.logits, policy.logits) and torch.equal(hot.var, policy.var)
    x_t = case["x_src"] * 0.9
    assert torch.equal(hot.x0(x_t, case["sigma"] * 0.6), policy.x0(x_t, case["sigma"] * 0.6))


@pytest.mark.parametrize("temperature", [0.3, 0.7])
def test_temperature_sharpens_x0_gm(temperature):
    case = make_case(10)
    policy = GMFlowPolicy(case["means"], case["logstds"], case["logweights"], case["x_src"], case["sigma"])
    cold = policy.temperature(temperature)
    mu, logw, var = x0_gm_of(case)
    # fields: weights softmax(a/T), variance v·T, means unchanged
    torch.testing.assert_close(torch.softmax(cold.logits.double(), 1), torch.softmax(logw / temperature, 1),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(cold.var.double().reshape(-1), var * temperature, rtol=1e-6, atol=0)
    torch.testing.assert_close(cold.means.double(), mu, rtol=0, atol=1e-5)
    # posterior mean vs brute-force integral of the tempered GM
    sigma_t = case["sigma"] * 0.5
    x_t = case["x_src"] * 0.8 - 0.1
    got = cold.x0(x_t, sigma_t).double()
    for b in range(3):
        ref = brute_gm_mean_tempered(mu[b], logw[b, :, 0], var[b], temperature, case["x_src"][b],
                                     float(case["sigma"][b]), x_t[b], float(sigma_t[b]))
        torch.testing.assert_close(got[b], ref, rtol=0, atol=1e-4)


def test_detach():
    case = make_case(11)
    means = case["means"].clone().requires_grad_(True)
    logstds = case["logstds"].clone().requires_grad_(True)
    logweights = case["logweights"].clone().requires_grad_(True)
    x_src = case["x_src"].clone().requires_grad_(True)
    policy = GMFlowPolicy(means, logstds, logweights, x_src, case["sigma"])
    detached = policy.detach()
    for name in ("means", "logits", "var", "x_src", "means_sq"):
        assert not getattr(detached, name).requires_grad, name
        torch.testing.assert_close(getattr(detached, name), getattr(policy, name).detach())
    assert policy.means.requires_grad and policy.var.requires_grad and policy.logits.requires_grad
    x_t, sigma_t = case["x_src"] * 0.9, case["sigma"] * 0.5
    out_d = detached.velocity(x_t, sigma_t)
    assert not out_d.requires_grad
    out = policy.velocity(x_t, sigma_t)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), out_d)
    out.sum().backward()
    for leaf in (means, logstds, logweights, x_src):
        assert leaf.grad is not None and float(leaf.grad.abs().sum()) > 0


def _args(B=2, K=4, C=2, H=3, W=3):
    g = torch.Generator().manual_seed(0)
    return dict(means=torch.randn(B, K, C, H, W, generator=g), logstds=torch.zeros(B, 1, 1, 1, 1),
                logweights=torch.log_softmax(torch.randn(B, K, 1, H, W, generator=g), 1),
                x_src=torch.randn(B, C, H, W, generator=g), sigma_src=0.5)


@pytest.mark.parametrize("field,value,name", [
    ("logweights", torch.zeros(2, 3, 1, 3, 3), "logweights"),            # K mismatch
    ("x_src", torch.zeros(2, 3, 3, 3), "x_src"),                         # channel mismatch
    ("x_src", torch.zeros(2, 2, 3, 4), "x_src"),                         # spatial mismatch
    ("logweights", torch.zeros(2, 4, 1, 3, 4), "logweights"),            # spatial mismatch
    ("logweights", torch.zeros(2, 4, 2, 3, 3), "logweights"),            # per-channel weights not allowed
    ("logstds", torch.zeros(2, 4, 1, 1, 1), "logstds"),                  # one per component not allowed
    ("sigma_src", 1.5, "sigma_src"),
    ("sigma_src", -0.1, "sigma_src"),
    ("sigma_src", 0.0, "sigma_src"),
    ("sigma_src", torch.tensor([0.5, 0.5, 0.5]), "sigma_src"),
    ("means", torch.full((2, 4, 2, 3, 3), float("nan")), "means"),
    ("logstds", torch.full((2, 1, 1, 1, 1), float("nan")), "logstds"),
    ("x_src", torch.full((2, 2, 3, 3), float("inf")), "x_src"),
])
def test_construction_errors(field, value, name):
    kwargs = _args()
    kwargs[field] = value
    with pytest.raises(ValueError, match=name):
        GMFlowPolicy(**kwargs)


def test_means_wrong_rank_raises():
    kwargs = _args()
    kwargs["means"] = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="means"):
        GMFlowPolicy(**kwargs)


def test_evaluation_errors():
    policy = GMFlowPolicy(**_args())
    x = torch.zeros(2, 2, 3, 3)
    for sigma in (1.2, -0.01, float("nan"), torch.tensor([0.2, 1.1])):
        with pytest.raises(ValueError, match="sigma_t"):
            policy.velocity(x, sigma)
    with pytest.raises(ValueError, match="x_t"):
        policy.velocity(torch.zeros(2, 2, 3, 4), 0.3)
    with pytest.raises(ValueError, match="x_t"):
        policy.x0(torch.zeros(3, 2, 3, 3), 0.3)
