"""Whether an output path can be written at all, asked before any work.

It lives on the lowest floor that writes files, so the shard builder and every ``pipeline`` job share it. What it
catches would otherwise surface after the work, or name a path the user never gave: a name that fits but whose
temporary or lock sibling (``.NAME.partial-XXXXXXXX``, ``NAME.tmp``) does not, a place that is a file, and a place
the system refuses to write in (permissions, a read-only mount, /proc or /sys).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

DEFAULT_NAME_MAX = 255  # bytes per name on Linux's file systems, where pathconf cannot say


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def _existing_ancestor(path: Path) -> Path:
    while not os.path.exists(path) and path != path.parent:  # os.path never raises (Path does on a long name)
        path = path.parent
    return path


def _refused(folder: Path) -> str | None:
    """Why nothing can be created in ``folder``, found by creating and removing a hidden temporary file there (the
    only test that sees a read-only mount or a special file system when the process runs as root)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".mcci-probe-", dir=folder)
    except OSError as e:
        return f"nothing can be created in {folder} ({e.strerror or e})"
    os.close(fd)
    os.unlink(name)
    return None


def unwritable(path: str | Path, extra_name: int = 0) -> str | None:
    """Why ``path`` (a file or folder to create or replace) cannot be written, or None. ``extra_name``: how many
    bytes the longest temporary or lock name made from ``path``'s name adds to it. Where the folder it goes in does
    not exist yet, the nearest folder that does is the one probed (the job creates the rest)."""
    if "\0" in str(path):
        return "it holds a NUL character, which no file name may"
    target = Path(os.path.abspath(path))
    ancestor = _existing_ancestor(target)
    if ancestor != target and not os.path.isdir(ancestor):
        return f"{ancestor} is a file, so no folder can be made inside it"
    limit = _name_max(ancestor if os.path.isdir(ancestor) else ancestor.parent)
    for part in target.relative_to(ancestor).parts if ancestor != target else ():
        if len(os.fsencode(part)) > limit:
            return f"the name {part[:24]}... is {len(os.fsencode(part))} bytes, above the file system's {limit}"
    length = len(os.fsencode(target.name))
    if length + extra_name > limit:
        return (f"its name is {length} bytes and the temporary names made from it {length + extra_name}, above the "
                f"file system's limit of {limit} bytes; choose a shorter name")
    folders = [ancestor if ancestor != target else target.parent]
    if os.path.isdir(target):
        folders.append(target)  # a folder's content is written inside it
    for folder in folders:
        problem = _refused(folder)
        if problem:
            return problem
    return None
