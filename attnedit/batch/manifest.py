"""What a run leaves in its output folder, written so that nothing is ever half there: atomic files,
sidecars (the completion mark, with the PNGs' sha256), `manifest.jsonl`, recovery after a kill, and
the folder's lock (one run at a time)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import LOCK, MANIFEST, SIDECAR_TAG, Unit


def is_complete(out: Path, unit: Unit) -> bool:
    """The sidecar is written last, so a readable sidecar with this key marks a finished image, when
    the image (and its maps grid) on disk are still the ones it describes (`intact`)."""
    side = out / f"{unit.stem}.json"
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get(SIDECAR_TAG) == unit.key and intact(out, unit.stem, data)


def intact(out: Path, stem: str, sidecar: dict[str, Any]) -> bool:
    """The PNG `stem`.png (and the maps grid the sidecar names) are whole: their bytes match the sha256
    the sidecar holds, or, for a sidecar written before hashes were stored, they decode completely."""
    files = [(out / f"{stem}.png", sidecar.get("png_sha256"))]
    if sidecar.get("maps_file"):
        maps = sidecar["maps_file"]
        if not isinstance(maps, str) or Path(maps).name != maps:
            return False
        files.append((out / maps, sidecar.get("maps_sha256")))
    return all(_file_intact(path, digest) for path, digest in files)


def _file_intact(path: Path, digest: Any) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if digest is not None:
        return isinstance(digest, str) and hashlib.sha256(data).hexdigest() == digest
    from PIL import Image

    try:  # verify: chunk CRCs up to IEND; load: every pixel (neither alone catches every truncation)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception:
        return False
    return True


def manifest_row(sidecar: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": sidecar[SIDECAR_TAG],
        "image": sidecar["image"],
        "sidecar": Path(sidecar["image"]).with_suffix(".json").name,
        "maps": sidecar.get("maps_file"),
        "line": sidecar["job"]["line"],
        "id": sidecar["job"]["id"],
        "prompt": sidecar["prompt"],
        "seed": sidecar["seed"],
    }


def _complete_sidecars(out: Path) -> dict[str, dict[str, Any]]:
    """stem -> sidecar of every image in `out` whose sidecar was written (and its files are there), for the
    manifest; whether an image is skipped is decided by `is_complete`, which also checks its bytes."""
    found = {}
    for side in sorted(out.glob("*.json")):
        try:
            data = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or SIDECAR_TAG not in data:
            continue
        maps = data.get("maps_file")
        if (out / f"{side.stem}.png").is_file() and (not maps or (out / str(maps)).is_file()):
            found[side.stem] = data
    return found


def _temp_name(path: Path) -> Path:
    """A temp name beside `path`, unique to this process and call (`recover` removes leftovers)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _write_bytes(path: Path, data: bytes) -> None:
    """Temp name, flushed to disk, renamed: after a kill or a power cut the file is whole or absent."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    _write_bytes(path, text.encode())


def rebuild_manifest(out: Path, units: Sequence[Unit] = ()) -> int:
    """Write `manifest.jsonl` from the sidecars: the run's units in file order, then any other
    finished image in `out` by name. Returns the number of rows."""
    found = _complete_sidecars(out)
    rows, done = [], set()
    for u in units:
        if u.stem in found and found[u.stem][SIDECAR_TAG] == u.key:
            rows.append(manifest_row(found[u.stem]))
            done.add(u.stem)
    rows += [manifest_row(found[s]) for s in sorted(found) if s not in done]
    write_atomic(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def recover(out: Path) -> bool:
    """Before a run (holding the folder's lock, so no other run writes here): drop temp files of a
    killed run and rebuild the manifest when it does not list exactly the finished images (cut
    short, a torn last line, duplicates). True if rebuilt."""
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    manifest = out / MANIFEST
    finished = {d["image"] for d in _complete_sidecars(out).values()}
    listed: list[str] = []
    intact = True
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            try:
                listed.append(json.loads(line)["image"])
            except (ValueError, KeyError, TypeError):
                intact = False
    if intact and len(listed) == len(set(listed)) and set(listed) == finished:
        return False
    rebuild_manifest(out)
    return True


def append_manifest(out: Path, row: dict[str, Any]) -> None:
    """One whole line per finished image; a file lock keeps lines of concurrent workers apart."""
    import fcntl

    data = (json.dumps(row) + "\n").encode()
    fd = os.open(out / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class OutputBusy(RuntimeError):
    """Another run holds the output folder's lock."""


class OutputLock:
    """An exclusive `flock` on `out/.attnedit-batch.lock` for one run (one per `accelerate launch`: the main
    process takes it for all). Refuses at once (`OutputBusy`) when another run holds it; the file is
    removed when the run ends, and a lock taken on a file removed meanwhile is taken again on the new one."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(f"--out {self.out}: cannot write in this folder ({err.strerror or err})") from None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by another run
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                raise OutputBusy(f"another attnedit batch run ({holder or 'its pid not written yet'}) is writing "
                                 f"into {self.out}; wait until it ends, or give another --out (its lock: {self.path})"
                                 ) from None
            except OSError as err:  # a file system without flock (some network mounts): run unlocked, say so
                import warnings

                warnings.warn(f"cannot lock {self.path} ({err.strerror or err}): a second run into {self.out} "
                              "at the same time would not be detected", stacklevel=2)
                break
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the run that held it ended and removed the file: lock the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # still holding it: a run that opened the old file retries on a new one
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()



def write_png(path: Path, image: Any) -> str:
    """`image` as a PNG at `path`, written atomically (`_write_bytes`); returns the sha256 of its bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    _write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()

