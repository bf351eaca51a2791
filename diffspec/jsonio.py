"""Reading user-supplied JSON files and writing results, with one error wording for each.

Reading: configs, checkpoints and results fail with one line naming the file.

Writing (`OutputFile`): a result costs minutes to hours of decoding, so its
destination is checked *before* the run (`OutputFile.check`), every write
goes to a temporary file in the same directory and is moved over the target
with `os.replace` (a reader, or a crash, sees the old file or the new one,
never half of one), replacing an existing result says so on stderr, and a
file another process wrote while this run decoded is not clobbered: this
run's result goes beside it instead. Every `OSError` on the way becomes an
`OutputError` (a `ValueError`, so the CLI prints one line and exits 2).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def parse_json_file(path: Path, what: str = "", error: type[Exception] = ValueError) -> Any:
    """The parsed file, or `error` saying which file is broken and where (never a bare JSONDecodeError)."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{what}{' ' if what else ''}{path} is not valid JSON ({e})") from None


class OutputError(ValueError):
    """An output path that cannot be written; a user error, reported in one line."""


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What identifies the file's current content cheaply (None when it does not exist)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _dir_problem(path: Path) -> str | None:
    """Why `path` cannot serve as a writable directory (it is created if missing), or None."""
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        return f"{blocker} is a file, not a directory" if blocker else f"cannot create {path} ({_reason(e)})"
    try:  # a real write: permission bits say nothing on a read-only mount, or for root
        fd, probe = tempfile.mkstemp(dir=path, prefix=".diffspec-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write in {path} ({_reason(e)})"
    return None


def check_output_dir(path: str | Path, what: str = "output directory") -> Path:
    """`path` as a directory, created if needed, and writable; OutputError otherwise."""
    path = Path(path)
    problem = _dir_problem(path)
    if problem:
        raise OutputError(f"{what} {path}: {problem}; give a writable directory path")
    return path


class OutputFile:
    """A result file whose path was checked before the run and is written atomically after it."""

    def __init__(self, path: Path, seen: tuple[int, int, int] | None):
        self.path = path
        self.seen = seen  # the target's stamp at check time: a change means another writer

    @classmethod
    def check(cls, path: str | Path, what: str = "output file") -> "OutputFile":
        """Validate `path` now, before any decoding: its directory exists (created if needed) and is
        writable, and the path is not a directory or a device. A symlink is followed to its target."""
        if not str(path).strip():
            raise OutputError(f"{what} path is empty; give a file path such as out/result.json")
        path = Path(path)
        if path.is_symlink():
            path = path.resolve()
        if path.is_dir():
            raise OutputError(f"{what} {path} is a directory; give a file path such as {path / 'result.json'}")
        if path.exists() and not path.is_file():
            raise OutputError(f"{what} {path} exists and is not a regular file; give another path")
        problem = _dir_problem(path.parent)
        if problem:
            raise OutputError(f"cannot write {what} {path}: {problem}")
        return cls(path, _stamp(path))

    def write_with(self, write: Callable[[Path], None]) -> Path:
        """Run `write(tmp)` on a temporary file beside the target, then move it over the target.

        Returns where the result went: the target, or (when another process wrote
        the target since `check`) a sibling named after this process, so that
        neither result is lost.
        """
        dest, now = self.path, _stamp(self.path)
        if now is not None and now != self.seen:
            dest = dest.with_name(f"{dest.stem}.{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{dest.suffix}")
            print(f"diffspec: warning: {self.path} was written by another process during this run; "
                  f"this run's result goes to {dest} instead", file=sys.stderr)
        elif now is not None:
            print(f"diffspec: note: overwriting existing {dest}", file=sys.stderr)
        try:
            with _temp_beside(dest) as tmp:
                write(tmp)
                os.replace(tmp, dest)
        except OSError as e:
            raise OutputError(f"cannot write {dest}: {_reason(e)}") from None
        if dest == self.path:
            self.seen = _stamp(dest)
        return dest

    def write_bytes(self, data: bytes) -> Path:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        return self.write_with(write)

    def write_text(self, text: str) -> Path:
        return self.write_bytes(text.encode("utf-8"))

    def write_json(self, obj: Any, rescue: bool = False) -> Path:
        """Serialised first, so an unserialisable object leaves the old file untouched. With `rescue`,
        a failed write still saves the result (see `rescue_json`) and the error says where."""
        text = json.dumps(obj, indent=2) + "\n"
        try:
            return self.write_text(text)
        except OutputError as e:
            if not rescue:
                raise
            saved = rescue_json(text, self.path.name)
            where = f"the result was saved to {saved}" if saved else "the result could not be saved anywhere"
            raise OutputError(f"{e}; {where}") from None


@contextmanager
def _temp_beside(dest: Path) -> Iterator[Path]:
    """A fresh temporary path in dest's directory with dest's suffix (so e.g. matplotlib picks the
    format), removed again unless it was moved away."""
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=f".tmp{dest.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _mode_for(dest))  # mkstemp's 0600 would make a result unreadable to others
        yield tmp
    finally:
        if tmp.exists():
            tmp.unlink()


def _mode_for(dest: Path) -> int:
    """The replaced file's permissions, or what a plain open() would give a new file (0666 & ~umask)."""
    try:
        return dest.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def rescue_json(text: str, name: str) -> Path | None:
    """Save serialised JSON that could not go where asked to the system's temp directory, so a
    failure at the output stage never loses a finished run; None if even that fails."""
    try:
        fd, path = tempfile.mkstemp(prefix=f"diffspec-rescued-{Path(name).stem}-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return Path(path)
    except OSError:
        return None
