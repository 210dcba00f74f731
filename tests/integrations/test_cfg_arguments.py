"""The FLUX.1, SD3 and Qwen-Image π-Flow pipelines accept every CFG argument of their stock pipeline (negative
prompts, CFG scales, skip-layer guidance) with a warning and compute what they compute without it: the student has
guidance distilled in (issue 25; the other families are covered by test_diffusers_pipelines)."""
import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from piflow.integrations.diffusers.families import get_family  # noqa: E402
from piflow.integrations.diffusers.pipelines import pipeline_class  # noqa: E402
from piflow.integrations.diffusers.tiny import tiny_pipeline  # noqa: E402

from test_authors_layout import student_on  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
CFG_WORDS = ("negative", "cfg", "guidance")
GIVEN = {"flux": {"negative_prompt": "blurry", "true_cfg_scale": 4.0},
         "sd3": {"negative_prompt": "blurry", "guidance_scale": 7.0, "skip_guidance_layers": [0]},
         "qwen": {"negative_prompt": "blurry", "true_cfg_scale": 4.0, "guidance_scale": 2.0}}


@pytest.mark.parametrize("family", sorted(GIVEN))
def test_stock_cfg_arguments_are_accepted_and_unused(family):
    stock = getattr(diffusers, get_family(family).stock_pipeline)
    cfg = {name for name in inspect.signature(stock.__call__).parameters if any(w in name for w in CFG_WORDS)}
    ours = set(inspect.signature(pipeline_class(family).__call__).parameters)
    assert cfg <= ours, sorted(cfg - ours)
    pipe = tiny_pipeline(family, pipeline_class(family))
    pipe.set_progress_bar_config(disable=True)
    pipe.set_piflow_student(student_on(pipe.transformer, get_family(family).architecture, "gmflow"))
    kwargs = dict(prompt=["a red cat"], height=32, width=32, num_inference_steps=1, output_type="latent")
    plain = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    with pytest.warns(UserWarning, match="unused: the π-Flow student has classifier-free guidance distilled in"):
        guided = pipe(generator=torch.Generator().manual_seed(0), **GIVEN[family], **kwargs).images
    assert torch.equal(plain, guided)
