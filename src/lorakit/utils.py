"""Small shared helpers: atomic file writes, seeding and stable per-name random generators.

Every file lorakit writes (checkpoints, JSON results, plots) goes through :func:`atomic_write`, so a
crash mid-write leaves the previous file intact: the bytes land in a temporary file in the same
folder, are flushed to disk and then renamed over the target (``os.replace`` is atomic on POSIX and
Windows).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    text = {} if "b" in mode else {"encoding": encoding, "newline": newline}
    try:
        with os.fdopen(fd, mode, **text) as handle:
            # mkstemp creates the file 0600; give it the permissions open() would (0666 less the umask),
            # or the existing file's, so results stay readable to whoever could read them before
            os.chmod(tmp, _mode_for(path))
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before threads write files
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV table (``header``, then ``rows``; ``None`` cells left empty), atomically."""
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(["" if value is None else value for value in row] for row in rows)


def atomic_save_figure(fig: Any, path: str | os.PathLike, dpi: int = 130) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file (used for optimizer/trainer state, never for adapters)."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def read_json(path: str | os.PathLike, missing_hint: str = "") -> Any:
    """Parse a JSON file; errors name the file (and the line, for invalid JSON)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: not found{missing_hint}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 JSON file") from error


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, record)`` for every non-blank line of a JSON-lines file.

    A line that is not JSON raises ``ValueError`` naming the file and the line, except a torn last line
    (no newline at its end: a crash while :class:`JsonlLog` appended it), which is skipped with a warning.
    """
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                if not line.endswith("\n"):
                    logger.warning(
                        "%s, line %d: skipping a torn last line (an interrupted write)", path, number
                    )
                    return
                raise ValueError(f"{path}, line {number}: invalid JSON ({error.msg})") from error


class JsonlLog:
    """Records kept in memory and in a JSON-lines file that grows by appending.

    The first write after construction or :meth:`load` rewrites the file atomically with every record
    held, so a fresh run replaces a stale file and a resumed run drops the records measured after its
    checkpoint. Each later record is appended as one line, flushed and fsynced. A long run therefore costs
    one line of I/O per record, not a rewrite of the whole file each time. A crash mid-append leaves the
    earlier lines intact and at most a torn last line, which :func:`read_jsonl` skips. ``path=None`` keeps
    the records in memory only.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self.records: list[dict[str, Any]] = []
        self._synced = False  # whether the file holds exactly self.records (appending is safe)

    def load(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Hold the file's records that ``keep`` accepts (none if there is no file); written on next add."""
        if self.path is not None and self.path.is_file():
            self.records = [record for _, record in read_jsonl(self.path) if keep(record)]
        self._synced = False

    def add(self, record: dict[str, Any], write: bool = True) -> None:
        """Hold ``record`` and, with ``write``, put it in the file (rewrite first, append after)."""
        self.records.append(record)
        if write and self.path is not None:
            if self._synced:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record, default=_json_default) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
            else:
                self.rewrite()

    def rewrite(self) -> Path:
        """Write every record held, atomically (temporary file, then rename)."""
        if self.path is None:
            raise ValueError("JsonlLog: no path given; the records are kept in memory only")
        with atomic_write(self.path) as handle:
            for record in self.records:
                handle.write(json.dumps(record, default=_json_default) + "\n")
        self._synced = True
        return self.path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write a {type(value).__name__} to JSON")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def named_generator(seed: int, name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator whose state depends only on ``(seed, name)``.

    Adapters are initialised from ``named_generator(config.seed, module_name)`` so that a module's
    initial factors do not depend on the order of injection or on which other modules are adapted.
    CRC32 is used because Python's ``hash`` of a string changes between processes.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    return generator


def local_path(value: str | os.PathLike | None) -> str | None:
    """``value`` as an absolute path if it is one or names an existing file or folder from this process's
    working directory; otherwise (``None``, a hub model or dataset name) ``value`` unchanged."""
    if value is None:
        return None
    text = os.path.expanduser(os.fspath(value))
    if os.path.isabs(text) or os.path.exists(text):
        return os.path.abspath(text)
    return os.fspath(value)
