"""GPTQ's memory-lean solve (issue 21, layer streaming) gives the bits of the full one and leaves its inputs alone.

``gptq_quantize`` no longer copies ``W`` when act-order permutes it anyway, factorises a fresh permuted copy of
``H`` per attempt instead of cloning a kept one, and with ``keep_rounded=False`` sweeps through one block-sized
buffer and converts the codes to uint8 before transposing them. Every comparison is ``torch.equal`` or ``==``.
"""

from __future__ import annotations

import pytest
import torch

from compressor.methods.quant import gptq_ops
from compressor.methods.quant.gptq_ops import gptq_quantize


def _layer(out: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, columns, generator=gen)
    X = torch.randn(3 * columns, columns, generator=gen) * torch.rand(columns, generator=gen) * 3
    return W, 2 / X.shape[0] * X.T @ X


def _same(a: gptq_ops.GPTQResult, b: gptq_ops.GPTQResult) -> bool:
    qa, qb = a.qweight, b.qweight
    return (torch.equal(qa.q, qb.q) and torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero, qb.zero)
            and a.loss == b.loss and a.dampening == b.dampening and a.cholesky_retries == b.cholesky_retries
            and a.dead_columns == b.dead_columns)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("fit_on", ["auto", "original", "sweep"])
@pytest.mark.parametrize("block", [16, 48, 128])
def test_lean_sweep_gives_the_same_codes(act_order: bool, dead: bool, fit_on: str, block: int) -> None:
    """Without the rounded values the codes, scales, zeros and loss are the full solve's, in uint8 codes."""
    W, H = _layer(40, 96, seed=5)
    if dead:
        H[7, :] = 0
        H[:, 7] = 0
    W0, H0 = W.clone(), H.clone()
    full = gptq_quantize(W, H, 4, 32, True, act_order, block, fit_on=fit_on)  # type: ignore[arg-type]
    lean = gptq_quantize(W, H, 4, 32, True, act_order, block, fit_on=fit_on, keep_rounded=False)  # type: ignore[arg-type]
    assert _same(full, lean)
    assert lean.rounded is None and full.rounded is not None
    assert lean.qweight.q.dtype == torch.uint8 and lean.qweight.q.is_contiguous()
    assert torch.equal(W, W0) and torch.equal(H, H0)  # the caller's tensors are untouched


def test_retries_factorise_a_fresh_copy_each_time() -> None:
    """A Hessian that needs raised dampening gets the same retries and codes as clone-per-attempt (the old form)."""
    W, H = _layer(24, 64, seed=2)
    H = H - 0.5 * torch.diagonal(H).mean() * torch.eye(64)  # indefinite: 1% dampening does not make it definite
    new = gptq_quantize(W, H, 4, 32, True, True, keep_rounded=False)
    assert new.cholesky_retries > 0

    def clone_per_attempt(H: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float, int]:
        mean_diag = torch.diagonal(H).mean()
        fraction = dampening
        for retries in range(gptq_ops._MAX_RETRIES + 1):
            Hd = H.clone()
            Hd.diagonal().add_(fraction * mean_diag)
            L, info = torch.linalg.cholesky_ex(Hd)
            if int(info) == 0:
                Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if int(info) == 0 and gptq_ops._finite(Hinv):
                    return Hinv.float(), fraction, retries
            fraction = fraction * 10 if fraction > 0 else gptq_ops._RETRY_START
        raise ValueError("singular")

    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    expected = clone_per_attempt(gptq_ops._permute_symmetric(H, perm), 0.01)
    got = gptq_ops._damped_inverse_factor(lambda: gptq_ops._permute_symmetric(H, perm), 0.01)
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert got[2] == new.cholesky_retries


def test_the_factorisation_holds_two_hessians_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the live [in, in] tensors the factorisation makes (through the linalg calls it uses)."""
    _, H = _layer(8, 64, seed=3)
    import weakref

    refs: list[weakref.ref[torch.Tensor]] = []
    peak = 0

    def track(t: torch.Tensor) -> torch.Tensor:
        nonlocal peak
        refs.append(weakref.ref(t))
        peak = max(peak, sum(1 for r in refs if r() is not None))
        return t

    real_chol, real_inv = torch.linalg.cholesky_ex, torch.cholesky_inverse
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A, **k: (lambda r: (track(r[0]), r[1]))(real_chol(A, **k)))
    monkeypatch.setattr(torch, "cholesky_inverse", lambda L, **k: track(real_inv(L, **k)))
    Hinv, _, _ = gptq_ops._damped_inverse_factor(lambda: track(H.clone()), 0.01)
    assert peak <= 2 and Hinv.shape == H.shape


@pytest.mark.parametrize(("columns", "tokens"), [(64, 300), (576, 512), (1000, 2048)])
def test_a_new_hessian_sum_equals_one_started_from_zeros(columns: int, tokens: int) -> None:
    """``accumulate_hessian(None, ...)`` starts from a broadcast zero, not [in, in] zeros: same bits, real strides."""
    x = torch.randn(tokens, columns, generator=torch.Generator().manual_seed(columns)) * 3
    new, n = gptq_ops.accumulate_hessian(None, x, 0)
    old, _ = gptq_ops.accumulate_hessian(torch.zeros(columns, columns), x, 0)
    assert torch.equal(new, old) and n == tokens and new.is_contiguous()
    empty, _ = gptq_ops.accumulate_hessian(None, x[:0], 0)
    assert empty.is_contiguous() and not empty.any()
    empty.add_(1)  # a real tensor that can be written
