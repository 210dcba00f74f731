"""The class-conditional U-Net: shapes, zero init, the student interface (features/proj_out/unpatchify), MeanFlow's
extra condition, persistence and its use by the image recipe."""
import json

import pytest
import torch

from piflow.methods.meanflow import AverageVelocityNet
from piflow.models import DiT, UNet, UNetConfig, load_image_network, read_image_network_config
from piflow.models.students import PolicyStudent
from piflow.policies import GMFlowPolicy

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(in_channels=1, input_size=8, channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
            num_heads=2, groups=4, num_classes=3)


def _random_unet(**overrides):
    torch.manual_seed(0)
    model = UNet(**{**TINY, **overrides})
    with torch.no_grad():                      # zero-initialised layers: randomise so outputs are informative
        for param in model.parameters():
            if param.abs().sum() == 0:
                param.normal_(0, 0.1)
    return model.eval()


def test_untrained_unet_outputs_zero_and_has_the_input_shape():
    model = UNet(**TINY)
    x = torch.randn(2, 1, 8, 8)
    out = model(x, torch.tensor([10.0, 900.0]), torch.tensor([0, 2]))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    assert model(torch.randn(1, 1, 8, 8), 500.0).shape == (1, 1, 8, 8)      # y None: the null class


def test_features_are_per_pixel_and_proj_out_is_a_one_by_one_conv():
    model = _random_unet()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([100.0, 700.0]), torch.tensor([1, 3])
    with torch.no_grad():
        tokens, cond = model.features(x, t, y)
        out = model(x, t, y)
    assert tokens.shape == (2, 64, 8) and cond.shape == (2, model.cond_dim)
    conv = torch.nn.functional.conv2d(tokens.transpose(1, 2).reshape(2, 8, 8, 8),
                                      model.proj_out.weight[:, :, None, None], model.proj_out.bias)
    torch.testing.assert_close(out, conv, atol=1e-6, rtol=1e-6)
    # pixel (row r, col c) is token r·W + c
    torch.testing.assert_close(model.unpatchify(tokens, 8)[:, :, 2, 5], tokens[:, 2 * 8 + 5], atol=0, rtol=0)
    wide = UNet(**{**TINY, "channel_mults": (2, 2)})       # the full-resolution width is channels·channel_mults[0]
    assert wide.features(x, t, y)[0].shape[-1] == wide.feature_dim == wide.proj_out.in_features == 16


def test_every_output_pixel_sees_the_whole_image():
    """Down to 4×4 with attention there: a change of one input pixel reaches every output pixel."""
    model = _random_unet()
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    model(x, 500.0, torch.tensor([0]))[0, 0, 7, 7].backward()
    assert x.grad[0, 0, 0, 0] != 0


def test_class_and_time_change_the_output():
    model = _random_unet()
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        base = model(x, 300.0, torch.tensor([0]))
        assert not torch.allclose(base, model(x, 300.0, torch.tensor([1])))
        assert not torch.allclose(base, model(x, 600.0, torch.tensor([0])))
        torch.testing.assert_close(model(x, 300.0, None), model(x, 300.0, torch.tensor([3])))


def test_bad_configs_and_inputs_name_the_argument():
    with pytest.raises(ValueError, match="input_size"):
        UNetConfig(input_size=7, channel_mults=(1, 2), attention_levels=(1,))
    with pytest.raises(ValueError, match="groups"):
        UNetConfig(channels=8, groups=3)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mults=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="dropout"):
        UNetConfig(dropout=1.0)
    model = UNet(**TINY)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\)"):
        model(torch.randn(1, 1, 6, 6), 1.0)
    with pytest.raises(ValueError, match="y must lie"):
        model(torch.randn(1, 1, 8, 8), 1.0, torch.tensor([4]))


def test_save_load_round_trip_and_type_dispatch(tmp_path):
    model = _random_unet()
    model.save_pretrained(tmp_path / "unet")
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["model_type"] == "UNet"
    loaded = load_image_network(tmp_path / "unet")
    assert isinstance(loaded, UNet) and read_image_network_config(tmp_path / "unet") == model.config
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 250.0, torch.tensor([0, 1])), model(x, 250.0, torch.tensor([0, 1])),
                                   atol=0, rtol=0)
    dit = DiT.from_preset("DiT-T", in_channels=1, input_size=8, num_classes=3)
    dit.save_pretrained(tmp_path / "dit")
    assert isinstance(load_image_network(tmp_path / "dit"), DiT)
    with pytest.raises(ValueError, match="does not describe a DiT"):
        DiT.from_pretrained(tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**config, "model_type": "Mamba"}))
    with pytest.raises(ValueError, match="model_type 'Mamba'"):
        load_image_network(tmp_path / "unet")


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _random_unet().train()
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x, 400.0, y).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed, atol=1e-6, rtol=1e-5)


def test_gm_student_of_a_unet_starts_at_the_teacher():
    teacher = _random_unet()
    student = PolicyStudent(teacher, "gmflow", num_components=3, head_noise_std=0.0).eval()
    x, sigma, y = torch.randn(2, 1, 8, 8), torch.tensor([0.8, 0.3]), torch.tensor([2, 0])
    with torch.no_grad():
        out = student(x, sigma, y)
        u_teacher = teacher(x, sigma * 1000, y)
    assert out["means"].shape == (2, 3, 1, 8, 8) and out["logweights"].shape == (2, 3, 1, 8, 8)
    for k in range(3):
        torch.testing.assert_close(out["means"][:, k], u_teacher, atol=1e-5, rtol=1e-5)
    policy = GMFlowPolicy(**out, x_src=x, sigma_src=sigma)
    torch.testing.assert_close(policy.velocity(x, sigma), u_teacher, atol=1e-5, rtol=1e-5)


def test_meanflow_average_velocity_net_on_a_unet_starts_at_the_velocity():
    teacher = _random_unet()
    net = AverageVelocityNet(teacher)
    z, r, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.5]), torch.tensor([0.9, 0.5]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(net(z, r, t, y), teacher(z, t * 1000, y), atol=1e-6, rtol=1e-6)
        net.interval_embedder[2].weight.normal_()
        assert not torch.allclose(net(z, r, t, y), teacher(z, t * 1000, y))
