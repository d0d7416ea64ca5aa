"""Check, before any training, that DP-SGD can train a model unchanged.

Opacus's :class:`~opacus.validators.ModuleValidator` knows which layers break
per-sample gradients, but its messages do not say where the layer sits. This
module runs the same validators layer by layer, names each layer, and says
what to use instead. Batch normalisation is refused even without trainable
parameters, because it mixes the rows of a batch in the forward pass.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from prifed.privacy.errors import UnsupportedLayerError

_REPLACEMENTS = {
    "LSTM": "opacus.layers.DPLSTM",
    "GRU": "opacus.layers.DPGRU",
    "RNN": "opacus.layers.DPRNN",
    "MultiheadAttention": "opacus.layers.DPMultiheadAttention",
}


def find_unsupported_layers(model: nn.Module) -> list[str]:
    """Return one line per layer that DP-SGD cannot train, naming the layer."""
    from opacus.validators import ModuleValidator

    problems = []
    for name, module in model.named_modules():
        label = f"layer {name or '(root)'!r} ({type(module).__name__})"
        if isinstance(module, _BatchNorm):
            problems.append(
                f"{label} normalises each row with statistics of the whole batch, "
                "so one record's gradient depends on the others; use nn.GroupNorm "
                "or nn.LayerNorm instead (opacus.validators.ModuleValidator.fix "
                "swaps BatchNorm for GroupNorm)")
            continue
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is None or not _has_trainable(module):
            continue
        for error in validator(module):
            replacement = _REPLACEMENTS.get(type(module).__name__)
            advice = (f"; use {replacement} instead" if replacement else
                      "; set track_running_stats=False" if "running stats"
                      in str(error) else "")
            problems.append(f"{label}: {_first_sentence(str(error))}{advice}")
    return problems


def validate_for_dp(model: nn.Module) -> None:
    """Raise UnsupportedLayerError listing every layer DP-SGD cannot train."""
    problems = find_unsupported_layers(model)
    if problems:
        raise UnsupportedLayerError(problems)


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _first_sentence(text: str) -> str:
    sentence = text.strip().split(". ")[0]
    return sentence.rstrip(".")
