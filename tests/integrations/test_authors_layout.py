"""Adapters in the authors' layout (Lakonik/piFlow's exporter, their pipelines' `load_piflow_adapter`, ComfyUI-piFlow):
piflow writes exactly their config fields, tensor names, dtypes and metadata; a model built and loaded the way their
loader does it (diffusers' `from_config` → `load_state_dict(strict=False, assign=True)` → `load_lora_adapter`)
computes the same outputs as piflow's student; their folders (including DX ones named after the base class) load in
piflow; bad fields are named with the expected value; `strength` scales the LoRA only."""
import inspect
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from piflow.errors import DataError  # noqa: E402
from piflow.integrations.diffusers.adapter import WEIGHTS, load_piflow_adapter, save_piflow_adapter  # noqa: E402
from piflow.integrations.diffusers.students import (ARCHITECTURES, DiffusersPolicyStudent,  # noqa: E402
                                                    add_student_lora, unpack_tokens)
from piflow.integrations.diffusers.tiny import tiny_components  # noqa: E402
from piflow.settings import PiIDSettings  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
CASES = [("flux", "gmflow"), ("flux", "dx"), ("qwen", "gmflow"), ("qwen", "dx"), ("flux2", "gmflow")]
LATENT = (4, 8, 8)                      # tiny latents: 4 channels, 8×8 → 16 tokens of 16 packed channels
GM_CLASSES = {"flux": "GMFluxTransformer2DModel", "qwen": "GMQwenImageTransformer2DModel",
              "flux2": "GMFlux2Transformer2DModel"}


def base_transformer(architecture):
    return tiny_components(architecture)["transformer"]


def student_on(transformer, architecture, policy, rank=4, alpha=None, seed=0):
    add_student_lora(transformer, rank=rank, alpha=alpha, target_modules=ARCHITECTURES[architecture].lora_targets(
        transformer))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():          # PEFT starts B at 0 and the head at the teacher: make every tensor matter
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=generator)
    settings = PiIDSettings(policy=policy, nfe=4, shift=3.2, final_step_size_scale=0.5)
    kwargs = {"segment_size": 1 / 3.5, "shift": 3.2} if policy == "dx" else {}
    student = DiffusersPolicyStudent(transformer, policy, num_components=2, num_nodes=3, latent_channels=4,
                                     logstd_hidden=16, share_transformer=True, architecture=architecture,
                                     policy_kwargs=kwargs, settings=settings, generator=generator)
    with torch.no_grad():
        for param in list(student.head.parameters()) + list(student.norm_out.parameters()):
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return student.eval()


def inputs(architecture, batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, *LATENT, generator=generator)
    sigma = torch.tensor([0.9, 0.4])[:batch]
    text = torch.randn(batch, 5, 32, generator=generator)
    if architecture == "flux":
        cond = {"encoder_hidden_states": text, "pooled_projections": torch.randn(batch, 32, generator=generator),
                "txt_ids": torch.zeros(5, 3), "guidance": torch.full((batch,), 3.5)}
    elif architecture == "flux2":        # FLUX.2 [dev]: three stacked 16-wide text layers, embedded guidance 4
        cond = {"encoder_hidden_states": torch.randn(batch, 5, 48, generator=generator),
                "guidance": torch.full((batch,), 4.0)}
    else:
        cond = {"encoder_hidden_states": text, "encoder_hidden_states_mask": torch.ones(batch, 5, dtype=torch.long)}
    return latents, sigma, cond


def expected_config(architecture, policy):
    """config.json as the authors' exporter writes it for the tiny bases (their classes' constructor fields)."""
    if architecture == "flux":
        base = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
                "axes_dims_rope": [4, 6, 6]}
    elif architecture == "flux2":       # GMFlux2Transformer2DModel's constructor fields
        base = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                "joint_attention_dim": 48, "timestep_guidance_channels": 32, "mlp_ratio": 3.0,
                "axes_dims_rope": [4, 4, 4, 4], "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True}
    else:
        base = {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                "axes_dims_rope": [4, 6, 6]}
    if policy == "gmflow":
        return {"_class_name": GM_CLASSES[architecture], "num_gaussians": 2, "constant_logstd": None,
                "logstd_inner_dim": 16, "gm_num_logstd_layers": 2, "logweights_channels": 4, "in_channels": 16,
                "out_channels": 16, **base}
    extra = {"guidance_embeds": False, "zero_cond_t": False, "use_additional_t_cond": False,
             "use_layer3d_rope": False} if architecture == "qwen" else {}
    return {"_class_name": "FluxTransformer2DModel" if architecture == "flux" else "QwenImageTransformer2DModel",
            "patch_size": 1, "in_channels": 16, "out_channels": 3 * 16, **base, **extra}


def authors_model(config, base):
    """A model built from config.json alone, the way the authors' loader builds it (`from_config`): DX is diffusers'
    own base class with enlarged outputs; GM adds their heads (proj_out_means / _logweights / _logstds) to it."""
    if config["_class_name"] not in GM_CLASSES.values():
        return getattr(diffusers, config["_class_name"]).from_config(config).eval()
    base_class = type(base)
    accepted = inspect.signature(base_class.__init__).parameters
    base_fields = {k: v for k, v in config.items() if k in accepted}
    assert set(config) - set(base_fields) <= {"_class_name", "_diffusers_version", "num_gaussians", "constant_logstd",
                                               "logstd_inner_dim", "gm_num_logstd_layers", "logweights_channels"}
    model = base_class(**base_fields)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    model.proj_out = torch.nn.Identity()              # their GM classes have no proj_out
    model.proj_out_means = torch.nn.Linear(inner, config["num_gaussians"] * config["out_channels"])
    model.proj_out_logweights = torch.nn.Linear(inner, config["num_gaussians"] * config["logweights_channels"])
    layers, width = [], inner
    for _ in range(config["gm_num_logstd_layers"] - 1):
        layers += [torch.nn.SiLU(), torch.nn.Linear(width, config["logstd_inner_dim"])]
        width = config["logstd_inner_dim"]
    model.proj_out_logstds = torch.nn.Sequential(*layers, torch.nn.SiLU(), torch.nn.Linear(width, 1))
    return model.eval()


def authors_load(directory, base):
    """Their loader's steps: config → model, base state + non-LoRA adapter tensors (cast to the base dtype) assigned,
    every key containing "lora" given to diffusers' `load_lora_adapter`. Stricter than theirs: nothing may be left
    unassigned and only the GM base's proj_out may go unused."""
    config = json.loads((directory / "config.json").read_text())
    model = authors_model(config, base)
    state, lora = dict(base.state_dict()), {}
    dtype = next(base.parameters()).dtype
    for key, value in load_file(directory / WEIGHTS).items():
        (lora if "lora" in key else state)[key.removeprefix("transformer.")] = value.to(dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    assert result.missing_keys == []
    allowed = {"proj_out.weight", "proj_out.bias"} if config["_class_name"] in GM_CLASSES.values() else set()
    assert set(result.unexpected_keys) <= allowed
    model.load_lora_adapter(lora, prefix=None, adapter_name="transformer_piflow")
    return model, config


@torch.no_grad()
def authors_outputs(model, config, student, latents, sigma, cond):
    """Their model's outputs in piflow's (B, K|N, C, H, W) layout (2×2 tokens unpacked as FLUX packs them)."""
    height, width = latents.shape[2:]
    captured = {}
    hook = model.norm_out.register_forward_pre_hook(lambda m, args: captured.update(temb=args[1]))
    out = model(**student.architecture.model_inputs(latents, sigma, cond), return_dict=False)[0]
    hook.remove()
    batch, length = out.shape[:2]

    def per_slot(tokens, slots):            # (B, L, slots·F) → (B, slots, F/4, H, W)
        flat = tokens.reshape(batch, length, slots, -1).permute(0, 2, 1, 3).reshape(batch * slots, length, -1)
        spatial = unpack_tokens(flat, height, width)
        return spatial.reshape(batch, slots, *spatial.shape[1:])

    if config["_class_name"] not in GM_CLASSES.values():
        return {"u_grid": per_slot(out, config["out_channels"] // student.transformer.proj_out.out_features)}
    k = config["num_gaussians"]
    logweights = model.proj_out_logweights(out).reshape(batch, length, k, -1).log_softmax(dim=2)
    return {"means": per_slot(model.proj_out_means(out), k), "logweights": per_slot(logweights.flatten(2), k),
            "logstds": model.proj_out_logstds(captured["temb"]).reshape(batch)}


def assert_outputs_close(got, expected, rtol, atol):
    assert set(got) == set(expected)
    for key in got:
        torch.testing.assert_close(got[key].reshape(expected[key].shape), expected[key], rtol=rtol, atol=atol)


@pytest.mark.parametrize("architecture,policy", CASES)
def test_export_is_what_their_exporter_writes(architecture, policy, tmp_path):
    student = student_on(base_transformer(architecture), architecture, policy)
    save_piflow_adapter(student, tmp_path / "a", layout="authors")
    text = (tmp_path / "a" / "config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"           # diffusers' config.json format
    assert config.pop("_diffusers_version") == diffusers.__version__
    assert config == expected_config(architecture, policy)
    with safe_open(str(tmp_path / "a" / WEIGHTS), "pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
        assert {handle.get_tensor(k).dtype for k in keys} == {torch.float16}
    assert metadata["policy_config"] == ('{"type": "GMFlow"}' if policy == "gmflow" else
                                         '{"segment_size": 0.2857142857142857, "shift": 3.2, "type": "DX"}')
    heads = ({"proj_out_means.weight", "proj_out_means.bias", "proj_out_logweights.weight", "proj_out_logweights.bias",
              "proj_out_logstds.1.weight", "proj_out_logstds.1.bias", "proj_out_logstds.3.weight",
              "proj_out_logstds.3.bias"} if policy == "gmflow" else {"proj_out.weight", "proj_out.bias"})
    lora_modules = {name for name, module in student.transformer.named_modules() if hasattr(module, "lora_A")}
    lora = {f"{m}.lora_{ab}.weight" for m in lora_modules for ab in "AB"}
    norm = {"norm_out.linear.weight"} | ({"norm_out.linear.bias"} if architecture != "flux2" else set())
    assert keys == heads | norm | lora         # FLUX.2's final norm (and theirs) has no bias


@pytest.mark.parametrize("architecture,policy", CASES)
def test_their_loader_computes_what_piflow_computes(architecture, policy, tmp_path):
    student = student_on(base_transformer(architecture), architecture, policy)
    latents, sigma, cond = inputs(architecture)
    with torch.no_grad():
        trained = student(latents, sigma, cond)
    save_piflow_adapter(student, tmp_path / "a", layout="authors")
    model, config = authors_load(tmp_path / "a", base_transformer(architecture))
    theirs = authors_outputs(model, config, student, latents, sigma, cond)
    ours = load_piflow_adapter(base_transformer(architecture), tmp_path / "a")
    with torch.no_grad():
        loaded = ours(latents, sigma, cond)
    assert_outputs_close(loaded, theirs, rtol=0, atol=0)              # same fp16 weights, same computation
    assert_outputs_close(loaded, trained, rtol=0, atol=2e-3)          # fp16 storage of the trained weights
    assert ours.sampling == student.sampling and ours.settings == student.settings     # piflow_config metadata


def test_lora_alpha_is_folded_into_b_for_their_alpha_equals_rank(tmp_path):
    student = student_on(base_transformer("flux"), "flux", "gmflow", rank=4, alpha=16.0)
    latents, sigma, cond = inputs("flux")
    with torch.no_grad():
        trained = student(latents, sigma, cond)
    save_piflow_adapter(student, tmp_path / "a", layout="authors")
    model, config = authors_load(tmp_path / "a", base_transformer("flux"))
    assert_outputs_close(authors_outputs(model, config, student, latents, sigma, cond), trained, rtol=0, atol=2e-3)
    save_piflow_adapter(student, tmp_path / "b")                    # piflow's layout keeps alpha as it is
    assert json.loads((tmp_path / "b" / "config.json").read_text())["lora_config"]["alpha"] == 16.0


@pytest.mark.parametrize("class_name", ["DXFluxTransformer2DModel", "FluxTransformer2DModel"])
def test_their_dx_folders_load_under_either_class_name(class_name, tmp_path):
    """Their exporter writes DXFluxTransformer2DModel; their loader needs the base class name (published adapters)."""
    student = student_on(base_transformer("flux"), "flux", "dx")
    save_piflow_adapter(student, tmp_path / "a", layout="authors")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps(dict(config, _class_name=class_name)))
    tensors = load_file(tmp_path / "a" / WEIGHTS)                 # their own files: no piflow_config metadata
    save_file(tensors, tmp_path / "a" / WEIGHTS, metadata={"policy_config": json.dumps(
        {"segment_size": 1 / 3.5, "shift": 3.2, "type": "DX"})})
    loaded = load_piflow_adapter(base_transformer("flux"), tmp_path / "a")
    assert loaded.policy_kind == "dx" and loaded.head.num_nodes == 3
    assert loaded.resolved_policy_kwargs() == {"mode": "grid", "segment_size": 1 / 3.5, "shift": 3.2}
    latents, sigma, cond = inputs("flux")
    with torch.no_grad():
        torch.testing.assert_close(loaded(latents, sigma, cond)["u_grid"], student(latents, sigma, cond)["u_grid"],
                                   rtol=0, atol=2e-3)


def rewrite(directory, config_change=None, policy_config=None):
    config = json.loads((directory / "config.json").read_text())
    config.update(config_change or {})
    for key, value in list(config.items()):
        if value == "<drop>":
            del config[key]
    (directory / "config.json").write_text(json.dumps(config))
    if policy_config is not None:
        save_file(load_file(directory / WEIGHTS), directory / WEIGHTS,
                  metadata={"policy_config": json.dumps(policy_config)})


@pytest.mark.parametrize("change,policy_config,message", [
    ({"num_layers": 19}, None, r"num_layers is 19, expected 1"),
    ({"num_gaussians": 8}, None, r"num_gaussians is 8, expected 2"),
    ({"out_channels": 64}, None, r"out_channels is 64, expected 16"),
    ({"constant_logstd": -2.0}, None, r"constant_logstd is -2.0, expected None"),
    ({"_class_name": "<drop>"}, None, r"no _class_name"),
    ({"_class_name": "GMSD3Transformer2DModel"}, None, r"_class_name must be one of \["),
    ({"_class_name": "GMQwenImageTransformer2DModel"}, None, r"is for a QwenImageTransformer2DModel"),
    (None, {"type": "DX"}, r"policy_config.type is 'DX', expected 'GMFlow'"),
    (None, {"type": "GMFlow", "temperature": 0.3}, r"unknown keys \['temperature'\]"),
])
def test_bad_fields_are_named_with_the_expected_value(change, policy_config, message, tmp_path):
    save_piflow_adapter(student_on(base_transformer("flux"), "flux", "gmflow"), tmp_path / "a", layout="authors")
    rewrite(tmp_path / "a", change, policy_config)
    with pytest.raises(DataError, match=message):
        load_piflow_adapter(base_transformer("flux"), tmp_path / "a")


def test_null_gm_out_channels_means_in_channels_as_in_their_class(tmp_path):
    save_piflow_adapter(student_on(base_transformer("flux"), "flux", "gmflow"), tmp_path / "a", layout="authors")
    rewrite(tmp_path / "a", {"out_channels": None})
    assert load_piflow_adapter(base_transformer("flux"), tmp_path / "a").head.num_components == 2


def test_authors_layout_has_no_sd3_class_and_nothing_is_written(tmp_path):
    sd3 = tiny_components("sd3")["transformer"]
    add_student_lora(sd3, rank=2, target_modules=ARCHITECTURES["sd3"].lora_targets(sd3))
    student = DiffusersPolicyStudent(sd3, "gmflow", num_components=2, latent_channels=4, logstd_hidden=8,
                                     share_transformer=True, architecture="sd3")
    with pytest.raises(ValueError, match="authors' adapter layout exists for"):
        save_piflow_adapter(student, tmp_path / "a", layout="authors")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="layout must be one of"):
        save_piflow_adapter(student, tmp_path / "a", layout="comfy")


@pytest.mark.parametrize("layout", ["piflow", "authors"])
def test_strength_scales_the_lora_update_only(layout, tmp_path):
    student = student_on(base_transformer("flux"), "flux", "gmflow")
    stored = torch.float16 if layout == "authors" else torch.float32
    trained_head = [p.detach().to(stored).float() for p in student.head.parameters()]
    save_piflow_adapter(student, tmp_path / "a", layout=layout)
    base = base_transformer("flux")
    add_student_lora(base, rank=2, target_modules=["ff.net.2"], adapter_name="style")    # another user LoRA
    layer = base.transformer_blocks[0].ff.net[2]                   # wrapped by both adapters
    style_scaling = dict(layer.scaling)["style"]
    full = load_piflow_adapter(base, tmp_path / "a")              # the newly added adapter is the active one
    assert layer.active_adapters == ["piflow"]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_lora = layer(x)
        base_only = layer.base_layer(x)
        half = load_piflow_adapter(base, tmp_path / "a", strength=0.5)
        torch.testing.assert_close(layer(x) - base_only, 0.5 * (with_lora - base_only), rtol=1e-5, atol=1e-6)
        for loaded in (full, half):                                # the head stays as trained
            assert all(torch.equal(p, q) for p, q in zip(loaded.head.parameters(), trained_head))
        assert layer.scaling["style"] == style_scaling             # other adapters untouched
        load_piflow_adapter(base, tmp_path / "a", strength=0.0)
        torch.testing.assert_close(layer(x), base_only)


def test_bad_strength_leaves_the_loaded_adapter_alone(tmp_path):
    first, second = (student_on(base_transformer("flux"), "flux", "gmflow", seed=s) for s in (0, 1))
    save_piflow_adapter(first, tmp_path / "a")
    save_piflow_adapter(second, tmp_path / "b")
    base = base_transformer("flux")
    loaded = load_piflow_adapter(base, tmp_path / "a")
    latents, sigma, cond = inputs("flux")
    with torch.no_grad():
        before = loaded(latents, sigma, cond)["means"]
        with pytest.raises(ValueError, match="strength must be a finite number"):
            load_piflow_adapter(base, tmp_path / "b", strength=float("nan"))
        assert torch.equal(loaded(latents, sigma, cond)["means"], before)


def test_polynomial_dx_keeps_its_mode_in_both_layouts(tmp_path):
    transformer = base_transformer("flux")
    add_student_lora(transformer, rank=2, target_modules=ARCHITECTURES["flux"].lora_targets(transformer))
    student = DiffusersPolicyStudent(transformer, "dx", num_nodes=3, dx_mode="polynomial", latent_channels=4,
                                     share_transformer=True)
    assert student.resolved_policy_kwargs()["mode"] == "polynomial"
    with pytest.raises(ValueError, match="differs from dx_mode"):
        DiffusersPolicyStudent(base_transformer("flux"), "dx", dx_mode="grid", latent_channels=4,
                               policy_kwargs={"mode": "polynomial"})
    with pytest.raises(ValueError, match=r"policy_kwargs \['temperature'\] are not gmflow policy settings"):
        DiffusersPolicyStudent(base_transformer("flux"), "gmflow", latent_channels=4,
                               policy_kwargs={"temperature": 0.5})
    for layout in ("piflow", "authors"):
        save_piflow_adapter(student, tmp_path / layout, layout=layout)
        loaded = load_piflow_adapter(base_transformer("flux"), tmp_path / layout)
        assert loaded.head.mode == "polynomial" and loaded.resolved_policy_kwargs()["mode"] == "polynomial"
    with safe_open(str(tmp_path / "authors" / WEIGHTS), "pt") as handle:
        assert json.loads(handle.metadata()["policy_config"])["mode"] == "polynomial"


def test_authors_layout_needs_lora_because_their_loader_does(tmp_path):
    student = DiffusersPolicyStudent(base_transformer("flux"), "gmflow", num_components=2, latent_channels=4,
                                     logstd_hidden=8)
    with pytest.raises(ValueError, match="only when it holds LoRA tensors"):
        save_piflow_adapter(student, tmp_path / "a", layout="authors")
    assert not (tmp_path / "a").exists()


def test_prefixed_keys_and_missing_gm_metadata_read_as_their_code_reads_them(tmp_path):
    student = student_on(base_transformer("flux"), "flux", "gmflow")
    save_piflow_adapter(student, tmp_path / "a", layout="authors")
    reference = load_piflow_adapter(base_transformer("flux"), tmp_path / "a")
    tensors = {f"transformer.{k}": v for k, v in load_file(tmp_path / "a" / WEIGHTS).items()}
    save_file(tensors, tmp_path / "a" / WEIGHTS)                   # no metadata: ComfyUI assumes GMFlow
    loaded = load_piflow_adapter(base_transformer("flux"), tmp_path / "a")
    latents, sigma, cond = inputs("flux")
    with torch.no_grad():
        assert_outputs_close(loaded(latents, sigma, cond), reference(latents, sigma, cond), rtol=0, atol=0)
    save_piflow_adapter(student_on(base_transformer("flux"), "flux", "dx"), tmp_path / "d", layout="authors")
    save_file(load_file(tmp_path / "d" / WEIGHTS), tmp_path / "d" / WEIGHTS)
    with pytest.raises(DataError, match="has no policy_config metadata"):      # DX needs its settings
        load_piflow_adapter(base_transformer("flux"), tmp_path / "d")


def test_package_face_is_flat_and_lazy():
    import subprocess
    import sys

    code = ("import sys, piflow, piflow.integrations.diffusers as d; "
            "assert 'diffusers' not in sys.modules and 'peft' not in sys.modules, 'eager import'; "
            "assert 'load_piflow_adapter' in dir(d); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    from piflow.integrations.diffusers import (FlowMapSDEScheduler, PiFluxPipeline, PiQwenImagePipeline,
                                               PiSD3Pipeline, load_piflow_adapter, save_piflow_adapter)
    from piflow.integrations.diffusers import adapter, pipelines, scheduler

    assert (PiFluxPipeline, PiQwenImagePipeline, PiSD3Pipeline) == (
        pipelines.PiFluxPipeline, pipelines.PiQwenImagePipeline, pipelines.PiSD3Pipeline)
    assert FlowMapSDEScheduler is scheduler.FlowMapSDEScheduler
    assert (load_piflow_adapter, save_piflow_adapter) == (adapter.load_piflow_adapter, adapter.save_piflow_adapter)
    import piflow.integrations.diffusers as package

    assert package.PiFlux2Pipeline is pipelines.PiFlux2Pipeline and package.PiWanPipeline is pipelines.PiWanPipeline
    with pytest.raises(AttributeError, match="no attribute 'PiKontextPipeline'"):
        package.PiKontextPipeline


def test_flux2_dx_has_no_authors_class_and_nothing_is_written(tmp_path):
    student = student_on(base_transformer("flux2"), "flux2", "dx")
    with pytest.raises(ValueError, match="no DX class for 'flux2'"):
        save_piflow_adapter(student, tmp_path / "a", layout="authors")
    assert not (tmp_path / "a").exists()
