"""SliceGPT math on tensors: stream covariance, principal bases, norm folding, rotations, widths.

Conventions: a linear's weight is ``W: [out, in]`` and acts on row vectors (``y = x W^T + b``). A basis ``Q: [D, d]``
has orthonormal columns; a stream vector ``x`` (``D`` wide, original coordinates) is stored as ``x Q`` (``d`` wide),
and read back approximately as ``(x Q) Q^T`` (exactly when ``d == D``). Every product is taken in float64 and
cast back to the weight's dtype. No modules, devices, files or logging here.
"""

from __future__ import annotations

import torch


def sliced_width(hidden: int, slicing: float | None, dim: int | None, round_to: int) -> int:
    """Stream width after slicing: ``dim``, or ``(1 - slicing) * hidden`` rounded down to a multiple of ``round_to``.

    Rounding down follows the reference implementation (25% of 576 -> 432, 10% -> 512). Raises ``ValueError``
    when the result is not in ``[1, hidden]``.
    """
    if dim is None:
        slicing = 0.25 if slicing is None else slicing
        width = int((1.0 - slicing) * hidden)
        width -= width % round_to
        how = f"{1.0 - slicing:g} x {hidden} rounded down to a multiple of round_to {round_to}"
    else:
        width, how = dim, "dim"
    if not 1 <= width <= hidden:
        raise ValueError(f"sliced width {width} ({how}) is outside [1, {hidden}]")
    return width


def accumulate_covariance(cov: torch.Tensor | None, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``cov + X^T X`` over the tokens of ``x: [..., D]``, float64 ``[D, D]``.

    With ``normalize`` each token is first scaled to unit RMS, so every token weighs the same whatever its norm:
    that is the error the RMS norms downstream see (a relative one).
    """
    X = x.reshape(-1, x.shape[-1]).double()
    if normalize:
        X = X / X.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
    update = X.T @ X
    return update if cov is None else cov + update


def principal_basis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``[D]`` (descending, clamped at 0) and eigenvectors ``Q: [D, D]`` (columns) of a covariance.

    Each column's sign is fixed so its largest-magnitude entry is positive: the same data gives the same basis.
    """
    cov = cov.double()
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    peak = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[peak, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return values.clamp_min(0.0), vectors * signs


def lost_fraction(values: torch.Tensor, width: int) -> float:
    """Share of the stream's energy (sum of eigenvalues) outside the first ``width`` principal directions."""
    total = float(values.sum())
    return float(values[width:].sum()) / total if total > 0 else 0.0


def centering_matrix(dim: int) -> torch.Tensor:
    """``C = I - 11^T / dim`` (float64): ``x C`` subtracts the mean of ``x``'s entries."""
    return torch.eye(dim, dtype=torch.float64) - 1.0 / dim


def fold_norm(
    W: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear reading ``n * scale + shift`` rewritten to read ``n``: ``W diag(scale)`` and ``b + W shift``.

    ``W: [out, D]``, ``b: [out]`` or None, ``scale``/``shift``: ``[D]`` or None. A shift needs a bias to land in:
    with ``b`` None and a shift given, the bias is created.
    """
    W64 = W.double()
    new_b = b
    if shift is not None:
        base = b.double() if b is not None else torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
        new_b = (base + W64 @ shift.double()).to(W.dtype)
    if scale is not None:
        W64 = W64 * scale.double()
    return W64.to(W.dtype), new_b


def center_output(W: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear writing into the stream rewritten to write its output minus the output's mean (``C W``, ``C b``)."""
    W64 = W.double()
    new_W = (W64 - W64.mean(dim=0, keepdim=True)).to(W.dtype)
    new_b = None if b is None else (b.double() - b.double().mean()).to(b.dtype)
    return new_W, new_b


def rotate_input(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """A linear that read ``x`` now reads ``x Q``: ``W Q`` (``[out, D] @ [D, d] -> [out, d]``)."""
    return (W.double() @ Q.double()).to(W.dtype)


def rotate_output(
    W: torch.Tensor, b: torch.Tensor | None, Q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear that wrote ``y`` now writes ``y Q``: ``Q^T W`` (``[d, D] @ [D, in]``) and ``Q^T b``."""
    new_W = (Q.double().T @ W.double()).to(W.dtype)
    new_b = None if b is None else (Q.double().T @ b.double()).to(b.dtype)
    return new_W, new_b


def basis_change(Q_from: torch.Tensor, Q_to: torch.Tensor) -> torch.Tensor:
    """The shortcut ``Q_from^T Q_to: [d_from, d_to]`` taking ``x Q_from`` to (approximately) ``x Q_to``."""
    return Q_from.double().T @ Q_to.double()
