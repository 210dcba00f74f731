"""diffusers integration (optional extra ``piflow[diffusers]``): import the submodules you need.

* `piflow.integrations.diffusers.students`: GM/DX LoRA students and teachers on FLUX, Qwen-Image, SD3 transformers;
  `Architecture` / `register_architecture` to bring your own.
* `piflow.integrations.diffusers.pipelines`: `PiFluxPipeline`, `PiQwenImagePipeline`, `PiSD3Pipeline`.
* `piflow.integrations.diffusers.adapter`: `save_piflow_adapter` / `load_piflow_adapter` (also the authors' layout).
* `piflow.integrations.diffusers.prompts`: prompt files, on-the-fly encoding, sharded prompt-embedding caches.
* `piflow.integrations.diffusers.scheduler`: `FlowMapSDEScheduler` as a diffusers scheduler.
* `piflow.integrations.diffusers.solvers`: diffusers' multistep solvers as teacher baselines.
* `piflow.integrations.diffusers.tiny`: tiny random-weight pipelines built from scratch (tests, offline smoke runs).
"""
