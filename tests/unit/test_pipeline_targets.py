"""compress() resolves every stage's targets on the loaded model's module paths before calibration."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import yaml

from compressor import pipeline
from compressor.errors import RecipeError
from compressor.methods.registry import get_method
from compressor.models import get_adapter
from compressor.pipeline import compress, load
from compressor.recipe import Recipe, recipe_from_dict

QUANT = {"bits": 4, "group_size": 32, "symmetric": True}


def _recipe(text_file: Path, *stages: dict[str, object]) -> Recipe:
    data = {
        "name": "t",
        "calibration": {"dataset": str(text_file), "samples": 2, "seq_len": 16, "batch_size": 2},
        "stages": list(stages),
        "export": {"format": "dense"},
    }
    return recipe_from_dict(yaml.safe_load(yaml.safe_dump(data)))


@pytest.fixture
def no_calibration():
    """Patch the calibration data step so a test can say it never ran."""
    with mock.patch.object(pipeline, "calibration_batch", side_effect=AssertionError("calibration ran")) as patched:
        yield patched


@pytest.mark.parametrize(
    ("first", "second", "module"),
    [
        # the example: every down_proj is also under "mlp"
        ("re:.*mlp.*", "re:.*down_proj", "model.layers.0.mlp.down_proj"),
        # a path suffix and a regex: comparing the strings cannot see it
        ("re:layers\\.1\\.mlp\\.", "down_proj", "model.layers.1.mlp.down_proj"),
    ],
)
def test_overlapping_quantizers_fail_before_calibration(model_dir_factory, text_file: Path, tmp_path: Path,
                                                        no_calibration, first: str, second: str,
                                                        module: str) -> None:
    recipe = _recipe(text_file, {"method": "rtn", "targets": [first], **QUANT},
                     {"method": "gptq", "targets": [second], **QUANT})
    with pytest.raises(RecipeError) as info:
        compress(load(model_dir_factory("llama")), recipe, tmp_path / "out", device="cpu")
    assert str(info.value) == (
        f"stages.0 (rtn) and stages.1 (gptq) both target {module}; give the stages disjoint targets"
    )
    assert no_calibration.call_count == 0
    assert not (tmp_path / "out").exists()


def test_overlap_after_a_pruning_stage_is_found_on_the_loaded_names(model_dir_factory, text_file: Path,
                                                                    tmp_path: Path, no_calibration) -> None:
    recipe = _recipe(text_file, {"method": "layer_drop", "remove": 1},
                     {"method": "rtn", "targets": ["re:.*mlp.*"], **QUANT},
                     {"method": "gptq", "targets": ["re:.*up_proj"], **QUANT})
    with pytest.raises(RecipeError, match=r"^stages\.1 \(rtn\) and stages\.2 \(gptq\) both target "
                                          r"model\.layers\.0\.mlp\.up_proj;"):
        compress(load(model_dir_factory("llama")), recipe, tmp_path / "out", device="cpu")
    assert no_calibration.call_count == 0


def test_disjoint_regex_targets_run(model_dir_factory, text_file: Path, tmp_path: Path) -> None:
    recipe = _recipe(text_file, {"method": "rtn", "targets": ["re:.*mlp.*"], **QUANT},
                     {"method": "gptq", "targets": ["re:.*self_attn.*"], **QUANT})
    report = compress(load(model_dir_factory("llama")), recipe, tmp_path / "out", device="cpu")
    methods = {row["module"]: row["method"] for row in report.layers}
    assert methods["model.layers.0.mlp.down_proj"] == "rtn"
    assert methods["model.layers.2.self_attn.q_proj"] == "gptq"


def test_a_planner_may_share_its_quantizers_modules(model_dir_factory) -> None:
    """BAQ only plans widths for the quantizer after it: the same modules are its purpose, not an overlap."""
    stages = [("baq", {"targets": ["re:.*mlp.*"], "avg_bits": 3.0, "candidates": [2, 4]}),
              ("gptq", {"targets": ["re:.*down_proj"], **QUANT})]
    methods = [get_method(name)(get_method(name).config_class(method=name, **fields)) for name, fields in stages]
    pipeline._check_targets(methods, get_adapter(load(model_dir_factory("llama")).model))


def test_a_stage_matching_nothing_is_still_named(model_dir_factory, text_file: Path, tmp_path: Path,
                                                 no_calibration) -> None:
    recipe = _recipe(text_file, {"method": "rtn", "targets": ["re:.*no_such_module"], **QUANT})
    with pytest.raises(RecipeError, match=r"^stages\.0 \(rtn\): targets \['re:\.\*no_such_module'\] match no "):
        compress(load(model_dir_factory("llama")), recipe, tmp_path / "out", device="cpu")
    assert no_calibration.call_count == 0
