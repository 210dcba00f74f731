"""Tests for piflow.diffusion: diffusion models (ε / v / x0 / EDM) as π-Flow teachers.

Independent truths: the exact posterior predictors of Gaussian-mixture data (derived here in float64) against
`GaussianMixtureTeacher.velocity`; diffusers' own DDIM sampler and zero-terminal-SNR rescale.
"""
import warnings

import pytest
import torch

from piflow.diffusion import (CosineVPSchedule, DiffusionTeacher, DiscreteVPSchedule, EDMSchedule, make_betas,
                              rescale_zero_terminal_snr)
from piflow.teachers import ClassifierFreeGuidance, GaussianMixtureTeacher

pytestmark = pytest.mark.usefixtures("single_thread")

MEANS = torch.tensor([[-1.5, 0.5, 0.2, -0.3], [1.0, 1.2, -0.8, 0.4], [0.3, -1.4, 0.9, 1.1]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
STD = 0.4
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def gm_teacher():
    return GaussianMixtureTeacher(MEANS, STD, WEIGHTS)


def _bcast(v, x):
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def gm_posterior(x_t, alpha, s):
    """(E[ε | x_t], E[x0 | x_t]) for x_t = α·x0 + s·ε, x0 ~ Σ_k w_k N(m_k, std²I), float64.

    x_t | k ~ N(α m_k, v I) with v = α²std² + s²; E[ε | x_t, k] = s/v·(x_t − α m_k),
    E[x0 | x_t, k] = m_k + α std²/v·(x_t − α m_k); mixed with responsibilities r_k ∝ w_k N(x_t; α m_k, v I).
    """
    x_t = x_t.double()
    alpha, s = _bcast(alpha.double(), x_t), _bcast(s.double(), x_t)
    var = alpha.square() * STD ** 2 + s.square()                              # (B, 1)
    residual = x_t[:, None] - alpha[:, None] * MEANS[None]                     # (B, K, D)
    log_r = torch.log(WEIGHTS)[None] - 0.5 * residual.square().sum(-1) / var - 0.5 * MEANS.shape[1] * torch.log(var)
    r = torch.softmax(log_r, dim=1)[..., None]
    eps = (r * (s / var)[:, None] * residual).sum(1)
    x0 = (r * (MEANS[None] + (alpha * STD ** 2 / var)[:, None] * residual)).sum(1)
    return eps, x0


def gm_eps(x_t, alpha, s):
    return gm_posterior(x_t, alpha, s)[0]


def gm_x0(x_t, alpha, s):
    return gm_posterior(x_t, alpha, s)[1]


def gm_v(x_t, alpha, s):
    """v = α·ε − s·x0 (linear, so E[v | x_t] = α E[ε | x_t] − s E[x0 | x_t])."""
    eps, x0 = gm_posterior(x_t, alpha, s)
    return _bcast(alpha.double(), eps) * eps - _bcast(s.double(), x0) * x0


def exact_model(schedule, kind, timestep_scale=1.0):
    """An exact predictor network model(x_t, t_in) for the Gaussian mixture under `schedule` (float32 output)."""
    fn = {"epsilon": gm_eps, "sample": gm_x0, "v_prediction": gm_v}[kind]

    def model(x_t, t_in):
        alpha, s = schedule.alpha_s(t_in.double() / timestep_scale)
        return fn(x_t, alpha, s).float()

    return model


def _states(sigmas, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = gm_teacher()
    x0 = teacher.sample(sigmas.numel(), generator=g).double()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    s = sigmas[:, None]
    return ((1 - s) * x0 + s * eps).float()


def _check_exact(teacher, sigmas, rtol=1e-5):
    x = _states(sigmas)
    u = teacher(x, sigmas)
    ref = gm_teacher().velocity(x.double(), sigmas)
    err = (u.double() - ref).norm(dim=1) / ref.norm(dim=1).clamp(min=1.0)
    assert float(err.max()) <= rtol, float(err.max())


SCHEDULES = {
    "discrete_sd": lambda: DiscreteVPSchedule.from_betas(**SD),
    "cosine": lambda: CosineVPSchedule(),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_exact_gaussian_mixture_velocity(name, kind):
    schedule = SCHEDULES[name]()
    # many σ inside the trained range, mostly at fractional timesteps (a few at integer ones for discrete)
    low, high = max(schedule.sigma_min, 0.01), min(schedule.sigma_max, 0.99)
    sigmas = torch.linspace(low, high, 257, dtype=torch.float64)
    if isinstance(schedule, DiscreteVPSchedule):
        sigmas = torch.cat([sigmas, schedule.sigma_of(torch.tensor([0.0, 1.0, 500.0, 998.0, 999.0]))])
        assert float((schedule.timestep_of(sigmas) % 1 != 0).double().mean()) > 0.9
    teacher = DiffusionTeacher(exact_model(schedule, kind), schedule, kind)
    _check_exact(teacher, sigmas)


def test_exact_cosine_with_scaled_time_input():
    schedule = CosineVPSchedule()
    teacher = DiffusionTeacher(exact_model(schedule, "v_prediction", 1000.0), schedule, "v_prediction",
                               timestep_input=1000.0)
    _check_exact(teacher, torch.linspace(0.02, 0.98, 65, dtype=torch.float64))


def test_exact_edm_denoiser_and_raw_network():
    schedule = EDMSchedule(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)

    def denoiser(x, sigma_edm):                                                # D(x; σ_edm) = E[x0 | x0 + σ_edm ε = x]
        return gm_x0(x, torch.ones_like(sigma_edm), sigma_edm)

    def d_model(x, t_in):                                                      # preconditioned D, time = σ_edm
        return denoiser(x, t_in.double()).float()

    def f_model(x_in, c_noise):                                                # raw F(c_in x; ¼ ln σ_edm)
        sigma_edm = torch.exp(4 * c_noise.double())
        total = sigma_edm.square() + 0.25
        c_skip, c_out, c_in = 0.25 / total, sigma_edm * 0.5 / total.sqrt(), 1 / total.sqrt()
        x = x_in.double() / c_in[:, None]
        return ((denoiser(x, sigma_edm) - c_skip[:, None] * x) / c_out[:, None]).float()

    sigmas = torch.linspace(0.01, 0.98, 129, dtype=torch.float64)
    _check_exact(DiffusionTeacher(d_model, schedule, "sample"), sigmas)
    _check_exact(DiffusionTeacher(f_model, schedule, "edm"), sigmas, rtol=2e-5)
    # the EDM time conventions: σ_edm = σ/(1 − σ); c_noise = ¼ ln σ_edm
    teacher = DiffusionTeacher(f_model, schedule, "edm")
    x = _states(sigmas[:3])
    _, t_in = teacher.network_inputs(x, sigmas[:3])
    torch.testing.assert_close(t_in.double(), 0.25 * torch.log(sigmas[:3] / (1 - sigmas[:3])), rtol=1e-6, atol=1e-7)


def test_network_inputs_and_velocity_from_output_match_call():
    schedule = DiscreteVPSchedule.from_betas(**SD)
    model = exact_model(schedule, "v_prediction")
    teacher = DiffusionTeacher(model, schedule, "v_prediction")
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    x = _states(sigmas.double())
    x_t, t = teacher.network_inputs(x, sigmas)
    assert t.dtype == torch.float32 and t.shape == (3,)
    u = teacher.velocity_from_output(model(x_t, t), x_t, t)
    torch.testing.assert_close(u, teacher(x, sigmas), rtol=1e-5, atol=1e-5)


def test_learned_variance_channels_dropped():
    schedule = DiscreteVPSchedule.from_betas(**SD)
    eps_model = exact_model(schedule, "epsilon")

    def model(x_t, t):                                                         # (B, 2C, H, W): ε and "variance"
        b, c = x_t.shape[:2]
        eps = eps_model(x_t.reshape(b, -1), t).reshape(x_t.shape)
        return torch.cat([eps, 100 + torch.zeros_like(eps)], 1)

    sigmas = torch.linspace(0.05, 0.9, 8, dtype=torch.float64)
    x = _states(sigmas).reshape(8, 2, 2, 1)
    u = DiffusionTeacher(model, schedule, "epsilon", out_channels=2)(x, sigmas)
    ref = gm_teacher().velocity(x.reshape(8, 4).double(), sigmas)
    torch.testing.assert_close(u.reshape(8, 4).double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out_channels=2"):
        DiffusionTeacher(model, schedule, "epsilon")(x, sigmas)


def test_classifier_free_guidance_on_u_equals_guidance_on_eps():
    schedule = DiscreteVPSchedule.from_betas(**SD)

    def model(x_t, t, label):                                                  # toy conditional ε-model
        return torch.tanh(x_t + label[:, None].float() + 1e-3 * t[:, None])

    w = 3.0
    guided = ClassifierFreeGuidance(DiffusionTeacher(model, schedule, "epsilon"), w, null_cond=0)

    def guided_eps(x_t, t, label):
        e_c, e_u = model(x_t, t, label), model(x_t, t, torch.zeros_like(label))
        return e_c + (w - 1) * (e_c - e_u)

    reference = DiffusionTeacher(guided_eps, schedule, "epsilon")
    sigmas = torch.tensor([0.2, 0.6, 0.9])
    x = _states(sigmas.double())
    label = torch.tensor([1, 2, 1])
    torch.testing.assert_close(guided(x, sigmas, label), reference(x, sigmas, label), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- schedules vs diffusers


def test_discrete_tables_match_diffusers():
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    for kwargs in (SD, dict(num_train_timesteps=1000, beta_schedule="linear"),
                   dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")):
        ours = DiscreteVPSchedule.from_diffusers_config(DDPMScheduler(**kwargs))
        theirs = DDPMScheduler(**kwargs).alphas_cumprod.double()
        torch.testing.assert_close(ours.alphas_cumprod, theirs, rtol=1e-5, atol=1e-7)
        alpha, s = ours.alpha_s(torch.arange(1000.0))
        torch.testing.assert_close(alpha, theirs.sqrt(), rtol=1e-5, atol=1e-7)


def test_fractional_timesteps_interpolate_log_snr():
    schedule = DiscreteVPSchedule.from_betas(**SD)
    abar = schedule.alphas_cumprod
    lam = torch.log(abar / (1 - abar))
    t = torch.tensor([0.25, 10.5, 123.75, 998.9], dtype=torch.float64)
    lo = t.floor().long()
    expected = lam[lo] + (t - lo) * (lam[lo + 1] - lam[lo])
    alpha, s = schedule.alpha_s(t)
    torch.testing.assert_close(torch.log(alpha ** 2 / s ** 2), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(alpha ** 2 + s ** 2, torch.ones_like(t), rtol=0, atol=1e-12)


def test_zero_terminal_snr_rescale_matches_diffusers():
    pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as reference

    for schedule in ("scaled_linear", "linear", "squaredcos_cap_v2"):
        betas = make_betas(1000, 0.00085, 0.012, schedule)
        torch.testing.assert_close(rescale_zero_terminal_snr(betas), reference(betas.clone()), rtol=1e-12, atol=1e-12)
    zt = DiscreteVPSchedule.from_betas(**SD, rescale_betas_zero_snr=True)
    assert zt.sigma_max == 1.0 and float(zt.alphas_cumprod[-1]) == 0.0
    plain = DiscreteVPSchedule.from_betas(**SD)
    assert abs(zt.sigma_min - plain.sigma_min) < 1e-12                       # first level unchanged
    assert 0.93 < plain.sigma_max < 0.94                                        # SD never saw σ = 1


def test_from_diffusers_config_reads_schedulers():
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    sd2v = dict(SD, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    for cls in (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler):
        scheduler = cls(**sd2v)
        for source in (scheduler, dict(scheduler.config)):
            schedule = DiscreteVPSchedule.from_diffusers_config(source)
            assert schedule.prediction_type == "v_prediction" and schedule.timestep_spacing == "trailing"
            assert schedule.num_train_timesteps == 1000 and schedule.sigma_max == 1.0
            torch.testing.assert_close(schedule.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=1e-5,
                                       atol=1e-7)
    # the teacher takes the prediction type from the schedule
    schedule = DiscreteVPSchedule.from_diffusers_config(dict(SD, prediction_type="sample"))
    assert DiffusionTeacher(lambda x, t: x, schedule).prediction_type == "sample"
    trained = DiscreteVPSchedule.from_diffusers_config({"num_train_timesteps": 3, "trained_betas": [0.1, 0.2, 0.3]})
    torch.testing.assert_close(trained.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504], dtype=torch.float64))


@pytest.mark.parametrize("make", [lambda: DiscreteVPSchedule.from_betas(**SD),
                                  lambda: DiscreteVPSchedule.from_betas(**SD, rescale_betas_zero_snr=True),
                                  lambda: DiscreteVPSchedule.from_betas(1000, beta_schedule="squaredcos_cap_v2"),
                                  lambda: CosineVPSchedule(), lambda: EDMSchedule()])
def test_sigma_timestep_map_monotone_and_inverse(make):
    schedule = make()
    t = torch.linspace(schedule.t_min, schedule.t_max, 20001, dtype=torch.float64)
    sigma = schedule.sigma_of(t)
    assert bool((sigma[1:] > sigma[:-1]).all())
    back = schedule.timestep_of(sigma)
    assert float(((back - t).abs() / t.abs().clamp(min=1)).max()) < 1e-9
    s = torch.linspace(schedule.sigma_min, schedule.sigma_max, 5001, dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_of(schedule.timestep_of(s)), s, rtol=1e-10, atol=1e-12)


def test_clamping_warns_once_and_uses_nearest_level():
    schedule = DiscreteVPSchedule.from_betas(**SD)
    teacher = DiffusionTeacher(exact_model(schedule, "epsilon"), schedule, "epsilon")
    x = _states(torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.warns(UserWarning, match="clamped") as record:
        u1 = teacher(x, torch.tensor([1.0, 0.0]))
        teacher(x, torch.tensor([1.0, 0.999]))
    assert len([w for w in record if "clamped" in str(w.message)]) == 1
    u_edge = teacher(x, torch.tensor([schedule.sigma_max, schedule.sigma_min], dtype=torch.float64))
    torch.testing.assert_close(u1, u_edge)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teacher(x, torch.tensor([0.5, 0.3]))                                   # in range: silent


def test_zero_terminal_snr_sigma_one():
    schedule = DiscreteVPSchedule.from_betas(**SD, rescale_betas_zero_snr=True)
    x = _states(torch.tensor([0.999, 0.999], dtype=torch.float64))
    # v-prediction defines x̂0 at α = 0 (x̂0 = −v/s, ε̂ = x_t/s): the exact GM v-predictor gives the exact u at σ = 1
    teacher = DiffusionTeacher(exact_model(schedule, "v_prediction"), schedule, "v_prediction")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u = teacher(x, 1.0)
    torch.testing.assert_close(u.double(), gm_teacher().velocity(x.double(), 1.0), rtol=1e-5, atol=1e-5)
    eps_teacher = DiffusionTeacher(exact_model(schedule, "epsilon"), schedule, "epsilon")
    with pytest.raises(ValueError, match="prediction_type 'epsilon'") as info:
        eps_teacher(x, 1.0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("build, match", [
    (lambda s: DiffusionTeacher(lambda x, t: x, s, "score"), "prediction_type"),
    (lambda s: DiffusionTeacher(lambda x, t: x, s, "edm"), "EDMSchedule"),
    (lambda s: DiffusionTeacher(lambda x, t: x, s, "epsilon", timestep_input="c_noise"), "timestep_input"),
    (lambda s: DiffusionTeacher(lambda x, t: x, s, "epsilon", out_channels=0), "out_channels"),
    (lambda s: DiscreteVPSchedule.from_betas(1000, 0.5, 1.5), "beta"),
    (lambda s: DiscreteVPSchedule([0.1, -0.1, 0.2]), "betas"),
    (lambda s: DiscreteVPSchedule.from_betas(1000, beta_schedule="sigmoid"), "beta_schedule"),
    (lambda s: DiscreteVPSchedule.from_diffusers_config({"prediction_type": "score"}), "prediction_type"),
    (lambda s: DiscreteVPSchedule.from_diffusers_config({"num_train_timesteps": 4, "trained_betas": [0.1] * 3}),
     "num_train_timesteps"),
    (lambda s: DiffusionTeacher(_ConfiguredModel(500), s, "epsilon"), "num_train_timesteps"),
    (lambda s: DiffusionTeacher(lambda x, t: x, DiscreteVPSchedule([0.1, 0.2])), "prediction_type"),
])
def test_bad_settings_one_line_errors(build, match):
    schedule = DiscreteVPSchedule.from_betas(**SD)
    with pytest.raises(ValueError, match=match) as info:
        build(schedule)
    assert "\n" not in str(info.value)


class _ConfiguredModel(torch.nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.config = {"num_train_timesteps": steps}


# ------------------------------------------------------------------------------------------- DDIM vs flow Euler


def _tiny_unet():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def _ddim(unet, scheduler, noise):
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x


def _flow_euler(teacher, x, sigmas):
    """Euler in the flow variable on an explicit σ grid (σ in float64, so the teacher hits the integer timesteps)."""
    batch = x.shape[0]
    for i in range(len(sigmas) - 1):
        x = x + teacher(x, sigmas[i].expand(batch)) * float(sigmas[i + 1] - sigmas[i])
    return x


@pytest.mark.parametrize("prediction_type, runs", [
    ("epsilon", ((10, True), (50, True), (250, True), (10, False))),
    ("v_prediction", ((10, True), (50, True), (10, False)))])
def test_ddim_eta0_is_exactly_flow_euler_on_its_sigma_grid(prediction_type, runs):
    """DDIM (η = 0) from x_T = ε equals Euler on x_σ = x_t/(α + s) over σ_i = σ(t_i), to float round-off, for every N.

    One DDIM step x_{t'} = α' x̂0 + s' ε̂ divided by (α' + s') is (1 − σ') x̂0 + σ' ε̂ = x_σ + (σ' − σ)(ε̂ − x̂0):
    exactly one Euler step of dx/dσ = u (x_σ = (1 − σ) x̂0 + σ ε̂ holds by construction of x̂0, ε̂).
    """
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    unet = _tiny_unet()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    results = {}
    for steps, set_alpha_to_one in runs:
        scheduler = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=set_alpha_to_one,
                                  prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1)
        scheduler.set_timesteps(steps)
        schedule = DiscreteVPSchedule.from_diffusers_config(scheduler)
        teacher = DiffusionTeacher(unet, schedule)
        ddim = _ddim(unet, scheduler, noise)
        ts = scheduler.timesteps.double()
        final = 0.0 if set_alpha_to_one else float(schedule.sigma_of(0.0))      # DDIM's last target level
        sigmas = torch.cat([schedule.sigma_of(ts), torch.tensor([final], dtype=torch.float64)])
        start_scale = float(sum(schedule.alpha_s(ts[0])))                       # x_σ0 = x_T/(α + s)
        flow = _flow_euler(teacher, noise / start_scale, sigmas)
        end_scale = 1.0 if set_alpha_to_one else float(sum(schedule.alpha_s(0.0)))
        diff = float((flow * end_scale - ddim).abs().max())
        assert diff < 2e-4 * float(ddim.abs().max()), (steps, diff)
        results[(steps, set_alpha_to_one)] = ddim
    # the samplers at different N really differ (the equality above is not vacuous)
    assert float((results[(10, True)] - results[(50, True)]).abs().max()) > 1e-2


def test_dtypes_and_gradients_for_students():
    schedule = DiscreteVPSchedule.from_betas(**SD)
    seen = {}

    def model(x_t, t):
        seen["dtype"], seen["t_dtype"] = x_t.dtype, t.dtype
        return torch.tanh(x_t)

    teacher = DiffusionTeacher(model, schedule, "epsilon")
    x = _states(torch.tensor([0.3, 0.7], dtype=torch.float64)).bfloat16()
    u = teacher(x, torch.tensor([0.3, 0.7]))
    assert u.dtype == torch.bfloat16 and seen == {"dtype": torch.bfloat16, "t_dtype": torch.float32}
    # network_inputs / velocity_from_output keep the graph (a student sharing the network trains through them)
    weight = torch.tensor(0.5, requires_grad=True)
    x_t, t = teacher.network_inputs(x.float(), 0.5)
    teacher.velocity_from_output(weight * x_t, x_t, t).sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad)
