"""The one rule for every file a sample is made of (an image, a ``.txt`` caption, a ``metadata.jsonl``, a tar shard):
it is a regular file (a FIFO, a device or a socket would block a read or never end), and, unless the recipe says
links out are meant (``data.follow_links = true``), it resolves to a path inside the data folder: a caption linked
to ``/etc/passwd`` is refused, not read, cached and printed. Every reader of ``cmkit.data`` asks ``data_file``; this
module imports nothing else of ``cmkit``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

FOLLOW_LINKS = "data.follow_links"
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def data_file(path, root=None, follow_links: bool = False, what: str = "") -> Path:
    """``path`` (a ``Path``) where it may be read as part of a sample; a one-line ``ValueError`` naming it (``what``:
    how the message names it, default the path) where it resolves outside ``root`` (a data folder; None: the user
    named the file itself) and ``follow_links`` is off, or where it is not a regular file. A missing file is
    returned as it is: its reader says what is missing."""
    path = Path(path)
    what = what or str(path)
    if root is not None and not follow_links:
        real = path.resolve()
        if not real.is_relative_to(Path(root).resolve()):
            raise ValueError(f"{what} points to {real}, outside the data folder {root} (through a symlink); copy it "
                             f"into the folder, or set {FOLLOW_LINKS} = true if links out of it are meant")
    try:
        mode = os.stat(path).st_mode  # follows links, never opens: a FIFO does not block here
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a file")
        raise ValueError(f"{what} is not a regular file ({kind}): reading it would block or never end; replace it "
                         "with a file or remove it")
    return path
