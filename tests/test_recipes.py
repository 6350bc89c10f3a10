"""Every shipped recipe parses, and --dry-run builds everything and runs one step."""

from importlib import resources

import pytest

from cmkit.cli.dryrun import dry_run
from cmkit.cli.recipes import all_keys, load_recipe

RECIPES = sorted(p.name[:-5] for p in resources.files("cmkit.shipped_recipes").iterdir() if p.name.endswith(".toml"))


def test_contract_keys_exist():
    keys = set(all_keys())
    for k in ("seed", "data.name", "data.path", "train.steps", "train.batch_size", "train.lr"):
        assert k in keys


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses_and_dry_runs(name):
    recipe = load_recipe(name)
    kind = recipe.objective.kind
    job = "train-teacher" if kind in ("edm", "ddpm") else "distill" if kind == "cd" else "train"
    lines = []
    summary = dry_run(recipe, job, echo=lines.append)
    assert summary["end_step"] == 1
    assert lines[-1].startswith("dry run OK"), lines


def test_set_overrides_parse_toml_values():
    r = load_recipe("quickstart-cd", ["train.steps=7", "train.ema_rates=[0.9, 0.99]", "data.name=moons",
                                      "objective.solver=euler"])
    assert r.train.steps == 7 and r.train.ema_rates == [0.9, 0.99] and r.data.name == "moons"
    assert r.objective.solver == "euler"
    with pytest.raises(ValueError, match="wants a int"):
        load_recipe("quickstart-cd", ["train.steps=many"])
