"""The quality-vs-steps benchmark: NFE bookkeeping, outputs, and resuming from partial results."""

import json

import pytest
import torch

import cmkit
import cmkit.eval.bench as bench
from cmkit.eval import EvalSettings, quality_vs_steps, vector_scorer, write_results


@pytest.fixture
def models():
    torch.manual_seed(0)
    teacher = cmkit.EDMDenoiser(cmkit.TimeMLP(dim=2, hidden=16, depth=1))
    cm = cmkit.ConsistencyModel(cmkit.TimeMLP(dim=2, hidden=16, depth=1))
    return teacher, cm


def run(teacher, cm, partial):
    ref = torch.randn(200, 2) * 0.5
    ev = EvalSettings(teacher_solvers=["euler", "heun"], teacher_nfe=[1, 2, 3], cm_steps=[1, 2], num_samples=100,
                      seeds=[0, 1], dopri5=False)
    return quality_vs_steps(teacher, {"CD": cm}, vector_scorer(ref), ev, progress=False, partial_dir=partial), ref


def test_rows_outputs_and_resume(tmp_path, models, monkeypatch):
    teacher, cm = models
    result, ref = run(teacher, cm, tmp_path / "partial")
    got = [(r["method"], r["nfe"]) for r in result["rows"]]
    assert got == [("teacher euler", 1), ("teacher euler", 2), ("teacher euler", 3), ("teacher heun", 1),
                   ("teacher heun", 3), ("CD", 1), ("CD", 2)]
    written = write_results(result, ref, tmp_path)
    payload = json.loads((tmp_path / "quality_vs_steps.json").read_text())
    assert {"date", "machine", "torch", "git_commit"} <= set(payload["info"]) and len(payload["rows"]) == 7
    assert (tmp_path / "quality_vs_steps.png").stat().st_size > 1000 and "| CD | 2 |" in written["table"]

    # a second run with the same settings and models measures nothing again
    def boom(*a, **k):
        raise AssertionError("should have been loaded from partial results")

    monkeypatch.setattr(bench, "sample_teacher", boom)
    monkeypatch.setattr(bench, "sample", boom)
    again, _ = run(teacher, cm, tmp_path / "partial")
    assert again["rows"] == result["rows"]
    # the same weights with another few-step schedule (a new schedule search) are measured again
    cm.default_sigmas[2] = [cm.sigma_max, 0.3]
    with pytest.raises(AssertionError, match="loaded from partial"):
        run(teacher, cm, tmp_path / "partial")
    del cm.default_sigmas[2]
    assert run(teacher, cm, tmp_path / "partial")[0]["rows"] == result["rows"]
    # a changed model (the same object, changed in place) is measured again
    with torch.no_grad():
        next(cm.parameters()).add_(1.0)
    with pytest.raises(AssertionError, match="loaded from partial"):
        run(teacher, cm, tmp_path / "partial")
