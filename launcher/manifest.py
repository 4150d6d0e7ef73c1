"""A folder's manifest: every file's relative path, size and SHA-256, written last into the folder, so
that the folder proves itself complete and unchanged when it is read back (a full checkpoint carries one).

SHA-256 rather than a CRC: with the SHA extensions of current x86 and ARM cores hashlib hashes about
1.5 GB/s per core (zlib.crc32 about 3 GB/s), well within what reading a multi-GB checkpoint back costs,
and a listed digest can be checked by hand with `sha256sum`. Files are hashed on several threads
(hashlib releases the GIL), one file per thread.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
ALGORITHM = "sha256"
_CHUNK = 1 << 20
_THREADS = min(8, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class Damage:
    """One way a folder differs from its manifest: which file, what the manifest says, what is there."""

    file: str  # relative to the folder
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.file}: expected {self.expected}, found {self.found}"


class DamageFound(Exception):
    """A folder does not match its manifest; `damage` lists how."""

    def __init__(self, damage: list[Damage]):
        super().__init__("; ".join(map(str, damage)))
        self.damage = damage


def file_digest(path: Path) -> tuple[int, str]:
    """(bytes read, hex SHA-256) of a file, read in 1 MiB chunks."""
    digest, size = hashlib.new(ALGORITHM), 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def _digests(folder: Path, names: list[str]) -> dict[str, tuple[int, str]]:
    with ThreadPoolExecutor(_THREADS) as pool:
        return dict(zip(names, pool.map(lambda name: file_digest(folder / name), names)))


def listed_files(folder: Path) -> list[str]:
    """Every regular file under `folder` but the manifest, as sorted POSIX paths relative to it."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def write_manifest(folder: Path) -> dict:
    """Hash every file of `folder` and write `manifest.json` into it; returns the manifest."""
    folder = Path(folder)
    names = listed_files(folder)
    digests = _digests(folder, names)
    files = [{"path": name, "size": digests[name][0], ALGORITHM: digests[name][1]} for name in names]
    manifest = {"algorithm": ALGORITHM, "total_bytes": sum(f["size"] for f in files), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder: Path) -> dict:
    """The manifest of `folder`; a Damage (raised) when it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        fields = {"path", "size", manifest["algorithm"]}
        if not all(fields <= entry.keys() for entry in manifest["files"]):
            raise KeyError(f"a file entry without one of {sorted(fields)}")
        return manifest
    except FileNotFoundError:
        raise DamageFound([Damage(MANIFEST, "a manifest", "no such file")]) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamageFound([Damage(MANIFEST, "a readable manifest", f"{type(exc).__name__}: {exc}")]) from None


def verify(folder: Path) -> dict:
    """Check `folder` against its manifest (sizes first, then digests); returns the manifest, or raises
    DamageFound listing every file that is missing or differs. Files not listed are ignored."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    algorithm = manifest["algorithm"]
    damage = []
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            damage.append(Damage(entry["path"], f"{entry['size']} bytes", "no such file"))
        elif (size := path.stat().st_size) != entry["size"]:
            damage.append(Damage(entry["path"], f"{entry['size']} bytes", f"{size} bytes"))
    if damage:  # hashing gigabytes would tell nothing more
        raise DamageFound(damage)
    if algorithm != ALGORITHM:
        raise DamageFound([Damage(MANIFEST, f"algorithm {ALGORITHM}", f"algorithm {algorithm!r}")])
    names = [entry["path"] for entry in manifest["files"]]
    digests = _digests(folder, names)
    for entry in manifest["files"]:
        size, digest = digests[entry["path"]]
        if size != entry["size"]:  # changed while it was read
            damage.append(Damage(entry["path"], f"{entry['size']} bytes", f"{size} bytes"))
        elif digest != entry[algorithm]:
            damage.append(Damage(entry["path"], f"{algorithm} {entry[algorithm][:16]}...", f"{algorithm} {digest[:16]}..."))
    if damage:
        raise DamageFound(damage)
    return manifest
