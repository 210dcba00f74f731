"""Hub-ready export (`piflow export`, `piflow.integrations.diffusers.hub`): the model card parses with
huggingface_hub's own card parser and carries the base model's licence; its usage snippet, run as written, loads the
tiny adapter and samples; `--push-to-hub` sends exactly the adapter folder as one commit (checked on the commit
operations huggingface_hub builds, no network); a missing token, offline mode or a failed upload is one line and is
never reported as uploaded."""
import json
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from piflow.cli import main  # noqa: E402
from piflow.integrations.diffusers.tiny import tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
BASE_CARD = "---\nlicense: openrail++\ntags:\n- text-to-image\n---\n# a tiny SDXL base\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    base = root / "tiny-sdxl"
    tiny_pipeline("sdxl").save_pretrained(base)
    (base / "README.md").write_text(BASE_CARD)
    (root / "prompts.txt").write_text("a red cat\na blue bird on a wire\n")
    run_dir = root / "run"
    assert main(["distill", "--run-dir", str(run_dir), f"pipeline={base}", "resolution=[32,32]",
                 f"prompts={root / 'prompts.txt'}", "student.lora_rank=4", "student.logstd_hidden=16",
                 "student.num_components=2", "distill.total_substeps=16", "train.warmup_iters=0",
                 "train.progress=false", "eval.nfe=[1]", "eval.prompts=[a lighthouse]", "train.iters=2",
                 "train.checkpoint_every=0"]) == 0
    return root, run_dir


def _card(folder):
    from huggingface_hub import ModelCard

    return ModelCard((folder / "README.md").read_text())


def test_card_front_matter_parses_and_carries_the_base_licence(tiny_run):
    root, run_dir = tiny_run
    out = root / "adapter_card"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out),
                 "--base-model", "stabilityai/stable-diffusion-xl-base-1.0"]) == 0
    card = _card(out)
    data = card.data.to_dict()
    assert data["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"pi-flow", "few-step", "lora", "sdxl"} <= set(data["tags"])
    assert data["license"] == "openrail++"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    text = card.text
    assert "| network evaluations (`num_inference_steps`) | 4 " in text and "| time shift | 3.2 |" in text
    assert "| total policy substeps | 16 |" in text and "K = 2 components" in text
    assert f"final π-ID loss: {metrics['final_loss']:.4g}" in text and "iterations trained: 2" in text
    assert r"ff\.net\.0\.proj\|ff" in text            # the LoRA pattern's | is escaped inside the table
    assert "pipeline_class('sdxl').from_pretrained('stabilityai/stable-diffusion-xl-base-1.0'" in text


def test_the_cards_snippet_runs_as_written(tiny_run, tmp_path, monkeypatch):
    root, run_dir = tiny_run
    out = root / "adapter_local"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out)]) == 0
    data = _card(out).data.to_dict()
    assert "base_model" not in data           # a local base folder is not a Hub id: the card does not invent one
    snippet = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "model_card_snippet", "exec"), {})
    from PIL import Image

    image = Image.open(tmp_path / "pi-flow.png")
    assert image.size == (32, 32)
    # the same pipeline call by hand gives the same picture
    from piflow.integrations.diffusers.pipelines import pipeline_class

    pipe = pipeline_class("sdxl").from_pretrained(root / "tiny-sdxl", torch_dtype=torch.float32)
    pipe.load_piflow_adapter(out)
    expected = pipe("a lighthouse", num_inference_steps=4, height=32, width=32,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    import numpy as np

    assert np.abs(np.asarray(image, dtype=np.float32) / 255 - expected).max() <= 1 / 255 + 1e-6


class _Recorder:
    """Stands in for the Hub: records create_repo and the commit operations upload_folder builds."""

    def __init__(self, fail=False):
        self.repos, self.commits, self.fail = [], [], fail

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, api, repo_id, operations, **kwargs):
        if self.fail:
            raise RuntimeError("503 Service Unavailable")
        self.commits.append((repo_id, sorted(op.path_in_repo for op in operations), kwargs))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
                                          commit_message=kwargs.get("commit_message", ""), commit_description="",
                                          oid="abc", pr_url=None)


def _patch_hub(monkeypatch, recorder):
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: recorder.create_repo(self, repo_id, **kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit",
                        lambda self, repo_id, operations, **kw: recorder.create_commit(self, repo_id, operations, **kw))


def test_push_to_hub_sends_the_adapter_folder_as_one_commit(tiny_run, monkeypatch, capsys):
    root, run_dir = tiny_run
    recorder = _Recorder()
    _patch_hub(monkeypatch, recorder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = root / "adapter_push"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out), "--push-to-hub", "someone/tiny-pi-sdxl",
                 "--private"]) == 0
    assert recorder.repos == [("someone/tiny-pi-sdxl", {"private": True, "exist_ok": True, "repo_type": "model"})]
    assert len(recorder.commits) == 1
    repo, files, kwargs = recorder.commits[0]
    assert repo == "someone/tiny-pi-sdxl"
    assert files == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]     # not export.json
    assert "someone/tiny-pi-sdxl/commit/abc" in capsys.readouterr().out
    assert "pipe.load_piflow_adapter('someone/tiny-pi-sdxl')" in (out / "README.md").read_text()


@pytest.mark.parametrize("case, message", [
    ("no_token", "needs a Hugging Face token"),
    ("offline", "HF_HUB_OFFLINE is set"),
    ("refused", "the upload failed, nothing was committed (503 Service Unavailable)"),
    ("bad_repo", "must be a Hub repository id 'user/name'"),
])
def test_push_failures_are_one_line_and_never_reported_as_uploaded(tiny_run, monkeypatch, capsys, case, message):
    root, run_dir = tiny_run
    recorder = _Recorder(fail=case == "refused")
    _patch_hub(monkeypatch, recorder)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    if case == "no_token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "not a repo id" if case == "bad_repo" else "someone/tiny"
    capsys.readouterr()
    assert main(["export", "--run-dir", str(run_dir), "--out", str(root / f"adapter_{case}"), "--push-to-hub",
                 repo]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("piflow export:")]
    assert len(errors) == 1 and message in errors[0], captured.err
    assert "uploaded to" not in captured.out and recorder.commits == []
    assert (root / f"adapter_{case}" / "config.json").is_file()        # the local adapter is kept
