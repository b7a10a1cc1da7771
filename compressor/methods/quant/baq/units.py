"""What BAQ's pass keeps per linear, and how those measurements become the allocation's units.

The pass (``BAQ.apply``) keeps one :class:`Measured` per targeted linear; ``finalize`` turns them into the
elements ``ops.allocate_bits`` assigns widths to (:func:`allocation_units`): one per module, per quantizer group
or per column, with the sensitivity the objective reads. Apart from the stage so that the stage module reads as
config, measurement and plan, and so that the units can be rebuilt from kept measurements for other budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Measured:
    """What the pass keeps per targeted linear: column sensitivities ``[in]`` and ``tr(W H W^T)``."""

    path: str
    layer: int
    name: str
    rows: int
    group: int  # columns per stored group (the whole width when per channel)
    sensitivity: torch.Tensor
    trace: float
    channel_sensitivity: torch.Tensor  # the same with every output row weighted by 1 / its output energy
    fisher_sensitivity: torch.Tensor | None = None  # ... by its mean squared loss gradient (objective fisher)
    fused: tuple[int, int] | None = None  # (layer, fused group): modules that must share one width


def allocation_units(
    measured: list[Measured], granularity: str, objective: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[tuple[int, int]]]:
    """Sensitivities and sizes of the allocation elements, the column-to-group pool, and each module's
    span of units (one for module granularity, its groups otherwise), for the ``objective``. At module
    granularity the modules of one fused group share a unit: sensitivities and sizes add up."""
    S: list[torch.Tensor] = []
    sizes: list[torch.Tensor] = []
    pool: list[torch.Tensor] = []
    spans: list[tuple[int, int]] = []
    unit, fused_units = 0, dict[tuple[int, int], int]()
    for m in measured:
        if objective == "fisher":
            if m.fisher_sensitivity is None:
                raise ValueError(f"objective fisher: {m.path} was measured without loss gradients")
            sensitivity = m.fisher_sensitivity
        else:
            sensitivity = {
                "absolute": m.sensitivity,
                "relative": m.sensitivity / m.trace if m.trace > 0 else m.sensitivity,
                "channel": m.channel_sensitivity,
            }[objective]
        n_groups = m.sensitivity.numel() // m.group
        per_group = sensitivity.reshape(n_groups, m.group)
        if granularity == "module":
            shared = fused_units.get(m.fused) if m.fused is not None else None
            if shared is not None:  # S and sizes hold one element per unit here
                S[shared] = S[shared] + sensitivity.sum()
                sizes[shared] = sizes[shared] + m.rows * m.sensitivity.numel()
                spans.append((shared, shared + 1))
                continue
            if m.fused is not None:
                fused_units[m.fused] = unit
            S.append(sensitivity.sum().reshape(1))
            sizes.append(torch.tensor([m.rows * m.sensitivity.numel()]))
            spans.append((unit, unit + 1))
            unit += 1
            continue
        if granularity == "group":
            S.append(per_group.sum(dim=1))
            sizes.append(torch.full((n_groups,), m.rows * m.group))
        else:
            S.append(sensitivity)
            sizes.append(torch.full((m.sensitivity.numel(),), m.rows))
            pool.append(torch.arange(unit, unit + n_groups).repeat_interleave(m.group))
        spans.append((unit, unit + n_groups))
        unit += n_groups
    return torch.cat(S), torch.cat(sizes), torch.cat(pool) if pool else None, spans
