"""Tests for the ADM-protocol ImageNet evaluation (`piflow.eval.adm`) with a randomly initialised Inception-v3.

No real Inception weights exist offline: the network here has exactly the layout of torch-fidelity's weights file
(its module's state dict, without ``num_batches_tracked``, as its converter writes it) filled with random He-normal
weights, so the numbers mean nothing about images. The tests check the plumbing — safe loading, inputs, the
reference cache — and that every metric equals an independent computation from the features the network returns.
Inception resizes every image to 299×299 (~0.2-0.4 s per image on one CPU core), so the real network sees 12 images
in all; the cache test swaps in a cheap stand-in for the network.
"""
from __future__ import annotations

import importlib.util
import io
import math
import pickle
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                       reason="needs torch-fidelity (pip install torch-fidelity==0.3.0 --no-deps)"),
]

from piflow.errors import CheckpointError, DataError  # noqa: E402
from piflow.eval import adm  # noqa: E402
from piflow.eval.adm import (  # noqa: E402
    InceptionFeatures,
    adm_metrics,
    adm_metrics_from_features,
    inception_score,
    load_image_batch,
    load_inception_weights,
    reference_cache_path,
)
from piflow.files import save_safetensors  # noqa: E402
from random_inception import random_inception_state as _random_inception_state  # noqa: E402

NUM_IMAGES = 4          # per set: the fewest that precision/recall with k = 3 accept


def _images(seed: int, smooth: bool) -> np.ndarray:
    """NUM_IMAGES uint8 (N, 32, 32, 3) images: white noise, or smooth gradients with a little noise."""
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.integers(0, 256, size=(NUM_IMAGES, 32, 32, 3), dtype=np.uint8)
    ramp = np.linspace(0.0, 1.0, 32)
    base = rng.uniform(0, 255, size=(NUM_IMAGES, 1, 1, 3)) * ramp[None, :, None, None] * ramp[None, None, :, None]
    return np.clip(base + rng.normal(0, 8, size=(NUM_IMAGES, 32, 32, 3)), 0, 255).astype(np.uint8)


def _save_png_folder(folder: Path, images: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The random weights file and the network built from it (every torch.load it makes recorded); images A as an
    .npz and as a PNG folder, images B as an .npz; one whole evaluation of A's PNG folder (samples) against A's npz
    (reference) with the features the network returned for each, and B's features."""
    root = tmp_path_factory.mktemp("adm")
    state = _random_inception_state(0)
    weights = root / "weights-inception-random.pth"
    torch.save(state, weights)
    with mock.patch("torch.load", wraps=torch.load) as spy:
        network = InceptionFeatures(weights, device="cpu", batch_size=NUM_IMAGES)
    images_a, images_b = _images(1, smooth=False), _images(2, smooth=True)
    np.savez(root / "a.npz", images_a)
    np.savez(root / "b.npz", images_b)
    _save_png_folder(root / "a_png", images_a)
    seen = []
    real_extract = network._extract

    def spy_extract(batch):
        seen.append(real_extract(batch))
        return seen[-1]

    with mock.patch.object(network, "_extract", spy_extract):
        same = adm_metrics(root / "a_png", root / "a.npz", network, inception_splits=2, cache=False, progress=False)
    a_npz, a_png = seen                                 # the reference is featurised first
    return {
        "root": root, "state": state, "weights": weights, "network": network, "load_calls": spy.call_args_list,
        "images_a": images_a, "a": a_npz, "a_png": a_png, "same": same,
        "b": network(root / "b.npz", progress=False),
    }


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------------------
# (a) weights: loaded without running code
# ----------------------------------------------------------------------------------------------------------

_EXECUTED: list[str] = []


def _record_execution(tag: str) -> str:
    _EXECUTED.append(tag)
    return tag


class _CodeRunningPayload:
    """Unpickling this calls _record_execution: what a malicious checkpoint would do with os.system."""

    def __reduce__(self):
        return (_record_execution, ("unpickled",))


def test_weights_are_loaded_only_through_the_restricted_unpickler(env):
    state = load_inception_weights(env["weights"])
    assert set(state) == set(env["state"]) and all(state[key].equal(value) for key, value in env["state"].items())
    # every torch.load made while building the network: piflow's (weights_only=True) and torch-fidelity's
    # constructor reading piflow's own in-memory empty dict, never the user's file
    calls = env["load_calls"]
    assert len(calls) == 2
    for call in calls:
        source = call.args[0] if call.args else call.kwargs["f"]
        assert call.kwargs.get("weights_only") is True or isinstance(source, io.BytesIO)
    assert {len(env["network"].weights_sha256)} == {64}
    # torch-fidelity's Inception module was imported without leaving a stand-in package behind
    assert "torch_fidelity" not in sys.modules or hasattr(sys.modules["torch_fidelity"], "calculate_metrics")


def test_weights_holding_code_are_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": _CodeRunningPayload()}, path)
    with pytest.raises(pickle.UnpicklingError):         # the plain unpickler would run it: the payload is real
        torch.load(path, weights_only=True)
    _EXECUTED.clear()
    for load in (load_inception_weights, InceptionFeatures):
        with pytest.raises(CheckpointError) as error:
            load(path)
        message = _one_line(error)
        assert str(path) in message and "refused" in message and "_record_execution" in message
        assert "add_safe_globals" not in message          # torch's advice on bypassing the check is not passed on
    assert _EXECUTED == []


def test_a_missing_torch_fidelity_is_a_one_line_missing_extra_error(monkeypatch):
    from piflow.errors import MissingExtraError

    monkeypatch.delitem(sys.modules, adm._FIDELITY_MODULE)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(MissingExtraError, match=r"pip install torch-fidelity==0\.3\.0 --no-deps$"):
        adm._inception_class()


def test_tf32_is_off_while_cuda_features_are_extracted():
    conv, matmul = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
    if not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has only the legacy allow_tf32 flags")
    before = (conv.fp32_precision, matmul.fp32_precision)
    with adm._ieee_float32(torch.device("cuda")):          # the flags exist on CPU builds too
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with adm._ieee_float32(torch.device("cpu")):
        assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_a_network_on_another_device_is_refused(env):
    with pytest.raises(ValueError, match="differs from the given InceptionFeatures' device cpu"):
        adm_metrics(env["root"] / "a.npz", env["root"] / "b.npz", env["network"], device="meta")


def test_weights_errors_are_one_line(tmp_path, env):
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(CheckpointError) as error:
        InceptionFeatures(missing)
    message = _one_line(error)
    assert str(missing) in message and adm.INCEPTION_WEIGHTS_URL in message and "--inception-weights" in message

    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, wrong)
    with pytest.raises(CheckpointError) as error:
        InceptionFeatures(wrong)
    assert _one_line(error).startswith(f"Inception weights file {wrong} does not hold torch-fidelity's Inception-v3")

    expected = env["network"].network.state_dict()
    for key, bad in (("fc.weight", torch.zeros(1008, 7)), ("fc.bias", torch.full((1008,), math.nan)),
                     ("fc.bias", torch.zeros(1008, dtype=torch.int64))):
        with pytest.raises(CheckpointError) as error:
            adm._check_weights_layout({**env["state"], key: bad}, expected, wrong)
        assert _one_line(error).startswith(f"Inception weights file {wrong}: {key} ")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as error:
        load_inception_weights(garbage)
    assert str(garbage) in _one_line(error)


def test_safetensors_weights_are_read_as_well(tmp_path):
    state = {"fc.bias": torch.arange(3.0), "fc.weight": torch.ones(3, 2)}
    save_safetensors(tmp_path / "inception.safetensors", state)
    again = load_inception_weights(tmp_path / "inception.safetensors")
    assert set(again) == set(state) and all(again[key].equal(state[key]) for key in state)


# ----------------------------------------------------------------------------------------------------------
# (b) FID / sFID
# ----------------------------------------------------------------------------------------------------------

def _independent_fd(f1, f2) -> float:
    """ADM's recipe (np.cov, scipy sqrtm of the product) after an exact change of basis: every centred feature and
    the mean difference lie in a subspace of dimension r <= N1 + N2 - 1, and FD restricted to it is unchanged."""
    from scipy import linalg

    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    spanning = np.vstack([f1 - mu1, f2 - mu2, (mu1 - mu2)[None]])
    _, singular, vt = np.linalg.svd(spanning, full_matrices=False)
    basis = vt[singular > 1e-9 * singular.max()].T                      # (D, r), orthonormal columns
    p1, p2 = f1 @ basis, f2 @ basis
    sigma1, sigma2 = np.cov(p1, rowvar=False), np.cov(p2, rowvar=False)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    diff = p1.mean(axis=0) - p2.mean(axis=0)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean).real)


def test_fid_of_a_set_with_itself_is_zero_and_matches_an_independent_computation(env):
    a, b = env["a"], env["b"]
    assert a["pool"].shape == (NUM_IMAGES, 2048) and a["spatial"].shape == (NUM_IMAGES, 2023)
    assert a["logits"].shape == (NUM_IMAGES, 1008)
    assert float(a["pool"].std()) > 1e-2                 # the random network does not collapse its features
    same = env["same"]                                      # A's PNG folder against A's npz, end to end
    scale = float(a["pool"].double().var(dim=0).sum())
    assert abs(same["fid"]) <= 1e-9 * scale and abs(same["sfid"]) <= 1e-9 * float(a["spatial"].double().var(0).sum())
    other = adm_metrics_from_features(a, b, inception_splits=1)
    assert other["fid"] > 1e-3 * scale and other["sfid"] > 0.0
    assert other["fid"] == pytest.approx(_independent_fd(a["pool"], b["pool"]), rel=1e-6)
    assert other["sfid"] == pytest.approx(_independent_fd(a["spatial"], b["spatial"]), rel=1e-6)
    assert adm_metrics_from_features(b, a, inception_splits=1)["fid"] == pytest.approx(other["fid"], rel=1e-9)


@pytest.mark.parametrize("n1, n2, d", [(6, 9, 10), (9, 6, 10), (40, 50, 5)])
def test_frechet_distance_both_routes_match_scipy_and_piflow(n1, n2, d):
    from piflow.eval.image_metrics import frechet_distance_from_features

    generator = torch.Generator().manual_seed(n1 + n2 + d)
    f1 = torch.randn(n1, d, generator=generator, dtype=torch.float64)
    f2 = 1.5 * torch.randn(n2, d, generator=generator, dtype=torch.float64) + 0.3
    value = adm._frechet_distance(f1, f2)           # n <= d: the nuclear-norm route; n > d: piflow's eigen route
    assert value == pytest.approx(frechet_distance_from_features(f1, f2), rel=1e-7)
    assert value == pytest.approx(_independent_fd(f1, f2), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# (c) Inception score
# ----------------------------------------------------------------------------------------------------------

def _independent_inception_score(logits, splits: int) -> float:
    """ADM's / improved-GAN's formula from softmax probabilities, consecutive unshuffled splits."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    n, scores = len(probs), []
    for i in range(splits):
        part = probs[i * n // splits:(i + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def test_inception_score_matches_an_independent_computation(env):
    logits = torch.cat([env["a"]["logits"], env["b"]["logits"]])
    for splits in (1, 2, 4):
        assert inception_score(logits, splits) == pytest.approx(_independent_inception_score(logits, splits),
                                                                rel=1e-9)
    assert inception_score(logits, 2) > 1.0
    metrics = adm_metrics_from_features(env["a"], env["b"], inception_splits=2)
    assert metrics["inception_score"] == pytest.approx(_independent_inception_score(env["a"]["logits"], 2), rel=1e-9)
    # ten splits of 5,000 consecutive samples = ADM's blocks of 5,000 for its 50,000 samples
    synthetic = 3.0 * torch.randn(50, 1008, generator=torch.Generator().manual_seed(0))
    assert inception_score(synthetic) == pytest.approx(_independent_inception_score(synthetic, 10), rel=1e-9)
    with pytest.raises(ValueError, match="10 splits need at least 10 samples, got 8"):
        inception_score(logits)


# ----------------------------------------------------------------------------------------------------------
# (d) precision / recall
# ----------------------------------------------------------------------------------------------------------

def _adm_precision_recall(reference, samples, k: int = 3) -> tuple[float, float]:
    """ADM's ManifoldEstimator: squared distances, radius = k-th smallest distance in the own set (0 = itself)."""
    def squared(x, y):
        return np.maximum((x * x).sum(1)[:, None] - 2 * x @ y.T + (y * y).sum(1)[None, :], 0.0)

    reference, samples = np.asarray(reference, np.float64), np.asarray(samples, np.float64)
    radii_ref = np.partition(squared(reference, reference), k, axis=1)[:, k]
    radii_samples = np.partition(squared(samples, samples), k, axis=1)[:, k]
    cross = squared(reference, samples)                                 # (N_ref, N_samples)
    precision = (cross <= radii_ref[:, None]).any(axis=0).mean()
    recall = (cross <= radii_samples[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def _synthetic_features(n: int, seed: int, shift: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(n, dim, generator=generator) + shift for key, dim in adm.FEATURE_DIMS.items()}


def test_precision_recall_of_a_set_with_itself_is_one_and_match_adms_definition(env):
    assert env["same"]["precision"] == 1.0 and env["same"]["recall"] == 1.0
    same = adm_metrics_from_features(env["b"], env["b"], inception_splits=1)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    reference, samples = _synthetic_features(60, 0, 0.0), _synthetic_features(50, 1, 0.03)
    samples["pool"][:10] += 0.5                         # some samples off the reference manifold
    metrics = adm_metrics_from_features(samples, reference, inception_splits=5)
    expected = _adm_precision_recall(reference["pool"], samples["pool"])
    assert (metrics["precision"], metrics["recall"]) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < metrics["precision"] < 1.0 and 0.0 < metrics["recall"] <= 1.0
    assert (metrics["num_samples"], metrics["num_reference"]) == (50, 60)


# ----------------------------------------------------------------------------------------------------------
# (e) npz and PNG folders; the whole evaluation
# ----------------------------------------------------------------------------------------------------------

def test_npz_and_png_folder_load_identical_images(env):
    from_npz = load_image_batch(env["root"] / "a.npz")
    from_png = load_image_batch(env["root"] / "a_png")
    assert from_npz.dtype == np.uint8 and from_npz.shape == (NUM_IMAGES, 32, 32, 3)
    np.testing.assert_array_equal(from_npz, env["images_a"])
    np.testing.assert_array_equal(from_png, env["images_a"])


def test_npz_variants_stream_in_batches(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "stored.npz", images)
    np.savez_compressed(tmp_path / "deflated.npz", images)
    np.savez(tmp_path / "fortran.npz", np.asfortranarray(images))       # read whole by np.load (rare)
    for name in ("stored", "deflated", "fortran"):
        source = adm._Images(tmp_path / f"{name}.npz", "samples")
        batches = list(source.batches(3))
        assert [len(batch) for batch in batches] == [3, 3, 1], name
        np.testing.assert_array_equal(np.concatenate(batches), images)
        np.testing.assert_array_equal(load_image_batch(tmp_path / f"{name}.npz"), images)


def test_png_folder_and_npz_give_identical_features_and_metrics(env):
    for key in adm.FEATURE_DIMS:                # A as samples from its PNG folder and as reference from its npz
        assert torch.equal(env["a_png"][key], env["a"][key]), key
    metrics = dict(env["same"])
    assert metrics.pop("weights_sha256") == env["network"].weights_sha256
    assert metrics == adm_metrics_from_features(env["a_png"], env["a"], inception_splits=2)
    assert set(metrics) == {"fid", "sfid", "inception_score", "precision", "recall", "num_samples", "num_reference"}
    assert all(isinstance(value, float) and math.isfinite(value) for key, value in metrics.items()
               if not key.startswith("num_"))
    assert (metrics["num_samples"], metrics["num_reference"]) == (NUM_IMAGES, NUM_IMAGES)


# ----------------------------------------------------------------------------------------------------------
# (f) bad inputs
# ----------------------------------------------------------------------------------------------------------

def _bad_inputs(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a phrase its error must contain)."""
    from PIL import Image

    good = np.zeros((4, 8, 8, 3), np.uint8)
    cases = {}

    def npz(name, phrase, **arrays):
        np.savez(root / f"{name}.npz", **arrays)
        cases[name] = (root / f"{name}.npz", phrase)

    npz("float", "uint8 (N, H, W, 3) RGB images, got float32 (4, 8, 8, 3)", arr_0=good.astype(np.float32))
    npz("rgba", "got uint8 (4, 8, 8, 4)", arr_0=np.zeros((4, 8, 8, 4), np.uint8))
    npz("gray", "got uint8 (4, 8, 8)", arr_0=np.zeros((4, 8, 8), np.uint8))
    npz("empty", "holds no images", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    npz("no_arr_0", "has no arr_0 (arrays: images)", images=good)
    np.savez(root / "objects.npz", np.array([_CodeRunningPayload()], dtype=object))
    cases["objects"] = (root / "objects.npz", "got object")
    (root / "not_zip.npz").write_bytes(b"plain text")
    cases["not_zip"] = (root / "not_zip.npz", "not a readable .npz file")
    (root / "images.txt").write_text("x")
    cases["suffix"] = (root / "images.txt", "neither an .npz file nor a folder")
    cases["missing"] = (root / "missing.npz", "does not exist")
    (root / "no_png").mkdir()
    (root / "no_png" / "readme.txt").write_text("x")
    cases["no_png"] = (root / "no_png", "folder without .png files")
    for name, mode, sizes in (("rgba_png", "RGBA", (8, 8)), ("gray_png", "L", (8, 8)), ("mixed_png", "RGB", (8, 9))):
        (root / name).mkdir()
        for i, size in enumerate(sizes):
            Image.new(mode, (size, size)).save(root / name / f"{i}.png")
    cases["rgba_png"] = (root / "rgba_png", "has mode 'RGBA'; expected 8-bit RGB")
    cases["gray_png"] = (root / "gray_png", "has mode 'L'")
    cases["mixed_png"] = (root / "mixed_png", "is 9x9 but 0.png is 8x8")
    return cases


def test_bad_inputs_give_one_line_errors_naming_the_argument(tmp_path, env):
    _EXECUTED.clear()
    for name, (path, phrase) in _bad_inputs(tmp_path).items():
        with pytest.raises(DataError) as error:
            load_image_batch(path)
        assert _one_line(error).startswith("path ") and phrase in str(error.value), (name, str(error.value))
        for argument in ("samples", "reference"):       # checked before anything is featurised
            inputs = {"samples": env["root"] / "a.npz", "reference": env["root"] / "b.npz", argument: path}
            with pytest.raises(ValueError) as error:
                adm_metrics(inputs["samples"], inputs["reference"], env["network"], inception_splits=1)
            assert _one_line(error).startswith(f"{argument} ") and phrase in str(error.value), (name, argument)
    assert _EXECUTED == []                              # the object array was never unpickled
    with pytest.raises(DataError, match=r"^samples must hold at least 10 images .* got 4$"):
        adm_metrics(env["root"] / "a.npz", env["root"] / "b.npz", env["network"])
    with pytest.raises(DataError, match="must be a path"):
        load_image_batch(42)
    with pytest.raises(DataError, match=r"^samples must hold uint8 \(N, H, W, 3\) RGB images, got int64"):
        adm_metrics(np.zeros((4, 8, 8, 3), np.int64), env["root"] / "b.npz", env["network"], inception_splits=1)


# ----------------------------------------------------------------------------------------------------------
# (g) the reference cache
# ----------------------------------------------------------------------------------------------------------

def test_reference_features_are_cached_and_invalidated(tmp_path, env, monkeypatch, capsys):
    network = env["network"]
    projection = {key: torch.randn(8 * 8 * 3, dim, generator=torch.Generator().manual_seed(i)) / 100
                  for i, (key, dim) in enumerate(adm.FEATURE_DIMS.items())}
    featurised = []

    def cheap_extract(batch):                  # a stand-in for the network: deterministic, ~free
        featurised.append(len(batch))
        pixels = torch.from_numpy(np.asarray(batch, np.float32)).reshape(len(batch), -1)
        return {key: pixels @ matrix for key, matrix in projection.items()}

    monkeypatch.setattr(network, "_extract", cheap_extract)
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    reference = tmp_path / "reference.npz"
    np.savez(reference, rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))

    def run(**kwargs):
        featurised.clear()
        return adm_metrics(samples, reference, network, inception_splits=1, **kwargs), sum(featurised)

    first, count = run()
    assert count == 5 + 6
    cache = reference_cache_path(reference, network.weights_sha256)
    assert cache.parent == tmp_path and cache.name.startswith("reference.npz.adm-inception-")
    from safetensors import safe_open

    with safe_open(str(cache), framework="pt") as handle:
        metadata = handle.metadata()
        assert handle.get_tensor("pool").shape == (6, 2048)
    assert metadata["reference_sha256"] == adm._sha256_file(reference)
    assert metadata["weights_sha256"] == network.weights_sha256

    second, count = run()
    assert count == 5 and second == first                # the reference was read from the cache

    np.savez(reference, rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8))        # the reference changed
    third, count = run()
    assert count == 5 + 7 and third["num_reference"] == 7 and third["fid"] != first["fid"]
    assert run()[1] == 5

    monkeypatch.setattr(network, "weights_sha256", "f" * 64)                        # other weights: other cache
    assert run()[1] == 5 + 7 and reference_cache_path(reference, "f" * 64).is_file()

    cache.write_bytes(b"truncated")                                                 # unreadable: recomputed
    monkeypatch.setattr(network, "weights_sha256", metadata["weights_sha256"])
    with pytest.warns(UserWarning, match="is unreadable"):
        assert run()[1] == 5 + 7
    assert run()[1] == 5

    cache.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(cache=False)[1] == 5 + 7 and not cache.exists()

    capsys.readouterr()
    run(progress=True)                                    # stderr is not a terminal: plain progress lines
    err = capsys.readouterr().err
    assert "Inception features (reference): 7/7 (100%)" in err and "Inception features (samples): 5/5" in err
