"""Where data lives, and how public datasets get there: downloaded once, checksum-verified.

- ``data_dir()``: raw files. ``$ONETRANS_DATA_DIR``, else ``data/`` at the project root (or
  ``~/.onetrans_mini/data`` for a non-editable install). May be read-only (CI points it at a shared copy).
- ``cache_dir()``: prepared requests (Arrow tables, vocabularies). ``$ONETRANS_CACHE_DIR``, else
  ``data/cache`` at the project root (or ``~/.cache/onetrans_mini``). Never inside a data dir given by
  the environment, so a read-only copy of the raw files is never written to.

A relative ``$ONETRANS_DATA_DIR`` / ``$ONETRANS_CACHE_DIR`` is taken from the project root in a source
checkout (from the current directory otherwise), so the CLI run at the root and a notebook kernel, whose
current directory is ``notebooks/``, read the same folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .requests import DataError

_PACKAGE = Path(__file__).resolve().parents[1]
_PROJECT = _PACKAGE.parent if (_PACKAGE.parent / "pyproject.toml").exists() else None


def _from_env(name: str) -> Path | None:
    env = os.environ.get(name)
    if not env:
        return None
    path = Path(env).expanduser()
    return path if path.is_absolute() or _PROJECT is None else _PROJECT / path


def data_dir() -> Path:
    env = _from_env("ONETRANS_DATA_DIR")
    if env:
        return env
    return (_PROJECT / "data") if _PROJECT else Path.home() / ".onetrans_mini" / "data"


def cache_dir() -> Path:
    env = _from_env("ONETRANS_CACHE_DIR")
    if env:
        return env
    return (_PROJECT / "data" / "cache") if _PROJECT else Path.home() / ".cache" / "onetrans_mini"


@dataclass(frozen=True)
class RemoteZip:
    """An official zip: where it is, its checksum, the folder it unpacks to and the files we need."""

    name: str
    url: str
    md5: str
    folder: str  # folder inside the data dir (and inside the zip)
    files: tuple[str, ...]
    size: int | None = None  # bytes, for the progress bar when the server sends no length


def file_digest(path: Path, algo: str = "md5", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_local(spec: RemoteZip, root: Path | None = None) -> Path | None:
    """The dataset's folder in the data dir if every needed file is there, else None."""
    folder = (root or data_dir()) / spec.folder
    return folder if all((folder / f).is_file() for f in spec.files) else None


def fetch(spec: RemoteZip, root: Path | None = None, progress: bool = True) -> Path:
    """Return the dataset's folder, downloading and unpacking the official zip on first use.

    The zip's md5 is checked before anything is unpacked; unpacking goes to a temporary folder that is
    renamed into place, so an interrupted download or a failed check leaves nothing behind.
    """
    root = Path(root or data_dir())
    found = find_local(spec, root)
    if found:
        return found
    manual = (
        f"download {spec.url} by hand (md5 {spec.md5}) and unzip it so that "
        f"{root / spec.folder}/ holds {', '.join(spec.files)}; or set ONETRANS_DATA_DIR to a folder that does"
    )
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.folder}-download-", dir=root))
    except OSError as e:
        raise DataError(f"{spec.name}: cannot write to the data dir {root} ({e}); {manual}") from e
    try:
        zpath = tmp / Path(spec.url).name
        _download(spec, zpath, progress, manual)
        got = file_digest(zpath, "md5")
        if got != spec.md5:
            raise DataError(
                f"{spec.name}: checksum mismatch for {spec.url}: expected md5 {spec.md5}, got {got} "
                f"(a truncated or changed download); nothing was kept. Try again, or {manual}"
            )
        try:
            with zipfile.ZipFile(zpath) as z:
                z.extractall(tmp / "unpacked")
        except zipfile.BadZipFile as e:
            raise DataError(f"{spec.name}: {zpath.name} from {spec.url} is not a valid zip ({e})") from e
        src = tmp / "unpacked" / spec.folder
        missing = [f for f in spec.files if not (src / f).is_file()]
        if missing:
            raise DataError(f"{spec.name}: the zip from {spec.url} lacks {missing} under {spec.folder}/")
        dest = root / spec.folder
        if dest.exists():  # a partial folder from an older manual copy: replace it whole
            shutil.rmtree(dest)
        src.rename(dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(spec: RemoteZip, dest: Path, progress: bool, manual: str) -> None:
    from tqdm.auto import tqdm

    try:
        with urllib.request.urlopen(spec.url, timeout=30) as r, open(dest, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or spec.size
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {spec.name}", disable=not progress) as bar:
                while block := r.read(1 << 16):
                    f.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DataError(f"{spec.name}: could not download {spec.url} ({e}). Offline? {manual}") from e
