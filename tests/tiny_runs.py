"""Overrides shared by the tests that train tiny image runs through the CLI."""

# a one-block DiT of width 32, without progress bars or periodic checkpoints: a run takes seconds on one core
TINY_DIT_RUN = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.progress=false",
                "train.checkpoint_every=0"]
