"""Few-step π-Flow pipelines that subclass the stock diffusers pipelines (algorithm.md §5.2–5.4).

`PiFluxPipeline`, `PiFlux2Pipeline`, `PiFlux2KleinPipeline`, `PiQwenImagePipeline`, `PiQwenImageEditPipeline`,
`PiQwenImageEditPlusPipeline`, `PiSD3Pipeline`, `PiZImagePipeline` and `PiWanPipeline` keep everything of their stock
pipelines — components, `from_pretrained`, text encoding, reference-image preparation, LoRA loading, offloading,
VAE decoding — and replace the denoising loop: each of the `num_inference_steps` steps evaluates the
student once, rolls its policy out with `total_substeps` Euler substeps per unit of raw time to the scheduler's
``sigmas_dst[i]`` and lets `FlowMapSDEScheduler.step` map the result to the next grid point.

    pipe = PiFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
    pipe.load_piflow_adapter("path/to/gmflux_adapter")          # or a student trained in this process:
    # pipe.set_piflow_student(student)
    image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images[0]   # 4 steps: as trained

The stock scheduler is replaced by a `FlowMapSDEScheduler` built from its config with the student's training shift
(3.2) and final step-size scale (0.5), dynamic shifting off; `sigmas=[…]` (raw times, strictly decreasing in (0, 1])
replaces the default grid, as in the authors' sampler. The loop itself is `piflow.sampling.sample`. Any
`num_inference_steps` ≥ 1 works for GM students (elastic inference); DX students keep their training grid. The GM
temperature on non-final steps is 'auto' (clamp(0.1·(nfe − 1), 0, 1)) or a number; `num_inference_steps` and
`total_substeps` default to the student's training values. The student takes no CFG (guidance is distilled in);
FLUX students get the distilled-guidance scalar `guidance_scale` (3.5) as their input like the teacher did.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from diffusers import (Flux2KleinPipeline, Flux2Pipeline, FluxPipeline, QwenImageEditPipeline,
                       QwenImageEditPlusPipeline, QwenImagePipeline, StableDiffusion3Pipeline, WanPipeline,
                       ZImagePipeline)
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from piflow.integrations.diffusers.adapter import load_piflow_adapter
from piflow.integrations.diffusers.quantization import base_parameter
from piflow.integrations.diffusers.scheduler import FlowMapSDEScheduler
from piflow.integrations.diffusers.students import LORA_ADAPTER, DiffusersPolicyStudent
from piflow.sampling import sample


class PiFlowPipelineMixin:
    """The π-Flow sampling loop and adapter handling shared by the three pipelines."""

    architecture_name = "flux"
    piflow_student: Optional[DiffusersPolicyStudent] = None

    def _use_policy_scheduler(self, student: DiffusersPolicyStudent) -> None:
        """Swap in a `FlowMapSDEScheduler` from the current scheduler's config and the student's training schedule."""
        scheduler = FlowMapSDEScheduler.from_config(
            self.scheduler.config, shift=student.settings.shift, use_dynamic_shifting=False,
            final_step_size_scale=student.settings.final_step_size_scale)
        self.register_modules(scheduler=scheduler)

    def set_piflow_student(self, student: DiffusersPolicyStudent) -> DiffusersPolicyStudent:
        """Use `student` (which must run `self.transformer`, e.g. a LoRA student built with share_transformer=True)."""
        if not isinstance(student, DiffusersPolicyStudent):
            raise TypeError(f"student must be a DiffusersPolicyStudent, got {type(student).__name__}")
        if student.architecture.name != self.architecture_name:
            raise ValueError(f"a {student.architecture.name!r} student cannot drive a {type(self).__name__} "
                             f"(expects {self.architecture_name!r})")
        if student.transformer is not self.transformer:
            self.register_modules(transformer=student.transformer)
        self.piflow_student = student
        self._use_policy_scheduler(student)
        return student

    def load_piflow_adapter(self, path_or_dir: Union[str, Path], subfolder: Optional[str] = None,
                            adapter_name: Optional[str] = None, strength: float = 1.0) -> DiffusersPolicyStudent:
        """Attach a saved π-Flow adapter (head, final norm, LoRA; piflow's or the authors' layout) to
        `self.transformer` (shared, not copied); `strength` scales the LoRA update (`load_piflow_adapter`).

        Loading again replaces the adapter of the same name. The LoRA part is a named PEFT adapter, so
        ``pipe.set_adapters([name, "style"], adapter_weights=[1.0, 0.8])`` combines it with other LoRAs."""
        student = load_piflow_adapter(self.transformer, path_or_dir, subfolder=subfolder,
                                      adapter_name=adapter_name or LORA_ADAPTER, strength=strength)
        return self.set_piflow_student(student)

    def _require_student(self) -> DiffusersPolicyStudent:
        student = self.piflow_student
        if student is None:
            raise RuntimeError(f"{type(self).__name__} has no π-Flow student: call pipe.load_piflow_adapter(path) "
                               "or pipe.set_piflow_student(student) first")
        parameter = base_parameter(self.transformer)
        # the head and final norm run in the base dtype/device (§5.4); the policy itself is built in float32
        for module in (student.head, student.norm_out):
            module.to(device=parameter.device, dtype=parameter.dtype)
        return student

    def _policy_denoise(self, noise: Tensor, cond: dict, num_inference_steps: Optional[int],
                        temperature: Union[float, str], generator: Optional[torch.Generator],
                        image_seq_len: Optional[int], total_substeps: Optional[int],
                        callback_on_step_end: Optional[Callable] = None, sigmas: Optional[list] = None) -> Tensor:
        """noise (B, C, H, W) → latents at σ = 0 (float32) with `piflow.sampling.sample` on this pipeline's
        scheduler (`num_inference_steps` steps, or the raw times `sigmas`; one student evaluation per step)."""
        student = self._require_student()
        if not isinstance(self.scheduler, FlowMapSDEScheduler):
            self._use_policy_scheduler(student)
        scheduler = self.scheduler
        if num_inference_steps is None and sigmas is None:
            num_inference_steps = student.settings.nfe      # the student's training NFE
        scheduler.set_timesteps(num_inference_steps, device=noise.device, image_seq_len=image_seq_len, sigmas=sigmas)
        nfe = scheduler.num_inference_steps
        self._num_timesteps = nfe
        was_training = student.training
        student.eval()          # LoRA dropout off; the previous mode is restored afterwards
        try:
            with self.progress_bar(total=nfe) as progress_bar:
                def on_step(i: int, x: Tensor) -> Tensor:
                    scheduler.step_done(i)          # keeps `step_index` true for callbacks
                    if callback_on_step_end is not None:
                        outputs = callback_on_step_end(self, i, scheduler.timesteps[i], {"latents": x}) or {}
                        x = outputs.get("latents", x)
                    progress_bar.update()
                    return x

                return sample(student.policy, noise.float(), cond=cond, schedule=scheduler.schedule,
                              temperature=temperature, generator=generator, on_step=on_step,
                              total_substeps=student.settings.total_substeps if total_substeps is None
                              else total_substeps)
        finally:
            student.train(was_training)

    def _noise(self, shape: tuple[int, ...], latents: Optional[Tensor], generator, device) -> Tensor:
        if latents is not None:
            if tuple(latents.shape) != tuple(shape):
                raise ValueError(f"latents must have shape {tuple(shape)} (B, C, H, W) at σ = 1, "
                                 f"got {tuple(latents.shape)}")
            return latents.to(device=device, dtype=torch.float32)
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    def _packed_noise(self, batch: int, height: int, width: int, latents: Optional[Tensor], generator,
                      device) -> tuple[Tensor, int]:
        """Noise (B, C, H/v, W/v) for the 2×2-packed families (FLUX, Qwen-Image) and its token count."""
        latent_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        channels = self.transformer.config.in_channels // 4
        noise = self._noise((batch, channels, latent_h, latent_w), latents, generator, device)
        return noise, (latent_h // 2) * (latent_w // 2)

    def _image_size(self, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
        """(height, width) in pixels; each defaults to the model's sample size, as in the stock pipelines."""
        default = getattr(self, "default_sample_size", 128) * self.vae_scale_factor
        return height or default, width or default

    def _check_multiple(self, height: int, width: int, multiple: int) -> None:
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} for {type(self).__name__}, got "
                             f"{height}×{width}")

    @staticmethod
    def _batch_size(prompt, prompt_embeds: Optional[Tensor]) -> int:
        if prompt is None and prompt_embeds is None:
            raise ValueError("give `prompt` or `prompt_embeds`")
        if prompt is None:
            return prompt_embeds.shape[0]
        return 1 if isinstance(prompt, str) else len(prompt)

    def _stock_extras(self, attention_kwargs: Optional[dict] = None,
                      callback_on_step_end_tensor_inputs: Optional[Sequence[str]] = ("latents",),
                      attention_name: str = "attention_kwargs", **guidance: Any) -> None:
        """The stock arguments a π-Flow loop cannot honour: attention kwargs (the student runs its own forward) and
        callback tensors other than ``latents`` are errors; CFG arguments (negative prompts, CFG scales) are
        accepted with a warning — the student has guidance distilled in."""
        if attention_kwargs:
            raise ValueError(f"{attention_name}: π-Flow pipelines run the student's own forward and take none; "
                             "scale LoRAs with pipe.set_adapters([...], adapter_weights=[...]) instead")
        extra = sorted(set(callback_on_step_end_tensor_inputs or ()) - {"latents"})
        if extra:
            raise ValueError(f"callback_on_step_end_tensor_inputs: π-Flow pipelines pass ['latents'] to callbacks, "
                             f"not {extra}")
        given = sorted(name for name, value in guidance.items() if value is not None)
        if given:
            warnings.warn(f"{', '.join(given)} unused: the π-Flow student has classifier-free guidance distilled in",
                          UserWarning, stacklevel=3)

    def _finish(self, image: Any, output_class: type, return_dict: bool):
        self.maybe_free_model_hooks()
        return output_class(images=image) if return_dict else (image,)


class PiFluxPipeline(PiFlowPipelineMixin, FluxPipeline):
    """`FluxPipeline` with a GM-FLUX / DX-FLUX student (§6.3): 1–8 steps instead of 28–50."""

    architecture_name = "flux"

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str], None] = None, prompt_2: Union[str, list[str], None] = None,
                 height: Optional[int] = None, width: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 guidance_scale: float = 3.5, temperature: Union[float, str] = "auto",
                 num_images_per_prompt: int = 1, generator: Optional[torch.Generator] = None,
                 latents: Optional[Tensor] = None, prompt_embeds: Optional[Tensor] = None,
                 pooled_prompt_embeds: Optional[Tensor] = None, output_type: str = "pil", return_dict: bool = True,
                 max_sequence_length: int = 512, total_substeps: Optional[int] = None,
                 callback_on_step_end: Optional[Callable] = None,
                 sigmas: Optional[list[float]] = None):
        """Generate images; `latents` (optional) is the unpacked noise (B·n, C, H/8, W/8) at σ = 1."""
        from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

        height, width = self._image_size(height, width)
        self.check_inputs(prompt, prompt_2, height, width, prompt_embeds=prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds, max_sequence_length=max_sequence_length)
        batch = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length)
        noise, num_tokens = self._packed_noise(batch, height, width, latents, generator, device)
        cond = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds,
                "txt_ids": text_ids}
        if self.transformer.config.guidance_embeds:
            cond["guidance"] = torch.full((batch,), float(guidance_scale), device=device, dtype=torch.float32)
        x = self._policy_denoise(noise, cond, num_inference_steps, temperature, generator,
                                 num_tokens, total_substeps, callback_on_step_end,
                                 sigmas=sigmas)
        if output_type == "latent":
            return self._finish(x, FluxPipelineOutput, return_dict)
        x = x / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(x.to(self.vae.dtype), return_dict=False)[0]
        return self._finish(self.image_processor.postprocess(image, output_type=output_type), FluxPipelineOutput,
                            return_dict)


class PiSD3Pipeline(PiFlowPipelineMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` with a GM / DX student on `SD3Transformer2DModel`."""

    architecture_name = "sd3"

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str], None] = None, prompt_2: Union[str, list[str], None] = None,
                 prompt_3: Union[str, list[str], None] = None, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 temperature: Union[float, str] = "auto", num_images_per_prompt: int = 1,
                 generator: Optional[torch.Generator] = None, latents: Optional[Tensor] = None,
                 prompt_embeds: Optional[Tensor] = None, pooled_prompt_embeds: Optional[Tensor] = None,
                 output_type: str = "pil", return_dict: bool = True, max_sequence_length: int = 256,
                 total_substeps: Optional[int] = None, callback_on_step_end: Optional[Callable] = None,
                 sigmas: Optional[list[float]] = None):
        """Generate images; `latents` (optional) is the noise (B·n, C, H/8, W/8) at σ = 1."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

        height, width = self._image_size(height, width)
        self.check_inputs(prompt, prompt_2, prompt_3, height, width, prompt_embeds=prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds, max_sequence_length=max_sequence_length)
        batch = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device
        prompt_embeds, _, pooled_prompt_embeds, _ = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, device=device,
            num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=False,
            prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            max_sequence_length=max_sequence_length)
        latent_h, latent_w = int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor
        noise = self._noise((batch, self.transformer.config.in_channels, latent_h, latent_w), latents, generator,
                            device)
        cond = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds}
        patch = self.transformer.config.patch_size
        x = self._policy_denoise(noise, cond, num_inference_steps, temperature, generator,
                                 (latent_h // patch) * (latent_w // patch), total_substeps, callback_on_step_end,
                                 sigmas=sigmas)
        if output_type == "latent":
            return self._finish(x, StableDiffusion3PipelineOutput, return_dict)
        x = x / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(x.to(self.vae.dtype), return_dict=False)[0]
        return self._finish(self.image_processor.postprocess(image, output_type=output_type),
                            StableDiffusion3PipelineOutput, return_dict)


def _decode_qwen(self, x: Tensor, output_type: str, return_dict: bool):
    """Normalised latents (B, C, H, W) → the pipeline output (images, or the latents for "latent")."""
    from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput

    if output_type == "latent":
        return self._finish(x, QwenImagePipelineOutput, return_dict)
    x = x[:, :, None].to(self.vae.dtype)                              # (B, C, 1, H, W): one video frame
    mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(x)
    std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1).to(x)
    image = self.vae.decode(x * std + mean, return_dict=False)[0][:, :, 0]
    return self._finish(self.image_processor.postprocess(image, output_type=output_type), QwenImagePipelineOutput,
                        return_dict)


class PiQwenImagePipeline(PiFlowPipelineMixin, QwenImagePipeline):
    """`QwenImagePipeline` with a GM-Qwen / DX-Qwen student (§6.4); no true CFG at inference (distilled in)."""

    architecture_name = "qwen"

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str], None] = None, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 temperature: Union[float, str] = "auto", num_images_per_prompt: int = 1,
                 generator: Optional[torch.Generator] = None, latents: Optional[Tensor] = None,
                 prompt_embeds: Optional[Tensor] = None, prompt_embeds_mask: Optional[Tensor] = None,
                 output_type: str = "pil", return_dict: bool = True, max_sequence_length: int = 512,
                 total_substeps: Optional[int] = None,
                 callback_on_step_end: Optional[Callable] = None,
                 sigmas: Optional[list[float]] = None):
        """Generate images; `latents` (optional) is the unpacked noise (B·n, C, H/8, W/8) at σ = 1."""
        height, width = self._image_size(height, width)
        self.check_inputs(prompt, height, width, prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                          max_sequence_length=max_sequence_length)
        batch = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device
        prompt_embeds, prompt_embeds_mask = self.encode_prompt(
            prompt=prompt, prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length)
        noise, num_tokens = self._packed_noise(batch, height, width, latents, generator, device)
        cond = {"encoder_hidden_states": prompt_embeds, "encoder_hidden_states_mask": prompt_embeds_mask}
        x = self._policy_denoise(noise, cond, num_inference_steps, temperature, generator,
                                 num_tokens, total_substeps, callback_on_step_end,
                                 sigmas=sigmas)
        return _decode_qwen(self, x, output_type, return_dict)


class PiZImagePipeline(PiFlowPipelineMixin, ZImagePipeline):
    """`ZImagePipeline` with a GM / DX student on `ZImageTransformer2DModel`; no CFG at inference (distilled in)."""

    architecture_name = "zimage"

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str], None] = None, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 temperature: Union[float, str] = "auto", num_images_per_prompt: int = 1,
                 generator: Optional[torch.Generator] = None, latents: Optional[Tensor] = None,
                 prompt_embeds: Optional[list[Tensor]] = None, output_type: str = "pil", return_dict: bool = True,
                 max_sequence_length: int = 512, total_substeps: Optional[int] = None,
                 callback_on_step_end: Optional[Callable] = None, sigmas: Optional[list[float]] = None,
                 guidance_scale=None, negative_prompt=None, negative_prompt_embeds=None, cfg_normalization=None,
                 cfg_truncation=None, joint_attention_kwargs=None, callback_on_step_end_tensor_inputs=("latents",)):
        """Generate images; `prompt_embeds` is the stock pipeline's list of (L_i, D) embeddings; `latents`
        (optional) is the noise (B·n, C, H/8, W/8) at σ = 1; CFG arguments are accepted and unused."""
        from diffusers.pipelines.z_image.pipeline_output import ZImagePipelineOutput

        self._stock_extras(joint_attention_kwargs, callback_on_step_end_tensor_inputs, "joint_attention_kwargs",
                           guidance_scale=guidance_scale,
                           negative_prompt=negative_prompt, negative_prompt_embeds=negative_prompt_embeds,
                           cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation)

        height, width = height or 1024, width or 1024
        self._check_multiple(height, width, self.vae_scale_factor * 2)
        device = self._execution_device
        if prompt is None and prompt_embeds is None:
            raise ValueError("give `prompt` or `prompt_embeds`")
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)  # encoded in place
        embeds, _ = self.encode_prompt(prompt=prompts, device=device, do_classifier_free_guidance=False,
                                       prompt_embeds=prompt_embeds, max_sequence_length=max_sequence_length)
        embeds = [e for e in embeds for _ in range(num_images_per_prompt)]
        latent_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        noise = self._noise((len(embeds), self.transformer.config.in_channels, latent_h, latent_w), latents,
                            generator, device)
        padded = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)
        mask = torch.stack([torch.arange(padded.shape[1], device=device) < e.shape[0] for e in embeds]).long()
        cond = {"encoder_hidden_states": padded, "encoder_hidden_states_mask": mask}
        x = self._policy_denoise(noise, cond, num_inference_steps, temperature, generator,
                                 (latent_h // 2) * (latent_w // 2), total_substeps, callback_on_step_end,
                                 sigmas=sigmas)
        if output_type == "latent":
            return self._finish(x, ZImagePipelineOutput, return_dict)
        x = x.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(x, return_dict=False)[0]
        return self._finish(self.image_processor.postprocess(image, output_type=output_type), ZImagePipelineOutput,
                            return_dict)


class _PiQwenEditMixin(PiFlowPipelineMixin):
    """The Qwen-Image-Edit(-Plus) call: reference image(s) encoded as in distillation (`families.qwen_edit_references`:
    the same resizing, VAE normalisation and vision-language prompt), the edited image in `num_inference_steps`
    student evaluations; no CFG at inference (distilled in)."""

    architecture_name = "qwen"
    plus = False

    def _edit_call(self, image, prompt, height, width, num_inference_steps, sigmas, temperature,
                   num_images_per_prompt, generator, latents, prompt_embeds, prompt_embeds_mask, output_type,
                   return_dict, callback_on_step_end, max_sequence_length, total_substeps):
        from PIL import Image

        from piflow.integrations.diffusers.families import _qwen_text, get_family, qwen_edit_references
        from piflow.integrations.diffusers.prompts import collate_text

        if image is None or (isinstance(image, list) and not image):
            raise ValueError(f"image: {type(self).__name__} edits a reference image; pass image=PIL.Image "
                             f"({'a list of reference images' if self.plus else 'or one per prompt'})")
        images = image if isinstance(image, list) else [image]
        if not all(isinstance(item, Image.Image) for item in images):
            raise ValueError("image must be a PIL image or a list of PIL images (the reference images)")
        count = self._batch_size(prompt, prompt_embeds)
        if not self.plus and len(images) not in (1, count):
            raise ValueError(f"image: give one reference image, or one per prompt ({count}), got {len(images)}")
        images = [item.convert("RGB") for item in images]
        # Plus: every reference for every prompt; Edit: one reference shared, or one per prompt
        per_prompt = ([images] * count if self.plus else [[images[i if len(images) == count else 0]]
                                                          for i in range(count)])
        family = get_family("qwen-edit-plus" if self.plus else "qwen-edit")
        if prompt_embeds is None:                 # as in distillation: one encoder for both
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            conditions = family.encode(self, prompts, max_sequence_length, per_prompt)
        else:
            conditions = []
            for index, references in enumerate(per_prompt):
                mask = None if prompt_embeds_mask is None else prompt_embeds_mask[index:index + 1]
                conditions.append({**_qwen_text(prompt_embeds[index:index + 1], mask)[0],
                                   **qwen_edit_references(self, references, self.plus)[1]})
        device = self._execution_device
        items = [item for item in conditions for _ in range(num_images_per_prompt)]
        cond = collate_text(items, family.name, device=device, dtype=self.transformer.dtype)
        size = images[-1 if self.plus else 0].size
        default_w, default_h = self._default_size(size[0] / size[1])
        height, width = height or default_h, width or default_w
        self._check_multiple(height, width, self.vae_scale_factor * 2)
        noise, num_tokens = self._packed_noise(len(items), height, width, latents, generator, device)
        x = self._policy_denoise(noise, cond, num_inference_steps, temperature, generator, num_tokens,
                                 total_substeps, callback_on_step_end, sigmas=sigmas)
        return _decode_qwen(self, x, output_type, return_dict)

    def _default_size(self, ratio: float) -> tuple[int, int]:
        """(width, height) of ~1 MP at the first (Edit) / last (Plus) reference's aspect ratio, as the stock ones."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit

        width, height, _ = edit.calculate_dimensions(1024 * 1024, ratio)
        return width, height


class PiQwenImageEditPipeline(_PiQwenEditMixin, QwenImageEditPipeline):
    """`QwenImageEditPipeline` with a GM / DX student distilled from (instruction, reference image) conditions."""

    @torch.no_grad()
    def __call__(self, image=None, prompt: Union[str, list[str], None] = None, negative_prompt=None,
                 true_cfg_scale: float = 1.0, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, sigmas: Optional[list[float]] = None,
                 temperature: Union[float, str] = "auto", num_images_per_prompt: int = 1,
                 generator: Optional[torch.Generator] = None, latents: Optional[Tensor] = None,
                 prompt_embeds: Optional[Tensor] = None, prompt_embeds_mask: Optional[Tensor] = None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end: Optional[Callable] = None,
                 max_sequence_length: int = 512, total_substeps: Optional[int] = None, guidance_scale=None,
                 negative_prompt_embeds=None, negative_prompt_embeds_mask=None, attention_kwargs=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """Edit `image` (one PIL image, or one per prompt) by `prompt`; CFG arguments (`negative_prompt`,
        `true_cfg_scale`, …) are accepted and unused (guidance is distilled in); `latents`: noise (B·n, C, H/8,
        W/8) at σ = 1."""
        self._stock_extras(attention_kwargs, callback_on_step_end_tensor_inputs, negative_prompt=negative_prompt,
                           true_cfg_scale=None if true_cfg_scale == 1.0 else true_cfg_scale,
                           guidance_scale=guidance_scale, negative_prompt_embeds=negative_prompt_embeds,
                           negative_prompt_embeds_mask=negative_prompt_embeds_mask)
        return self._edit_call(image, prompt, height, width, num_inference_steps, sigmas, temperature,
                               num_images_per_prompt, generator, latents, prompt_embeds, prompt_embeds_mask,
                               output_type, return_dict, callback_on_step_end, max_sequence_length, total_substeps)


class PiQwenImageEditPlusPipeline(_PiQwenEditMixin, QwenImageEditPlusPipeline):
    """`QwenImageEditPlusPipeline` (Qwen-Image-Edit-2509 / 2511) with a GM / DX student; `image` is the list of
    reference images (shared by the prompts)."""

    plus = True
    __call__ = PiQwenImageEditPipeline.__call__


class _PiFlux2Mixin(PiFlowPipelineMixin):
    """The FLUX.2 [dev] / [klein] call: text-to-image, or editing with a list of reference images shared by the
    batch (clean tokens after the generated ones, as the stock pipelines)."""

    architecture_name = "flux2"

    def _reference_latents(self, image, batch: int, device) -> list[Tensor]:
        from piflow.integrations.diffusers.families import flux2_condition_image

        images = image if isinstance(image, list) else [image]
        latents = []
        for number, item in enumerate(images):
            self.image_processor.check_image_input(item)
            pixels = flux2_condition_image(self, item).to(device=device, dtype=self.vae.dtype)
            if pixels.shape[1] != 3:
                raise ValueError(f"image[{number}] must be an RGB image (3 channels), got {pixels.shape[1]} channels")
            packed = self._encode_vae_image(image=pixels, generator=None)
            latents.append(self._unpatchify_latents(packed).float().expand(batch, -1, -1, -1))
        return latents

    def _flux2_noise(self, batch: int, height: int, width: int, latents: Optional[Tensor], generator, device):
        channels = self.transformer.config.in_channels // 4
        latent_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        if latents is not None and latents.dim() == 4 and tuple(latents.shape) == (
                batch, 4 * channels, latent_h // 2, latent_w // 2):           # the stock pipelines' patchified noise
            latents = self._unpatchify_latents(latents)
        return self._noise((batch, channels, latent_h, latent_w), latents, generator, device)

    def _flux2_call(self, image, prompt, height, width, num_inference_steps, sigmas, guidance_scale, temperature,
                    num_images_per_prompt, generator, latents, prompt_embeds, output_type, return_dict,
                    callback_on_step_end, max_sequence_length, text_encoder_out_layers, total_substeps):
        from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput

        batch = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device
        prompt_embeds, _ = self.encode_prompt(prompt=prompt, prompt_embeds=prompt_embeds, device=device,
                                              num_images_per_prompt=num_images_per_prompt,
                                              max_sequence_length=max_sequence_length,
                                              text_encoder_out_layers=text_encoder_out_layers)
        cond = {"encoder_hidden_states": prompt_embeds}
        if image is not None and not (isinstance(image, list) and not image):
            references = self._reference_latents(image, batch, device)
            cond.update({f"reference_latents.{j}": r for j, r in enumerate(references)})
            height = height or references[0].shape[2] * self.vae_scale_factor     # the first reference's size
            width = width or references[0].shape[3] * self.vae_scale_factor
        height, width = self._image_size(height, width)
        self._check_multiple(height, width, self.vae_scale_factor * 2)
        if self.transformer.config.guidance_embeds:
            cond["guidance"] = torch.full((batch,), float(guidance_scale), device=device, dtype=torch.float32)
        noise = self._flux2_noise(batch, height, width, latents, generator, device)
        x = self._policy_denoise(noise, cond, num_inference_steps, temperature, generator,
                                 noise.shape[2] * noise.shape[3] // 4, total_substeps, callback_on_step_end,
                                 sigmas=sigmas)
        if output_type == "latent":
            return self._finish(x, Flux2PipelineOutput, return_dict)
        packed = self._patchify_latents(x.to(self.vae.dtype))
        mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(packed)
        std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(packed)
        image = self.vae.decode(self._unpatchify_latents(packed * std + mean), return_dict=False)[0]
        return self._finish(self.image_processor.postprocess(image, output_type=output_type), Flux2PipelineOutput,
                            return_dict)


class PiFlux2Pipeline(_PiFlux2Mixin, Flux2Pipeline):
    """`Flux2Pipeline` (FLUX.2 [dev]) with a GM / DX student: text-to-image, or multi-reference editing with
    ``image=[…]``; the distilled-guidance scalar `guidance_scale` (4.0) is the student's input as the teacher's."""

    @torch.no_grad()
    def __call__(self, image=None, prompt: Union[str, list[str], None] = None, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 sigmas: Optional[list[float]] = None, guidance_scale: float = 4.0,
                 temperature: Union[float, str] = "auto", num_images_per_prompt: int = 1,
                 generator: Optional[torch.Generator] = None, latents: Optional[Tensor] = None,
                 prompt_embeds: Optional[Tensor] = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Optional[Callable] = None, max_sequence_length: int = 512,
                 text_encoder_out_layers: tuple[int, ...] = (10, 20, 30), total_substeps: Optional[int] = None,
                 caption_upsample_temperature: Optional[float] = None, attention_kwargs=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """Generate or edit; `latents` (optional) is the noise (B·n, C, H/8, W/8) at σ = 1 (or the stock
        pipeline's patchified (B·n, 4C, H/16, W/16)); output_type "latent" returns the normalised (B, C, H/8, W/8);
        `caption_upsample_temperature` rewrites the prompts with the text encoder first, as the stock pipeline."""
        self._stock_extras(attention_kwargs, callback_on_step_end_tensor_inputs)
        if caption_upsample_temperature:
            prompt = self.upsample_prompt(prompt, images=image, temperature=caption_upsample_temperature,
                                          device=self._execution_device)
        return self._flux2_call(image, prompt, height, width, num_inference_steps, sigmas, guidance_scale,
                                temperature, num_images_per_prompt, generator, latents, prompt_embeds, output_type,
                                return_dict, callback_on_step_end, max_sequence_length, text_encoder_out_layers,
                                total_substeps)


class PiFlux2KleinPipeline(_PiFlux2Mixin, Flux2KleinPipeline):
    """`Flux2KleinPipeline` (FLUX.2 [klein]) with a GM / DX student; no CFG at inference (distilled in)."""

    @torch.no_grad()
    def __call__(self, image=None, prompt: Union[str, list[str], None] = None, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 sigmas: Optional[list[float]] = None, temperature: Union[float, str] = "auto",
                 num_images_per_prompt: int = 1, generator: Optional[torch.Generator] = None,
                 latents: Optional[Tensor] = None, prompt_embeds: Optional[Tensor] = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end: Optional[Callable] = None,
                 max_sequence_length: int = 512, text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
                 total_substeps: Optional[int] = None, guidance_scale=None, negative_prompt_embeds=None,
                 attention_kwargs=None, callback_on_step_end_tensor_inputs=("latents",)):
        """Generate or edit (``image=[…]``); `latents` as in `PiFlux2Pipeline`; CFG arguments are accepted and
        unused (guidance is distilled in)."""
        self._stock_extras(attention_kwargs, callback_on_step_end_tensor_inputs, guidance_scale=guidance_scale,
                           negative_prompt_embeds=negative_prompt_embeds)
        return self._flux2_call(image, prompt, height, width, num_inference_steps, sigmas, 1.0, temperature,
                                num_images_per_prompt, generator, latents, prompt_embeds, output_type, return_dict,
                                callback_on_step_end, max_sequence_length, text_encoder_out_layers, total_substeps)


class PiWanPipeline(PiFlowPipelineMixin, WanPipeline):
    """`WanPipeline` (Wan 2.1 / 2.2 text-to-video, one transformer) with a GM / DX student over 5-D video latents;
    no CFG at inference (distilled in). Returns ``frames`` like the stock pipeline."""

    architecture_name = "wan"

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str], None] = None, height: int = 480, width: int = 832,
                 num_frames: int = 81, num_inference_steps: Optional[int] = None,
                 temperature: Union[float, str] = "auto", num_videos_per_prompt: int = 1,
                 generator: Optional[torch.Generator] = None, latents: Optional[Tensor] = None,
                 prompt_embeds: Optional[Tensor] = None, output_type: str = "np", return_dict: bool = True,
                 callback_on_step_end: Optional[Callable] = None, max_sequence_length: int = 512,
                 total_substeps: Optional[int] = None, sigmas: Optional[list[float]] = None, negative_prompt=None,
                 guidance_scale=None, guidance_scale_2=None, negative_prompt_embeds=None, attention_kwargs=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """Generate videos; `latents` (optional) is the noise (B·n, C, (num_frames − 1)/4 + 1, H/8, W/8) at σ = 1;
        CFG arguments are accepted and unused (guidance is distilled in)."""
        from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

        self._stock_extras(attention_kwargs, callback_on_step_end_tensor_inputs, negative_prompt=negative_prompt,
                           guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2,
                           negative_prompt_embeds=negative_prompt_embeds)

        temporal, spatial = self.vae_scale_factor_temporal, self.vae_scale_factor_spatial
        if int(num_frames) < 1 or (int(num_frames) - 1) % temporal:
            raise ValueError(f"num_frames must be 1 + a multiple of {temporal} (the VAE's temporal factor), "
                             f"got {num_frames}")
        patch = self.transformer.config.patch_size
        self._check_multiple(height, width, spatial * patch[1])
        batch = self._batch_size(prompt, prompt_embeds) * num_videos_per_prompt
        device = self._execution_device
        prompt_embeds, _ = self.encode_prompt(prompt=prompt, do_classifier_free_guidance=False,
                                              num_videos_per_prompt=num_videos_per_prompt,
                                              prompt_embeds=prompt_embeds, max_sequence_length=max_sequence_length,
                                              device=device)
        shape = (batch, self.transformer.config.in_channels, (int(num_frames) - 1) // temporal + 1,
                 int(height) // spatial, int(width) // spatial)
        noise = self._noise(shape, latents, generator, device)
        x = self._policy_denoise(noise, {"encoder_hidden_states": prompt_embeds}, num_inference_steps, temperature,
                                 generator, shape[2] * (shape[3] // patch[1]) * (shape[4] // patch[2]),
                                 total_substeps, callback_on_step_end, sigmas=sigmas)
        if output_type == "latent":
            return self._finish_video(x, WanPipelineOutput, return_dict)
        x = x.to(self.vae.dtype)
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(x)
        std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1).to(x)
        video = self.vae.decode(x * std + mean, return_dict=False)[0]
        return self._finish_video(self.video_processor.postprocess_video(video, output_type=output_type),
                                  WanPipelineOutput, return_dict)

    def _finish_video(self, frames: Any, output_class: type, return_dict: bool):
        self.maybe_free_model_hooks()
        return output_class(frames=frames) if return_dict else (frames,)


PIPELINES = {"flux": PiFluxPipeline, "sd3": PiSD3Pipeline, "qwen": PiQwenImagePipeline, "zimage": PiZImagePipeline,
             "flux2": PiFlux2Pipeline, "flux2-klein": PiFlux2KleinPipeline, "wan": PiWanPipeline,
             "qwen-edit": PiQwenImageEditPipeline, "qwen-edit-plus": PiQwenImageEditPlusPipeline}
