"""The streamed model: a meta-device skeleton, its decoder layers read one at a time, each written out when done."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from compressor.errors import ExportError, ModelLoadError, UnsupportedModelError
from compressor.export.streamed import LayerFiles
from compressor.methods.quant.bitstack.spill import spill_layer
from compressor.methods.quant.ops import QuantizedWeight
from compressor.models import get_adapter
from compressor.models.loading import DTYPES, LoadedModel, read_config, resolve_dtype
from compressor.streaming.heap import file_backed, trim

_SAFETENSORS_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class Checkpoint:
    """Where each tensor of a safetensors directory lives; reads one tensor at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: dict[str, Path] = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    self.files[name] = path

    def has(self, name: str) -> bool:
        """Whether ``read(name)`` finds the tensor."""
        return name in self.files

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def run_dtype(config: dict[str, Any], checkpoint: Checkpoint, dtype: str) -> torch.dtype:
    """The dtype the in-RAM loader would use: forced, else config.json's, else the first float tensor's."""
    forced = resolve_dtype(dtype)
    if isinstance(forced, torch.dtype):
        return forced
    named = config.get("dtype") or config.get("torch_dtype")
    if isinstance(named, str) and named in DTYPES:
        return DTYPES[named]
    for name in checkpoint.files:
        with safe_open(str(checkpoint.files[name]), framework="pt") as handle:
            found = handle.get_slice(name).get_dtype()
        if found in _SAFETENSORS_TORCH:
            return _SAFETENSORS_TORCH[found]
    return torch.float32


def load_skeleton(directory: Path, dtype: str, checkpoint: Checkpoint | None = None) -> tuple[LoadedModel, Checkpoint]:
    """The model on meta with its embeddings and rotary modules loaded (for layer 0's inputs), the rest on meta.

    ``checkpoint`` reads the tensors (default: the directory's safetensors as stored; a
    :class:`~compressor.streaming.packed.PackedCheckpoint` dequantizes a compressed-tensors output, whose config's
    ``quantization_config`` is then dropped: the skeleton holds dense linears).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    raw = read_config(directory)
    flap = _flap_class(directory, raw)
    if "auto_map" in raw and flap is None:
        raise UnsupportedModelError(f"{directory}: custom modeling code (auto_map) does not stream yet")
    checkpoint = checkpoint or Checkpoint(directory)
    model_dtype = run_dtype(raw, checkpoint, dtype)
    config = AutoConfig.from_pretrained(directory)
    if type(checkpoint) is not Checkpoint and hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(config, dtype=model_dtype) if flap is None else \
            flap._from_config(config, dtype=model_dtype)
    model.eval()
    if model.can_generate():  # as from_pretrained: the file, else one read from config.json
        try:
            model.generation_config = GenerationConfig.from_pretrained(directory)
        except OSError:
            model.generation_config = GenerationConfig.from_pretrained(directory, config_file_name="config.json",
                                                                       _from_model_config=True)
    adapter = get_adapter(model)
    layers = adapter.layers_path() + "."
    expected = {name: t for name, t in model.state_dict().items() if not name.startswith(layers)}
    tied = {name for name in expected if not checkpoint.has(name) and _is_tied(model, name)}
    missing = [name for name in expected if not checkpoint.has(name) and name not in tied]
    missing += [n for n in model.state_dict() if n.startswith(layers) and not checkpoint.has(n)]
    if missing:
        raise UnsupportedModelError(f"{directory}: the checkpoint's tensor names do not match the model's "
                                    f"({missing[0]} is missing), so its layers cannot be streamed")
    # Only what runs before layer 0 is loaded; the final norm and head (never run) are read again at export.
    load_modules(model, adapter.before_layers(), checkpoint)
    model._weight_conversions = []  # as from_pretrained leaves it when the names matched: save order follows it
    for path in adapter.family.rotary:  # non-persistent buffers (inv_freq) are computed from the config
        rotary = model.get_submodule(path)
        model.set_submodule(path, type(rotary)(config=model.config))
    model.tie_weights()
    paths = {id(module): path for path, module in model.named_modules()}
    first = [paths[id(m)] for m in adapter.before_layers()]
    left = [f"{path}.{name}" for path in first for name, t in
            [*model.get_submodule(path).named_parameters(), *model.get_submodule(path).named_buffers()] if t.is_meta]
    if left:
        raise UnsupportedModelError(f"{directory}: {left[0]} cannot be materialised without loading the whole "
                                    "model, so this model does not stream yet")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {directory}: {exc}") from exc
    return LoadedModel(model, tokenizer, str(directory), directory), checkpoint


def _flap_class(directory: Path, raw: dict[str, Any]) -> Any:
    """The class of a FLAP output whose ``auto_map`` names compressor's own modeling_flap.py, else None.

    It is the stock family class that narrows each layer to config.json ``flap.layers`` as it is built (on meta
    here), so the skeleton has the file's per-layer shapes and biases; the same class the in-RAM loader runs.
    """
    from compressor.models.loading import is_own_remote_code
    from compressor.models.shipped import modeling_flap

    names = {str(ref) for ref in (raw.get("auto_map") or {}).values()}
    if len(names) != 1 or not is_own_remote_code(directory, raw) or "flap" not in raw:
        return None
    module, _, name = names.pop().partition(".")
    return getattr(modeling_flap, name, None) if module == "modeling_flap" else None


def load_modules(model: Any, modules: list[nn.Module], checkpoint: Checkpoint) -> None:
    """Read the state (parameters, persistent buffers) of these submodules of ``model`` from ``checkpoint``."""
    paths = {id(module): path for path, module in model.named_modules()}
    first = [(paths[id(m)], m) for m in modules]
    state = {f"{path}.{name}": checkpoint.read(f"{path}.{name}", t.dtype)
             for path, module in first for name, t in module.state_dict().items()}
    model.load_state_dict(state, strict=False, assign=True)


#: How a shape-changing model-level stage turns a layer's checkpoint tensors into its own (names relative to it).
Rewrite = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
Derived = Callable[[Callable[[str, torch.dtype], torch.Tensor]], torch.Tensor]  # compute(read): LayerStream.derived


def read_layer(adapter: Any, checkpoint: Checkpoint, index: int, source: int | None = None,
               rewrite: Rewrite | None = None) -> dict[str, torch.Tensor]:
    """Decoder layer ``index``'s state (names relative to the layer) as the skeleton holds it, read from ``checkpoint``.

    ``source``: the layer's index in the checkpoint when layers before it were removed from the skeleton
    (default ``index``). ``rewrite``: a stage changed the layer's shapes (FLAP): the checkpoint's tensors of the
    skeleton's names (a new compensation bias is in the skeleton only) go through it.
    """
    layer: nn.Module = adapter.layers()[index]
    prefix = adapter.layer_prefix(index if source is None else source) + "."
    state = {name: checkpoint.read(prefix + name, t.dtype) for name, t in layer.state_dict().items()
             if rewrite is None or checkpoint.has(prefix + name)}
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelLoadError(f"{checkpoint.directory}: weight {prefix + bad[0]} has NaN/inf values; "
                             "the checkpoint is corrupt")
    return state if rewrite is None else rewrite(state)


def load_layer(adapter: Any, checkpoint: Checkpoint, index: int, source: int | None = None,
               rewrite: Rewrite | None = None) -> nn.Module:
    """Materialise decoder layer ``index`` of a skeleton from ``checkpoint`` (its tensors only) and return it."""
    layer: nn.Module = adapter.layers()[index]
    layer.load_state_dict(read_layer(adapter, checkpoint, index, source, rewrite), strict=True, assign=True)
    return layer


def _is_tied(model: Any, name: str) -> bool:
    keys = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return name in keys


@dataclass
class LayerStreamer:
    """Loads decoder layers from the checkpoint and writes each finished one out (the engine's ``LayerStream``).

    ``finish`` runs once the engine is done with a layer: its quantized weights' scales are rounded to what
    the file stores (as the in-RAM run does after the last layer), its output tensors are saved, its integer
    codes are replaced by shapes-only copies on meta (the report counts them), and the layer goes back on meta.

    A pass that ends in a model-level stage (layer removal) is a scoring pass: its layers are loaded, run and
    dropped, nothing is written, since the stage changes the model only after the last layer. Removal then
    shrinks the skeleton's layer list; each surviving layer module keeps its index in the checkpoint
    (:attr:`sources`, keyed by the module itself, so any number of removals compose), so the next pass loads it
    by that index and writes it under its new one. When no pass after the removal writes the layers, the
    export copies them from the checkpoint under their new names (:meth:`read_unchanged`).

    A stage that changes the layers' shapes (FLAP) narrows the meta skeleton at its finalize and leaves a
    rewrite per layer (:meth:`reshape`: its plan applied to the checkpoint's tensors), run whenever the layer is
    read again (the next pass, the export's copy). A BitStack pass leaves each finished layer's blocks in a file
    (``spill_layer``). SliceGPT's rotated embeddings and head are computed at export (:attr:`derived`).
    """

    model: Any
    adapter: Any
    checkpoint: Checkpoint
    files: LayerFiles
    export_format: str
    scale_dtype: Callable[[torch.dtype], torch.dtype]
    workdir: Path
    reason: str = ""
    activation_limit: int | None = None
    resident: int = 0
    max_resident: int = 0
    #: quantized module path -> its output tensor names, in the order the in-RAM writer creates them
    packed: dict[str, list[str]] = field(default_factory=dict)
    #: skeleton decoder layer (the module object) -> its index in the checkpoint
    sources: dict[nn.Module, int] = field(default_factory=dict)
    #: skeleton decoder layer -> how its checkpoint tensors become its own (a shape-changing stage's plan)
    reshapes: dict[nn.Module, Rewrite] = field(default_factory=dict)
    stages: list[Any] = field(default_factory=list)  # of every pass so far (the export finds bitstack's)
    derived: dict[str, Derived] = field(default_factory=dict)  # outside the layers, computed at export (SliceGPT)
    #: whether the current pass writes its finished layers (False: a scoring pass), and whether one did
    writes: bool = True
    wrote: bool = False
    passes: int = 0
    loads: int = 0
    _flip: int = 0
    #: the export's last layer read through a rewrite: (layer index, its state)
    _copied: tuple[int, dict[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        self.sources = {layer: index for index, layer in enumerate(self.adapter.layers())}

    def begin(self, stages: Sequence[Any]) -> None:
        """A pass starts: reload the embeddings a previous pass released; a model-level last stage writes nothing."""
        if self.wrote:  # its layers would load from the checkpoint without the written pass's changes
            raise RuntimeError("layer streaming: a pass after the one that wrote the layers (check_streamable "
                               "should have refused this recipe)")
        self.passes += 1
        self.stages += stages
        self.writes = self.wrote = not stages[-1].model_level
        released = [m for m in self.adapter.embeddings() if any(t.is_meta for t in m.state_dict().values())]
        if released:
            load_modules(self.model, released, self.checkpoint)
            self.model.tie_weights()

    def reshape(self, layer: nn.Module, rewrite: Rewrite) -> None:
        """``layer`` (on meta, at its new shapes) reads its checkpoint tensors via ``rewrite``, after any earlier."""
        first = self.reshapes.get(layer)
        self.reshapes[layer] = rewrite if first is None else _then(first, rewrite)

    def load(self, index: int) -> nn.Module:
        module = self.adapter.layers()[index]
        layer = load_layer(self.adapter, self.checkpoint, index, self.sources[module], self.reshapes.get(module))
        self.resident += 1
        self.loads += 1
        self.max_resident = max(self.max_resident, self.resident)
        return layer

    def captured(self) -> None:
        """Layer 0's inputs are captured: the embeddings go back to meta (the export reads them from the file)."""
        for module in self.adapter.embeddings():
            module.to("meta")
        self.model.tie_weights()

    def read_unchanged(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor no layer file holds, for the export: resident, or read again from the checkpoint.

        A decoder layer's tensor is read from the checkpoint when no pass wrote layers (the last one scored
        them for a removal): under the layer's index there, which the removal may have changed.
        """
        layers = self.adapter.layers_path() + "."
        if name in self.derived:
            return self.derived[name](self.checkpoint.read)
        if name.startswith(layers):
            if self.wrote:
                raise ExportError(f"streamed export: {name} was never written (its layer did not finish)")
            number, _, rest = name.removeprefix(layers).partition(".")
            index = int(number)
            layer = self.adapter.layers()[index]
            if layer in self.reshapes:  # the whole layer goes through the stage's plan; kept while its tensors go
                if self._copied is None or self._copied[0] != index:
                    self._copied = None
                    self._copied = (index, read_layer(self.adapter, self.checkpoint, index, self.sources[layer],
                                                      self.reshapes[layer]))
                return self._copied[1][rest]
            name = f"{self.adapter.layer_prefix(self.sources[layer])}.{rest}"
        return self.checkpoint.read(name, tensor.dtype) if tensor.is_meta else tensor.detach()

    def note(self) -> dict[str, Any]:
        """The report's record of the streaming (a warning group: it changes what the run could do)."""
        layers = len(self.adapter.layers())
        where = "RAM" if self.activation_limit is None else f"memory-mapped files above {self.activation_limit} bytes"
        copied = "the layers were read from the checkpoint and reshaped by the last stage's plan" if self.reshapes \
            else "the layers left were copied from the checkpoint"
        passes = "" if self.loads == layers and self.wrote else \
            f" ({self.loads} layer loads over {self.passes} pass{'es' if self.passes > 1 else ''}" + \
            ("" if self.wrote else f"; {copied} at export") + ")"
        message = (f"streamed from disk ({self.reason}): {layers} decoder layers loaded one at a time{passes}, at "
                   f"most {self.max_resident} in memory at once; hidden states in {where}; no checkpoints")
        return {"message": message, "count": layers, "pattern": f"{self.adapter.layers_path()}.*",
                "modules": [self.adapter.layer_prefix(i) for i in range(layers)]}

    def keep(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """One boundary of hidden states: as they are, or copied into a memory-mapped file above the limit."""
        sink = self.sink(hidden)
        return hidden if sink is None else [sink(i, t) for i, t in enumerate(hidden)]

    def sink(self, like: list[torch.Tensor]) -> Callable[[int, torch.Tensor], torch.Tensor] | None:
        """Where the next boundary's batch outputs go: None (RAM), or slices of a fresh memory-mapped file.

        Two files alternate: one holds the layer's inputs while its outputs are written to the other. Each token
        has room for the full hidden size: a layer may write a wider stream than it reads (SliceGPT's last).
        """
        size = sum(t.numel() * t.element_size() for t in like)
        if self.activation_limit is None or size <= self.activation_limit:
            return None
        self._flip ^= 1
        path = self.workdir / f"hidden-{self._flip}.bin"
        width = max(self.adapter.hidden_size, *(t.shape[-1] for t in like))
        starts = [0]
        for tensor in like:
            starts.append(starts[-1] + tensor.numel() // tensor.shape[-1] * width)
        flat = file_backed(path, starts[-1], like[0].dtype)

        def put(batch: int, out: torch.Tensor) -> torch.Tensor:
            return flat[starts[batch] : starts[batch] + out.numel()].view(out.shape).copy_(out)

        return put

    def finish(self, run: Any, index: int) -> None:
        layer = self.adapter.layers()[index]
        if not self.writes:  # a scoring pass: the layer was only run (a BitStack pass moves its blocks to a file)
            spill_layer(self.stages[-1], self.adapter.layer_prefix(index), self.workdir / "bitstack")
            self.release(index)
            return
        prefix = self.adapter.layer_prefix(index) + "."
        paths = [p for p in run.quantized if p.startswith(prefix)]
        for path in paths:
            module = layer.get_submodule(path.removeprefix(prefix))
            storage = self.scale_dtype(module.weight.dtype)
            if storage != torch.float32:
                run.quantized[path] = replace(run.quantized[path],
                                              scale=run.quantized[path].scale.to(storage).float())
                module.weight.data = run.quantized[path].dequantize(module.weight.dtype)
        outputs = self._outputs(run, layer, prefix, paths)
        packed = {name for path in paths for name in self.packed.get(path, [])}
        self.files.save(index, outputs, shared=True if self.export_format == "dense" else packed)
        for path in paths:
            run.quantized[path] = _shape_only(run.quantized[path])
        self.release(index)

    def release(self, index: int) -> None:
        """Layer ``index`` goes back on meta: written, or only read (a scoring pass, a stage's statistics)."""
        self.adapter.layers()[index].to("meta")
        self.resident -= 1
        trim()  # what the layer's solve freed leaves the process before the next layer loads

    def _outputs(self, run: Any, layer: nn.Module, prefix: str, paths: list[str]) -> dict[str, torch.Tensor]:
        """The layer's tensors as the in-RAM writer of ``export_format`` stores them."""
        state = {prefix + name: t for name, t in layer.state_dict().items()}
        if self.export_format == "dense":
            return state
        from compressor.export.compressed_tensors import (
            INT_FORMAT,
            activation_bits,
            int_weight,
            module_format,
            pack_weight,
            scheme_of,
        )

        weights = {f"{path}.weight" for path in paths}
        tensors = {name: t for name, t in state.items() if name not in weights}
        dtype = self.model.dtype
        for path in paths:
            qweight = run.quantized[path]
            module = layer.get_submodule(path.removeprefix(prefix))
            as_int = module_format(scheme_of(qweight), activation_bits(module)) == INT_FORMAT
            writer = int_weight if as_int else pack_weight
            packed = {f"{path}.{suffix}": t for suffix, t in writer(qweight, dtype).items()}
            self.packed[path] = list(packed)
            tensors.update(packed)
        return tensors


def _then(first: Rewrite, second: Rewrite) -> Rewrite:
    return lambda state: second(first(state))


def _shape_only(qweight: QuantizedWeight) -> QuantizedWeight:
    """The same weight with its codes, scales and zero points on meta: the report's bit counts still work (BAQ's
    per-group widths count by column group, derived from the codes without a ``g_idx``: kept as a contiguous one)."""
    groups = qweight.g_idx if qweight.g_idx is not None or qweight.group_bits is None else qweight.column_groups()
    return replace(qweight, q=qweight.q.to("meta"), scale=qweight.scale.to("meta"), zero=qweight.zero.to("meta"),
                   g_idx=groups)
