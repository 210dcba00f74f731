"""The checks every diffusion family's tests share: Euler in x_σ on DDIM's σ grid (which equals the stock DDIM
pipeline exactly, docs/algorithm.md §15), and a fresh student that starts at its teacher."""
import torch

from piflow.integrations.diffusers.students import DiffusersPolicyStudent, DiffusersTeacher
from piflow.policies import GMFlowPolicy

NUM_COMPONENTS, NUM_NODES = 3, 4


def euler_on_ddim_grid(teacher, schedule, scheduler, noise, cond, steps):
    """Euler in x_σ on the σ grid of DDIM's timesteps (then σ = 0), from the stock start x_t0 = noise."""
    scheduler.set_timesteps(steps)
    grid = [*schedule.sigma_of(scheduler.timesteps.double()), torch.tensor(0.0, dtype=torch.float64)]
    alpha, s = schedule.alpha_s(scheduler.timesteps[0].double())
    x = (noise.double() / (alpha + s)).float()          # the stock start x_t0 = ε as a flow state
    for i in range(steps):
        x = x + float(grid[i + 1] - grid[i]) * teacher(x, grid[i].expand(noise.shape[0]), cond)
    return x


def assert_matches_stock(x, expected, rel: float = 2e-6) -> None:
    scale = expected.abs().max()
    assert (x - expected).abs().max() < rel * scale, float((x - expected).abs().max() / scale)


def fresh_student(network, family: str, policy: str) -> DiffusersPolicyStudent:
    """A student without head noise (K = 3 components or N = 4 nodes) on `network`."""
    return DiffusersPolicyStudent(network, policy, num_components=NUM_COMPONENTS, num_nodes=NUM_NODES,
                                  latent_channels=4, head_noise_std=0.0, logstd_hidden=16,
                                  architecture=family).eval()


def assert_student_starts_at_teacher(network, family: str, policy: str, cond, side: int) -> dict:
    """Every GM component mean (and the policy's velocity) or every DX node equals the teacher's u at init, at two
    noise levels; returns the student's output."""
    teacher = DiffusersTeacher(network, family)
    student = fresh_student(network, family, policy)
    x, sigma = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(1)), torch.tensor([0.9, 0.3])
    u = teacher(x, sigma, cond)
    with torch.no_grad():
        out = student(x, sigma, cond)
    if policy == "dx":
        for k in range(NUM_NODES):
            torch.testing.assert_close(out["u_grid"][:, k], u, atol=1e-5, rtol=1e-5)
        return out
    for k in range(NUM_COMPONENTS):          # every component mean, in velocity space, is the teacher's u
        torch.testing.assert_close(out["means"][:, k], u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(GMFlowPolicy(**out, x_src=x, sigma_src=sigma).velocity(x, sigma), u, atol=1e-4,
                               rtol=1e-5)
    return out


def cli_distil_export_reload(family: str, policy: str, tmp_path, prompt_lines: str, *, size: int = 32,
                             extra=(), eval_prompt: str = "a cat", call_prompts=("a red cat", "fog"),
                             call_kwargs=None, sample_prompt: str = "a cat", base_pipeline=None):
    """The command line of a diffusion family end to end on its tiny pipeline (`base_pipeline`, default the stock
    tiny one), saved to disk: `piflow distill` (2 iterations on `prompt_lines`) → `piflow export` → a fresh
    ``Pi*Pipeline.from_pretrained`` + `load_piflow_adapter` → 1- and 4-step outputs of shape (2, size, size, 3),
    reproduced bit for bit → `piflow sample` (one PNG). Checks what every family shares and returns
    (pipe, student, the exported config.json, {steps: outputs}) for the family's own checks."""
    import json

    from piflow.cli import main
    from piflow.integrations.diffusers.pipelines import pipeline_class
    from piflow.integrations.diffusers.tiny import tiny_pipeline

    base = tmp_path / f"tiny-{family}"
    (base_pipeline if base_pipeline is not None else tiny_pipeline(family)).save_pretrained(base)
    (tmp_path / "prompts.txt").write_text(prompt_lines)
    run_dir = tmp_path / "run"
    assert main(["distill", "--run-dir", str(run_dir), f"pipeline={base}", f"resolution=[{size},{size}]",
                 f"prompts={tmp_path / 'prompts.txt'}", *extra, "student.lora_rank=4", "student.logstd_hidden=16",
                 "student.num_components=2", "student.num_nodes=3", "distill.total_substeps=16",
                 "train.warmup_iters=0", "train.progress=false", "eval.nfe=[1,2]", f"eval.prompts=[{eval_prompt}]",
                 "train.iters=2", f"student.policy={policy}"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["architecture"] == family and metrics["iters"] == 2
    assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "exported")]) == 0
    saved = json.loads((tmp_path / "exported" / "config.json").read_text())
    pipe = pipeline_class(family).from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    student = pipe.load_piflow_adapter(tmp_path / "exported")
    assert student.policy_kind == policy
    call_kwargs = dict(height=size, width=size) if call_kwargs is None else call_kwargs
    outputs = {}
    for steps in (1, 4):
        runs = [pipe(prompt=list(call_prompts), num_inference_steps=steps, output_type="np",
                     generator=torch.Generator().manual_seed(0), **call_kwargs).images for _ in range(2)]
        assert runs[0].shape == (2, size, size, 3)
        assert (runs[0] == runs[1]).all()                                         # bit for bit
        outputs[steps] = runs[0]
    assert main(["sample", "--run-dir", str(run_dir), "--prompt", sample_prompt, "--nfe", "1", "--output",
                 str(tmp_path / "out")]) == 0
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["000_00.png"]
    return pipe, student, saved, outputs
