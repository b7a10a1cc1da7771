"""Every family's adapter resolves every role to a real module of the right kind and shape."""

from __future__ import annotations

import pytest
from tiny import tiny_model
from torch import nn

from compressor.errors import UnsupportedModelError
from compressor.models import ADAPTERS, check_supported, get_adapter


class AdapterContract:
    family: str

    @pytest.fixture
    def adapter(self):  # type: ignore[no-untyped-def]
        return get_adapter(tiny_model(self.family))

    def test_layers_are_reachable_by_path(self, adapter) -> None:  # type: ignore[no-untyped-def]
        assert adapter.num_layers == 3
        for i, layer in enumerate(adapter.layers()):
            assert adapter.model.get_submodule(adapter.layer_prefix(i)) is layer

    def test_linear_groups_share_their_input_width(self, adapter) -> None:  # type: ignore[no-untyped-def]
        layer = adapter.layers()[0]
        for group in adapter.linear_groups():
            widths = {layer.get_submodule(name).in_features for name in group.names}
            assert len(widths) == 1
            assert all(isinstance(layer.get_submodule(n), nn.Linear) for n in group.names)
        first, *_, last = adapter.linear_groups()
        assert layer.get_submodule(first.names[0]).in_features == adapter.hidden_size
        assert layer.get_submodule(last.names[0]).out_features == adapter.hidden_size

    def test_residual_writers_and_norms(self, adapter) -> None:  # type: ignore[no-untyped-def]
        layer = adapter.layers()[0]
        assert adapter.attention_output(layer).out_features == adapter.hidden_size
        assert adapter.mlp_output(layer).out_features == adapter.hidden_size
        for norm in (adapter.attention_norm(layer), adapter.mlp_norm(layer), adapter.final_norm()):
            assert norm.weight.shape == (adapter.hidden_size,)
        assert adapter.attention(layer) is not None and adapter.mlp(layer) is not None

    def test_norm_readers_eps_and_rotation(self, adapter) -> None:  # type: ignore[no-untyped-def]
        layer = adapter.layers()[0]
        qkv, _, mlp_in, _ = adapter.linear_groups()
        assert adapter.attention_inputs(layer) == [layer.get_submodule(n) for n in qkv.names]
        assert adapter.mlp_inputs(layer) == [layer.get_submodule(n) for n in mlp_in.names]
        for norm in (adapter.attention_norm(layer), adapter.mlp_norm(layer), adapter.final_norm()):
            assert 0 < adapter.norm_eps(norm) < 1e-3
        assert adapter.rotation_blocker() is None

    def test_embeddings_and_head(self, adapter) -> None:  # type: ignore[no-untyped-def]
        assert adapter.embeddings()
        assert adapter.lm_head().in_features == adapter.hidden_size
        assert adapter.max_positions == 256


class TestLlamaAdapter(AdapterContract):
    family = "llama"


class TestQwen2Adapter(AdapterContract):
    family = "qwen2"


class TestOPTAdapter(AdapterContract):
    family = "opt"


def test_opt_without_pre_norm_cannot_rotate() -> None:
    adapter = get_adapter(tiny_model("opt", do_layer_norm_before=False))
    assert "do_layer_norm_before" in (adapter.rotation_blocker() or "")


def test_unknown_family_lists_supported() -> None:
    with pytest.raises(UnsupportedModelError, match="supported model types are .*llama.*opt.*qwen2"):
        check_supported("gpt_bigcode")


def test_table_covers_the_families() -> None:
    assert {"llama", "mistral", "qwen2", "qwen3", "opt"} <= set(ADAPTERS)
