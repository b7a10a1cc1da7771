"""Known answers for FLAP's math: moments, scores, parameter costs, selection, compensation."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.methods.prune.flap_ops import (
    Unit,
    accumulate_moments,
    channel_scores,
    compensation_bias,
    group_channels,
    group_means,
    head_group_params,
    mlp_channel_params,
    round_kept_channels,
    select_units,
    standardize,
)


def test_moments_over_batches_equal_the_two_pass_formula() -> None:
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0)) * 4 + 1e3  # large mean, small spread
    state = None
    for batch in x:
        state = accumulate_moments(state, batch)
    assert state is not None and state.n == 21
    flat = x.reshape(-1, 5).double()
    torch.testing.assert_close(state.mean, flat.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(state.variance, flat.var(0, correction=0), rtol=1e-10, atol=1e-9)


def test_scores_by_metric_on_a_hand_case() -> None:
    # channel 0: values 1, 3 (mean 2, var 1); channel 1: constant 5 (var 0)
    state = accumulate_moments(None, torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
    W = torch.tensor([[1.0, 2.0], [2.0, 0.0]])  # column norms^2: 5, 4
    assert channel_scores("fluctuation", state, W).tolist() == [5.0, 0.0]
    assert channel_scores("weight_norm", state, W).tolist() == [5.0, 4.0]
    torch.testing.assert_close(channel_scores("activation_norm", state, W),
                               torch.tensor([math.sqrt(5) * math.sqrt(5), 5 * 2.0], dtype=torch.float64))
    assert group_means(torch.arange(6.0), 3).tolist() == [1.0, 4.0]
    assert group_channels(torch.tensor([0, 2]), 2).tolist() == [0, 1, 4, 5]


def test_parameter_costs_count_every_weight_a_unit_owns() -> None:
    # hidden 64, head_dim 16, 2 query heads per KV group: q 32x64, k 16x64, v 16x64, o 64x32
    assert head_group_params(64, 16, 2, qkv_bias=False) == 2048 + 1024 + 1024 + 2048
    assert head_group_params(64, 16, 2, qkv_bias=True) == 6144 + 32 + 16 + 16
    assert mlp_channel_params(64, 2, input_bias=False) == 3 * 64


def test_budget_is_never_exceeded_and_stops_at_one_threshold() -> None:
    units = [Unit(0, "attention", 0, 0.0, 100), Unit(0, "attention", 1, 9.0, 100),
             Unit(0, "mlp", 0, 1.0, 30), Unit(0, "mlp", 1, 2.0, 30), Unit(0, "mlp", 2, 3.0, 30),
             Unit(0, "mlp", 3, 8.0, 30)]
    total = 320
    # ratio 0.5 -> budget 160: head 0 (100) + mlp 0 (30) + mlp 1 (30) = 160 exactly; mlp 2 would pass it
    chosen = select_units(units, 0.5, "global")
    assert [(u.kind, u.index) for u in chosen] == [("attention", 0), ("mlp", 0), ("mlp", 1)]
    assert sum(u.params for u in chosen) == 160 == math.floor(0.5 * total)
    # ratio 0.45 -> budget 144: mlp 1 no longer fits and nothing after it is taken (one threshold)
    assert [(u.kind, u.index) for u in select_units(units, 0.45, "global")] == [("attention", 0), ("mlp", 0)]
    # each module keeps its best unit even when the budget would allow more
    assert all(u.index != 1 or u.kind != "attention" for u in select_units(units, 0.99, "global"))


def test_uniform_removes_the_same_count_in_every_layer() -> None:
    units = [Unit(layer, "mlp", i, float((i * 7 + layer) % 5), 10) for layer in range(2) for i in range(5)]
    chosen = select_units(units, 0.4, "uniform")
    assert [sum(u.layer == layer for u in chosen) for layer in range(2)] == [2, 2]
    assert {(u.layer, u.index) for u in chosen} == {(0, 0), (0, 3), (1, 2), (1, 0)}


def test_uniform_spends_what_the_coarse_head_groups_leave_on_channels() -> None:
    # per layer: 2 head groups of 100 params, 5 channels of 10 -> 250 params
    units = [Unit(layer, "attention", i, float(i + layer), 100) for layer in range(2) for i in range(2)]
    units += [Unit(layer, "mlp", i, float((3 * i + layer) % 5), 10) for layer in range(2) for i in range(5)]
    # 20%: budget 50; floor(0.2 * 2) = 0 groups, so 5 channels would fit but each module keeps one: 4 channels
    chosen = select_units(units, 0.2, "uniform")
    assert sorted((u.layer, u.kind) for u in chosen) == [(0, "mlp")] * 4 + [(1, "mlp")] * 4
    # 50%: budget 125; one group (100) and 25 // 10 = 2 channels, the lowest-scored ones
    chosen = select_units(units, 0.5, "uniform")
    assert {(u.layer, u.kind, u.index) for u in chosen} == {
        (0, "attention", 0), (0, "mlp", 0), (0, "mlp", 2), (1, "attention", 0), (1, "mlp", 3), (1, "mlp", 0)}
    assert all(sum(u.params for u in chosen if u.layer == layer) <= 125 for layer in range(2))


def _brute_force(attention: list[list[float]], mlp: list[list[float]], costs: tuple[int, int], ratio: float) -> set:
    """Standardise each layer's scores of each kind by hand, then try every threshold: the largest removal within
    budget wins."""
    def z(rows: list[list[float]]) -> list[list[float]]:
        """Each layer (row) on its own, sample standard deviation."""
        out = []
        for row in rows:
            mean = sum(row) / len(row)
            std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
            out.append([(v - mean) / std for v in row])
        return out

    scored = [(s, layer, "attention", i, costs[0]) for layer, row in enumerate(z(attention)) for i, s in enumerate(row)]
    scored += [(s, layer, "mlp", i, costs[1]) for layer, row in enumerate(z(mlp)) for i, s in enumerate(row)]
    best_of = {}
    for entry in scored:
        key = entry[1:3]
        if key not in best_of or entry[0] > best_of[key][0]:
            best_of[key] = entry
    candidates = [e for e in scored if e not in best_of.values()]
    total = sum(e[4] for e in scored)
    best: tuple[int, set] = (-1, set())
    for threshold in [-math.inf] + sorted(e[0] for e in candidates):
        removed = {e[1:4] for e in candidates if e[0] <= threshold}
        cost = sum(e[4] for e in candidates if e[0] <= threshold)
        if cost <= math.floor(ratio * total) and cost > best[0]:
            best = (cost, removed)
    return best[1]


@pytest.mark.parametrize("seed", range(5))
def test_global_selection_with_standardisation_matches_brute_force(seed: int) -> None:
    rng = torch.Generator().manual_seed(seed)
    attention = (torch.rand(3, 3, generator=rng) * 100).tolist()  # 3 layers x 3 KV groups
    mlp = (torch.rand(3, 6, generator=rng) * 0.1).tolist()        # 3 layers x 6 channels, another scale
    costs = (50, 7)
    z_attention = [standardize(torch.tensor(row)) for row in attention]
    z_mlp = [standardize(torch.tensor(row)) for row in mlp]
    units = [Unit(layer, "attention", i, float(s), costs[0]) for layer, row in enumerate(z_attention)
             for i, s in enumerate(row)]
    units += [Unit(layer, "mlp", i, float(s), costs[1]) for layer, row in enumerate(z_mlp) for i, s in enumerate(row)]
    for ratio in (0.1, 0.3, 0.5):
        chosen = {(u.layer, u.kind, u.index) for u in select_units(units, ratio, "global")}
        assert chosen == _brute_force(attention, mlp, costs, ratio)


def test_standardize_puts_each_layer_on_its_own_scale() -> None:
    """A layer whose scores are all 100x smaller gets the same standardised scores: no layer is emptied for its
    overall scale alone (the reference code standardises per layer, with the sample standard deviation)."""
    small, large = standardize(torch.tensor([1.0, 2.0, 4.0])), standardize(torch.tensor([100.0, 200.0, 400.0]))
    expected = torch.tensor([-4.0, -1.0, 5.0], dtype=torch.float64) / math.sqrt(21)  # -4/3, -1/3, 5/3 over sqrt(7/3)
    torch.testing.assert_close(small, expected)
    torch.testing.assert_close(large, expected)
    assert standardize(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]
    assert standardize(torch.tensor([7.0])).tolist() == [0.0]


def test_removing_a_constant_channel_with_compensation_leaves_the_output_exactly_unchanged() -> None:
    # integer-valued weights and inputs: every float32 sum below is exact, so equality is bitwise
    gen = torch.Generator().manual_seed(1)
    W = torch.randint(-4, 5, (6, 5), generator=gen).float()
    x = torch.randint(-3, 4, (10, 5), generator=gen).float()
    x[:, 2] = 3.0  # channel 2 never moves
    moments = accumulate_moments(None, x)
    assert channel_scores("fluctuation", moments, W)[2] == 0.0
    keep = torch.tensor([0, 1, 3, 4])
    bias = compensation_bias(W, moments.mean, torch.tensor([2]))
    pruned = torch.nn.functional.linear(x[:, keep], W[:, keep], bias)
    assert torch.equal(pruned, x @ W.T)
    # without the bias the output is off by exactly the removed column times 3
    assert torch.equal(x @ W.T - x[:, keep] @ W[:, keep].T, (3.0 * W[:, 2]).expand(10, 6))



def test_rounding_the_kept_width_gives_back_the_best_removed_channels() -> None:
    # layer 0: 10 channels, the 5 lowest (scores 0..4) removed, 5 kept -> 8 kept: the 3 best removed (scores 4,
    # 3, 2: channels 4, 3, 8) return; layer 1: 6 channels, 1 removed -> 8 > 6, so all 6 kept; heads untouched
    units = [Unit(0, "mlp", i, float(s), 1) for i, s in enumerate([9, 0, 8, 3, 4, 7, 1, 6, 2, 5])]
    units += [Unit(1, "mlp", i, float(i), 1) for i in range(6)] + [Unit(1, "attention", 0, -1.0, 50)]
    chosen = [u for u in units if u.layer == 0 and u.score < 5] + [units[10], units[-1]]
    rounded = round_kept_channels(units, chosen, 4)
    assert sorted((u.layer, u.kind, u.index) for u in rounded) == [(0, "mlp", 1), (0, "mlp", 6), (1, "attention", 0)]
    assert round_kept_channels(units, chosen, 1) is chosen
    exact = [u for u in units if u.layer == 0 and u.score < 2]  # 8 kept: already a multiple of 4
    assert round_kept_channels(units, exact, 4) == exact
