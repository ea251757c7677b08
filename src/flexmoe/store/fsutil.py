"""Atomic outputs: nothing half-written is ever left where a user would look for a result, and
nothing a user owns is replaced without being asked.

- `atomic_dir` builds a directory beside its destination and swaps it in with one atomic
  `renameat2(RENAME_EXCHANGE)` (Linux), so a kill at any moment leaves either the old or the new
  complete output. Leftovers of killed runs (`.NAME.tmp-PID-*`) are removed by the next run.
- `guard_output` is called by every writer before any work: it refuses an output path that is an
  input (or contains one, or lies inside one), a non-empty path that is not a previous output of
  the same command, and a previous output holding files flexmoe did not write there (each output
  lists its own files in `.flexmoe-files`), unless `--overwrite`.
- A refused or failed run leaves nothing: the temp dir and any parent directories it created go.
- Created files and directories get the user's umask (mkstemp/mkdtemp would make them private).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexmoeError

MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
FILES_RECORD = ".flexmoe-files"  # inside every output: the files flexmoe wrote there
MAX_OUTPUT_FILES = 100_000  # a previous output is walked no further than this


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False if the
    platform or filesystem cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(dest: Path) -> None:
    """Remove temp/old copies of `dest` left by killed runs; restore an old output that a kill
    between the two renames of the non-Linux fallback left aside."""
    pat = re.compile(rf"^\.{re.escape(dest.name)}\.(tmp|old)-(\d+)-")
    if not dest.parent.is_dir():
        return
    for p in dest.parent.iterdir():
        m = pat.match(p.name)
        if not m or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not dest.exists():
            os.replace(p, dest)  # the only complete copy: put it back, never delete it
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _make_parents(path: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (deepest last) so a failure can undo it."""
    made: list[Path] = []
    for d in reversed([path, *path.parents]):
        if not d.exists():
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                _remove_empty(made)
                raise FlexmoeError(f"cannot create directory {d}: {e.strerror}") from None
            made.append(d)
        elif not d.is_dir():
            _remove_empty(made)
            raise FlexmoeError(f"{d} is not a directory")
    return made


def _remove_empty(made: list[Path]) -> None:
    for d in reversed(made):
        with contextlib.suppress(OSError):
            d.rmdir()


def _output_files(root: Path, limit: int = MAX_OUTPUT_FILES) -> list[str] | None:
    """Relative paths of everything but directories under root (None beyond `limit`)."""
    found: list[str] = []
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                else:
                    found.append(Path(e.path).relative_to(root).as_posix())
                    if len(found) > limit:
                        return None
    return sorted(found)


def _write_files_record(root: Path) -> None:
    files = [f for f in _output_files(root) or [] if f != FILES_RECORD]
    with open(root / FILES_RECORD, "w") as f:
        json.dump({"format": "flexmoe-output-files/1", "files": files}, f, indent=0)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `dest`; on success record its files, swap it into `dest`
    atomically; on failure delete it (and the parents this call created). The caller decides
    beforehand (guard_output) whether `dest` may be replaced."""
    dest = Path(dest)
    made = _make_parents(dest.parent)
    try:
        clean_leftovers(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    except BaseException:
        _remove_empty(made)
        raise
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        _write_files_record(tmp)
        if dest.exists() or dest.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{dest} already exists")
            if not dest.is_dir() or dest.is_symlink():
                raise FlexmoeError(f"{dest} exists and is not a directory")
            if _exchange(tmp, dest):  # tmp now holds the old output
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}-x")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `dest` and rename it into place only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside `dest` for a writer that opens files itself (e.g. GGUFWriter); renamed
    into place only if the block succeeds, removed otherwise."""
    dest = Path(dest)
    made = _make_parents(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _remove_empty(made)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- bounded reads of untrusted files
def regular_file(path: str | os.PathLike, what: str, max_bytes: int) -> Path:
    """`path` must be an existing regular file of at most max_bytes (checked before reading)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FlexmoeError(f"{what} is missing: {path}") from None
    except OSError as e:
        raise FlexmoeError(f"{what} cannot be read: {path} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise FlexmoeError(f"{what} is not a regular file: {path}")
    if st.st_size > max_bytes:
        raise FlexmoeError(f"{what} is too large: {path} ({st.st_size:,} bytes > {max_bytes:,})")
    return path


def writable_file(path: str | os.PathLike, what: str) -> Path:
    """`path` may be written as a file: it names a file (not '' or a directory), is not an
    existing directory, FIFO or device, and its parent is (or can be) a directory. Checked before
    any work, so a wrong path costs nothing."""
    raw = os.fspath(path)
    path = Path(raw)
    if not raw or raw.endswith("/") or path.name in ("", ".", ".."):
        raise FlexmoeError(f"{what} must name a file, got {raw!r}")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise FlexmoeError(f"{what} {path} exists and is not a regular file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FlexmoeError(f"{what} {path}: {parent} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise FlexmoeError(f"{what} {path}: {parent} is not writable")
            break
    return path


def guard_file(path: str | os.PathLike, what: str, fmt: str, overwrite: bool = False) -> Path:
    """A file output: writable (writable_file), and an existing file is replaced only if it is a
    previous output of the same command (a JSON object with `"format": fmt`) or with overwrite."""
    path = writable_file(path, what)
    if path.exists() and not overwrite:
        try:
            rec = read_json(path, what)
        except FlexmoeError:
            rec = None
        if not (isinstance(rec, dict) and rec.get("format") == fmt):
            raise FlexmoeError(
                f"{what} {path} exists and is not a {fmt} file written by flexmoe: refusing to "
                "replace it (pass --overwrite)"
            )
    return path


def copy_bounded(src: str | os.PathLike, dst: str | os.PathLike, max_bytes: int, what: str) -> None:
    """Copy a regular file of at most max_bytes, reading no more than that even if it grows."""
    src = regular_file(src, what, max_bytes)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        left = max_bytes + 1
        while left > 0 and (block := fi.read(min(1 << 20, left))):
            fo.write(block)
            left -= len(block)
    if left <= 0:
        raise FlexmoeError(f"{what} grew beyond {max_bytes:,} bytes while being copied: {src}")


def json_depth(obj: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of parsed JSON, computed without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(o, dict):
            stack += [(v, d + 1) for v in o.values()]
        elif isinstance(o, list):
            stack += [(v, d + 1) for v in o]
    return deepest


def read_json(
    path: str | os.PathLike,
    what: str,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Parse an untrusted JSON file: size and nesting bounded, any defect one FlexmoeError."""
    path = regular_file(path, what, max_bytes)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise FlexmoeError(f"{what} is not valid JSON: {path} ({str(e)[:80]})") from None
    except RecursionError:
        raise FlexmoeError(f"{what} is nested too deeply: {path}") from None
    except OSError as e:
        raise FlexmoeError(f"{what} cannot be read: {path} ({e.strerror})") from None
    if json_depth(obj, max_depth) > max_depth:
        raise FlexmoeError(f"{what} is nested deeper than {max_depth} levels: {path}")
    return obj


# ---------------------------------------------------------------- output policy
def _marker(name: str, **fields: Any) -> Callable[[Path], bool]:
    """A predicate: `dir/name` exists (and its JSON has these field values)."""

    def check(d: Path) -> bool:
        f = d / name
        if not f.is_file():
            return False
        if not fields:
            return True
        try:
            rec = read_json(f, name)
        except FlexmoeError:
            return False
        return isinstance(rec, dict) and all(rec.get(k) == v for k, v in fields.items())

    return check


TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    FILES_RECORD,
}

# what each writer leaves behind, to recognise its own previous output
OUTPUT_KINDS: dict[str, Callable[[Path], bool]] = {
    "anchor": _marker("flexmoe_anchor.json", kind="anchor"),
    "dense expert": _marker("flexmoe_anchor.json", kind="dense-expert"),
    "expert package": _marker("manifest.json", format="flexmoe-expert-package"),
    "merged model": _marker("flexmoe_merged.json", format="flexmoe-merged"),
    "tokenizer": lambda d: (
        _marker("tokenizer.json")(d) and {p.name for p in d.iterdir()} <= TOKENIZER_FILES
    ),
    "token shards": _marker("index.json"),
    "FlexOlmo import": _marker("flexmoe_import.json", format="flexmoe-flexolmo-import"),
}


# files flexmoe adds to an output after writing it (`expert sign`)
ADDED_LATER: dict[str, set[str]] = {"expert package": {"signature.json"}}


def foreign_files(out: Path, kind: str) -> list[str]:
    """Files in a previous output that flexmoe did not write there: not in its files record,
    not added later by flexmoe. An output without a readable record is all foreign."""
    try:
        rec = read_json(out / FILES_RECORD, FILES_RECORD)
        written = set(rec["files"]) if isinstance(rec, dict) else set()
    except (FlexmoeError, KeyError, TypeError):
        written = set()
    written |= ADDED_LATER.get(kind, set()) | {FILES_RECORD}
    present = _output_files(out)
    if present is None:
        return [f"(more than {MAX_OUTPUT_FILES:,} files)"]
    return [f for f in present if f not in written]


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def guard_output(
    out: str | os.PathLike,
    kind: str,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
) -> Path:
    """Refuse, before any work, an output that would destroy something: `out` equal to, inside
    or containing an input; an existing non-directory; a non-empty directory that is not a
    previous output of this kind (unless overwrite)."""
    out = Path(out)
    real = out.resolve()
    for src in inputs:
        if src is None:
            continue
        s = Path(src).resolve()
        if _within(s, real) or _within(real, s):
            raise FlexmoeError(f"output {out} overlaps the input {src}: choose another -o")
    if not (out.exists() or out.is_symlink()):
        return out
    if out.is_symlink() or not out.is_dir():
        raise FlexmoeError(f"output {out} exists and is not a directory")
    if overwrite or not any(out.iterdir()):
        return out
    if OUTPUT_KINDS[kind](out):
        foreign = foreign_files(out, kind)
        if not foreign:
            return out
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise FlexmoeError(
            f"output {out} is a previous {kind} but holds files flexmoe did not write there "
            f"({shown}): refusing to replace it (move them, or pass --overwrite)"
        )
    raise FlexmoeError(
        f"output {out} is a non-empty directory that is not a {kind} written by flexmoe: "
        "refusing to replace it (pass --overwrite)"
    )
