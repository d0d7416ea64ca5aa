"""Local training in torch: models, the site's trainer and evaluation metrics.

This file imports no torch, so config checks can use it cheaply.
"""

BATCH_NORM_MODELS = ("bn-mlp",)
"""Models with batch-norm layers, which cannot train on a batch of one row."""


def check_batch_size(model: str, batch_size: int) -> None:
    """Raise ValueError when the model cannot train on batches of this size."""
    if model in BATCH_NORM_MODELS and batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 for model {model!r}, "
                         f"whose batch-norm layers need two rows to train; got "
                         f"{batch_size}")
