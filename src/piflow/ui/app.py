"""The Gradio Blocks of `piflow ui`: the playground tab and the text-to-image / editing tab.

The logic lives in `piflow.ui.playground` and `piflow.ui.text_to_image`; this module only wires controls to it.
Every handler turns bad input into a one-line message in the page (element ``pg-message`` / ``t2i-message``)
instead of an exception, so the app keeps serving. Components carry ``elem_id``s (``pg-*``, ``t2i-*``) for the
browser test (tests/ui/browser.py).
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from piflow.errors import UserError, require
from piflow.files import one_line
from piflow.schedule import DEFAULT_TOTAL_SUBSTEPS
from piflow.ui import playground as pg

logger = logging.getLogger("piflow.ui")

DEFAULT_PORT = 7860
USER_ERRORS = (ValueError, UserError, OSError, RuntimeError)


def message_of(error: BaseException) -> str:
    """The page's one-line message for an error: the message of an input problem; a bug is logged with its
    traceback on the server and named in one line."""
    if isinstance(error, USER_ERRORS):
        return f"⚠️ {one_line(error, 400)}"
    logger.exception("piflow ui: unexpected error")
    return f"⚠️ unexpected error ({type(error).__name__}: {one_line(error, 200)}); details are in the server log"


class ModelCache:
    """Playground models by label, loaded on first use (bundled students and `extra_runs`), thread-safe."""

    def __init__(self, extra_runs: Sequence[Path] = ()):
        self.sources: dict[str, Optional[Path]] = {label: None for label in pg.BUNDLED}
        for run in extra_runs:
            self.sources[f"run: {Path(run).name}"] = Path(run)
        self.models: dict[str, pg.PlaygroundModel] = {}
        self.lock = threading.Lock()

    @property
    def labels(self) -> list[str]:
        return list(self.sources)

    def get(self, label: str) -> pg.PlaygroundModel:
        if label not in self.sources:
            raise ValueError(f"model must be one of {self.labels}, got {label!r}")
        with self.lock:
            if label not in self.models:
                run = self.sources[label]
                self.models[label] = pg.load_bundled(label) if run is None else pg.load_run(run, label)
            return self.models[label]


class PipelineSession:
    """The text-to-image tab's loaded pipeline (one per server), replaced by each successful load."""

    def __init__(self):
        self.loaded = None
        self.lock = threading.Lock()


def framed(image, top: int = 30):
    """`image` (H, W, 3) uint8 with a white band on top, so that the component's label badge covers no sample."""
    import numpy as np

    return np.pad(image, ((top, 0), (0, 0), (0, 0)), constant_values=255)


def _class_choices(model: pg.PlaygroundModel) -> list[str]:
    return ["all"] + [str(c) for c in range(model.num_classes)]


def build_app(extra_runs: Sequence[Path] = (), pipeline: Optional[str] = None, adapter: Optional[str] = None):
    """The `gr.Blocks` app: the playground (bundled students and `extra_runs`) and the text-to-image tab (the
    `pipeline` and `adapter` fields start filled in and are loaded when the page opens, if given)."""
    gr = require("gradio", "piflow ui")
    cache = ModelCache(extra_runs)
    session = PipelineSession()
    first = cache.labels[-1] if extra_runs else cache.labels[0]
    initial = cache.get(first)

    with gr.Blocks(title="piflow: π-Flow playground", analytics_enabled=False) as app:
        gr.Markdown("# π-Flow: few-step students beside their teachers\n"
                    "The **playground** runs small bundled teachers and the π-Flow students distilled from them on "
                    "the CPU; **text-to-image** drives any `Pi*Pipeline` with a loaded adapter.")
        with gr.Tab("Playground", elem_id="pg-tab"):
            with gr.Row():
                model = gr.Dropdown(cache.labels, value=first, label="teacher → student", elem_id="pg-model",
                                    scale=3)
                label = gr.Dropdown(_class_choices(initial), value="all", label="class", elem_id="pg-class",
                                    scale=1)
                seed = gr.Number(0, label="seed", precision=0, elem_id="pg-seed", scale=1)
                batch = gr.Number(initial.default_batch, label="batch", precision=0, elem_id="pg-batch", scale=1)
            with gr.Row():
                nfe = gr.Number(4, label=f"student NFE (1–{pg.MAX_NFE}, any: elastic)", precision=0,
                                elem_id="pg-nfe")
                teacher_steps = gr.Number(32, label=f"teacher Euler steps (1–{pg.MAX_TEACHER_STEPS})", precision=0,
                                          elem_id="pg-teacher-steps")
                temperature = gr.Textbox("1.0", label="GM temperature (number ≥ 0 or auto)",
                                         elem_id="pg-temperature")
                substeps = gr.Number(DEFAULT_TOTAL_SUBSTEPS, label=f"substeps per unit time (1–{pg.MAX_SUBSTEPS})",
                                     precision=0, elem_id="pg-substeps")
                h = gr.Textbox("0", label="h (0 = deterministic, inf = re-noise fully)", elem_id="pg-h")
            generate = gr.Button("Generate", variant="primary", elem_id="pg-generate")
            message = gr.Markdown("", elem_id="pg-message")
            timing = gr.Markdown("", elem_id="pg-timing")
            with gr.Row():
                teacher_image = gr.Image(label="teacher (N Euler steps)", type="numpy", format="png",
                                         interactive=False, elem_id="pg-teacher")
                student_image = gr.Image(label="π-Flow student (same noise)", type="numpy", format="png",
                                         interactive=False, elem_id="pg-student")
            detail = gr.Image(label="policy x̂0 along the substeps / flow field and rollouts", type="numpy",
                              format="png", interactive=False, elem_id="pg-detail")
            caption = gr.Markdown("", elem_id="pg-caption")

            def on_model(name: str):
                try:
                    chosen = cache.get(name)
                except Exception as error:            # noqa: BLE001 - shown in the page
                    return gr.update(), gr.update(), message_of(error)
                return (gr.update(choices=_class_choices(chosen), value="all"),
                        gr.update(value=chosen.default_batch), "")

            model.change(on_model, [model], [label, batch, message])

            def on_generate(name, klass, seed_value, batch_value, nfe_value, steps_value, temperature_value,
                            substeps_value, h_value, progress=gr.Progress()):
                try:
                    chosen = cache.get(name)
                    settings = pg.check_settings(chosen, nfe_value, seed_value, batch_value, klass,
                                                 temperature_value, substeps_value, h_value, steps_value)
                    generation = pg.generate(chosen, settings, lambda f, text: progress(f, desc=text))
                    shown = pg.render(chosen, generation)
                except Exception as error:            # noqa: BLE001 - shown in the page
                    return gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), message_of(error)
                return (framed(shown.teacher), framed(shown.student), framed(shown.detail), shown.detail_caption,
                        shown.timing, "")

            generate.click(on_generate, [model, label, seed, batch, nfe, teacher_steps, temperature, substeps, h],
                           [teacher_image, student_image, detail, caption, timing, message])

        with gr.Tab("Text-to-image / editing", elem_id="t2i-tab"):
            with gr.Row():
                pipeline_box = gr.Textbox(pipeline or "", label="diffusers pipeline (folder or Hub id)",
                                          elem_id="t2i-pipeline", scale=3)
                adapter_box = gr.Textbox(adapter or "", label="π-Flow adapter folder", elem_id="t2i-adapter",
                                         scale=3)
                load = gr.Button("Load", elem_id="t2i-load", scale=1)
            status = gr.Markdown("no pipeline loaded", elem_id="t2i-status")
            prompt = gr.Textbox("a photo of a red fox in the snow", label="prompt", lines=2, elem_id="t2i-prompt")
            negative = gr.Textbox("", label="negative prompt", visible=False, elem_id="t2i-negative")
            references = gr.File(label="reference images (editing models)", file_count="multiple",
                                 file_types=["image"], visible=False, elem_id="t2i-references")
            with gr.Row():
                t2i_seed = gr.Number(0, label="seed", precision=0, elem_id="t2i-seed")
                randomize = gr.Checkbox(True, label="random seed (untick to reuse)", elem_id="t2i-random")
                width = gr.Number(1024, label="width", precision=0, elem_id="t2i-width")
                height = gr.Number(1024, label="height", precision=0, elem_id="t2i-height")
                swap = gr.Button("⇄ swap", elem_id="t2i-swap")
            with gr.Row():
                steps = gr.Number(4, label=f"steps (1–{pg.MAX_NFE})", precision=0, elem_id="t2i-steps")
                t2i_temperature = gr.Textbox("auto", label="GM temperature (number ≥ 0 or auto)",
                                             elem_id="t2i-temperature")
            t2i_generate = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
            t2i_message = gr.Markdown("", elem_id="t2i-message")
            image = gr.Image(label="image", type="pil", format="png", interactive=False, elem_id="t2i-image")
            last = gr.Markdown("", elem_id="t2i-settings")

            swap.click(lambda w, hh: (hh, w), [width, height], [width, height])

            def on_load(pipeline_value, adapter_value, progress=gr.Progress()):
                from piflow.ui import text_to_image as t2i

                progress(0.1, desc="loading the pipeline and the adapter")
                try:
                    loaded = t2i.load_pipeline(pipeline_value, adapter_value)
                except Exception as error:            # noqa: BLE001 - shown in the page
                    return (message_of(error), gr.update(), gr.update(), gr.update(), gr.update(), gr.update(),
                            gr.update(), gr.update())
                with session.lock:
                    session.loaded = loaded
                m = loaded.multiple
                h_default, w_default = loaded.default_size
                text = (f"loaded {type(loaded.pipe).__name__} ({loaded.family.name}) with the adapter "
                        f"{loaded.adapter}; sizes in multiples of {m}")
                return (text, gr.update(visible=loaded.takes_negative_prompt),
                        gr.update(visible=loaded.takes_references),
                        gr.update(value=w_default, step=m, label=f"width (multiple of {m})"),
                        gr.update(value=h_default, step=m, label=f"height (multiple of {m})"),
                        gr.update(value=loaded.default_steps), "", gr.update())

            load_outputs = [status, negative, references, width, height, steps, t2i_message, image]
            load.click(on_load, [pipeline_box, adapter_box], load_outputs)
            if pipeline:
                app.load(on_load, [pipeline_box, adapter_box], load_outputs)

            def on_t2i(prompt_value, negative_value, seed_value, random_value, width_value, height_value,
                       steps_value, temperature_value, files, progress=gr.Progress()):
                from piflow.ui import text_to_image as t2i

                try:
                    with session.lock:
                        loaded = session.loaded
                    if loaded is None:
                        raise ValueError("no pipeline loaded: give the pipeline and the adapter folder, then Load")
                    seed_value = pg.random_seed() if random_value else seed_value
                    request = t2i.check_request(loaded, prompt_value, seed_value, height_value, width_value,
                                                steps_value, temperature_value, negative_value,
                                                [getattr(f, "name", f) for f in files or []])
                    progress(0.0, desc="generating")
                    result = t2i.generate(loaded, request,
                                          lambda done, total: progress(done / total, desc=f"step {done}/{total}"))
                except Exception as error:            # noqa: BLE001 - shown in the page
                    return gr.update(), gr.update(), message_of(error), gr.update()
                notes = "".join(f"\n\nnote: {w}" for w in result.warnings)
                text = (f"**last image** ({result.seconds:.2f} s): seed {request.seed}, {request.width}×"
                        f"{request.height}, {request.steps} steps, temperature {request.temperature}\n\n"
                        f"```python\n{t2i.reproduce_command(result.settings)}\n```{notes}")
                return result.image, text, "", request.seed

            t2i_generate.click(on_t2i, [prompt, negative, t2i_seed, randomize, width, height, steps,
                                        t2i_temperature, references], [image, last, t2i_message, t2i_seed])
    return app


def serve(app, port: int = DEFAULT_PORT, host: str = "127.0.0.1", block: bool = True):
    """Start `app` on http://host:port (no share link, no analytics); `block=False` returns at once (tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app.queue(default_concurrency_limit=1)
    return app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                      show_error=False, quiet=not block, ssr_mode=False)


def run_ui(run_dirs: Sequence[Path] = (), pipeline: Optional[str] = None, adapter: Optional[str] = None,
           port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> Any:
    """`piflow ui`: build the app and serve it until interrupted."""
    return serve(build_app(run_dirs, pipeline, adapter), port, host, block=True)
