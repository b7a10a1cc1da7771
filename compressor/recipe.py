"""Recipes: the YAML schema, ``--set`` overrides, and every check that can run before a model loads.

A recipe is strict: unknown keys, wrong types and impossible combinations are errors that name the
file, the YAML line and the field. Stage configs are the registered methods' own pydantic models.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import compressor.methods  # noqa: F401  (registers the built-in methods)
from compressor.errors import RecipeError
from compressor.methods.base import Method, MethodConfig
from compressor.methods.registry import get_method

RECIPE_VERSION = 1
#: A recipe is a page of settings; anything larger is a mistake or an attack on the parser.
MAX_RECIPE_BYTES = 1 << 20
EXPORT_FORMATS = ("dense", "compressed-tensors", "gguf")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(_Strict):
    """Where calibration text comes from and how much of it the engine runs."""

    dataset: str = Field("demo:lee", description="SOURCE: file, directory, hf:NAME[:CONFIG][@SPLIT], demo:lee.")
    samples: int = Field(128, ge=1, description="Number of calibration sequences.")
    seq_len: int = Field(512, ge=2, description="Tokens per sequence.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    text_field: str | None = Field(None, description="Column holding the text in json/csv/parquet data.")


class ExportConfig(_Strict):
    """The stored form of the result."""

    format: Literal["dense", "compressed-tensors", "gguf", "bitstack", "compressor-int8", "bitsandbytes"] = "dense"
    gguf_type: Literal["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"] | None = Field(
        None, description="GGUF type for every quantized linear, requantizing codes it cannot hold; default: "
        "each linear's own type from its bits and symmetry.")
    max_shard_mb: int = Field(2048, ge=1, description="Largest safetensors shard, in MiB.")


class Recipe(_Strict):
    """A named, ordered list of stages plus calibration and export settings."""

    name: str
    description: str = ""
    seed: int = 0
    calibration: CalibrationConfig = CalibrationConfig()
    stages: list[MethodConfig]
    export: ExportConfig = ExportConfig()

    @field_validator("stages")
    @classmethod
    def _not_empty(cls, value: list[MethodConfig]) -> list[MethodConfig]:
        if not value:
            raise ValueError("a recipe needs at least one stage")
        return value

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"stages"})
        data["stages"] = [stage.model_dump(mode="json") for stage in self.stages]
        data["version"] = RECIPE_VERSION
        data["stage_versions"] = {s.method: type(s).version for s in self.stages}
        return {k: data[k] for k in ("name", "description", "version", "seed", "calibration", "stages",
                                     "export", "stage_versions")}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """Short hash of the resolved recipe: same hash, same run settings."""
        return hashlib.sha256(self.dump().encode()).hexdigest()[:16]


def shipped_recipes_dir() -> Path:
    return Path(str(importlib.resources.files("compressor") / "recipes"))


def shipped_recipe_names() -> list[str]:
    return sorted(p.stem for p in shipped_recipes_dir().glob("*.yaml"))


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A shipped recipe name (``w8a16-rtn``) or a path to a YAML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        return path
    shipped = shipped_recipes_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise RecipeError(
        f"unknown recipe '{name_or_path}': not a file, and not a shipped recipe "
        f"({', '.join(shipped_recipe_names())})"
    )


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override (``--set a.b=v``), and validate a recipe; errors name file, line and field."""
    path = resolve_recipe_path(name_or_path)
    text = _read_recipe_text(path)
    try:
        check_plain_yaml(text, str(path))
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError:
        raise RecipeError(f"{path}: invalid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping with 'name' and 'stages'")
    data.pop("version", None)
    data.pop("stage_versions", None)
    for override in overrides or []:
        apply_override(data, override)
    return recipe_from_dict(data, source=str(path), node=root)


def _read_recipe_text(path: Path) -> str:
    """The recipe's text, refused before parsing when it is over 1 MB or not UTF-8."""
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {size:,} bytes; a recipe must be under 1 MB")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); a recipe is a YAML file") from None


def check_plain_yaml(text: str, where: str) -> None:
    """Refuse YAML tags (``!!python/object``...) and anchors/aliases before any object is built.

    ``safe_load`` already refuses Python tags, but an alias bomb (aliases of aliases) is a few hundred bytes
    that expand to billions of nodes once validated or dumped; recipes never need either feature.
    """
    for token in yaml.scan(text):
        line = token.start_mark.line + 1
        if isinstance(token, yaml.TagToken):
            handle, suffix = token.value
            raise RecipeError(f"{where}:{line}: YAML tag {handle or ''}{suffix} refused: recipes are plain YAML")
        if isinstance(token, (yaml.AnchorToken, yaml.AliasToken)):
            raise RecipeError(f"{where}:{line}: YAML anchor/alias '{token.value}' refused: write the values out")


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``stages.0.bits=3`` style paths; the value is parsed as YAML (numbers, bools, lists)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set '{override}': expected KEY=VALUE, e.g. stages.0.bits=3")
    parts = key.split(".")
    target: Any = data
    for i, part in enumerate(parts[:-1]):
        target = _child(target, part, ".".join(parts[: i + 1]), override)
    try:
        check_plain_yaml(raw, f"--set '{override}'")
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set '{override}': invalid YAML value: {' '.join(str(exc).split())}") from None
    last = parts[-1]
    if isinstance(target, list):
        target[_index(target, last, key, override)] = value
    elif isinstance(target, dict):
        target[last] = value
    else:
        raise RecipeError(f"--set '{override}': '{'.'.join(parts[:-1])}' is not a mapping or list")


def _child(target: Any, part: str, where: str, override: str) -> Any:
    if isinstance(target, list):
        return target[_index(target, part, where, override)]
    if isinstance(target, dict):
        return target.setdefault(part, {})
    raise RecipeError(f"--set '{override}': '{where}' is not a mapping or list")


def _index(target: list[Any], part: str, where: str, override: str) -> int:
    if not part.isdigit() or int(part) >= len(target):
        raise RecipeError(f"--set '{override}': '{where}' is not an index below {len(target)}")
    return int(part)


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>", node: yaml.Node | None = None) -> Recipe:
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list):
        raise RecipeError(f"{source}{_line(node, ('stages',))}: 'stages' must be a list of stages")
    stages = [_parse_stage(raw, i, source, node) for i, raw in enumerate(raw_stages)]
    try:
        recipe = Recipe.model_validate({**data, "stages": stages})
    except ValidationError as exc:
        raise RecipeError(_describe(exc, source, node, ())) from None
    check_combination(recipe, source)
    return recipe


def _parse_stage(raw: Any, index: int, source: str, node: yaml.Node | None) -> MethodConfig:
    where = ("stages", index)
    if not isinstance(raw, dict) or "method" not in raw:
        raise RecipeError(f"{source}{_line(node, where)}: stages.{index}: each stage needs a 'method' key")
    try:
        method = get_method(str(raw["method"]))
    except RecipeError as exc:
        raise RecipeError(f"{source}{_line(node, (*where, 'method'))}: stages.{index}.method: {exc}") from None
    try:
        return method.config_class.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_describe(exc, source, node, where)) from None


def _describe(exc: ValidationError, source: str, node: yaml.Node | None, prefix: tuple[Any, ...]) -> str:
    """First pydantic error as one line: ``file:line: stages.0.bits: message``."""
    error = exc.errors()[0]
    loc = (*prefix, *error["loc"])
    field = ".".join(str(p) for p in loc) or "recipe"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}{_line(node, loc)}: {field}: {message}{more}"


def _line(node: yaml.Node | None, loc: tuple[Any, ...]) -> str:
    """``:N`` for the deepest YAML node on ``loc`` (keys or list indices), or '' when unknown."""
    if node is None:
        return ""
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node = child
    return f":{node.start_mark.line + 1}"


def check_combination(recipe: Recipe, source: str) -> None:
    """Cross-stage rules: pruning before quantizing, plans next to their quantizer, one quantizer per module,
    exportable settings."""
    kinds = [get_method(s.method).kind for s in recipe.stages]
    for i, kind in enumerate(kinds):
        if kind == "prune" and "quant" in kinds[:i]:
            raise RecipeError(
                f"{source}: stages.{i}: pruning ({recipe.stages[i].method}) must come before quantization"
            )
        if kind == "allocate":
            _check_plan_reaches_quantizer(recipe.stages, kinds, i, source)
    for i, stage in enumerate(recipe.stages):
        problem = get_method(stage.method).check_recipe(stage, recipe.stages[i + 1 :], recipe.export.format)
        if problem:
            raise RecipeError(f"{source}: stages.{i}: {problem}")
    quant = [(i, s) for i, s in enumerate(recipe.stages) if get_method(s.method).kind == "quant"]
    seen: set[str] = set()
    for i, stage in quant:
        targets = set(getattr(stage, "targets", ["Linear"]))
        if targets & seen or (seen and "Linear" in targets) or (seen and "Linear" in seen):
            raise RecipeError(f"{source}: stages.{i}: two quantizing stages target the same modules")
        seen |= targets
    from compressor.export import check_export_settings

    problem = check_export_settings(recipe.export, [s for _, s in quant], recipe.stages)
    if problem:
        raise RecipeError(f"{source}: export.format: {problem}")


def _check_plan_reaches_quantizer(stages: list[MethodConfig], kinds: Sequence[str], i: int, source: str) -> None:
    """A plan (``kind == "allocate"``, keyed by module path) must reach the next quantizer unchanged.

    A structure-changing stage in between renumbers layers or reshapes linears, so the planned widths
    would land on other modules; a second plan in between would overwrite the first.
    """
    plan = stages[i].method
    j = next((k for k in range(i + 1, len(kinds)) if kinds[k] == "quant"), None)
    if j is None:
        raise RecipeError(f"{source}: stages.{i}: {plan} plans bits for a later quantizing stage (rtn, gptq), "
                          "but none follows")
    for k in range(i + 1, j):
        between = stages[k].method
        if kinds[k] == "prune":
            raise RecipeError(
                f"{source}: stages.{k}: {between} between {plan} (stages.{i}) and the {stages[j].method} it plans "
                f"for (stages.{j}) would move the planned widths onto other modules; put {plan} after it"
            )
        if kinds[k] == "allocate":
            raise RecipeError(f"{source}: stages.{k}: {between} would overwrite the plan of {plan} (stages.{i}) "
                              f"before {stages[j].method} (stages.{j}) uses it; keep one planning stage")


def build_stages(configs: list[MethodConfig], export_format: str = "dense") -> list[Method]:
    """The registered method of every stage, each told the stages after it and the export format.

    ``compress`` runs recipes through here; library users who assemble stages by hand should too, since a
    planner (BAQ) takes its quantizer's settings from the stage it plans for (``Method.bind``).
    """
    stages = [get_method(config.method)(config) for config in configs]
    for i, stage in enumerate(stages):
        stage.bind(configs[i + 1 :], export_format)
    return stages
