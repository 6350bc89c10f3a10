"""``cmkit quickstart``: teacher -> distil -> sample -> quality-vs-steps table and plot, on the S-curve."""

from __future__ import annotations

from pathlib import Path

from ..eval import quality_vs_steps, vector_scorer, write_results
from ..loading import load_teacher
from ..models import ConsistencyModel
from .jobs import dataset_for, distill, train_teacher
from .recipes import load_recipe


def run_quickstart(out="quickstart-out", overrides: list[str] | None = None, progress: bool = True,
                   echo=print) -> dict:
    out = Path(out)
    teacher_recipe = load_recipe("quickstart-teacher", overrides)
    cd_recipe = load_recipe("quickstart-cd", overrides)
    echo(f"[1/3] training the S-curve teacher -> {out / 'teacher'}")
    train_teacher(teacher_recipe, out / "teacher", progress=progress)
    teacher_dir = out / "teacher" / "model"
    echo(f"[2/3] distilling it into a consistency model -> {out / 'cd'}")
    distill(cd_recipe, out / "cd", teacher_path=str(teacher_dir), progress=progress)
    ev = cd_recipe.eval
    echo(f"[3/3] sampling the teacher at each NFE and the consistency model at "
         f"{', '.join(map(str, ev.cm_steps))} steps")
    teacher = load_teacher(teacher_dir)
    cm = ConsistencyModel.from_pretrained(out / "cd" / "model")
    data = dataset_for(cd_recipe)
    result = quality_vs_steps(teacher, {"CD": cm}, vector_scorer(data.test), ev, progress=progress,
                              partial_dir=Path(out) / "partial")
    written = write_results(result, data.test, out, extra={"dataset": data.name, "teacher": str(teacher_dir),
                                                           "models": {"CD": str(out / "cd" / "model")}})
    echo("")
    echo(written["header"] + written["table"])
    echo("\nwrote " + ", ".join(written["paths"]))
    return {"result": result, **written}
