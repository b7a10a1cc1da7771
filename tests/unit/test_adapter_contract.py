"""Every family in the table: its description resolves every role to a real module of the right kind and shape.

The families come from ``compressor.models.FAMILIES`` itself, so a new row is tested without editing this file
(its tiny config is a row of ``tests/tiny.py``'s ``TINY``, and a missing row fails here).
"""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from tiny import FAMILIES, TINY, tiny_model
from torch import nn

from compressor.errors import UnsupportedModelError
from compressor.models import FAMILIES as FAMILY_TABLE
from compressor.models import MODEL_TYPES, check_supported, get_adapter


class TestAdapterContract:
    @pytest.fixture(params=FAMILIES)
    def adapter(self, request):  # type: ignore[no-untyped-def]
        adapter = get_adapter(tiny_model(request.param))
        assert adapter.family.name == request.param
        return adapter

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
        assert all(writer.out_features == adapter.hidden_size for writer in adapter.mlp_outputs(layer))
        for norm in (adapter.attention_norm(layer), adapter.mlp_norm(layer), adapter.final_norm()):
            assert norm.weight.shape == (adapter.hidden_size,)
        assert adapter.attention(layer) is not None and adapter.mlp(layer) is not None

    def test_norm_readers_eps_and_rotation(self, adapter) -> None:  # type: ignore[no-untyped-def]
        layer = adapter.layers()[0]
        qkv, _, mlp_in, *_ = adapter.linear_groups()
        assert adapter.attention_inputs(layer) == [layer.get_submodule(n) for n in qkv.names]
        assert adapter.mlp_inputs(layer) == [layer.get_submodule(n) for n in mlp_in.names]
        for norm in (adapter.attention_norm(layer), adapter.mlp_norm(layer), adapter.final_norm()):
            assert 0 < adapter.norm_eps(norm) < 1e-3
        if adapter.post_norms(layer):  # a norm after a branch does not commute with a rotation of the stream
            assert "post-norms" in (adapter.rotation_blocker() or "")
        elif len(adapter.mlp_outputs(layer)) > 1:  # a mixture of experts: router and experts are not rotated
            assert "expert" in (adapter.rotation_blocker() or "")
        else:
            assert adapter.rotation_blocker() is None

    def test_embeddings_and_head(self, adapter) -> None:  # type: ignore[no-untyped-def]
        assert adapter.embeddings()
        assert adapter.lm_head().in_features == adapter.hidden_size
        assert adapter.max_positions == 256

    def test_norm_kind_is_what_the_norms_compute(self, adapter) -> None:  # type: ignore[no-untyped-def]
        """Each norm on random input equals the formula of the described kind, written out here."""
        x = torch.randn(5, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
        layer = adapter.layers()[0]
        for norm in (adapter.attention_norm(layer), adapter.mlp_norm(layer), adapter.final_norm()):
            eps, w = adapter.norm_eps(norm), norm.weight.detach()
            if adapter.family.norm == "layernorm":
                centred = x - x.mean(-1, keepdim=True)
                expected = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * w + norm.bias.detach()
            else:
                gain = (1 + w) if adapter.family.norm == "rms_one_plus" else w
                expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain
            with torch.no_grad():
                torch.testing.assert_close(norm(x), expected)
            scale, shift = adapter.norm_affine(norm)
            torch.testing.assert_close(scale, (1 + w) if adapter.family.norm == "rms_one_plus" else w)
            assert (shift is None) == (adapter.family.norm != "layernorm")

    def test_embedding_scale_is_what_the_lookup_computes(self, adapter) -> None:  # type: ignore[no-untyped-def]
        tokens = torch.arange(7)
        embedding = adapter.embeddings()[0]
        with torch.no_grad():
            torch.testing.assert_close(embedding(tokens), embedding.weight[tokens] * adapter.embedding_scale())

    def test_fused_linears_share_a_group(self, adapter) -> None:  # type: ignore[no-untyped-def]
        layer = adapter.layers()[0]
        groups = [set(g.names) for g in adapter.linear_groups()]
        for fused in adapter.fused_groups():
            assert len(fused.names) > 1 and any(set(fused.names) <= g for g in groups), fused
            assert all(isinstance(layer.get_submodule(n), nn.Linear) for n in fused.names)

    def test_branches_and_layout(self, adapter) -> None:  # type: ignore[no-untyped-def]
        """The branch modules exist, the layout the shipped files read is JSON, and post-norms block rotation."""
        layer, family = adapter.layers()[0], adapter.family
        for branch in (family.attention, family.mlp):
            for path in (branch.norm, *branch.modules, *branch.inputs, branch.output):
                layer.get_submodule(path)
        layout = json.loads(json.dumps(family.layout()))
        assert adapter.model.get_submodule(layout["layers"]) is adapter.layers()
        assert adapter.model.get_submodule(layout["final_norm"]) is adapter.final_norm()
        assert [adapter.model.get_submodule(p) for p in layout["positions"]] == adapter.embeddings()[1:]
        assert adapter.mlp(layer) is (layer if len(family.mlp.modules) > 1 else layer.get_submodule("mlp"))
        assert bool(adapter.post_norms(layer)) == bool(family.attention.post_norm or family.mlp.post_norm)

    def test_before_layers_hold_the_rotary_modules(self, adapter) -> None:  # type: ignore[no-untyped-def]
        before = adapter.before_layers()
        rotary = [m for name, m in adapter.decoder().named_children() if "rotary" in name]
        assert all(any(m is b for b in before) for m in rotary)
        assert before[: len(adapter.embeddings())] == adapter.embeddings()

    def test_attention_types_and_gguf_names(self, adapter) -> None:  # type: ignore[no-untyped-def]
        types = adapter.attention_types()
        assert len(types) == adapter.num_layers and set(types) <= {"full_attention", "sliding_attention"}
        arches = adapter.family.gguf_architectures
        assert set(arches) <= set(adapter.family.model_types)
        assert set(arches.values()) <= set(gguf.MODEL_ARCH_NAMES.values())

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


def test_opt_without_pre_norm_cannot_rotate() -> None:
    adapter = get_adapter(tiny_model("opt", do_layer_norm_before=False))
    assert "do_layer_norm_before" in (adapter.rotation_blocker() or "")


def test_unknown_family_lists_supported() -> None:
    with pytest.raises(UnsupportedModelError, match="supported model types are .*llama.*opt.*qwen2"):
        check_supported("gpt_bigcode")


def test_table_covers_the_families() -> None:
    assert {"llama", "mistral", "qwen2", "qwen3", "opt"} <= set(MODEL_TYPES)
    assert [f.name for f in FAMILY_TABLE] == list(FAMILIES)


def test_every_family_has_a_tiny_config() -> None:
    assert set(TINY) == set(FAMILIES)
    for name, sizes in TINY.items():
        assert check_supported(sizes["model_type"]).name == name
