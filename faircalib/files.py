"""Writing outputs: whole or not at all, with ordinary permissions, never over what the user made.

Every directory faircalib writes (artifact, bundle, engine) is built in a hidden staging directory beside
its destination and renamed into place, so a killed run leaves either the old output or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from faircalib.errors import ConfigError

MANIFEST = "manifest.json"
OWNER_KEY = "faircalib_version"  # every manifest faircalib writes carries it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_permissions(path: Path) -> None:
    """Directories 0755 and files 0644 under ``path`` (less what the umask takes): a bundle is meant to be
    copied to a device or shared, and temporary files and safetensors are created owner-only."""
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        item.chmod((0o755 if item.is_dir() else 0o644) & ~mask)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        open_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_ours(path: Path, names: Iterable[str]) -> bool:
    """Whether ``path`` is a directory that faircalib wrote: a manifest of ours, and no file but ``names``."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and OWNER_KEY in manifest and {p.name for p in path.iterdir()} <= set(names)


def check_output_dir(out: Path, names: Iterable[str], overwrite: bool = False) -> None:
    """Refuse an output path that holds something faircalib did not write there, unless ``overwrite``.

    ``names``: the files this kind of output is made of; an earlier output of the same kind is replaced.
    """
    if not out.exists() or overwrite:
        return
    if not out.is_dir():
        raise ConfigError(f"{out} is a file, not a directory: choose another output path")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not is_ours(out, names):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ConfigError(
            f"{out} already holds files faircalib did not write ({shown}): choose another output directory, "
            "or pass --overwrite to replace it"
        )


@contextmanager
def staged_dir(out: Path, names: Iterable[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; when the block finishes, it replaces ``out`` in one rename (after
    ``check_output_dir``). On any error, or an interrupt, the staging directory is removed and ``out`` is
    left as it was."""
    names = tuple(names)
    check_output_dir(out, names, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    try:
        yield staging
        open_permissions(staging)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(out: Path) -> None:
    """Remove what a killed run left beside ``out``: its staging directory and a swapped-out old output
    (both carry the pid of the process that made them, and that process is gone)."""
    for item in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        pid = item.name.rsplit(".", 1)[1].split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)


def replace_dir(staging: Path, path: Path) -> None:
    """Move a finished directory into place; an existing one is swapped out and removed after."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
