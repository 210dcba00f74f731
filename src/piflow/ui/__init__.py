"""`piflow ui`: the browser demo (optional extra ``piflow[ui]``, Gradio ≥ 5).

* `playground`: the bundled teachers and students, teacher N-step vs student NFE on the same noise, the policy's x̂0
  along its substeps, the 2-D flow field and rollout figures, input checks (no Gradio; testable on its own).
* `text_to_image`: a `Pi*Pipeline` with a loaded adapter: loading, size and input checks, one generation (no Gradio).
* `app`: the Gradio Blocks wiring of both tabs (imports Gradio).
* `browser`: drives the app in headless Chromium through Selenium (the browser test and the README screenshot).

Importing this package imports neither Gradio nor Selenium.
"""
