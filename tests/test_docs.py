"""The documentation runs (issue 30): every fenced ```python block of README.md and docs/**/*.md is executed, the
blocks of one page in order in one namespace, in a temporary working directory, offline (``HF_HUB_OFFLINE=1``).

A block may be left out only with an HTML comment on the line just before its fence that says why, e.g.
``<!-- skip: needs a GPU and the FLUX.1-dev download -->`` (a GPU, a hub download, or more than a minute on a 2-core
CPU); a marker with no reason fails.

Pages load the folders that long runs write (``runs/tiny-t2i-lcm/model`` after ``cmkit distill tiny-t2i-lcm``, 3000
steps). Those folders are made here by the same commands cut to a few steps, on eight captioned images for the
text-to-image kinds, once per session, and copied into the working directory of each page that names them: the pages
show calls on real folders of the right kind, not results."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import re  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)")
SKIP = re.compile(r"^\s*<!--\s*skip\b:?(.*?)-->\s*$")
ALLOWED_SKIPS = re.compile(r"\bGPU\b|download|\bhub\b|minute", re.I)

# a page naming the folder -> (recipe command, cut short) that writes it
_LATENT = ["--set", "data.path=captions", "--set", "train.steps=2", "--set", "train.batch_size=4", "--no-progress"]
_TOY = ["--set", "train.steps=2", "--set", "eval.schedule_max_steps=1", "--no-progress"]
RUNS = {
    "runs/tiny-t2i-lcm/model": ["distill", "tiny-t2i-lcm", *_LATENT],
    "runs/tiny-t2i-lcm-lora/model": ["distill", "tiny-t2i-lcm-lora", *_LATENT],
    "runs/tiny-sd3-cd/model": ["distill", "tiny-sd3-cd", *_LATENT],
    "runs/tiny-sd3-cd-lora/model": ["distill", "tiny-sd3-cd-lora", *_LATENT],
    "runs/s_curve-sct/model": ["train", "s_curve-sct", *_TOY],
    "runs/s_curve-meanflow/model": ["train", "s_curve-meanflow", *_TOY],
    "runs/tinted-digits-ict/model": ["train", "tinted-digits-ict", *_TOY[:-1], "--set", "train.batch_size=8",
                                     "--no-progress"],
}


def python_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """(line, code, skip reason or None) of each fenced python block of a page; a skip marker is the line just
    before the fence."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip("`") == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        if lang.lower() in ("python", "py"):
            marker = SKIP.match(lines[start - 1]) if start else None
            blocks.append((start + 1, "\n".join(body) + "\n", marker.group(1).strip() if marker else None))
    return blocks


def _caption_folder(folder: Path) -> None:
    """Eight 32x32 images with "a {colour} {item}" captions beside them, the data of the cut-short latent runs."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red bag", "a green boot", "a blue bag", "a white sneaker"] * 2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)


@pytest.fixture(scope="session")
def prepared_runs(tmp_path_factory):
    """Makes (once) and returns the folder a page names, by its recipe's own command cut short."""
    root = tmp_path_factory.mktemp("doc-runs")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            from cmkit.cli import main

            if not (root / "captions").exists():
                _caption_folder(root / "captions")
            out = str(Path(name).parent)
            old, cache = os.getcwd(), os.environ.get("CMKIT_CACHE")
            os.chdir(root)
            os.environ["CMKIT_CACHE"] = str(root / ".cache")  # the latent cache of the eight images, not ~/.cache
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                code = main([*RUNS[name][:2], "--out", out, *RUNS[name][2:]])
            finally:
                torch.set_num_threads(threads)
                os.chdir(old)
                if cache is None:
                    os.environ.pop("CMKIT_CACHE")
                else:
                    os.environ["CMKIT_CACHE"] = cache
            assert code == 0, f"{' '.join(RUNS[name][:2])} --out {out} exited with {code}"
            made[name] = root / name
        return made[name]

    return make


def test_the_pages_are_found_and_every_skip_says_why():
    assert (ROOT / "docs" / "index.md") in PAGES and len(PAGES) > 10
    assert sum(len(python_blocks(p)) for p in PAGES) >= 10
    for page in PAGES:
        for line, _, reason in python_blocks(page):
            assert reason != "", f"{page.name}:{line}: a skip marker must say why (<!-- skip: needs a GPU ... -->)"
            assert reason is None or ALLOWED_SKIPS.search(reason), \
                f"{page.name}:{line}: skipped only for a GPU, a hub download or minutes of CPU, not {reason!r}"


RUNNABLE = [p for p in PAGES if any(reason is None for _, _, reason in python_blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_page_python_blocks_run(page, tmp_path, monkeypatch, prepared_runs):
    blocks = [(line, code) for line, code, reason in python_blocks(page) if reason is None]
    for name in RUNS:
        if any(name in code for _, code in blocks):
            shutil.copytree(prepared_runs(name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / ".cache"))
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: a second thread only spin-waits on a shared 2-core machine
    try:
        namespace = {"__name__": "__docs__"}
        for line, code in blocks:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_readme_is_a_newcomers_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 320, f"README.md has {len(lines)} lines (at most 320; the rest belongs in docs/)"
    first = next(i for i, line in enumerate(lines) if line.startswith("```"))
    assert first < 40, f"README.md's first code block starts at line {first + 1}, after line 40"
    assert "<!-- test-command -->" in lines
