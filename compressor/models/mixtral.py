"""The Mixtral family: Mistral's attention and norms, a sparse MoE MLP (router ``mlp.gate``, top-k of E experts).

The per-expert linears are the checkpoint's ``mlp.experts.{e}.w1`` (gate), ``w3`` (up) and ``w2`` (down),
which :class:`~compressor.models.moe.MoEAdapter` puts in place of transformers' 3-D experts; transformers'
loader reads these names back (``block_sparse_moe`` on disk is renamed to ``mlp`` at load).
"""

from __future__ import annotations

from dataclasses import replace

from compressor.models.base import Sublayer
from compressor.models.llama import ATTENTION, LLAMA
from compressor.models.moe import Experts, MoEAdapter

EXPERTS = Experts(module="mlp.experts", router="mlp.gate", gate="w1", up="w3", down="w2", count="num_local_experts")


class MixtralAdapter(MoEAdapter):
    experts = EXPERTS


#: The MLP branch as a whole: the router and the experts read the norm's output, the experts write the
#: stream; the per-expert linears depend on the config's expert count, so the adapter answers them.
MOE_MLP = Sublayer(norm="post_attention_layernorm", modules=("mlp",), inputs=("mlp.gate",), output="mlp.experts")

MIXTRAL = replace(
    LLAMA,
    name="mixtral",
    model_types=("mixtral",),
    attention=ATTENTION,
    mlp=MOE_MLP,
    fused=(ATTENTION.inputs,),
    gguf_architectures={},
    adapter=MixtralAdapter,
)
