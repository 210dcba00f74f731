"""Tests for piflow.models.dit."""
import json

import pytest
import torch
import torch.nn.functional as F

from piflow.models import DIT_PRESETS, DiT, DiTConfig


def tiny(**overrides) -> DiT:
    kwargs = dict(in_channels=3, input_size=8, num_classes=10)
    kwargs.update(overrides)
    return DiT.from_preset("DiT-T/2", **kwargs)


def randomize_(model: DiT, seed: int = 0) -> DiT:
    """Overwrite every parameter (incl. the zero-initialized modulation and proj_out) with noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_presets():
    assert set(DIT_PRESETS) == {"DiT-T", "DiT-S", "DiT-B", "DiT-L", "DiT-XL"}
    assert DIT_PRESETS["DiT-XL"] == dict(hidden_size=1152, depth=28, num_heads=16)
    cfg = DiTConfig.from_preset("DiT-B/4", input_size=32)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (768, 12, 12, 4)
    model = DiT.from_preset("DiT-T", in_channels=2, input_size=(4, 6), patch_size=2, num_classes=0)
    assert model.grid_size == (2, 3) and len(model.blocks) == 2
    with pytest.raises(ValueError, match="unknown DiT preset"):
        DiT.from_preset("DiT-Q/2")


@pytest.mark.parametrize("input_size,shape", [(8, (2, 3, 8, 8)), ((8, 4), (2, 3, 8, 4)),
                                              ((3, 8, 4), (2, 3, 3, 8, 4))])
def test_forward_shapes_and_zero_init(input_size, shape):
    model = tiny(input_size=input_size)
    x = torch.randn(shape)
    u = model(x, torch.tensor([10.0, 900.0]), torch.tensor([1, 2]))
    assert u.shape == shape
    assert torch.all(u == 0)  # adaLN-Zero: untrained model outputs exactly 0
    tokens, cond = model.features(x, 500.0)
    assert tokens.shape == (2, model.num_tokens, 64) and cond.shape == (2, 64)
    with torch.no_grad():
        model.proj_out.weight.normal_()
    u = model(x, 500.0, torch.tensor([1, 2]))
    assert u.shape == shape and u.abs().sum() > 0
    assert torch.allclose(u, model.unpatchify(model.proj_out(model.features(x, 500.0, torch.tensor([1, 2]))[0]), 3))


def test_learn_sigma_doubles_channels():
    model = tiny(learn_sigma=True)
    assert model.out_channels == 6 and model(torch.randn(1, 3, 8, 8), 1.0).shape == (1, 6, 8, 8)


@pytest.mark.parametrize("input_size,shape", [((8, 4), (2, 5, 8, 4)), ((3, 8, 4), (2, 5, 3, 8, 4))])
def test_patchify_roundtrip_and_layout(input_size, shape):
    model = tiny(input_size=input_size)
    x = torch.randn(shape)
    tokens = model.patchify(x)
    assert tokens.shape == (2, model.num_tokens, 2 * 2 * 5)
    assert torch.equal(model.unpatchify(tokens, 5), x)
    y = torch.randn(2, model.num_tokens, 2 * 2 * 7)
    assert torch.equal(model.patchify(model.unpatchify(y, 7)), y)
    # layout: token (0, 1) of the first frame holds x[..., 0:2, 2:4] as (p_row, p_col, c), channel fastest
    first = x if x.dim() == 4 else x[:, :, 0]
    expected = first[:, :, 0:2, 2:4].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(tokens[:, 1], expected)


def test_patch_embedding_equals_conv():
    model = randomize_(tiny())
    x = torch.randn(2, 3, 8, 8)
    lin = model.x_embedder
    conv_weight = lin.weight.view(64, 2, 2, 3).permute(0, 3, 1, 2)  # (out, c, p_row, p_col)
    conv = F.conv2d(x, conv_weight, lin.bias, stride=2).flatten(2).transpose(1, 2)
    assert torch.allclose(lin(model.patchify(x)), conv, atol=1e-5)


def test_unpatchify_bad_shape():
    model = tiny()
    with pytest.raises(ValueError, match="tokens_out must have shape"):
        model.unpatchify(torch.randn(2, 16, 13), 3)


def test_class_conditioning_and_null_class():
    model = randomize_(tiny())
    assert model.y_embedder.weight.shape[0] == 11 and model.null_class_index == 10
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([300.0, 300.0])
    u_a = model(x, t, torch.tensor([0, 0]))
    u_b = model(x, t, torch.tensor([5, 5]))
    assert not torch.allclose(u_a, u_b)
    # y=None means the null class
    assert torch.equal(model(x, t), model(x, t, torch.tensor([10, 10])))
    with pytest.raises(ValueError, match=r"y must lie in \[0, 10\]"):
        model(x, t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="y must be an integer tensor"):
        model(x, t, torch.tensor([0.0, 1.0]))


def test_drop_labels():
    model = tiny(class_dropout_prob=0.5)
    y = torch.arange(10).repeat(20)
    dropped = model.drop_labels(y, generator=torch.Generator().manual_seed(0))
    is_null = dropped == model.null_class_index
    assert 0.3 < is_null.float().mean() < 0.7
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.all(model.drop_labels(y, drop_prob=1.0) == 10)
    assert torch.equal(model.drop_labels(y, drop_prob=0.0), y)


def test_unconditional():
    model = tiny(num_classes=0)
    assert model.y_embedder is None
    assert model(torch.randn(1, 3, 8, 8), 1.0).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 3, 8, 8), 1.0, torch.tensor([0]))


def test_bad_inputs():
    model = tiny()
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\)"):
        model(torch.randn(2, 3, 8, 6), 1.0)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 3, 1, 8, 8), 1.0)
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(2, 4, 8, 8), 1.0)
    with pytest.raises(ValueError, match="t must"):
        model(torch.randn(2, 3, 8, 8), torch.ones(3))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiTConfig(input_size=7, patch_size=2, hidden_size=64, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig(hidden_size=64, num_heads=3, depth=1)
    with pytest.raises(ValueError, match="input_size"):
        DiTConfig(input_size=(1, 2, 3, 4), hidden_size=64, depth=1, num_heads=2)


def test_save_load_roundtrip(tmp_path):
    model = randomize_(tiny(input_size=(2, 8, 4)))
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = DiT.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    ref, new = model.state_dict(), loaded.state_dict()
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)
    x, y = torch.randn(2, 3, 2, 8, 4), torch.tensor([3, 10])
    assert torch.equal(model(x, 100.0, y), loaded(x, 100.0, y))
    # bf16 weights keep their dtype
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert DiT.from_pretrained(tmp_path / "bf16").proj_out.weight.dtype == torch.bfloat16


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiT.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        DiT.from_pretrained(tmp_path / "empty")
    tiny().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        DiT.from_pretrained(tmp_path / "m")
    # config says a different width than the stored weights
    tiny().save_pretrained(tmp_path / "mm")
    cfg_path = tmp_path / "mm" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hidden_size"] = 32
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatches"):
        DiT.from_pretrained(tmp_path / "mm")
    cfg["hidden_size"], cfg["bogus"] = 64, 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown DiTConfig fields"):
        DiT.from_pretrained(tmp_path / "mm")


def test_gradient_checkpointing_same_grads():
    model = randomize_(tiny(input_size=(2, 8, 4)))
    x, t, y = torch.randn(2, 3, 2, 8, 4), torch.tensor([100.0, 700.0]), torch.tensor([1, 4])

    def grads(checkpointing: bool):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        model(x, t, y).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert all(torch.allclose(plain[n], ckpt[n], rtol=1e-5, atol=1e-7) for n in plain)
    assert plain["blocks.0.attn.qkv.weight"].abs().sum() > 0


def test_extra_condition_is_added_to_the_conditioning(tiny_dit):
    model = tiny_dit()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([300.0, 700.0]), torch.tensor([0, 2])
    assert model.extra_condition_dim == 32
    torch.testing.assert_close(model(x, t, y, extra_condition=torch.zeros(2, 32)), model(x, t, y))
    shift = torch.randn(2, 32)
    tokens, c = model.features(x, t, y, extra_condition=shift)
    torch.testing.assert_close(c, model.condition_embedding(t, y, 2, x.device) + shift)
    with pytest.raises(ValueError, match="extra_condition must have shape"):
        model(x, t, y, extra_condition=torch.zeros(2, 31))
