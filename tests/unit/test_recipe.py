"""Recipe validation names file, line and field; overrides; shipped recipes round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compressor.errors import RecipeError
from compressor.recipe import load_recipe, recipe_from_dict, shipped_recipe_names

GOOD = """\
name: test
calibration: {dataset: "demo:lee", samples: 4, seq_len: 32}
stages:
  - method: rtn
    bits: 4
    group_size: 32
export: {format: dense}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_good_recipe_loads(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, GOOD))
    assert recipe.stages[0].bits == 4 and recipe.calibration.samples == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("method: rtn", "method: nope"), r"recipe.yaml:4: stages.0.method: unknown method 'nope'.*rtn"),
        (("bits: 4", "bits: 4\n    bitz: 3"), r"recipe.yaml:6: stages.0.bitz: unknown key"),
        (("bits: 4", "bits: four"), r"recipe.yaml:5: stages.0.bits: .*integer"),
        (("bits: 4", "bits: 12"), r"recipe.yaml:5: stages.0.bits: bits must be between 2 and 8"),
        (("samples: 4", "samples: 0"), r"recipe.yaml:2: calibration.samples: .*greater than or equal to 1"),
        (("format: dense", "format: onnx"), r"export.format"),
        (("name: test\n", "name: test\ncolour: red\n"), r"recipe.yaml:2: colour: unknown key"),
    ],
)
def test_errors_name_line_and_field(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, GOOD.replace(*change)))


def test_export_format_rejects_unstorable_bits(tmp_path: Path) -> None:
    text = GOOD.replace("bits: 4", "bits: 3").replace("format: dense", "format: gguf")
    with pytest.raises(RecipeError, match=r"export.format: stage 'rtn': GGUF export writes 4-bit \(Q4_0\)"):
        load_recipe(_write(tmp_path, text))
    text = GOOD.replace("format: dense", "format: compressed-tensors")
    text = text.replace("bits: 4", "bits: 4\n    symmetric: false")
    with pytest.raises(RecipeError, match="asymmetric pack-quantized files do not load"):
        load_recipe(_write(tmp_path, text))
    text = GOOD.replace("format: dense", "format: gguf").replace("group_size: 32", "group_size: 48")
    with pytest.raises(RecipeError, match="need group_size=32"):
        load_recipe(_write(tmp_path, text))


def test_set_overrides_fields(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, GOOD), ["stages.0.bits=3", "calibration.samples=8", "seed=5"])
    assert recipe.stages[0].bits == 3 and recipe.calibration.samples == 8 and recipe.seed == 5
    with pytest.raises(RecipeError, match="not an index"):
        load_recipe(_write(tmp_path, GOOD), ["stages.4.bits=3"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(_write(tmp_path, GOOD), ["stages.0.bits"])


def test_missing_recipe_lists_shipped() -> None:
    with pytest.raises(RecipeError, match="w8a16-rtn"):
        load_recipe("no-such-recipe")


def test_two_quantizers_on_same_modules_rejected() -> None:
    data = yaml.safe_load(GOOD)
    data["stages"].append({"method": "rtn", "bits": 8})
    with pytest.raises(RecipeError, match="two quantizing stages"):
        recipe_from_dict(data)


@pytest.mark.parametrize("name", shipped_recipe_names())
def test_shipped_recipes_round_trip(name: str, tmp_path: Path) -> None:
    recipe = load_recipe(name)
    dumped = recipe.dump()
    again = load_recipe(_write(tmp_path, dumped))
    assert again.to_dict() == recipe.to_dict()
    assert again.digest() == recipe.digest()


BAQ_GPTQ = """\
name: test
stages:
  - method: baq
    avg_bits: 3.0
  - method: gptq
    group_size: 32
export: {format: compressed-tensors}
"""


@pytest.mark.parametrize("between", [{"method": "layer_drop", "remove": 1}, {"method": "slicegpt", "slicing": 0.25}])
def test_pruning_between_a_plan_and_its_quantizer_is_rejected(between: dict[str, object]) -> None:
    """BAQ's plan is keyed by module path; removing layers or slicing after it moves widths to other modules."""
    data = yaml.safe_load(BAQ_GPTQ)
    data["stages"].insert(1, between)
    name = between["method"]
    with pytest.raises(RecipeError, match=rf"stages.1: {name} between baq \(stages.0\) and the gptq it plans for "
                                          r"\(stages.2\) would move the planned widths onto other modules; "
                                          r"put baq after it"):
        recipe_from_dict(data)
    data["stages"].insert(0, data["stages"].pop(1))  # pruning first is fine
    assert [s.method for s in recipe_from_dict(data).stages] == [name, "baq", "gptq"]


def test_two_plans_for_one_quantizer_are_rejected() -> None:
    data = yaml.safe_load(BAQ_GPTQ)
    data["stages"].insert(1, {"method": "baq", "avg_bits": 4.0})
    with pytest.raises(RecipeError, match=r"stages.1: baq would overwrite the plan of baq \(stages.0\)"):
        recipe_from_dict(data)


@pytest.mark.parametrize(("key", "value"), [("group_size", 128), ("act_order", True), ("dampening", 0.01)])
def test_baq_refuses_the_quantizers_knobs_and_says_where_they_live(tmp_path: Path, key: str, value: object) -> None:
    text = BAQ_GPTQ.replace("avg_bits: 3.0", f"avg_bits: 3.0\n    {key}: {str(value).lower()}")
    with pytest.raises(RecipeError, match=rf"recipe.yaml:3: stages.0: {key}: baq takes these from the quantizing "
                                          r"stage it plans for \(the gptq/rtn stage after it\); set them there"):
        load_recipe(_write(tmp_path, text))
    assert load_recipe(_write(tmp_path, BAQ_GPTQ)).stages[1].group_size == 32
