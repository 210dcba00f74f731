"""The `piflow` command line's arguments: one sub-parser per command, each naming its handler in `piflow.cli`."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

SAMPLE_VALUES = ("values are the student's outputs in data units, not clipped: images in about [-1, 1] "
                 "(the training data's scale; latents for `latents` datasets), 2-D points in data coordinates")


def _add_config_args(parser: argparse.ArgumentParser, run_dir_default: Optional[str]) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config file (defaults are built in)")
    parser.add_argument("--run-dir", default=run_dir_default, required=run_dir_default is None,
                        help="where config.yaml, checkpoint.safetensors, metrics.json and figures go; an existing run "
                             "there is resumed (default: %(default)s)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a run even though the config differs from the one it was started with "
                             "(the change is recorded in run.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. distill.nfe=4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="piflow", description="π-Flow: few-step policy distillation (π-ID).",
        epilog="Errors in the input are printed as one line (exit status 2; 3 when training diverged); "
               "PIFLOW_TRACEBACK=1 adds the traceback.")
    from piflow import __version__

    parser.add_argument("--version", action="version", version=f"piflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="2-D and digits end-to-end demo with exact answers; prints comparison tables")
    demo.add_argument("--run-dir", default=None, help="output folder (default: runs/demo, or runs/demo_quick with "
                                                      "--quick)")
    demo.add_argument("--quick", action="store_true", help="fewer iterations (smoke test; trains tiny teachers)")
    demo.add_argument("--train-teachers", action="store_true",
                      help="train the learned teachers instead of loading the bundled checkpoints")
    demo.set_defaults(handler="demo")

    teacher = sub.add_parser("train-teacher", help="train a flow-matching teacher: 2-D MLP or class-conditional "
                                                   "image DiT or U-Net (by `dataset` and `model.type`)")
    _add_config_args(teacher, "runs/teacher")
    teacher.set_defaults(handler="train")

    distill = sub.add_parser("distill", help="distil a teacher (exact GM, a teacher run, or a diffusers pipeline "
                                             "with pipeline=...) into a policy student")
    _add_config_args(distill, "runs/student")
    distill.set_defaults(handler="train")

    sample = sub.add_parser("sample", help="sample a finished student (any NFE): .npy + PNG preview, or PNGs for "
                                           "text-to-image runs",
                            description=f"Sample a finished `piflow distill` run. 2-D/image runs write a float32 "
                                        f".npy ({SAMPLE_VALUES}) and a PNG preview; text-to-image runs write one PNG "
                                        f"per image.")
    sample.add_argument("--run-dir", required=True, help="a finished `piflow distill` run")
    sample.add_argument("--nfe", type=int, default=None, help="number of steps (default: the training NFE)")
    sample.add_argument("--num-samples", type=int, default=None,
                        help="samples (2-D/image runs, default 5000) or images per prompt (text-to-image, default 1)")
    sample.add_argument("--batch-size", type=int, default=None,
                        help="2-D/image runs: samples generated at once (default: 256 for images, 5000 for 2-D); "
                             "the samples do not depend on it, except a DMD2 student's, whose fresh noise between "
                             "steps is drawn per batch")
    sample.add_argument("--seed", type=int, default=0, help="seed of the noise (default: %(default)s)")
    sample.add_argument("--temperature", default="1.0",
                        help="GM temperature on non-final steps: a number >= 0, or 'auto' (default: %(default)s)")
    sample.add_argument("--output", default=None,
                        help="2-D/image runs: .npy output path (default: <run-dir>/samples_nfe<N>.npy); "
                             "text-to-image: output folder (default: <run-dir>/samples)")
    sample.add_argument("--label", type=int, default=None, help="class label for image runs (default: all classes)")
    sample.add_argument("--per-class", type=int, default=None,
                        help="image runs: a class-balanced FID set of N samples per class (ADM protocol: 50) as one "
                             "PNG per sample in the --output folder plus <output>.npz (uint8 arr_0), sharded over "
                             "torchrun ranks and resumable; latent runs are decoded by their `vae`")
    sample.add_argument("--teacher-steps", type=int, default=None,
                        help="with --per-class: sample the run's (guided) teacher with N Euler steps instead of the "
                             "student, for its own FID on the same protocol")
    sample.add_argument("--num-classes", type=int, default=None,
                        help="with --per-class: only the first N classes (default: all of the teacher's)")
    sample.add_argument("--device", default=None, help="with --per-class: cpu, cuda (default: cuda:LOCAL_RANK if "
                                                       "available)")
    sample.add_argument("--prompt", action="append", default=[], help="text-to-image runs: a prompt (repeatable)")
    sample.add_argument("--image", action="append", default=[],
                        help="editing runs: a reference image path (repeatable; shared by the prompts)")
    sample.add_argument("--video-format", default="gif", choices=["gif", "mp4"],
                        help="video runs: file format of each video (mp4 needs the [video] extra; default: "
                             "%(default)s)")
    sample.add_argument("--overwrite", action="store_true",
                        help="text-to-image runs: replace the samples of an earlier call in --output (without it, "
                             "a folder that holds files is refused)")
    sample.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides applied when loading the run, e.g. distill.total_substeps=256")
    sample.set_defaults(handler="sample")

    evaluate = sub.add_parser("evaluate", help="metrics of a student vs the teacher's Euler sampler (2-D and image "
                                               "runs); rows are added to metrics.json")
    evaluate.add_argument("--run-dir", default=None,
                          help="a finished `piflow distill` run (required by the default protocol; with --protocol "
                               "adm the metrics are also added to its metrics.json)")
    evaluate.add_argument("--protocol", default="piflow", choices=("piflow", "adm"),
                          help="piflow (default): the run's own metrics; adm: FID/sFID/IS/precision/recall of "
                               "--samples against --reference with the Inception network of --inception-weights "
                               "(ImageNet, as the ADM evaluator)")
    evaluate.add_argument("--samples", default=None, help="adm: an .npz (uint8 arr_0, from `piflow sample "
                                                          "--per-class`) or a PNG folder")
    evaluate.add_argument("--reference", default=None,
                          help="adm: the reference batch (VIRTUAL_imagenet256_labeled.npz of OpenAI's guided-diffusion "
                               "evaluations), or a PNG folder; its features are cached beside it")
    evaluate.add_argument("--inception-weights", default=None,
                          help="adm: torch-fidelity's weights-inception-2015-12-05-6726825d.pth (a local file; "
                               "nothing is downloaded)")
    evaluate.add_argument("--batch-size", type=int, default=64, help="adm: images per Inception batch "
                                                                     "(default: %(default)s)")
    evaluate.add_argument("--device", default=None, help="adm: cpu or cuda (default: cuda if available)")
    evaluate.add_argument("--json", default=None, help="adm: where to write the metrics (default: "
                                                       "<samples>.adm.json)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.student_nfe=[1,2,4,8]")
    evaluate.set_defaults(handler="evaluate")

    toy = sub.add_parser("toy-trajectory", help="fit one static K=32 GM policy to a single teacher trajectory")
    toy.add_argument("--teacher", required=True, help="an image `piflow train-teacher` run directory")
    toy.add_argument("--run-dir", default="runs/toy_trajectory", help="output folder (default: %(default)s)")
    toy.add_argument("--label", type=int, default=3, help="class label of the trajectory (default: %(default)s)")
    toy.add_argument("--iters", type=int, default=2000, help="optimisation steps (default: %(default)s)")
    toy.add_argument("--components", type=int, default=32, help="GM components K (default: %(default)s)")
    toy.add_argument("--snapshot-every", type=int, default=250,
                     help="iterations between x0 snapshots in snapshots.png (default: %(default)s)")
    toy.add_argument("--seed", type=int, default=0, help="seed of the noise and initialisation (default: %(default)s)")
    toy.set_defaults(handler="toy_trajectory")

    encode = sub.add_parser("encode-prompts", help="pre-compute prompt embeddings (sharded safetensors cache)")
    encode.add_argument("--pipeline", required=True, help="local folder or hub id of the diffusers pipeline")
    source = encode.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="prompt file, one per line")
    source.add_argument("--conditions", help="editing: JSON Lines file, one {\"prompt\": ..., \"images\": [...]} "
                                             "per line (reference latents are cached with the text embeddings)")
    encode.add_argument("--out", required=True, help="cache folder (resumable)")
    encode.add_argument("--negative-prompt", default="", help="cached as the unconditional prompt for CFG")
    encode.add_argument("--shard-size", type=int, default=1000, help="prompts per shard file (default: %(default)s)")
    encode.add_argument("--max-sequence-length", type=int, default=512,
                        help="text tokens kept per prompt (default: %(default)s)")
    encode.add_argument("--dtype", default="fp32", choices=sorted(["bf16", "fp16", "fp32"]),
                        help="dtype of the text encoders and the cached embeddings (default: %(default)s)")
    encode.set_defaults(handler="encode_prompts")

    images = sub.add_parser("encode-images", help="encode ImageNet-style images into VAE latent shards (the train "
                                                  "cache of latent datasets; resumable, shards split over torchrun "
                                                  "ranks)",
                            description="Encode a class folder or webdataset tar shards into safetensors shards of "
                                        "VAE latents (ADM center crop; latents = (posterior mean - shift_factor) × "
                                        "scaling_factor) plus index.json; `dataset=latents data.root=OUT` trains on "
                                        "them. Run it again to resume; under torchrun shard k goes to rank k mod "
                                        "WORLD_SIZE.")
    image_source = images.add_mutually_exclusive_group(required=True)
    image_source.add_argument("--images", help="class folder ROOT/<class>/*.JPEG|jpg|png|webp (sorted folder names "
                                               "give labels 0..C-1)")
    image_source.add_argument("--shards", help="webdataset tar files, comma-separated ('train-{0000..0099}.tar' "
                                               "ranges and globs allowed); each sample is <key>.jpg|jpeg|png|webp "
                                               "and <key>.cls (its integer label)")
    images.add_argument("--out", required=True, help="output folder of shard-*.safetensors and index.json "
                                                     "(resumable)")
    images.add_argument("--resolution", type=int, default=256,
                        help="image side after the center crop, a multiple of 8 (default: %(default)s)")
    images.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                        help="diffusers AutoencoderKL: local folder (or a pipeline folder with vae/) or Hub id "
                             "(default: %(default)s)")
    images.add_argument("--batch-size", type=int, default=32,
                        help="images per VAE call, flipped copies included (default: %(default)s)")
    images.add_argument("--shard-size", type=int, default=1000,
                        help="source images per shard file (default: %(default)s)")
    images.add_argument("--flip", action="store_true",
                        help="also encode each image's horizontal flip (stored after it, flipped=1)")
    images.add_argument("--store-std", action="store_true",
                        help="also store the posterior std × scaling_factor (latent_stds), to sample the posterior "
                             "in training")
    images.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"],
                        help="dtype of the stored latents; the VAE runs in float32 (default: %(default)s)")
    images.add_argument("--class-index", default=None,
                        help="JSON mapping class folder name → label (or ImageNet's {\"0\": [\"n01440764\", …]}); "
                             "with --shards it names the classes")
    images.add_argument("--device", default=None, choices=["cpu", "cuda"],
                        help="where the VAE runs (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    images.add_argument("--workers", type=int, default=4,
                        help="threads decoding and cropping images (0: none; default: %(default)s)")
    images.set_defaults(handler="encode_images")

    export = sub.add_parser("export", help="turn a text-to-image run's checkpoint into a piflow adapter folder")
    export.add_argument("--run-dir", required=True, help="a `piflow distill pipeline=...` run (finished or not)")
    export.add_argument("--out", default=None, help="adapter folder (default: <run-dir>/adapter)")
    export.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    export.add_argument("--layout", choices=("piflow", "authors"), default="piflow",
                        help="piflow (default: float32, all settings) or authors (the folder the authors' exporter "
                             "writes, for their diffusers pipelines and ComfyUI-piFlow; FLUX.1 and Qwen-Image)")
    export.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="upload the adapter folder (with its model card) to this Hugging Face model repository "
                             "in one commit; needs HF_TOKEN or `hf auth login`")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    export.add_argument("--base-model", default=None, metavar="HUB_ID",
                        help="the base model's Hub id for the card's base_model (default: from pipeline= when it is "
                             "a Hub id or a Hub-cache snapshot)")
    export.add_argument("--no-card", action="store_true", help="do not write README.md (the model card)")
    export.set_defaults(handler="export")

    ui = sub.add_parser("ui", help="browser demo (needs the [ui] extra): the bundled teachers beside their π-Flow "
                                   "students, and text-to-image with a Pi*Pipeline and an adapter",
                        description="Serve the Gradio demo on http://HOST:PORT. The playground always shows the "
                                    "bundled teachers and students (CPU, no downloads); --run-dir adds a 2-D or image "
                                    "student run, or opens a text-to-image run's adapter; --pipeline/--adapter open "
                                    "a diffusers pipeline with a π-Flow adapter in the text-to-image tab.")
    ui.add_argument("--run-dir", action="append", default=[],
                    help="a finished `piflow distill` run (repeatable): 2-D/image runs join the playground, a "
                         "text-to-image run opens in the text-to-image tab")
    ui.add_argument("--pipeline", default=None, help="text-to-image: a diffusers pipeline folder or Hub id")
    ui.add_argument("--adapter", default=None, help="text-to-image: the π-Flow adapter folder for --pipeline")
    ui.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="interface to listen on (default: %(default)s, this machine only)")
    ui.set_defaults(handler="ui")

    convert = sub.add_parser("convert-checkpoint",
                             help="with --out: a published DiT/SiT/REPA/π-Flow ImageNet teacher (.pt/.pth) into a "
                                  "piflow DiT folder; without: a piflow <= 0.1 checkpoint.pt into the safe format",
                             description="With --out: read a teacher checkpoint without running code (tensors, plain "
                                         "containers and argparse.Namespace only), convert it to piflow's DiT (time "
                                         "and sign conventions mapped) and write config.json + model.safetensors; "
                                         "use the folder as `teacher:`. Without --out: convert a piflow <= 0.1 run "
                                         "checkpoint.pt.")
    convert.add_argument("path", help="the teacher checkpoint (with --out), or a piflow <= 0.1 checkpoint.pt (or its "
                                      "run directory; only convert files you trust)")
    convert.add_argument("--out", default=None, help="teacher conversion: the DiT folder to write")
    convert.add_argument("--layout", default="auto", choices=("auto", "sit", "repa", "authors-repa", "authors-fm"),
                         help="teacher layout (default: auto = SiT or REPA by their keys; the π-Flow authors' files "
                              "need authors-repa (repa_imagenet.pth) or authors-fm (flowdit_imagenet.pth))")
    convert.add_argument("--weights", default="ema", choices=("ema", "model"),
                         help="which weights of a training checkpoint (default: %(default)s)")
    convert.add_argument("--num-heads", type=int, default=None,
                         help="attention heads, for widths other than the DiT presets' (S/B/L/XL)")
    convert.add_argument("--input-size", type=int, default=None,
                         help="latent side (32 for 256² images); needed for the authors' files (no stored table)")
    convert.set_defaults(handler="convert_checkpoint")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line as `build_parser` reads it, with ``key=value`` overrides accepted anywhere after the
    command (before, between or after the options: `piflow distill dataset=ring8 --run-dir r teacher=exact`)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    overrides = [item for item in extras if "=" in item and not item.startswith("-")]
    unknown = [item for item in extras if item not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args
