"""`python -m finetune ...` (what `accelerate launch -m finetune train RECIPE` runs)."""

from finetune.cli import run

run()
