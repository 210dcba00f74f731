"""Bring your own teacher: a π-Flow LoRA student for diffusers' `AuraFlowTransformer2DModel` (a fourth family,
declared here in ~20 lines; the protocol is in docs/bring_your_own_teacher.md).

Runs on a tiny random AuraFlow config by default (seconds on a CPU); with real weights use e.g.
``AuraFlowTransformer2DModel.from_pretrained("fal/AuraFlow-v0.3", subfolder="transformer")`` and its text embeddings.

    python examples/byo_teacher_auraflow.py --iters 20 --out runs/auraflow_adapter
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from piflow import PiFlow, PiIDSettings
from piflow.integrations.diffusers.adapter import load_piflow_adapter, save_piflow_adapter
from piflow.integrations.diffusers.students import (Architecture, DiffusersPolicyStudent, DiffusersTeacher,
                                                    add_student_lora, register_architecture, unpatchify_pqc)


def auraflow_inputs(latents: torch.Tensor, sigma: torch.Tensor, cond: dict) -> dict:
    """AuraFlow patchifies inside and takes σ ∈ [0, 1] as its timestep (its embedding multiplies by 1000)."""
    return {"hidden_states": latents, "timestep": sigma.reshape(-1).to(latents.dtype),
            "encoder_hidden_states": cond["encoder_hidden_states"]}


# feed-forward and timestep MLPs only, never attention (§6.6)
AURAFLOW_LORA_TARGETS = r".*((ff|ff_context)\.(linear_1|linear_2|out_projection)|time_step_proj\.linear_[12])$"

AURAFLOW = register_architecture(Architecture(
    name="auraflow", model_inputs=auraflow_inputs,
    tokens_to_latents=unpatchify_pqc,  # its tokens are (p_row, p_col, c)-ordered, like SD3
    layout="pc", output_is_tokens=False, lora_targets=lambda transformer: AURAFLOW_LORA_TARGETS,
    packs_outside=False, base_class="AuraFlowTransformer2DModel"))


def tiny_auraflow(seed: int = 0) -> torch.nn.Module:
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(seed)
    model = AuraFlowTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                       num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                       joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
                                       pos_embed_max_size=64)
    with torch.no_grad():   # zero-initialised in diffusers; random values make the tiny teacher informative
        model.proj_out.weight.normal_(0, 0.05)
    return model.eval().requires_grad_(False)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="runs/auraflow_adapter")
    parser.add_argument("--policy", default="gmflow", choices=["gmflow", "dx"])
    args = parser.parse_args(argv)

    transformer = tiny_auraflow()
    text = {"encoder_hidden_states": torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))}
    teacher = DiffusersTeacher(transformer, AURAFLOW)          # the base model; LoRA is disabled for its calls
    add_student_lora(transformer, rank=8, target_modules=AURAFLOW.lora_targets(transformer))
    settings = PiIDSettings(policy=args.policy, nfe=4, final_step_size_scale=0.5, shift=3.2, num_intermediate_states=2,
                            window_substeps=3, policy_dropout=0.1 if args.policy == "gmflow" else 0.0,
                            loss_scale=30.0, total_substeps=32)
    student = DiffusersPolicyStudent(transformer, args.policy, num_components=4, num_nodes=6, latent_channels=4,
                                     logstd_hidden=32, share_transformer=True, architecture=AURAFLOW,
                                     settings=settings)     # the adapter saves the settings with the weights
    pf = PiFlow(student, teacher, settings)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(args.iters):        # data-free π-ID on a fixed toy batch
        optimizer.zero_grad()
        losses.append(float(pf.data_free_loss(noise, text, generator=torch.Generator().manual_seed(3))))
        optimizer.step()
    save_piflow_adapter(student.eval(), args.out)

    fresh = load_piflow_adapter(tiny_auraflow(), args.out)       # a new copy of the base + the adapter
    fresh_pf = PiFlow(fresh, None, fresh.settings, policy_kwargs=fresh.policy_kwargs)    # sampling only
    with torch.no_grad():
        samples = fresh_pf.sample(noise, cond=text, temperature="auto")
        reference = pf.sample(noise, cond=text, temperature="auto")
    result = {"first_loss": losses[0], "last_loss": losses[-1],
              "round_trip_max_abs_diff": float((samples - reference).abs().max()), "adapter": str(Path(args.out))}
    print(result)
    return result


if __name__ == "__main__":
    main()
