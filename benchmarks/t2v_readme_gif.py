"""The README's video GIF: rows of ``cmkit bench text-to-video``'s ``prompts_by_method.gif`` (held-out clips, the
pipeline, the teacher's Euler at 50 steps, CD at 1 and 4 steps, the flow-map student at 1, 2 and 4 jumps), cropped
frame by frame. Rows are the bench GIF's own (a 32-pixel header, then 66 pixels a row, in its table's order).
    python benchmarks/t2v_readme_gif.py benchmarks/results/text-to-video"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageSequence

TOP, ROW = 32, 66
# held out, pipeline, teacher euler NFE 100, cd NFE 1 and 4, flow-map NFE 1, 2, 4: their rows in the bench GIF of
# 2026-12-07 (held out, the pipeline, 7 step counts x 3 solvers, then cd and flow-map at 1, 2, 4, 8)
INDEX = [0, 1, 8, 23, 25, 27, 28, 29]


def main(folder: str) -> None:
    src = Image.open(Path(folder) / "prompts_by_method.gif")
    frames = []
    for fr in ImageSequence.Iterator(src):
        fr = fr.convert("RGB")
        out = Image.new("RGB", (fr.width, TOP + ROW * len(INDEX)))
        out.paste(fr.crop((0, 0, fr.width, TOP)), (0, 0))
        for i, r in enumerate(INDEX):
            out.paste(fr.crop((0, TOP + r * ROW, fr.width, TOP + (r + 1) * ROW)), (0, TOP + i * ROW))
        frames.append(out)
    frames[0].save(Path(folder) / "readme.gif", save_all=True, append_images=frames[1:],
                   duration=src.info.get("duration", 250), loop=0, optimize=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/text-to-video")
