"""π-Flow students and teachers on diffusers transformers — FLUX.1, FLUX.2, Qwen-Image(-Edit), SD3, Z-Image and Wan
(algorithm.md §6.3–6.5) — without changing the model's code.

The student runs the transformer unchanged and reads, through forward hooks, the tokens that enter its final
projection (after the final norm) and the conditioning embedding `temb` of that final layer; a `GMHead` (K per-token
copies of the projection's outputs, per-pixel log-weights, log-std MLP on the detached temb) or `DXHead` replaces
the projection and is initialised from it. An `Architecture` (one per family file of
`piflow.integrations.diffusers.families`, or your own through `register_architecture`) says how latents enter the
model and how tokens map back. Only the generated tokens (the first L) feed the head and the teacher's velocity;
reference tokens condition.

LoRA (§6.6): `add_student_lora` wraps the feed-forward and timestep-MLP layers with a PEFT adapter (each
architecture's targets are listed and explained in its family file); a student built with
``share_transformer=True`` then shares every frozen base weight with the teacher (`DiffusersTeacher` runs the same
module with adapters disabled and the original final norm), while the student swaps in its own trainable copy.
Every registered architecture has the documented aliases ``<alias>Teacher`` and ``<alias>PolicyStudent``
(`FluxTeacher`, `Flux2Teacher`, `QwenImageTeacher`, `SD3Teacher`, `ZImageTeacher`, `WanTeacher`, …).

Diffusion architectures (an `Architecture.parametrisation`, e.g. PixArt-α's ε-prediction): teacher and student
run the network at (x_t, t) = `network_inputs(x_σ, σ)` of the architecture's `Parametrisation.converter` (a
`piflow.diffusion.DiffusionTeacher`) and turn outputs into velocities with its `velocity_from_output` — the one
conversion both share; see `DiffusersPolicyStudent` for what that means for the GM means and DX nodes.

UNets (SD 1.5, SDXL: `families.sd15`): the output layer is ``conv_out``, an `nn.Conv2d`; the one branch on it is in
`DiffusersPolicyStudent.__init__` (``spatial_features``): the head is then convolutional (`piflow.heads`, K / N
copies of conv_out), reads the (B, C', H, W) features entering conv_out, and its per-pixel outputs are laid out like
tokens of patch 1 — everything else (final-norm copy, capture hooks, diffusion conversion, policies) is shared.

Adapter files: `piflow.integrations.diffusers.adapter`; pipelines: `piflow.integrations.diffusers.pipelines`.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from piflow.heads import make_policy_head, projection_shape
from piflow.integrations.diffusers.families import (ARCHITECTURES, TEXT_TO_IMAGE_SCHEDULE,  # noqa: F401
                                                    Architecture, get_architecture, register_architecture)
from piflow.integrations.diffusers.families.base import (PATCH, pack_latents, unpack_tokens,  # noqa: F401
                                                         unpatchify_pqc)
from piflow.integrations.diffusers.families.flux import FLUX_LORA_TARGETS
from piflow.integrations.diffusers.quantization import base_parameter, float_copy, float_linear
from piflow.policies import policy_from_outputs, resolve_policy_kwargs
from piflow.settings import PiIDSettings, policy_kind

LORA_ADAPTER = "piflow"
# the settings each policy takes from `policy_kwargs` (saved in adapters' policy_config)
POLICY_SETTINGS = {"gmflow": ("eps",), "dx": ("mode", "segment_size", "shift", "eps")}

def with_peft_support(transformer: nn.Module) -> nn.Module:
    """`transformer` with diffusers' PEFT methods (add_adapter, disable_adapters, delete_adapters, …): a model class
    without `PeftAdapterMixin` (PixArtTransformer2DModel in diffusers 0.42) becomes, in place, an instance of a
    subclass of the same name that mixes it in — the weights, config and ``type(transformer).__name__`` (adapter
    checks, ``save_pretrained``) are unchanged."""
    from diffusers.loaders.peft import PeftAdapterMixin

    cls = type(transformer)
    if not isinstance(transformer, PeftAdapterMixin):
        transformer.__class__ = type(cls.__name__, (cls, PeftAdapterMixin),
                                     {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                      "__doc__": cls.__doc__})
    return transformer


def add_student_lora(transformer: nn.Module, rank: int = 256, alpha: Optional[float] = None, dropout: float = 0.05,
                     target_modules: Any = FLUX_LORA_TARGETS, adapter_name: str = LORA_ADAPTER) -> None:
    """Add a PEFT LoRA adapter (Gaussian A, zero B, so the output is unchanged) and freeze all base weights.

    `target_modules` defaults to the FLUX list; use ``ARCHITECTURES[name].lora_targets(transformer)`` otherwise."""
    try:
        from peft import LoraConfig
    except ImportError as error:  # pragma: no cover - optional dependency
        raise ImportError("LoRA students need `pip install peft`") from error
    transformer.requires_grad_(False)
    with_peft_support(transformer)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                                       init_lora_weights="gaussian", target_modules=target_modules), adapter_name)


def set_lora_strength(transformer: nn.Module, strength: float, adapter_name: str = LORA_ADAPTER) -> int:
    """Scale the LoRA update of `adapter_name` by `strength` (1: as trained; other adapters untouched, the policy
    head and final norm are not LoRA and stay as trained). Returns the number of LoRA layers rescaled."""
    from piflow.checks import check_number

    strength = check_number(strength, "strength")
    layers = [m for m in transformer.modules() if adapter_name in getattr(m, "scaling", {}) and hasattr(m, "set_scale")]
    for layer in layers:
        layer.set_scale(adapter_name, strength)
    return len(layers)


def _patch_size(transformer: nn.Module, architecture: Architecture):
    if architecture.patch_size is not None:
        return architecture.patch_size(transformer)
    return PATCH if architecture.packs_outside else int(transformer.config.patch_size)


def _num_tokens(size: tuple[int, ...], patch) -> int:
    """Generated tokens of a latent of spatial `size` (H, W) or (T, H, W) with `patch` (int or per-axis tuple)."""
    patches = (patch,) * len(size) if isinstance(patch, int) else tuple(patch)
    count = 1
    for extent, step in zip(size, patches):
        count *= extent // step
    return count


def _patch_volume(patch) -> int:
    return patch ** 2 if isinstance(patch, int) else int(torch.tensor(patch).prod())


def _split_path(transformer: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return (transformer.get_submodule(parent) if parent else transformer), leaf


class FinalParameter(nn.Module):
    """A student's own copy of a final-layer parameter (Wan's ``scale_shift_table``): the parameter ``weight``."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.weight = nn.Parameter(value.detach().clone())


def final_norm_copy(transformer: nn.Module, architecture: Architecture) -> nn.Module:
    """A trainable float copy of the architecture's final norm (a module, or a `FinalParameter`)."""
    parent, leaf = _split_path(transformer, architecture.final_norm)
    if leaf in parent._parameters:
        return FinalParameter(parent._parameters[leaf])
    return float_copy(parent._modules[leaf])


@contextmanager
def final_norm_swapped(transformer: nn.Module, architecture: Architecture, norm: nn.Module):
    """Run `transformer` with the student's final norm `norm` in place of its own inside the block."""
    parent, leaf = _split_path(transformer, architecture.final_norm)
    slots = parent._parameters if isinstance(norm, FinalParameter) else parent._modules
    original = slots[leaf]
    slots[leaf] = norm.weight if isinstance(norm, FinalParameter) else norm
    try:
        yield
    finally:
        slots[leaf] = original


def output_projection(transformer: nn.Module, architecture: Architecture) -> nn.Module:
    """The teacher's output layer as a float `nn.Linear` (token models) or the UNet's `nn.Conv2d` ``conv_out``,
    times `output_sign` (the head starts from it)."""
    projection = float_linear(transformer.get_submodule(architecture.projection))
    if architecture.output_sign == 1:
        return projection
    signed = copy.deepcopy(projection)            # never the teacher's own layer
    with torch.no_grad():
        signed.weight.mul_(architecture.output_sign)
        if signed.bias is not None:
            signed.bias.mul_(architecture.output_sign)
    return signed


def kept_channels(projection: nn.Module, layout: str, patch_volume: int, keep: Optional[int]) -> nn.Module:
    """The output rows of `projection` that produce the first `keep` channels of every patch position (a new
    layer; `projection` itself when all are kept): a learned-variance model's projection emits 2C channels of
    which the first C are the prediction. layout "pc": row = position·c_total + channel; "cp": channel·|patch| +
    position. A UNet's ``conv_out`` (`nn.Conv2d`, one pixel per position) keeps its first `keep` output channels."""
    if isinstance(projection, nn.Conv2d):
        if keep is None or keep == projection.out_channels:
            return projection
        if keep > projection.out_channels:
            raise ValueError(f"cannot keep {keep} of the {projection.out_channels} output channels")
        kept = copy.deepcopy(projection)
        kept.out_channels = keep
        kept.weight = nn.Parameter(projection.weight.detach()[:keep].clone())
        if projection.bias is not None:
            kept.bias = nn.Parameter(projection.bias.detach()[:keep].clone())
        return kept
    total = projection.out_features // patch_volume
    if keep is None or keep == total:
        return projection
    if keep > total or projection.out_features % patch_volume:
        raise ValueError(f"cannot keep {keep} of the {projection.out_features} outputs (|patch| = {patch_volume})")
    index = torch.arange(projection.out_features)
    index = (index.reshape(patch_volume, total)[:, :keep] if layout == "pc"
             else index.reshape(total, patch_volume)[:keep]).reshape(-1)
    kept = nn.Linear(projection.in_features, index.numel(), bias=projection.bias is not None)
    kept = kept.to(device=projection.weight.device, dtype=projection.weight.dtype)
    with torch.no_grad():
        kept.weight.copy_(projection.weight[index])
        if projection.bias is not None:
            kept.bias.copy_(projection.bias[index])
    return kept


def diffusion_converter(transformer: nn.Module, architecture: Architecture, scheduler_config: Any = None):
    """The `DiffusionTeacher` converting the architecture's network inputs and outputs (None for flow models)."""
    if architecture.parametrisation is None:
        if scheduler_config is not None:
            raise ValueError(f"scheduler_config is for diffusion architectures; {architecture.name!r} is a flow model")
        return None
    return architecture.parametrisation.converter(transformer, scheduler_config)


@contextmanager
def capture_final_features(transformer: nn.Module, architecture: Union[str, Architecture] = "flux"):
    """Record the tokens entering the architecture's output projection and its conditioning embedding."""
    arch = get_architecture(architecture)
    captured: dict[str, Tensor] = {}

    def read_temb(module, args, kwargs, output):
        captured["temb"] = arch.read_temb(args, kwargs, output)

    def before_proj(module, args):
        captured["tokens"] = args[0]

    handles = [transformer.get_submodule(arch.temb_module).register_forward_hook(read_temb, with_kwargs=True),
               transformer.get_submodule(arch.projection).register_forward_pre_hook(before_proj)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def adapters_disabled(transformer: nn.Module):
    """Run `transformer` as the base model (PEFT adapters off) inside the block; a no-op without adapters."""
    has_adapters = bool(getattr(transformer, "_hf_peft_config_loaded", False))
    if has_adapters:
        transformer.disable_adapters()
    try:
        yield
    finally:
        if has_adapters:
            transformer.enable_adapters()


class DiffusersTeacher:
    """σ-space teacher around a diffusers transformer: ``teacher(latents (B,C,H,W), sigma (B,), cond) -> u``.

    LoRA adapters that a shared student added are disabled for every teacher call. A diffusion architecture's
    network runs at (x_t, t) = `network_inputs(latents, σ)` and its output becomes u through
    `velocity_from_output` of the converter built from `scheduler_config` (a diffusers scheduler or its config;
    default: the architecture's declared one; `Parametrisation`)."""

    def __init__(self, transformer: nn.Module, architecture: Union[str, Architecture] = "flux",
                 scheduler_config: Any = None):
        self.transformer = transformer
        self.architecture = get_architecture(architecture)
        if self.architecture.prepare_network is not None:
            self.architecture.prepare_network(transformer)
        self.diffusion = diffusion_converter(transformer, self.architecture, scheduler_config)

    @torch.no_grad()
    def __call__(self, latents: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        arch = self.architecture
        x_in, t_in = (latents, sigma) if self.diffusion is None else self.diffusion.network_inputs(latents, sigma)
        with adapters_disabled(self.transformer):
            out = arch.read_output(self.transformer(**arch.model_inputs(x_in, t_in, cond), return_dict=False))
        if arch.output_is_tokens:
            patch = _patch_size(self.transformer, arch)
            out = arch.tokens_to_latents(out[:, :_num_tokens(latents.shape[2:], patch)], *latents.shape[2:], patch)
        if self.diffusion is not None:
            return self.diffusion.velocity_from_output(out, x_in, t_in).to(latents.dtype)
        if arch.output_sign != 1:
            out = out * arch.output_sign
        return out.to(latents.dtype)


class DiffusersPolicyStudent(nn.Module):
    """GM / DX student ``(latents, sigma, cond) -> dict`` of policy parameters on a diffusers transformer.

    Args:
        transformer: the transformer (deep-copied unless `share_transformer`; sharing is for LoRA setups where
            the teacher is the same module with adapters disabled).
        policy: "gmflow" (K components, one `latent_channels`-dim GM per latent pixel) or "dx" (N nodes).
        latent_channels: the VAE latent channels C of one GM chunk (16 for FLUX/SD3, 4 in tiny tests).
        architecture: "flux", "sd3", "qwen" or a registered `Architecture`.
        settings: the π-ID settings it is (or was) trained with; pipelines sample on its schedule (nfe, shift,
            final_step_size_scale, total_substeps) and adapters save it. Default: the text-to-image schedule of
            §4.7 (4 NFE, shift 3.2, f 0.5).
        policy_kwargs: settings of the policy built from the outputs (GM ``eps``; DX ``mode``, ``segment_size``,
            ``shift`` — DX defaults come from `settings`), saved in the adapter's ``policy_config``.
        scheduler_config: diffusion architectures only: the diffusers scheduler (config) whose schedule and
            prediction type convert the network (default: the architecture's `Parametrisation`); adapters save it.

    Diffusion architectures (docs/algorithm.md §15): the network sees (x_t, t) = `network_inputs(x_σ, σ)`, and u is
    affine in its output, u = a(σ)·out + b(σ)·x_t per sample (`velocity_from_output`; for ε-prediction
    a = (α + s)/α, b = −1/α). The head predicts in the network's output space: component k's output mean out_k
    (the first `out_channels` of the output projection's rows, replicated per component, so at initialisation
    out_k is the teacher's output up to the head noise) is mapped by the same affine map, μ_k = a·out_k + b·x_t,
    which is what ``means`` holds (velocity space, as for flow models). The whole mixture is pushed forward by
    that map: the weights are unchanged (``logweights`` are the head's) and every std scales by |a|
    (``logstds`` = the head's + log|a|, so the head's log-std MLP works in the network's output units, e.g. ε's,
    while the velocity-space stds grow like 1/α near σ = 1 as the means' spread does). The policy is therefore
    the GM of u at (x_σ, σ) with means μ_k and stds |a|·s, and its posterior at any later (x, σ') is the usual
    GMFlow posterior of that velocity mixture (`piflow.policies`): nothing downstream knows the teacher was a
    diffusion model. DX nodes are mapped the same way (node_k = a·out_k + b·x_t, all at the evaluation's (x_t, t)).
    """

    def __init__(self, transformer: nn.Module, policy: str = "gmflow", num_components: int = 8,
                 num_nodes: int = 10, dx_mode: str = "grid", latent_channels: int = 16,
                 head_noise_std: float = 0.05, logstd_hidden: int = 1024, share_transformer: bool = False,
                 generator: Optional[torch.Generator] = None, architecture: Union[str, Architecture] = "flux",
                 settings: Optional[PiIDSettings] = None, policy_kwargs: Optional[dict] = None,
                 scheduler_config: Any = None):
        super().__init__()
        self.policy_kind = policy_kind(policy)
        self.settings = settings if settings is not None else PiIDSettings(
            policy=self.policy_kind, **TEXT_TO_IMAGE_SCHEDULE)
        if self.settings.policy != self.policy_kind:
            raise ValueError(f"settings.policy={self.settings.policy!r} does not match policy={policy!r}")
        self.policy_kwargs = dict(policy_kwargs or {})
        unknown = sorted(set(self.policy_kwargs) - set(POLICY_SETTINGS[self.policy_kind]))
        if unknown:
            raise ValueError(f"policy_kwargs {unknown} are not {self.policy_kind} policy settings; expected some of "
                             f"{list(POLICY_SETTINGS[self.policy_kind])}")
        if self.policy_kind == "dx":             # the policy interpolates the nodes the head was built for
            if self.policy_kwargs.setdefault("mode", dx_mode) != dx_mode:
                raise ValueError(f"policy_kwargs mode={self.policy_kwargs['mode']!r} differs from dx_mode={dx_mode!r}")
        self.architecture = get_architecture(architecture)
        self.transformer = transformer if share_transformer else copy.deepcopy(transformer)
        if self.architecture.prepare_network is not None:
            self.architecture.prepare_network(self.transformer)
        # the student's own final norm (trainable, §6.6; a float copy on a quantized base), swapped in only while
        # the student runs
        self.norm_out = final_norm_copy(self.transformer, self.architecture).requires_grad_(True)
        projection = output_projection(self.transformer, self.architecture)   # the head starts from the teacher's
        self.latent_channels = latent_channels
        self.patch = _patch_size(self.transformer, self.architecture)
        # diffusion architectures: the converter of network inputs/outputs (shared with the teacher's code path)
        self.diffusion = diffusion_converter(self.transformer, self.architecture, scheduler_config)
        self.scheduler_config = (None if self.diffusion is None
                                 else self.architecture.parametrisation.resolved_config(scheduler_config))
        if self.diffusion is not None:
            projection = kept_channels(projection, self.architecture.layout, _patch_volume(self.patch),
                                       self.diffusion.out_channels)
        # the one branch between token models (an nn.Linear proj_out on tokens) and UNets (an nn.Conv2d conv_out on
        # (B, C', H, W) features, one pixel per position): the head is linear or convolutional like the projection
        in_dim, out_dim, kernel_size = projection_shape(projection)
        self.spatial_features = kernel_size is not None
        if out_dim != latent_channels * _patch_volume(self.patch):
            raise ValueError(f"{self.architecture.projection} has {out_dim} outputs, expected latent_channels·"
                             f"|patch| = {latent_channels * _patch_volume(self.patch)}")
        self.head = make_policy_head(
            self.policy_kind, in_dim, out_dim, channels=latent_channels,
            cond_dim=self.architecture.cond_dim(self.transformer), num_components=num_components,
            num_nodes=num_nodes, dx_mode=dx_mode, logstd_hidden=logstd_hidden, layout=self.architecture.layout,
            teacher_projection=projection, noise_std=head_noise_std, generator=generator)

    @property
    def sampling(self) -> dict:
        """The training schedule (nfe, shift, final_step_size_scale, total_substeps) pipelines sample on."""
        return self.settings.sampling

    def resolved_policy_kwargs(self) -> dict:
        """`policy_kwargs` with the DX defaults of the training schedule filled in (what adapters save)."""
        s = self.settings
        return resolve_policy_kwargs(self.policy_kind, self.policy_kwargs, nfe=s.nfe,
                                     final_step_size_scale=s.final_step_size_scale, shift=s.shift)

    def policy(self, latents: Tensor, sigma: Tensor, cond: Any = None):
        """One evaluation at (latents, σ (B,)) as its policy, on the student's own schedule. The transformer sees
        the latents in its own dtype (bf16 bases); the policy is built at the float32 state `latents`."""
        dtype = base_parameter(self.transformer).dtype
        return policy_from_outputs(self(latents.to(dtype), sigma, cond), latents, sigma, self.policy_kind,
                                   policy_kwargs=self.resolved_policy_kwargs())

    def _unpack(self, per_token: Tensor, size: tuple[int, ...]) -> Tensor:
        """(B, L, N, F) per generated token → (B, N, c, *size)."""
        batch, length, num, features = per_token.shape
        flat = per_token.permute(0, 2, 1, 3).reshape(batch * num, length, features)
        spatial = self.architecture.tokens_to_latents(flat, *size, self.patch)
        return spatial.reshape(batch, num, *spatial.shape[1:])

    def _velocities(self, outputs: Tensor, x_in: Tensor, t_in: Tensor) -> Tensor:
        """(B, N, c, *size) per-component network outputs → velocities a·out_k + b·x_t (diffusion architectures;
        flow architectures' outputs are velocities already)."""
        if self.diffusion is None:
            return outputs
        return self.diffusion.component_velocities(outputs, x_in, t_in)

    def forward(self, latents: Tensor, sigma: Tensor, cond: Any = None) -> dict:
        size = tuple(latents.shape[2:])
        arch = self.architecture
        x_in, t_in = (latents, sigma) if self.diffusion is None else self.diffusion.network_inputs(latents, sigma)
        with final_norm_swapped(self.transformer, arch, self.norm_out), \
                capture_final_features(self.transformer, arch) as captured:
            self.transformer(**arch.model_inputs(x_in, t_in, cond), return_dict=False)
        features, temb = captured["tokens"], captured["temb"]
        if not self.spatial_features:               # tokens (B, L + …, D): the generated ones
            features = features[:, :_num_tokens(size, self.patch)]
        if self.policy_kind == "dx":            # (B, *positions, N, F) → per position (B, L, N, F)
            return {"u_grid": self._velocities(self._unpack(self.head(features).flatten(1, -3), size), x_in, t_in)}
        out = self.head(features, temb)
        out = out._replace(means=out.means.flatten(1, -3), logweights=out.logweights.flatten(1, -3))
        logstds = out.logstds
        if self.diffusion is not None:          # the velocity GM is the output GM pushed forward
            logstds = self.diffusion.velocity_logstds(logstds, t_in)
        return {"means": self._velocities(self._unpack(out.means, size), x_in, t_in),
                "logweights": self._unpack(out.logweights, size), "logstds": logstds}


def _bind_architecture(name: str, cls, architecture: Architecture, doc: str):
    """A documented alias `name`: ``name(transformer, …)`` = ``cls(transformer, …, architecture=architecture)``."""
    def build(*args, **kwargs):
        kwargs.setdefault("architecture", architecture)
        return cls(*args, **kwargs)
    build.__doc__ = doc
    build.__name__ = build.__qualname__ = name
    return build


def __getattr__(name: str) -> Any:
    """``<alias>Teacher`` / ``<alias>PolicyStudent`` of a registered architecture (e.g. `FluxTeacher`): the generic
    class with that architecture, built once."""
    for architecture in ARCHITECTURES.values():
        kinds = {f"{architecture.alias}Teacher": (DiffusersTeacher, "`DiffusersTeacher`"),
                 f"{architecture.alias}PolicyStudent": (DiffusersPolicyStudent, "GM / DX student")}
        if architecture.alias and name in kinds:
            cls, what = kinds[name]
            alias = _bind_architecture(name, cls, architecture,
                                       f"{what} on a `{architecture.base_class}` (architecture {architecture.name!r}).")
            globals()[name] = alias
            return alias
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

