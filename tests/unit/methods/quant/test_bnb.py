"""nf4 / int8 against known answers written from the formats' definitions, and through the engine."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny import tiny_model

from compressor.engine import ModelContext, run_stages
from compressor.errors import RecipeError
from compressor.methods.quant.bnb import INT8Config, NF4Config
from compressor.methods.quant.bnb_ops import quantize_int8, quantize_nf4
from compressor.models import get_adapter
from compressor.recipe import build_stages, recipe_from_dict

pytest.importorskip("bitsandbytes")

#: QLoRA's NormalFloat4 levels (Dettmers et al. 2023, appendix E).
NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def _nf4_reference(W: torch.Tensor) -> torch.Tensor:
    """Slow reference: per block of 64 consecutive (row-major) weights, the nearest level times the block absmax."""
    blocks = W.reshape(-1, 64).double()
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / absmax).unsqueeze(-1).sub(NF4_TABLE.double()).abs().argmin(dim=-1)
    return (NF4_TABLE[nearest].double() * absmax).reshape(W.shape)


def test_nf4_known_answer_block() -> None:
    """One block with absmax 2: w / 2 = 0.5 lies between 0.4407 (0.0593 away) and 0.5626 (0.0626) -> 0.8814;
    -0.3 / 2 = -0.15 is nearest -0.1848 -> -0.3695; 0.02 / 2 = 0.01 -> 0; 2 -> 2 (level 1)."""
    row = torch.zeros(64)
    row[:4] = torch.tensor([1.0, -0.3, 0.02, 2.0])
    W_hat = quantize_nf4(row.reshape(1, 64), double_quant=False).dequantize(torch.float32)
    expected = torch.zeros(64)
    expected[:4] = torch.tensor([2 * 0.44070982933044434, 2 * -0.18477343022823334, 0.0, 2.0])
    torch.testing.assert_close(W_hat.flatten(), expected)


@pytest.mark.parametrize("shape", [(8, 64), (16, 96), (3, 128)])
def test_nf4_blocks_the_flattened_weight_like_the_reference(shape: tuple[int, int]) -> None:
    """(16, 96): blocks straddle rows, as bitsandbytes blocks the flattened tensor."""
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    W_hat = quantize_nf4(W, double_quant=False).dequantize(torch.float32)
    torch.testing.assert_close(W_hat.double(), _nf4_reference(W), rtol=1e-6, atol=0)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 64), (48, 576), (16, 96), (5, 32), (4, 100)])
def test_nf4_dequantize_is_bitsandbytes_own(shape: tuple[int, int], dtype: torch.dtype, double_quant: bool) -> None:
    """Our dequantization equals ``bitsandbytes.functional.dequantize_4bit`` bit for bit, wherever that is exact:
    everywhere when ``in % 64 == 0`` (each row starts a block); for straddling widths only off its AVX-512 CPU
    kernel, which bitsandbytes 0.50.2 takes when the width is a multiple of 16 on such a CPU and which restarts the
    blocks at each row (its pure-torch and scalar paths, and CUDA, block the flattened weight, as the reference
    test above does)."""
    import bitsandbytes

    W = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    weight = quantize_nf4(W, double_quant)
    ours = weight.dequantize(dtype)
    assert ours.dtype == dtype and ours.shape == W.shape
    avx512_rows = torch.backends.cpu.get_cpu_capability() == "AVX512" and shape[1] % 16 == 0
    if shape[1] % 64 == 0 or not avx512_rows:
        assert torch.equal(ours, bitsandbytes.functional.dequantize_4bit(weight.packed, weight.state))


def test_double_quant_rounds_the_absmax_only() -> None:
    """Same codes; each block's scale moves by at most the 8-bit rounding of the absmaxes; fewer bytes stored."""
    W = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    plain, double = quantize_nf4(W, False), quantize_nf4(W, True)
    assert torch.equal(plain.packed, double.packed)
    ratio = double.dequantize(torch.float32).reshape(-1, 64).abs().amax(1) / W.reshape(-1, 64).abs().amax(1)
    assert (ratio - 1).abs().max() < 0.02 and (ratio != 1).any()
    assert double.storage_bytes() < plain.storage_bytes() < W.numel()  # under 4.5 bits vs 4.5 bits + fixed parts


def test_int8_known_answer_row() -> None:
    """Row absmax 2 (exact in float16): codes round(127 * w / 2): 1 -> 63.5 is a tie, avoided; -1.5 -> -95.25 ->
    -95; 0.5 -> 31.75 -> 32; 0.1 (float16 0.0999755859375) -> 6.348 -> 6; 2 -> 127."""
    W = torch.tensor([[2.0, -1.5, 0.5, 0.1]])
    weight = quantize_int8(W)
    assert weight.codes.tolist() == [[127, -95, 32, 6]]
    assert weight.scale.tolist() == [2.0]
    torch.testing.assert_close(weight.dequantize(torch.float32), torch.tensor([[127, -95, 32, 6]]) * 2.0 / 127)


def _run(config: dict[str, Any]) -> tuple[ModelContext, list[Any], dict[str, torch.Tensor], Any]:
    model = tiny_model("llama")
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
    cls = NF4Config if config["method"] == "nf4" else INT8Config
    stages = build_stages([cls.model_validate(config)], "bitsandbytes")
    return run, run_stages(run, stages), original, stages[0]


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_engine_writes_the_bitsandbytes_weights_back_and_keeps_them(method: str) -> None:
    run, records, original, stage = _run({"method": method, "ignore": ["lm_head", "re:.*down_proj$"]})
    targeted = [n for n in original if n != "lm_head" and not n.endswith("down_proj")]
    assert sorted(r.module for r in records) == sorted(targeted) == sorted(stage.states)
    for name, W in original.items():
        now = run.model.get_submodule(name).weight.data
        if name not in targeted:
            assert torch.equal(now, W), name
            continue
        expected = _nf4_reference(W).float() if method == "nf4" else quantize_int8(W).dequantize(torch.float32)
        torch.testing.assert_close(now, expected, rtol=1e-6, atol=0)
    for row in records:  # nf4: a 64-wide row is one block (one scale per row), a 128-wide one two
        columns = original[row.module].shape[1]
        assert row.group_size == (64 if method == "nf4" and columns == 128 else -1), row.module
    record = records[0]
    assert record.bits == (4 if method == "nf4" else 8)
    assert record.bytes_after < record.bytes_before / (6 if method == "nf4" else 3)
    assert 0 < record.rel_error < (0.2 if method == "nf4" else 0.02)
    assert run.quantized == {}  # integer-grid exports never see these codes


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"method": "nf4", "bits": 4}, "stages.0.bits: unknown key"),
        ({"method": "nf4", "double_quant": "maybe"}, "stages.0.double_quant"),
        ({"method": "int8", "threshold": -1}, "stages.0.threshold"),
        ({"method": "int8", "group_size": 64}, "stages.0.group_size: unknown key"),
    ],
)
def test_configs_are_strict(stage: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"name": "t", "stages": [stage], "export": {"format": "bitsandbytes"}})


def test_dense_export_is_allowed() -> None:
    recipe = recipe_from_dict({"name": "t", "stages": [{"method": "int8"}], "export": {"format": "dense"}})
    assert recipe.stages[0].threshold == 6.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(("columns", "group"), [(576, 64), (128, 64), (96, 32), (64, -1), (32, -1)])
def test_nf4_report_group_is_the_columns_of_a_row_sharing_a_block(columns: int, group: int) -> None:
    from compressor.methods.quant.bnb import _row_group

    assert _row_group(columns) == group
