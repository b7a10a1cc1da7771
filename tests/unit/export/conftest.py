"""Tiny seeded Llama models fake-quantized the way the engine leaves them, for the export writers' tests.

The helpers are handed out as fixtures (``make_llama``, ``fake_quantize``, ``all_but_head``, ``logits``):
``tests/`` is on ``sys.path``, so ``import conftest`` would find the top-level conftest, not this one.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from compressor.methods.quant.ops import QuantizedWeight, quantize_rtn

#: (bits, group_size, symmetric) for a module path, or None to leave it dense.
SchemeFn = Callable[[str], "tuple[int, int, bool] | None"]


def _make_llama(tied: bool = True, dtype: torch.dtype = torch.float32, vocab_size: int = 256, seed: int = 0,
               num_key_value_heads: int = 2) -> PreTrainedModel:
    """hidden 64, MLP 128, 2 layers, 4 heads; norms perturbed so a norm written to the wrong place shows."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
                         tie_word_embeddings=tied, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _fake_quantize(
    model: PreTrainedModel, scheme: SchemeFn,
    prepare: Callable[[QuantizedWeight], QuantizedWeight] | None = None,
) -> dict[str, QuantizedWeight]:
    """RTN every linear ``scheme`` names and write ``dequantize(model dtype)`` back, as the engine does.

    ``prepare`` adjusts the integer form first (rounding scales to what the file stores).
    """
    quantized = {}
    for name, module in model.named_modules():
        settings = scheme(name) if isinstance(module, torch.nn.Linear) else None
        if settings is None:
            continue
        qweight = quantize_rtn(module.weight.data.float(), *settings)
        if prepare is not None:
            qweight = prepare(qweight)
        module.weight.data = qweight.dequantize(module.weight.dtype)
        quantized[name] = qweight
    return quantized


def _all_but_head(bits: int, group_size: int, symmetric: bool) -> SchemeFn:
    """Every decoder linear with one scheme; lm_head stays dense (the usual recipe's ignore)."""
    return lambda name: None if name == "lm_head" else (bits, group_size, symmetric)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture
def make_llama() -> Callable[..., PreTrainedModel]:
    return _make_llama


@pytest.fixture
def fake_quantize() -> Callable[..., dict[str, QuantizedWeight]]:
    return _fake_quantize


@pytest.fixture
def all_but_head() -> Callable[[int, int, bool], SchemeFn]:
    return _all_but_head


@pytest.fixture
def logits() -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    return _logits
