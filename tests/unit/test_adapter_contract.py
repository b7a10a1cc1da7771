"""Every family's adapter resolves every role to a real module of the right kind and shape."""

from __future__ import annotations

import pytest
import torch
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

    def test_logits_from_the_last_layer_output(self, adapter) -> None:  # type: ignore[no-untyped-def]
        tokens = torch.arange(12).reshape(2, 6)
        seen = []
        handle = adapter.layers()[-1].register_forward_hook(lambda _m, _a, out: seen.append(out))
        with torch.no_grad():
            expected = adapter.model(tokens).logits
            handle.remove()
            last = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
            torch.testing.assert_close(adapter.logits(last), expected)

    def test_remove_layers_renumbers_and_shrinks_the_config(self, adapter) -> None:  # type: ignore[no-untyped-def]
        model = adapter.model
        survivors = [adapter.layers()[0], adapter.layers()[2]]
        adapter.remove_layers([1])
        assert list(adapter.layers()) == survivors and adapter.num_layers == 2
        assert model.config.num_hidden_layers == 2
        for i, layer in enumerate(adapter.layers()):
            assert model.get_submodule(adapter.layer_prefix(i)) is layer
            indices = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
            assert indices == {i}
        if getattr(model.config, "layer_types", None) is not None:
            assert len(model.config.layer_types) == 2
        assert {key.split(".layers.")[1].split(".")[0] for key in model.state_dict() if ".layers." in key} == {"0", "1"}
        tokens = torch.arange(6).reshape(1, 6)
        with torch.no_grad():
            cached = model.generate(tokens, max_new_tokens=4, do_sample=False)
            assert torch.equal(cached, model.generate(tokens, max_new_tokens=4, do_sample=False, use_cache=False))
        with pytest.raises(IndexError):
            adapter.remove_layers([2])


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
