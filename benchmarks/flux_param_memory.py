"""Parameter memory of teacher + student + EMA for a LoRA GM-FLUX student, at FLUX.1-dev dimensions.

    python benchmarks/flux_param_memory.py [--rank 256] [--components 8]

Builds the transformer on the meta device (no weights, no memory, no download), adds the LoRA adapter and the GM
head exactly as training does, and counts distinct parameter tensors of teacher, student and its power EMA.
"""
import argparse

import torch
from diffusers import FluxTransformer2DModel

from piflow.integrations.diffusers.students import FluxPolicyStudent, add_student_lora
from piflow.train import PowerEMA


def distinct_numel(*modules) -> int:
    return sum({id(p): p.numel() for m in modules for p in m.parameters()}.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--components", type=int, default=8)
    args = parser.parse_args()
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)     # FLUX.1-dev: 19 double + 38 single blocks
        base = distinct_numel(transformer)
        add_student_lora(transformer, rank=args.rank)
        student = FluxPolicyStudent(transformer, "gmflow", num_components=args.components, share_transformer=True)
        ema = PowerEMA(student)
        total = distinct_numel(transformer, student, ema.model)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    print(f"base transformer:            {base / 1e9:.3f} B parameters ({base * 2 / 2**30:.1f} GiB in bf16)")
    print(f"trainable (LoRA r={args.rank}, GM head K={args.components}, norm_out): {trainable / 1e6:.1f} M")
    print(f"teacher + student + EMA:     {total / 1e9:.3f} B parameters = {total / base:.3f} x the base alone")
    print(f"  = bf16 base {base * 2 / 2**30:.1f} GiB + fp32 trainable for student and EMA {2 * trainable * 4 / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
