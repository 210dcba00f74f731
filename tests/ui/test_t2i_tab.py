"""The text-to-image tab's logic on a tiny random FLUX pipeline: loading, checks, and one generation that equals
the pipeline's own call (the images are noise: this checks the wiring, not the content)."""
import numpy as np
import pytest
import torch

from piflow.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def loaded(tiny_flux):
    from piflow.ui import text_to_image as t2i

    return t2i.load_pipeline(*tiny_flux)


def test_load_reads_the_family_patch_multiple_and_steps(loaded):
    assert type(loaded.pipe).__name__ == "PiFluxPipeline" and loaded.family.name == "flux"
    assert loaded.multiple == 4 and loaded.default_size[0] % 4 == 0     # tiny VAE ×2, 2×2 packing
    assert loaded.default_steps == 4 and not loaded.takes_references and not loaded.takes_negative_prompt


def test_generation_equals_the_pipeline_call(loaded):
    from piflow.ui import text_to_image as t2i

    request = t2i.check_request(loaded, "a red cat", 3, 16, 24, 2, "auto")
    seen = []
    result = t2i.generate(loaded, request, lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)] and result.image.size == (24, 16)
    direct = loaded.pipe(prompt="a red cat", height=16, width=24, num_inference_steps=2, temperature="auto",
                         generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(result.image), np.asarray(direct))
    assert result.settings["seed"] == 3 and result.settings["pipeline_class"] == "PiFluxPipeline"
    command = t2i.reproduce_command(result.settings)
    assert "manual_seed(3)" in command and "height=16, width=24" in command and "load_piflow_adapter" in command
    # the code box runs as written, in a fresh namespace (imports included), and makes the same image
    namespace: dict = {}
    exec(command, namespace)
    assert np.array_equal(np.asarray(namespace["image"]), np.asarray(result.image))


@pytest.mark.parametrize("changes, message", [
    (dict(height=18), "height must be a multiple of 4 (the model's patch size in pixels), got 18"),
    (dict(width=2), "width must be a whole number in [4, 4096], got 2"),
    (dict(steps=0), "steps must be a whole number in [1, 8], got 0"),
    (dict(prompt=" "), "prompt: write a prompt"),
    (dict(temperature="x"), "temperature must be a number >= 0 or 'auto'"),
    (dict(references=["a.png"]), "reference images: flux is text-to-image only"),
])
def test_bad_requests_are_one_line_messages(loaded, changes, message):
    from piflow.ui import text_to_image as t2i

    arguments = dict(prompt="a cat", seed=0, height=16, width=16, steps=2)
    arguments.update(changes)
    with pytest.raises(ValueError) as error:
        t2i.check_request(loaded, **arguments)
    assert message in str(error.value)


def test_missing_pipeline_or_adapter(tiny_flux, tmp_path):
    from piflow.ui import text_to_image as t2i

    with pytest.raises(ConfigError, match="adapter: give the folder of a π-Flow adapter"):
        t2i.load_pipeline(tiny_flux[0], "")
    with pytest.raises(ConfigError, match="pipeline: give a diffusers pipeline folder"):
        t2i.load_pipeline("", tiny_flux[1])
    with pytest.raises(OSError, match="does not exist"):
        t2i.load_pipeline(tiny_flux[0], str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a π-Flow adapter folder"):
        t2i.load_pipeline(tiny_flux[0], str(tmp_path / "empty"))
