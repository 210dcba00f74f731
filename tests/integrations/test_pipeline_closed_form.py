"""The π-Flow pipelines against an independent truth: a student stand-in whose policy is known in closed form.

`ClosedFormStudent` runs no network: at (x_i, σ_i) it predicts the same x0 for every DX node,
c_i = ½(1 − σ_i)·x_i + g + k(cond), with k the mean of the condition's text embeddings (plus 0.01·guidance for
FLUX). A DX policy with one x0 has velocity (x − c_i)/σ, whose flow from σ_i to σ_{i+1} is exactly
x_{i+1} = c_i + (σ_{i+1}/σ_i)(x_i − c_i) (Euler substeps are exact on it). The expected latents are computed here
by that recursion over a σ grid computed here from the shift and final step-size scale, with the text embeddings
from the stock pipeline's `encode_prompt` — nothing of piflow's sampler, scheduler or condition code — so a wrong
step, grid, destination or condition in the pipeline fails it (unlike a comparison with `PiFlow.sample`, which
runs the same loop)."""
import pytest
import torch

from piflow.settings import PiIDSettings

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from piflow.integrations.diffusers.pipelines import pipeline_class  # noqa: E402
from piflow.integrations.diffusers.students import DiffusersPolicyStudent  # noqa: E402
from piflow.integrations.diffusers.tiny import tiny_pipeline  # noqa: E402

from family_cases import latent_shape, size_arguments  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a red cat", "two blue birds on a wire"]
SHIFT, FINAL_SCALE, NFE = 3.2, 0.5, 4
# the stock pipeline's text embeddings (B, L, D) of PROMPTS, as each π-Flow pipeline encodes them
STOCK_EMBEDDINGS = {
    "flux": lambda pipe: pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, max_sequence_length=512)[0],
    "sd3": lambda pipe: pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None,
                                           do_classifier_free_guidance=False, max_sequence_length=256)[0],
    "wan": lambda pipe: pipe.encode_prompt(prompt=PROMPTS, do_classifier_free_guidance=False,
                                           max_sequence_length=512)[0],
}
GUIDANCE = {"flux": 3.5}          # the distilled-guidance scalar the FLUX pipeline passes in cond


def offset(shape: tuple) -> torch.Tensor:
    """g: a fixed, spatially varying x0 offset of one sample's latent shape."""
    return torch.linspace(-1.0, 1.0, int(torch.tensor(shape).prod())).reshape(shape)


def closed_form_x0(x: torch.Tensor, sigma: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """c = ½(1 − σ)·x + g + k: x (B, C, *S), σ (B,), k (B,) → (B, C, *S)."""
    view = (-1,) + (1,) * (x.dim() - 1)
    return 0.5 * (1 - sigma.reshape(view)) * x + offset(tuple(x.shape[1:])).to(x) + k.reshape(view)


class ClosedFormStudent(DiffusersPolicyStudent):
    """A DX student whose outputs are the velocities of the closed-form x0 at every node (no network runs)."""

    def forward(self, latents, sigma, cond=None) -> dict:
        x, s = latents.double(), sigma.double()
        k = cond["encoder_hidden_states"].double().mean(dim=(1, 2)) + 0.01 * cond.get(
            "guidance", torch.zeros_like(s)).double()
        u = (x - closed_form_x0(x, s, k)) / s.reshape((-1,) + (1,) * (x.dim() - 1))       # x0 = x − σ·u
        return {"u_grid": u.unsqueeze(1).expand(-1, self.head.num_nodes, *u.shape[1:]).float()}


def reference_latents(noise: torch.Tensor, raw_times: list, k: torch.Tensor) -> torch.Tensor:
    """The hand-written loop: σ_i = warp(τ_i) = s·τ/(1 + (s − 1)·τ), then 0; x ← c + (σ_next/σ)(x − c)."""
    sigmas = [SHIFT * t / (1 + (SHIFT - 1) * t) for t in raw_times] + [0.0]
    x = noise.double()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        c = closed_form_x0(x, torch.full((x.shape[0],), sigma, dtype=torch.float64), k)
        x = c + (sigma_next / sigma) * (x - c)
    return x


@pytest.mark.parametrize("family", sorted(STOCK_EMBEDDINGS))
def test_pipeline_latents_equal_the_closed_form_rollout(family):
    pipe = tiny_pipeline(family, pipeline_class(family))
    pipe.set_progress_bar_config(disable=True)
    settings = PiIDSettings(policy="dx", nfe=NFE, shift=SHIFT, final_step_size_scale=FINAL_SCALE)
    student = ClosedFormStudent(pipe.transformer, "dx", num_nodes=3, latent_channels=4, share_transformer=True,
                                architecture=pipe.architecture_name, settings=settings,
                                policy_kwargs={"mode": "grid", "segment_size": 1 / 3.5, "shift": SHIFT})
    pipe.set_piflow_student(student)
    noise = torch.randn(latent_shape(family, len(PROMPTS)), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        k = STOCK_EMBEDDINGS[family](pipe).double().mean(dim=(1, 2)) + 0.01 * GUIDANCE.get(family, 0.0)
    base = 1 / (NFE - 1 + FINAL_SCALE)                                   # raw step; the last one is f·base
    cases = [({}, [1 - i * base for i in range(NFE)]),                   # the student's 4 training steps
             ({"sigmas": [1.0, 0.6, 0.25]}, [1.0, 0.6, 0.25]), ({"num_inference_steps": 1}, [1.0])]
    for arguments, raw_times in cases:
        out = pipe(prompt=PROMPTS, latents=noise.clone(), output_type="latent", **arguments,
                   **size_arguments(family))
        latents = out.frames if family == "wan" else out.images
        assert latents.shape == noise.shape
        torch.testing.assert_close(latents.double(), reference_latents(noise, raw_times, k), atol=2e-5, rtol=2e-5)
