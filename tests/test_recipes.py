"""Every shipped recipe parses, and --dry-run builds everything and runs one step."""

from importlib import resources
from pathlib import Path

import pytest

from cmkit.cli.dryrun import dry_run
from cmkit.cli.recipes import all_keys, load_recipe
from cmkit.objectives import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name[:-5] for p in resources.files("cmkit.shipped_recipes").iterdir() if p.name.endswith(".toml"))


def test_contract_keys_exist():
    keys = set(all_keys())
    for k in ("seed", "data.name", "data.path", "train.steps", "train.batch_size", "train.lr"):
        assert k in keys


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses_and_dry_runs(name):
    recipe = load_recipe(name)
    job = OBJECTIVES[recipe.objective.kind].job
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


def test_objective_keys_belong_to_their_kind():
    r = load_recipe("s_curve-ict", ["objective.p_mean=-1.0"])
    assert r.objective.kind == "ict" and r.objective.p_mean == -1.0 and r.objective.total_steps is None
    with pytest.raises(ValueError, match="objective.kind 'ict' has no key 'mu0'; its keys: .*p_mean"):
        load_recipe("s_curve-ict", ["objective.mu0=0.9"])  # a CT key
    with pytest.raises(ValueError, match="unknown objective.kind 'ictt'; choose one of .*ict"):
        load_recipe("s_curve-ict", ['objective.kind="ictt"'])
    with pytest.raises(ValueError, match="has no key 'n_points'"):  # switching kind re-checks the keys
        load_recipe("quickstart-cd", ['objective.kind="ect"'])


def test_a_new_kind_is_one_registration(tmp_path):
    """A kind registered from outside the package is parsed, trained by `cmkit train`'s job and dry-run, with no
    edit anywhere else."""
    from dataclasses import dataclass

    import torch

    from cmkit.cli.jobs import train_consistency
    from cmkit.models import ConsistencyModel
    from cmkit.objectives import LevelsConfig, register_objective

    @dataclass
    class HalfConfig(LevelsConfig):
        kind: str = "test_half"
        level: float = 1.0

    class HalfLoss:
        def __init__(self, level):
            self.level = level

        def target_ema(self, step):
            return 0.0

        def __call__(self, model, x0, target=None, step=0, **cond):
            return (model(x0 + self.level * torch.randn_like(x0), self.level) - x0).pow(2).mean()

    @register_objective("test_half", HalfConfig, job="train")
    def build(cfg, ctx):
        """A denoising loss at one level (test only)."""
        return ConsistencyModel(ctx.make_backbone(), cfg.sigma_min, cfg.sigma_max, cfg.sigma_data), HalfLoss(cfg.level)

    try:
        overrides = ['objective.kind="test_half"', "objective.level=0.5", "train.steps=3", "model.hidden=16",
                     "model.depth=1", "train.batch_size=16", "eval.schedule_max_steps=0"]
        recipe = load_recipe(None, overrides)
        assert recipe.objective.level == 0.5
        assert dry_run(recipe, "train", echo=lambda *_: None)["end_step"] == 1
        assert train_consistency(recipe, tmp_path, progress=False)["end_step"] == 3
        assert (tmp_path / "model" / "cmkit.json").is_file()
    finally:
        OBJECTIVES._items.pop("test_half")


def test_gpu_recipes_state_the_memory_the_estimate_gives():
    """Each GPU recipe's header says what ``benchmarks/recipe_memory.py`` estimates for it (it went stale once: the
    headers kept a whole-teacher set-up after the run had learnt to hold the encoders and the network in turns)."""
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("recipe_memory", ROOT / "benchmarks" / "recipe_memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    counts = memory.networks()
    for name, (family, trained, copies, fake) in memory.RECIPES.items():
        header = " ".join(line[2:] for line in (ROOT / "recipes" / f"{name}.toml").read_text().splitlines()
                          if line.startswith("# "))
        said = re.search(r"needs ([\d.]+) GB per device .*?\(([\d.]+) GB with train\.optimizer = \"adamw8bit\"\)"
                         r".*? Set-up ([\d.]+) GB .*?training ([\d.]+) GB", header)
        assert said, f"{name}: no memory line in its header"
        e, e8 = (memory.estimate(counts[family], trained, copies, fake, moment_bytes=b) for b in (8, 2))
        want = [max(e["setup"], e["total"]), max(e8["setup"], e8["total"]), e["setup"], e["total"]]
        assert [float(v) for v in said.groups()] == [round(v, 1) for v in want], name
