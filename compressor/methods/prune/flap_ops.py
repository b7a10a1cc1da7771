"""FLAP math (An et al., 2024, "Fluctuation-based adaptive structured pruning"): pure functions on tensors.

Statistics: per input channel of an output projection (o_proj / down_proj), the running mean and variance of
that channel over calibration tokens, merged batch by batch in float64 (Chan et al.'s parallel update, so the
variance of a nearly constant channel does not cancel to noise); under torchrun each process's (count, mean, M2)
is merged with the others' the same way (:func:`merge_moments`), never averaged. Scores per channel:

- ``fluctuation`` (the paper's WIFV): ``var_j * ||W[:, j]||^2``: a channel that barely moves can be replaced by
  its mean, which the compensation bias does;
- ``weight_norm``: ``||W[:, j]||^2`` (no data);
- ``activation_norm``: ``sqrt(E[x_j^2]) * ||W[:, j]||`` (the size of the channel's contribution, Wanda-like).

As in the paper's reference code, o_proj's channel scores are squared, each layer's scores are standardised on
their own per module (o_proj's channels, down_proj's channels), and a head (here: a whole KV group, see
``flap.py``) scores the mean of its channels' standardised scores; so one threshold compares heads with channels
and every layer with every other. Selection removes the lowest-scored units under a budget counted in parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Metric = Literal["fluctuation", "weight_norm", "activation_norm"]
Structure = Literal["global", "per_layer", "uniform"]


@dataclass(frozen=True)
class Moments:
    """Running statistics of one input ``[C]`` over ``n`` tokens: ``mean`` and ``m2 = sum (x - mean)^2`` (float64)."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def variance(self) -> torch.Tensor:
        """Population variance per channel ``[C]`` (zero before any token)."""
        return self.m2 / max(self.n, 1)


def accumulate_moments(state: Moments | None, x: torch.Tensor) -> Moments:
    """Fold a batch ``x: [..., C]`` into ``state`` (Chan's merge of two (n, mean, M2) triples, in float64)."""
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    mean_b = rows.mean(dim=0)
    return merge_moments(state, Moments(rows.shape[0], mean_b, ((rows - mean_b) ** 2).sum(dim=0)))


def merge_moments(a: Moments | None, b: Moments) -> Moments:
    """The moments of ``a``'s and ``b``'s tokens together (Chan et al.'s pairwise update, float64).

    Exact in real arithmetic for any split of the tokens, so it folds a batch into a running state and, under
    torchrun, one process's moments into another's: merging the processes' states in rank order repeats the
    one-process sequence of merges whenever every process after the first holds one batch. It adds deviations
    from the means, never ``sum x^2 - n mean^2``, so a nearly constant channel keeps its small variance.
    """
    if a is None or a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    m2 = a.m2 + b.m2 + delta**2 * (a.n * b.n / n)
    return Moments(n, mean, m2)


def channel_scores(metric: Metric, moments: Moments, W: torch.Tensor) -> torch.Tensor:
    """Score of every input channel of ``W: [out, in]`` given its input's ``moments`` (``[in]``, float64)."""
    column_sq = W.detach().double().pow(2).sum(dim=0)
    if metric == "fluctuation":
        return moments.variance * column_sq
    if metric == "weight_norm":
        return column_sq
    second = moments.variance + moments.mean**2
    return second.sqrt() * column_sq.sqrt()


def group_means(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Mean of consecutive ``width`` channels: ``[C] -> [C / width]`` (a head group's score from its channels')."""
    return scores.reshape(-1, width).mean(dim=1)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / std`` over one layer's channels of one module (sample std); all equal: zeros.

    The paper standardises each layer's scores on their own (its reference does it per row of the [layers,
    channels] matrix), so the one global threshold asks how far a unit lies below its own layer's typical score.
    Standardising across all layers instead lets a layer whose inputs fluctuate little overall be emptied for that
    alone: on the demo model it took a third of the attention of the first ten layers (ppl 194 at 20%).
    """
    flat = scores.double()
    if flat.numel() < 2:
        return torch.zeros_like(flat)
    std = flat.std()
    return (flat - flat.mean()) / (std if std > 0 else torch.ones((), dtype=torch.float64))


def head_group_params(hidden: int, head_dim: int, heads_per_group: int, qkv_bias: bool) -> int:
    """Parameters one KV group removes: its query heads' q rows and o columns, its key and value rows.

    q: ``g * d`` rows of ``hidden`` (+ bias), k and v: ``d`` rows each (+ bias), o: ``g * d`` columns of ``hidden``.
    """
    row = hidden + (1 if qkv_bias else 0)
    return heads_per_group * head_dim * row + 2 * head_dim * row + heads_per_group * head_dim * hidden


def mlp_channel_params(hidden: int, inputs: int, input_bias: bool) -> int:
    """Parameters one MLP channel removes: a row of each of ``inputs`` linears (gate, up) and a down column."""
    return inputs * (hidden + (1 if input_bias else 0)) + hidden


@dataclass(frozen=True)
class Unit:
    """A removable unit: a KV group (``attention``) or an MLP channel of one layer, with its score and cost."""

    layer: int
    kind: Literal["attention", "mlp"]
    index: int
    score: float
    params: int


def _candidates(units: list[Unit]) -> list[Unit]:
    """Every unit but the best of each (layer, kind): a module always keeps one head group and one channel."""
    best: dict[tuple[int, str], Unit] = {}
    for unit in units:
        key = (unit.layer, unit.kind)
        if key not in best or (unit.score, -unit.index) > (best[key].score, -best[key].index):
            best[key] = unit
    keep = set(map(id, best.values()))
    return [u for u in units if id(u) not in keep]


def lowest_within(units: list[Unit], budget: int) -> list[Unit]:
    """The lowest-scored units, in score order, up to the first one that would take the total past ``budget``.

    One threshold: every removed unit scores below every kept candidate (ties: layer, kind, index order).
    """
    chosen, spent = [], 0
    for unit in sorted(_candidates(units), key=lambda u: (u.score, u.layer, u.kind, u.index)):
        if spent + unit.params > budget:
            break
        chosen.append(unit)
        spent += unit.params
    return chosen


def select_units(units: list[Unit], ratio: float, structure: Structure) -> list[Unit]:
    """Units to remove so that at most ``ratio`` of the units' parameters go.

    ``global``: one threshold over every layer (scores must be standardised per kind: the paper's adaptive
    structure); ``per_layer``: each layer loses at most ``ratio`` of its own parameters, split between heads
    and channels by score; ``uniform``: each layer loses ``floor(ratio * groups)`` head groups and spends the
    rest of its ``ratio`` on the lowest-scored channels, the same counts in every layer.
    """
    if structure == "global":
        return lowest_within(units, math.floor(ratio * sum(u.params for u in units)))
    layers = sorted({u.layer for u in units})
    chosen: list[Unit] = []
    for layer in layers:
        own = [u for u in units if u.layer == layer]
        if structure == "per_layer":
            chosen += lowest_within(own, math.floor(ratio * sum(u.params for u in own)))
            continue
        chosen += _uniform_layer(own, ratio)
    return chosen


def _uniform_layer(own: list[Unit], ratio: float) -> list[Unit]:
    """``floor(ratio * groups)`` head groups, then as many MLP channels as the rest of the layer's budget pays for.

    Head groups are coarse (a model with 3 KV groups cannot lose 20% of them), so counting each kind on its
    own would leave most of the budget unspent and compare a uniform model larger than the adaptive one;
    spending the remainder on channels keeps every layer alike and the size equal to the other structures'.
    """
    heads = sorted((u for u in own if u.kind == "attention"), key=lambda u: (u.score, u.index))
    channels = sorted((u for u in own if u.kind == "mlp"), key=lambda u: (u.score, u.index))
    removed = heads[: max(min(math.floor(ratio * len(heads)), len(heads) - 1), 0)]
    left = math.floor(ratio * sum(u.params for u in own)) - sum(u.params for u in removed)
    if channels and left > 0:
        removed += channels[: max(min(left // channels[0].params, len(channels) - 1), 0)]
    return removed


def round_kept_channels(units: list[Unit], chosen: list[Unit], multiple: int) -> list[Unit]:
    """``chosen`` without each layer's highest-scored removed MLP channels, so the kept width is a multiple.

    Every layer keeps ``ceil(kept / multiple) * multiple`` channels (all of them when that is more than it
    has), so fewer parameters go than chosen, never more; head groups are unchanged. ``multiple`` 1 changes
    nothing. Used so a later quantizer's groups divide down_proj's narrower input.
    """
    if multiple <= 1:
        return chosen
    result = [u for u in chosen if u.kind != "mlp"]
    for layer in sorted({u.layer for u in units}):
        width = sum(1 for u in units if u.layer == layer and u.kind == "mlp")
        removed = sorted((u for u in chosen if u.layer == layer and u.kind == "mlp"), key=lambda u: (u.score, u.index))
        kept = width - len(removed)
        restore = min(width, math.ceil(kept / multiple) * multiple) - kept
        result += removed[: len(removed) - restore]
    return result


def compensation_bias(W: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``W[:, removed] @ mean[removed]``: what the removed input channels added on average (``[out]``, W's dtype).

    ``W: [out, in]``, ``mean: [in]`` (float64), ``removed``: channel indices. Computed in float64.
    """
    return (W.detach().double()[:, removed] @ mean.double()[removed]).to(W.dtype)


def group_channels(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices of the groups ``groups`` when group ``g`` owns channels ``g*width .. g*width+width-1``."""
    return (groups.reshape(-1, 1) * width + torch.arange(width)).reshape(-1)
