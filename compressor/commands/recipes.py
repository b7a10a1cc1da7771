"""``compressor recipes list | show NAME | validate FILE``: the shipped recipes and recipe checking."""

from __future__ import annotations

from typing import Annotated

import typer

from compressor.commands._handler import configure_logging, run_guarded
from compressor.commands._options import DebugOpt, JsonOpt, SetOpt
from compressor.commands._render import print_json

app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="A shipped recipe name or a YAML file.", show_default=False)]


@app.command("list")
def list_(json_output: JsonOpt = False) -> None:
    """List the shipped recipes with their descriptions."""
    from compressor.recipe import load_recipe, shipped_recipe_names

    rows = {name: load_recipe(name).description.strip().splitlines()[0] for name in shipped_recipe_names()}
    if json_output:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("recipe", "what it is for")
    for name, description in rows.items():
        table.add_row(name, description)
    Console().print(table)


@app.command("show")
def show(name: NameArg, debug: DebugOpt = False) -> None:
    """Print a recipe's YAML as shipped (comments included)."""
    from compressor.recipe import resolve_recipe_path

    run_guarded(lambda: typer.echo(resolve_recipe_path(name).read_text().rstrip()), debug=debug)


@app.command("validate")
def validate(name: NameArg, overrides: SetOpt = None, json_output: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Check a recipe without loading a model; prints the resolved recipe. Exit 2 when invalid."""
    configure_logging(json_output)

    def action() -> None:
        from compressor.recipe import load_recipe

        recipe = load_recipe(name, list(overrides or []))
        if json_output:
            print_json({"valid": True, "recipe": recipe.to_dict()})
        else:
            typer.echo(f"# {name}: valid\n{recipe.dump().rstrip()}")

    run_guarded(action, debug=debug)
