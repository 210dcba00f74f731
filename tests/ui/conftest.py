"""Shared fixtures of the UI tests: a tiny random FLUX pipeline saved to disk with a random π-Flow adapter."""
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """(pipeline folder, adapter folder) of a tiny random FluxPipeline and a GM LoRA adapter for it."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from piflow.integrations.diffusers.adapter import save_piflow_adapter
    from piflow.integrations.diffusers.pipelines import pipeline_class
    from piflow.integrations.diffusers.students import ARCHITECTURES, DiffusersPolicyStudent, add_student_lora
    from piflow.integrations.diffusers.tiny import tiny_pipeline
    from piflow.settings import PiIDSettings

    root = tmp_path_factory.mktemp("tiny_flux")
    pipe = tiny_pipeline("flux", pipeline_class("flux"))
    pipe.save_pretrained(root / "base")
    add_student_lora(pipe.transformer, rank=4, target_modules=ARCHITECTURES["flux"].lora_targets(pipe.transformer))
    with torch.no_grad():      # PEFT starts B at 0: give the LoRA a visible effect
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    student = DiffusersPolicyStudent(pipe.transformer, "gmflow", num_components=2, latent_channels=4, logstd_hidden=16,
                                     share_transformer=True, architecture="flux",
                                     settings=PiIDSettings(policy="gmflow", nfe=4, shift=3.2,
                                                           final_step_size_scale=0.5),
                                     generator=torch.Generator().manual_seed(0)).eval()
    save_piflow_adapter(student, root / "adapter")
    return str(root / "base"), str(root / "adapter")
