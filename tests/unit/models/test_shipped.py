"""The shipped modeling files serve every family from config.json alone: no family table, no compressor import."""

from __future__ import annotations

import ast
import re
import sys

import pytest
import transformers
from tiny import tiny_config

from compressor.models import FAMILIES
from compressor.models.shipped import auto_class_name, modeling_finercut, modeling_sliced, shipped_dir

SHIPPED = sorted(shipped_dir().glob("modeling_*.py"))


def test_every_modeling_file_is_shipped() -> None:
    names = ["modeling_bitstack.py", "modeling_finercut.py", "modeling_flap.py", "modeling_sliced.py"]
    assert [p.name for p in SHIPPED] == names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_import_only_the_standard_library_torch_and_transformers(path) -> None:  # type: ignore[no-untyped-def]
    """They run where compressor is not installed: the standard library, torch and transformers (with its own
    dependency safetensors) are all they may import."""
    tree = ast.parse(path.read_text())
    nodes = list(ast.walk(tree))
    roots = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
    assert roots - set(sys.stdlib_module_names) <= {"torch", "transformers", "safetensors"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_name_no_family(path) -> None:  # type: ignore[no-untyped-def]
    """Family facts come from the description through config.json; a file naming a family keeps a table."""
    source = path.read_text()
    for family in FAMILIES:
        for name in (family.name, *family.model_types):
            assert not re.search(rf"(?i:(?<![a-z]){re.escape(name)})(?![a-z])", source), f"{path.name} names {name}"


@pytest.mark.parametrize("module", [modeling_sliced, modeling_finercut], ids=lambda m: m.PREFIX)
def test_classes_are_made_for_any_transformers_causal_lm(module) -> None:  # type: ignore[no-untyped-def]
    for base in (transformers.MistralForCausalLM, transformers.Gemma3ForCausalLM):
        cls = getattr(module, module.PREFIX + base.__name__)
        assert issubclass(cls, base) and cls.__name__ == module.PREFIX + base.__name__
        assert getattr(module, cls.__name__) is cls  # made once: reloads and isinstance agree
    for missing in (module.PREFIX + "NoSuchModel", module.PREFIX + "AutoConfig", "LlamaForCausalLM"):
        with pytest.raises(AttributeError):
            getattr(module, missing)


def test_auto_class_name_is_the_stock_transformers_class() -> None:
    config = tiny_config("llama")
    config.finercut_layout = FAMILIES[0].layout()
    config.finercut_removed = [[], ["mlp"], []]
    reloaded = modeling_finercut.FinerCutLlamaForCausalLM(config)
    assert modeling_finercut.is_removed(reloaded.model.layers[1], config.finercut_layout, "mlp")
    assert auto_class_name("Sliced", reloaded) == "SlicedLlamaForCausalLM"
    with pytest.raises(LookupError):
        auto_class_name("Sliced", transformers.LlamaModel.__new__(transformers.LlamaModel))  # no LM head
