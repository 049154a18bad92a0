"""Files we do not control — stores, checkpoints, plans, profiles, presets, shared folders — are read and
written here. A path named inside a file stays inside its folder (no absolute paths, no `..`, no link that
leads out); only regular files are opened (a FIFO would block); sizes and JSON nesting are capped before
anything grows with them; a write never follows a link: it goes to a fresh temporary file with a name no
one can plant beforehand, then is renamed over the target. Knows nothing of what the files mean."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from adapmoe_cli.errors import AdapmoeError, OutputError

MAX_JSON_DEPTH = 64
#: caps on what we read whole into memory (a manifest of DeepSeek-V3's 15k experts is ~12 MB)
MAX_MANIFEST_BYTES = 64 << 20
MAX_DOC_BYTES = 32 << 20  # plans, profiles, checkpoint config and index, generation config
MAX_YAML_BYTES = 1 << 20  # presets, hardware and model descriptions


def relative_name(rel: object, what: str, error: type[AdapmoeError]) -> str:
    """`rel` if it is a relative path that stays inside its folder (no absolute path, no `..`)."""
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel:
        raise error(f"{what}: {rel!r} is not a file name")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        raise error(f"{what} names {rel!r}, a path outside its folder; adapmoe reads only files inside it")
    return rel


def inside(root: Path, rel: str, what: str, error: type[AdapmoeError]) -> Path:
    """`root / rel`, resolved, refusing names that leave `root` and links that lead out of it."""
    relative_name(rel, what, error)
    base = Path(root).resolve()
    real = (base / rel).resolve()
    if real != base and base not in real.parents:
        raise error(f"{what}: {rel} is a link that leads outside {root}; adapmoe reads only files inside it")
    return real


def open_regular(path: Path, what: str, error: type[AdapmoeError], flags: int = 0, follow: bool = False) -> int:
    """A read-only descriptor of a regular file (not a FIFO, device or folder; not a link unless `follow`)."""
    mode = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | flags | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, mode)
    except FileNotFoundError:
        raise error(f"{what} is missing") from None
    except OSError as e:
        raise error(f"{what} cannot be opened ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{what} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def read_capped(path: Path, limit: int, what: str, error: type[AdapmoeError], follow: bool = False) -> bytearray:
    """The whole file (one read, so what a caller checks is what it uses), refused unread when larger than
    `limit` bytes."""
    fd = open_regular(path, what, error, follow=follow)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{what} is {size:,} bytes, more than the {limit:,} adapmoe reads; it cannot be right")
        try:
            buf = bytearray(size)
            with os.fdopen(os.dup(fd), "rb") as f:
                n = f.readinto(buf)
                grew = f.read(1)
        except MemoryError:
            raise error(f"{what} ({size:,} bytes) does not fit in memory") from None
        except OSError as e:
            raise error(f"{what} cannot be read ({e.strerror})") from None
    finally:
        os.close(fd)
    if grew:
        raise error(f"{what} grew while it was read; try again when nothing writes to it")
    del buf[n:]
    return buf


def read_text(path: Path, what: str, error: type[AdapmoeError]) -> str:
    """A text file the user named (prompts, a text to score): UTF-8, every failure one `error` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e})") from None


def json_depth_ok(doc: Any, max_depth: int = MAX_JSON_DEPTH) -> bool:
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            if depth > max_depth:
                return False
            stack.extend((child, depth + 1) for child in node if isinstance(child, dict | list))
    return True


def parse_json(data: bytes, what: str, error: type[AdapmoeError], max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON from untrusted bytes: UTF-8 only, nesting at most `max_depth` deep, every failure an `error`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} is not UTF-8 text (byte {e.start})") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise error(f"{what} nests deeper than {max_depth} levels; it cannot be right") from None
    except ValueError as e:
        raise error(f"{what} is not valid JSON ({e})") from None
    if not json_depth_ok(doc, max_depth):
        raise error(f"{what} nests deeper than {max_depth} levels; it cannot be right")
    return doc


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 8 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def ensure_dir(path: Path) -> Path:
    """Create `path` (and parents) or raise OutputError saying why; ADAPMOE_HOME is named when it is the cause."""
    from adapmoe_cli.paths import home

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        hint = ""
        h = home()
        if path == h or h in path.parents:
            hint = f"; ADAPMOE_HOME ({h}) must be a folder you can write to"
        raise OutputError(f"cannot create the folder {path}: {e.strerror or e}{hint}") from None
    if not path.is_dir():
        raise OutputError(f"cannot create the folder {path}: a file of that name is in the way")
    return path


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    """Replace `path` with `data`: a new temporary file (O_EXCL, never a link) in the same folder, renamed
    over `path`. A link at `path` is replaced, never followed; an interrupted write leaves `path` as it was."""
    path = Path(path)
    ensure_dir(path.parent)
    if isinstance(data, str):
        data = data.encode()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path
