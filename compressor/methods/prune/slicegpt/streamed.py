"""SliceGPT on a streamed model (``compressor.streaming``): what changes when only one decoder layer is loaded.

The layers are folded and rebuilt as the sliced class when the pass loads them (``convert_layer``), not in
``prepare``: on the meta skeleton their norms' weights are not there to fold. The embeddings are rotated where they
are loaded (for layer 0's inputs) and released afterwards, and the head is never loaded, so the export computes
both again from the checkpoint's tensors, one tensor at a time, with the same functions as the in-RAM run
(``LayerStream.derived``): the rows rotated by the first basis, the head folded with the final norm and rotated by
the last one. A tied embedding is not rotated (its projections are): the embedding's projection is kept as
computed, the final norm's is rebuilt from the checkpoint's norm at export. ``shared`` measures its basis in
``prepare`` by loading every layer once more (``pooled.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressor.methods.prune.slicegpt import ops
from compressor.methods.prune.slicegpt.invariance import Ready, module_path

if TYPE_CHECKING:
    from compressor.engine import ModelContext

Read = Callable[[str, torch.dtype], torch.Tensor]


class StreamedEnds:
    """The embeddings and head of a streamed model, recorded before ``make_rotation_ready`` replaces the final norm.

    ``rows`` and ``head`` tell the streamer how the export computes their rotated tensors.
    """

    def __init__(self, run: ModelContext) -> None:
        adapter, model = run.adapter, run.model
        head = adapter.lm_head()
        self.final_norm: nn.Module = adapter.final_norm()
        self.final_path = module_path(model, self.final_norm)
        self.head_path = module_path(model, head)
        self.head_bias = head.bias is not None
        self.dtype = head.weight.dtype
        self.adapter = adapter

    def rows(self, run: ModelContext, ready: Ready, Q: torch.Tensor) -> None:
        """Each embedding's rows, rotated into the first basis ``Q: [D, d]`` (centred first for LayerNorm); a tied
        embedding's projection (already rotated, small) as it is now, since the embeddings are released later."""
        assert run.stream is not None
        for linear in ready.embedding_writers:
            kept = linear.weight.detach().clone()
            run.stream.derived[f"{module_path(run.model, linear)}.weight"] = partial(_kept, kept)
        for embedding in ready.embedding_rows:
            name = f"{module_path(run.model, embedding)}.weight"
            run.stream.derived[name] = partial(_rotated_rows, name=name, dtype=embedding.weight.dtype, Q=Q.cpu(),
                                               center=self.adapter.uses_layernorm)

    def head(self, run: ModelContext, ready: Ready, Q: torch.Tensor) -> None:
        """The head folded with the final norm's scale (and shift, into its bias), reading the stream in basis ``Q``."""
        assert run.stream is not None
        path = module_path(run.model, ready.head_reader)
        if ready.tied:  # the final norm's projection: diag(scale) and the shift as its bias
            run.stream.derived[f"{path}.weight"] = partial(self._projection, Q=Q.cpu(), part=0)
            if ready.head_reader.bias is not None:
                run.stream.derived[f"{path}.bias"] = partial(self._projection, Q=Q.cpu(), part=1)
            return
        run.stream.derived[f"{path}.weight"] = partial(self._head, Q=Q.cpu(), part=0)
        if ready.head_reader.bias is not None:
            run.stream.derived[f"{path}.bias"] = partial(self._head, Q=Q.cpu(), part=1)

    def _head(self, read: Read, Q: torch.Tensor, part: int) -> torch.Tensor:
        W = read(f"{self.head_path}.weight", self.dtype)
        b = read(f"{self.head_path}.bias", self.dtype) if self.head_bias else None
        W, b = ops.fold_norm(W, b, *self._final_affine(read))
        if part == 1:
            assert b is not None
            return b
        return ops.rotate_input(W, Q)

    def _projection(self, read: Read, Q: torch.Tensor, part: int) -> torch.Tensor:
        """As ``invariance._prepare_head`` builds it for a tied head, then rotated as ``finalize`` does."""
        scale, shift = self._final_affine(read)
        if part == 1:
            assert shift is not None
            return shift.clone()
        hidden = self.adapter.hidden_size
        diag = torch.ones(hidden, dtype=self.dtype) if scale is None else scale
        return ops.rotate_input(torch.diag(diag).to(self.dtype), Q)

    def _final_affine(self, read: Read) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The final norm's scale and shift, from the checkpoint (the module is put back on meta)."""
        norm: Any = self.final_norm
        norm.load_state_dict({k: read(f"{self.final_path}.{k}", t.dtype) for k, t in norm.state_dict().items()},
                             assign=True)
        try:
            scale, shift = self.adapter.norm_affine(norm)
            return (None if scale is None else scale.clone(), None if shift is None else shift.clone())
        finally:
            norm.to("meta")


def _kept(tensor: torch.Tensor, read: Read) -> torch.Tensor:
    return tensor


def _rotated_rows(read: Read, name: str, dtype: torch.dtype, Q: torch.Tensor, center: bool) -> torch.Tensor:
    weight = read(name, dtype)
    if center:
        weight = ops.center_output(weight.T, None)[0].T.contiguous()
    return ops.rotate_input(weight, Q)
