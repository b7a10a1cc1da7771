"""Built-in methods; importing this package registers each of them by name."""

from compressor.methods import registry
from compressor.methods.prune import finercut, flap, layer_drop, slicegpt  # noqa: F401
from compressor.methods.quant import baq, bitstack, bnb, dgq, gptq, rtn  # noqa: F401

__all__ = ["registry"]
