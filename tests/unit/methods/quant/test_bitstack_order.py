"""BitStack's global block order against a brute-force best choice, and the budget parser's units."""

from __future__ import annotations

import itertools
import random

import pytest

from compressor.methods.quant.bitstack.order import (
    Budget,
    BudgetError,
    Chain,
    blocks_for_budget,
    global_order,
    parse_budget,
)


def _concave_chains(seed: int) -> list[Chain]:
    """Three linears of 4 blocks, drops falling within each (concave), block sizes differing between linears."""
    rng = random.Random(seed)
    chains = []
    for name in "abc":
        size = rng.choice([3, 5, 8])
        drops = sorted((rng.uniform(0, 100) for _ in range(4)), reverse=True)
        chains.append(Chain(name, tuple(drops), (size + 2, size, size, size)))
    return chains


def _brute_force_best(chains: list[Chain], capacity: int) -> float:
    """Largest total drop over every choice of k >= 1 leading blocks per linear fitting ``capacity`` bytes."""
    best = float("-inf")
    for counts in itertools.product(*(range(1, len(c.sizes) + 1) for c in chains)):
        size = sum(sum(c.sizes[:k]) for c, k in zip(chains, counts, strict=True))
        if size <= capacity:
            best = max(best, sum(sum(c.drops[:k]) for c, k in zip(chains, counts, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_every_prefix_of_the_order_is_the_best_choice_of_its_size(seed: int) -> None:
    chains = _concave_chains(seed)
    by_path = {c.path: c for c in chains}
    order = global_order(chains)
    assert sorted(order) == sorted((c.path, j) for c in chains for j in range(4))
    for length in range(len(chains), len(order) + 1):
        prefix = order[:length]
        size = sum(by_path[p].sizes[j] for p, j in prefix)
        gained = sum(by_path[p].drops[j] for p, j in prefix)
        assert gained == pytest.approx(_brute_force_best(chains, size)), f"prefix of {length} blocks"


def test_blocks_of_a_linear_load_in_order_even_when_a_later_block_is_worth_more() -> None:
    # a: block 2 drops 10 after block 1's 1, together 11 in 2 bytes (5.5 per byte); b: 6, then 0.5 per byte
    chains = [Chain("a", (50.0, 1.0, 10.0), (4, 1, 1)), Chain("b", (50.0, 6.0, 0.5), (4, 1, 1))]
    assert global_order(chains) == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    # the brute-force best at each boundary of the merged steps: 8, 9, 11, 12 bytes
    by_path = {c.path: c for c in chains}
    order = global_order(chains)
    for length in (2, 3, 5, 6):
        size = sum(by_path[p].sizes[j] for p, j in order[:length])
        gained = sum(by_path[p].drops[j] for p, j in order[:length])
        assert gained == pytest.approx(_brute_force_best(chains, size))


def test_order_keeps_each_linear_in_sequence_on_random_non_concave_drops() -> None:
    rng = random.Random(7)
    chains = [Chain(f"m{i}", tuple(rng.uniform(-5, 50) for _ in range(6)), tuple(rng.choice([2, 3]) for _ in range(6)))
              for i in range(5)]
    order = global_order(chains)
    for chain in chains:
        assert [j for p, j in order if p == chain.path] == list(range(6))
    assert order[:5] == [(c.path, 0) for c in chains]


@pytest.mark.parametrize(
    ("text", "value", "unit"),
    [
        ("300MB", 300e6, "bytes"),
        ("300mb", 300e6, "bytes"),
        ("1.5GB", 1.5e9, "bytes"),
        ("300MiB", 300 * 2**20, "bytes"),
        ("1.5GiB", 1.5 * 2**30, "bytes"),
        ("2KiB", 2048, "bytes"),
        ("123456", 123456, "bytes"),
        ("123456B", 123456, "bytes"),
        (123456, 123456, "bytes"),
        (" 2 MB ", 2e6, "bytes"),
        ("2.5bpw", 2.5, "bpw"),
    ],
)
def test_budget_units(text: str | int, value: float, unit: str) -> None:
    assert parse_budget(text) == Budget(value, unit)


@pytest.mark.parametrize(("text", "message"), [("abc", "expected a size"), ("-3MB", "expected a size"),
                                                ("3 parsecs", "expected a size"), ("0MB", "above 0")])
def test_unreadable_budgets_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(BudgetError, match=message) as error:
        parse_budget(text)
    assert "\n" not in str(error.value)


def _hand_chains() -> list[Chain]:
    # two 8 x 8 linears (64 weights each); block bytes 20 then 10
    return [Chain("a", (9.0, 4.0, 1.0), (20, 10, 10), 64), Chain("b", (9.0, 3.0, 2.0), (20, 10, 10), 64)]


def test_a_byte_budget_counts_the_fixed_weights() -> None:
    chains = _hand_chains()
    order = global_order(chains)  # a0, b0, a1 (0.4/byte), b1 (0.3), b2 (0.2), a2 (0.1)
    # cumulative bytes along the order: 20, 40, 50, 60, 70, 80
    assert blocks_for_budget(chains, order, Budget(1000 + 59, "bytes"), fixed_bytes=1000) == {"a": 2, "b": 1}
    assert blocks_for_budget(chains, order, Budget(1000 + 60, "bytes"), fixed_bytes=1000) == {"a": 2, "b": 2}
    assert blocks_for_budget(chains, order, Budget(10**9, "bytes"), fixed_bytes=1000) == {"a": 3, "b": 3}
    # bits per weight count the linears only: 4.5 bpw of 128 weights = 72 bytes
    assert blocks_for_budget(chains, order, Budget(4.5, "bpw"), fixed_bytes=1000) == {"a": 2, "b": 3}


def test_a_budget_below_one_block_per_linear_names_the_smallest_and_largest() -> None:
    chains = _hand_chains()
    with pytest.raises(BudgetError) as error:
        blocks_for_budget(chains, global_order(chains), Budget(1039, "bytes"), fixed_bytes=1000)
    message = str(error.value)
    assert "\n" not in message
    # smallest 1000 + 40 bytes = 2.5 bpw; largest 1000 + 80 bytes = 5 bpw
    assert "smallest is 0.001MB (1040 bytes) = 2.500bpw" in message
    assert "largest 0.001MB (1080 bytes) = 5.000bpw" in message
