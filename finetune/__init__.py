"""finetune: parameter-efficient fine-tuning for LLaMA-family models. What you train is what you ship."""

__version__ = "0.1.0"
