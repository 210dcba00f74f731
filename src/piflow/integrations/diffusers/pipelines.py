"""Few-step π-Flow pipelines that subclass the stock diffusers pipelines (algorithm.md §5.2–5.4), one per family
(`PiFluxPipeline`, `PiFlux2Pipeline`, `PiFlux2KleinPipeline`, `PiQwenImagePipeline`, `PiQwenImageEditPipeline`,
`PiQwenImageEditPlusPipeline`, `PiSD3Pipeline`, `PiZImagePipeline`, `PiWanPipeline`; `pipeline_class(family)`).

Each keeps everything of its stock pipeline — components, `from_pretrained`, text encoding, reference-image
preparation, LoRA loading, offloading, VAE decoding — and replaces the denoising loop: each of the
`num_inference_steps` steps evaluates the student once, rolls its policy out with `total_substeps` Euler substeps
per unit of raw time to the scheduler's ``sigmas_dst[i]`` and lets `FlowMapSDEScheduler.step` map the result to the
next grid point.

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

All pipelines share one call (`PiFlowPipelineMixin._piflow_call`): the family file's `PipelineHooks.prepare`
encodes the prompts and draws the noise, `policy_denoise` runs the student, `PipelineHooks.decode` decodes. A
pipeline of your own (bring your own teacher) subclasses `PiFlowPipelineMixin` and calls `policy_denoise`.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from piflow.integrations.diffusers.adapter import load_piflow_adapter, unload_piflow_adapter
from piflow.integrations.diffusers.families import FAMILIES, Family, get_family
from piflow.integrations.diffusers.quantization import base_parameter
from piflow.integrations.diffusers.scheduler import FlowMapSDEScheduler
from piflow.integrations.diffusers.students import LORA_ADAPTER, DiffusersPolicyStudent
from piflow.sampling import sample
from piflow.schedule import strength_raw_times


class PiFlowPipelineMixin:
    """The π-Flow sampling loop, the one pipeline call and adapter handling shared by the π-Flow pipelines; mix it
    in before a diffusers pipeline class. ``piflow_family`` names the family, ``architecture_name`` its students'
    architecture."""

    piflow_family: str = "flux"
    architecture_name: str = "flux"           # the students' architecture (a pipeline of your own sets its own)
    piflow_student: Optional[DiffusersPolicyStudent] = None

    @property
    def piflow_denoiser(self):
        """The network the student runs: ``self.transformer``, or ``self.unet`` for the UNet families."""
        return getattr(self, get_family(self.piflow_family).denoiser)

    def _use_policy_scheduler(self, student: DiffusersPolicyStudent) -> None:
        """Swap in a `FlowMapSDEScheduler` from the current scheduler's config and the student's training schedule
        (the stock scheduler is kept for `unload_piflow_adapter`)."""
        if not isinstance(self.scheduler, FlowMapSDEScheduler):
            self._piflow_stock_scheduler = self.scheduler
        scheduler = FlowMapSDEScheduler.from_config(
            self.scheduler.config, shift=student.settings.shift, use_dynamic_shifting=False,
            final_step_size_scale=student.settings.final_step_size_scale)
        self.register_modules(scheduler=scheduler)

    def set_piflow_student(self, student: DiffusersPolicyStudent) -> DiffusersPolicyStudent:
        """Use `student` (which must run `self.transformer` — `self.unet` for UNet families —, e.g. a LoRA student
        built with share_transformer=True)."""
        if not isinstance(student, DiffusersPolicyStudent):
            raise TypeError(f"student must be a DiffusersPolicyStudent, got {type(student).__name__}")
        if student.architecture.name != self.architecture_name:
            raise ValueError(f"a {student.architecture.name!r} student cannot drive a {type(self).__name__} "
                             f"(expects {self.architecture_name!r})")
        if student.transformer is not self.piflow_denoiser:
            self.register_modules(**{get_family(self.piflow_family).denoiser: student.transformer})
        self.piflow_student = student
        self._use_policy_scheduler(student)
        return student

    def load_piflow_adapter(self, path_or_dir: Union[str, Path], subfolder: Optional[str] = None,
                            adapter_name: Optional[str] = None, strength: float = 1.0,
                            strict: bool = True) -> DiffusersPolicyStudent:
        """Attach a saved π-Flow adapter (head, final norm, LoRA; piflow's or the authors' layout) to
        `self.transformer` (shared, not copied); `strength` scales the LoRA update, `strict=False` loads an
        incomplete adapter with a warning (`adapter.load_piflow_adapter`).

        Loading again replaces the adapter of the same name; a load that fails after the previous adapter's LoRA
        was removed leaves the stock pipeline (`unload_piflow_adapter`), never a student without its LoRA. The LoRA
        part is a named PEFT adapter, so ``pipe.set_adapters([name, "style"], adapter_weights=[1.0, 0.8])``
        combines it with other LoRAs."""
        name = adapter_name or LORA_ADAPTER
        had_lora = name in (getattr(self.piflow_denoiser, "peft_config", None) or {})
        try:
            student = load_piflow_adapter(self.piflow_denoiser, path_or_dir, subfolder=subfolder, adapter_name=name,
                                          strength=strength, strict=strict)
        except BaseException:
            if had_lora and name not in (getattr(self.piflow_denoiser, "peft_config", None) or {}):
                self.unload_piflow_adapter(name)
            raise
        return self.set_piflow_student(student)

    def unload_piflow_adapter(self, adapter_name: Optional[str] = None) -> None:
        """Undo `load_piflow_adapter` / `set_piflow_student`: remove the student's LoRA `adapter_name` (default: the
        student's, "piflow") from `self.transformer` (`adapter.unload_piflow_adapter`), drop the student (its policy
        head and final norm) and put the stock scheduler back: the stock pipeline's call computes what it did
        before the adapter was loaded."""
        unload_piflow_adapter(self.piflow_denoiser, adapter_name or LORA_ADAPTER)
        self.piflow_student = None
        stock = getattr(self, "_piflow_stock_scheduler", None)
        if stock is not None:
            self.register_modules(scheduler=stock)
            self._piflow_stock_scheduler = None

    def unload_lora_weights(self, *args, **kwargs) -> None:
        """The stock `unload_lora_weights` (every LoRA, the student's included), then the π-Flow student goes too
        (`unload_piflow_adapter`): a policy head without its LoRA would sample garbage."""
        super().unload_lora_weights(*args, **kwargs)
        self.unload_piflow_adapter()

    def _require_student(self) -> DiffusersPolicyStudent:
        student = self.piflow_student
        if student is None:
            raise RuntimeError(f"{type(self).__name__} has no π-Flow student: call pipe.load_piflow_adapter(path) "
                               "or pipe.set_piflow_student(student) first")
        parameter = base_parameter(self.piflow_denoiser)
        # the head and final norm run in the base dtype/device (§5.4); the policy itself is built in float32
        for module in (student.head, student.norm_out):
            module.to(device=parameter.device, dtype=parameter.dtype)
        return student

    def policy_denoise(self, noise: Tensor, cond: dict, num_inference_steps: Optional[int] = None,
                       temperature: Union[float, str] = "auto", generator: Optional[torch.Generator] = None,
                       image_seq_len: Optional[int] = None, total_substeps: Optional[int] = None,
                       callback_on_step_end: Optional[Callable] = None, sigmas: Optional[list] = None,
                       init: Optional[Tensor] = None, strength: float = 1.0) -> Tensor:
        """Run the π-Flow student from noise to clean latents with `piflow.sampling.sample` on this pipeline's
        `FlowMapSDEScheduler` — the loop of every π-Flow pipeline, public for pipelines of your own.

        Args:
            noise: the latents at σ = 1, (B, C, H, W) — (B, C, T, H, W) for video — in the layout the student's
                architecture takes (unpacked; float32 is used).
            cond: the student's condition dict (``encoder_hidden_states`` (B, L, D), …; see the family file).
            num_inference_steps: student evaluations (default: the student's training NFE), or give `sigmas`, the
                raw times (strictly decreasing in (0, 1]).
            temperature: GM temperature of the non-final steps ('auto' or a number).
            image_seq_len: token count (only for schedulers with dynamic shifting; the π-Flow one has it off).
            total_substeps: Euler substeps of the policy rollout per unit of raw time (default: the student's).
            callback_on_step_end: ``callback(pipe, i, timestep, {"latents": x}) -> {"latents": x'} or None``.
            init: image-to-image: the clean latents (shaped like `noise`) to start from; the steps are the last
                ⌊nfe·strength⌋ of the grid (`piflow.schedule.strength_raw_times`), the start state
                (1 − σ_0)·init + σ_0·noise; with no step left, `init` itself is returned.
            strength: in [0, 1]; 1 (the default) is text-to-image on the same noise, whatever `init` holds.

        Returns:
            the latents at σ = 0, float32, shaped like `noise`.
        """
        student = self._require_student()
        if not isinstance(self.scheduler, FlowMapSDEScheduler):
            self._use_policy_scheduler(student)
        scheduler = self.scheduler
        if num_inference_steps is None and sigmas is None:
            num_inference_steps = student.settings.nfe      # the student's training NFE
        if strength != 1.0:
            if init is None:
                raise ValueError("strength < 1 needs an init image (image-to-image) to start from")
            if sigmas is not None:
                raise ValueError("give sigmas or strength (image-to-image on the default grid), not both")
            sigmas = strength_raw_times(num_inference_steps, strength, scheduler.config.final_step_size_scale)
            if not sigmas:                       # no step left: the input image, as it was encoded
                return init.float()
            num_inference_steps = None
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
                              else total_substeps, init=None if init is None else init.float())
        finally:
            student.train(was_training)

    def _check_stock_arguments(self, call: dict) -> None:
        """The stock arguments a π-Flow loop cannot honour: attention kwargs (the student runs its own forward) and
        callback tensors other than ``latents`` are errors; CFG arguments (negative prompts, CFG scales) are
        accepted with a warning — the student has guidance distilled in."""
        for name, value in call.items():
            if name.endswith("attention_kwargs") and value:
                raise ValueError(f"{name}: π-Flow pipelines run the student's own forward and take none; "
                                 "scale LoRAs with pipe.set_adapters([...], adapter_weights=[...]) instead")
        extra = sorted(set(call["callback_on_step_end_tensor_inputs"] or ()) - {"latents"})
        if extra:
            raise ValueError(f"callback_on_step_end_tensor_inputs: π-Flow pipelines pass ['latents'] to callbacks, "
                             f"not {extra}")
        unused = get_family(self.piflow_family).pipeline.unused
        given = sorted(name for name, neutral in unused.items()          # neutral: None, or a number (CFG scale 1)
                       if call[name] is not None and (neutral is None or call[name] != neutral))
        if given:
            warnings.warn(f"{', '.join(given)} unused: the π-Flow student has classifier-free guidance distilled in",
                          UserWarning, stacklevel=5)          # the caller of pipe(...)

    def _init_latents(self, hooks, call: dict, noise: Tensor) -> Optional[Tensor]:
        """Image-to-image: the init image of the call (PIL image(s), arrays or (B, 3, H, W) tensors in [−1, 1], one
        or one per sample), resized to the output size and encoded by the family's `encode` hook; None without
        one."""
        if hooks.encode is None:
            return None
        image = call.get(hooks.init_image_argument)
        if image is None:
            return None
        height, width = (int(size) * self.vae_scale_factor for size in noise.shape[-2:])
        pixels = self.image_processor.preprocess(image, height=height, width=width)
        latents = hooks.encode(self, pixels.to(self._execution_device)).float()
        if latents.shape[0] == 1 and noise.shape[0] > 1:
            latents = latents.expand(noise.shape[0], *latents.shape[1:])
        if latents.shape != noise.shape:
            raise ValueError(f"{hooks.init_image_argument}: give one image or one per generated image ("
                             f"{noise.shape[0]}); it encoded to {tuple(latents.shape)}, the noise is "
                             f"{tuple(noise.shape)}")
        return latents

    @torch.no_grad()
    def _piflow_call(self, args: tuple, kwargs: dict):
        """The one π-Flow pipeline call: bind the arguments to the family's signature, check them, prepare noise
        and condition (family hook), `policy_denoise`, decode (family hook) and wrap as the stock output."""
        hooks = get_family(self.piflow_family).pipeline
        bound = hooks.signature().bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        del call["self"]
        self._check_stock_arguments(call)
        noise, cond, image_seq_len = hooks.prepare(self, call)
        init = self._init_latents(hooks, call, noise)
        x = self.policy_denoise(noise, cond, call["num_inference_steps"], call["temperature"], call["generator"],
                                image_seq_len, call["total_substeps"], call["callback_on_step_end"],
                                sigmas=call["sigmas"], init=init, strength=call.get("strength", 1.0))
        output = x if call["output_type"] == "latent" else hooks.decode(self, x, call["output_type"])
        self.maybe_free_model_hooks()
        return hooks.output_class()(**{hooks.output_field: output}) if call["return_dict"] else (output,)


def _build(family: Family) -> type:
    """The π-Flow pipeline class of `family`: `PiFlowPipelineMixin` + the stock pipeline, with a ``__call__`` of the
    family's signature and docstring that runs `PiFlowPipelineMixin._piflow_call`."""
    import diffusers

    stock = getattr(diffusers, family.stock_pipeline)
    hooks = family.pipeline

    def __call__(self, *args, **kwargs):
        return self._piflow_call(args, kwargs)

    __call__.__signature__ = hooks.signature()
    __call__.__doc__ = hooks.doc
    __call__.__qualname__ = f"{family.pi_pipeline}.__call__"
    doc = (f"`{family.stock_pipeline}` with a GM / DX π-Flow student (family {family.name!r}): "
           f"`num_inference_steps` student evaluations (4 as trained) instead of the teacher's dozens.")
    optional = list(dict.fromkeys([*getattr(stock, "_optional_components", []), *hooks.optional_components]))
    return type(family.pi_pipeline, (PiFlowPipelineMixin, stock),
                {"__call__": __call__, "__doc__": doc, "__module__": __name__, "piflow_family": family.name,
                 "architecture_name": family.architecture, "_optional_components": optional})


def pipeline_class(family: str) -> type:
    """The π-Flow pipeline class of `family` (a name of `families.FAMILIES`), e.g. `PiFluxPipeline` for "flux";
    built on first use for a family registered after this module was imported."""
    spec = get_family(family)
    if spec.pi_pipeline not in globals():
        globals()[spec.pi_pipeline] = _build(spec)
    return globals()[spec.pi_pipeline]


for _name in FAMILIES:
    pipeline_class(_name)
