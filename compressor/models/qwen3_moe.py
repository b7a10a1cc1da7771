"""The Qwen3-MoE family: Qwen3's attention (q/k norms inside it), a sparse MoE MLP (router ``mlp.gate``).

The per-expert linears are the checkpoint's ``mlp.experts.{e}.gate_proj``, ``up_proj`` and ``down_proj`` (see
``models/moe.py``). Checkpoints whose layers mix dense and expert MLPs (``mlp_only_layers``,
``decoder_sparse_step`` above 1) are refused by the adapter, naming the layer.
"""

from __future__ import annotations

from dataclasses import replace

from compressor.models.mixtral import MIXTRAL
from compressor.models.moe import Experts, MoEAdapter
from compressor.models.qwen2 import Qwen2Adapter

EXPERTS = Experts(module="mlp.experts", router="mlp.gate", gate="gate_proj", up="up_proj", down="down_proj",
                  count="num_experts")


class Qwen3MoeAdapter(MoEAdapter, Qwen2Adapter):
    """Qwen2's sliding-window bookkeeping after layer removal, over per-expert linears."""

    experts = EXPERTS


QWEN3_MOE = replace(MIXTRAL, name="qwen3_moe", model_types=("qwen3_moe",), adapter=Qwen3MoeAdapter)
