"""Download a bundle of the collection from a bundle index: checksum first, then a safe, all-or-nothing extraction.

    python -m meddet.hub download --name retinaunet_resencl_mae_detection [--version 0.1.0] \\
        --index bundle_index.json --bundle_dir bundles

The index (`bundle_index.json`, written by `tools/package.py`) maps `<name>_v<version>` to
`{"checksum": <sha256 of the zip>, "source": <URL or path of the zip>, "size": <bytes of the zip>}`, the MONAI model
zoo's `model_info.json` form (`size` is optional: entries written before it existed lack it); other top-level keys
(the `bundles` section) are ignored here. `index` and `source` may be local paths, `file://` or `http(s)://` URLs; a
relative `source` is resolved against the index's location. Versions are dotted numbers (`0.1.0`, `1.2`: digits
separated by dots, no suffix such as `-rc1`); an index entry of the bundle whose version does not parse is an error,
not skipped. Without `--version` the highest version is taken, compared numerically (0.10.0 > 0.9.0). Without
`--index`, the environment variable `MEDDET_BUNDLE_INDEX` names it.

Steps: resolve the version -> remove stale staging folders of this bundle left by killed downloads -> create a
staging folder `<bundle_dir>/.<name>.XXXXXXXX` holding a `pid` marker (owner process id and host) -> download the
zip into it -> verify its size and sha256 -> check every member (it must lie under `<name>/`; absolute paths, `..`,
links, special files and encrypted members are refused) -> extract into the staging folder, checking every member's
written bytes and CRC-32 against its header -> rename `<name>/` into place. Any failure removes the staging folder;
an existing `<bundle_dir>/<name>` is never overwritten.

Limits (module constants):

- download: at most the entry's `size`, else `MAX_ARCHIVE_BYTES` (1 GiB; the packed bundles are well under 1 MiB,
  weights are fetched separately). Reading stops as soon as the stream passes the limit, so a wrong or hostile
  source cannot fill the disk.
- extraction: at most `min(MAX_EXTRACTED_BYTES, MAX_EXPANSION_RATIO * archive bytes)`, i.e. 4 GiB and 200 times
  the zip (the packed bundles expand about 3 times, deflated text rarely over 10; a zip bomb by up to 1000 times),
  counted on the bytes actually written, since a member's declared size may lie.
- members: the bytes written and their CRC-32 must equal the member's header (`file_size`, `CRC`); the standard
  library silently stops short of a declared size that is too large.

Stale staging folders: a folder `.<name>.XXXXXXXX` of the same bundle is removed when its `pid` marker names a
process of this host that no longer runs, or when it has no marker and is older than `STALE_UNMARKED_S` (one hour:
a marker is written right after the folder is created, so only an old download, or one killed in between, has
none). A folder whose owner runs, or whose liveness cannot be told (another host, or Windows), is never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
import zlib

from meddet import VERSION_PATTERN, VERSION_RE, version_key

INDEX_ENV = "MEDDET_BUNDLE_INDEX"
DOWNLOAD_TIMEOUT_S = 60
MAX_ARCHIVE_BYTES = 1 << 30  # download cap of an index entry without "size"
MAX_EXTRACTED_BYTES = 4 << 30  # extraction cap, whatever the archive size
MAX_EXPANSION_RATIO = 200  # extraction cap relative to the archive size
STALE_UNMARKED_S = 3600  # age after which a staging folder without a pid marker counts as abandoned
CHUNK_BYTES = 1 << 20
PID_MARKER = "pid"
#: an index key `<name>_v<version>` (shared with tools/package.py, which writes the index)
INDEX_ENTRY = _ENTRY = re.compile(rf"^(?P<name>.+)_v(?P<version>{VERSION_PATTERN})$")
_VERSION_FORMAT = "a dotted number such as 0.1.0 (digits separated by dots, no suffix such as -rc1)"


class BundleDownloadError(RuntimeError):
    """A bundle could not be fetched, verified or extracted; the message names the bundle, version and source."""


class _TooLarge(Exception):
    """The download stream passed its byte limit; `received` is what had been read when reading stopped."""

    def __init__(self, received: int):
        super().__init__(received)
        self.received = received


def _is_url(location: str) -> bool:
    return urllib.parse.urlparse(location).scheme in ("http", "https", "file")


def _open(location: str):
    """A readable binary stream of a local path or a file/http(s) URL."""
    if _is_url(location):
        return urllib.request.urlopen(location, timeout=DOWNLOAD_TIMEOUT_S)  # noqa: S310 (schemes checked above)
    return open(location, "rb")


def load_index(index: str) -> dict:
    """The index at a path or URL, as a dict."""
    try:
        with _open(index) as stream:
            content = json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError) as error:
        raise BundleDownloadError(f"cannot read the bundle index {index}: {error}") from error
    if not isinstance(content, dict):
        raise BundleDownloadError(f"bundle index {index}: expected a JSON object")
    return content


def available_versions(index: dict, name: str) -> list[str]:
    """Versions of `name` listed in the index, lowest first (numeric order).

    Raises BundleDownloadError when an entry `<name>_v<version>` has a version that does not parse: skipping it would
    quietly pick another version than the publisher meant.
    """
    versions, malformed = [], []
    for key in index:
        if not key.startswith(f"{name}_v"):
            continue
        match = _ENTRY.match(key)
        if match and match["name"] == name:
            versions.append(match["version"])
        elif "_v" not in key[len(name) + 2:]:  # otherwise `<longer name>_v<version>`: another bundle's entry
            malformed.append(key)
    if malformed:
        raise BundleDownloadError(f"bundle '{name}': the index is malformed: {malformed} carry a version that is "
                                  f"not {_VERSION_FORMAT}")
    return sorted(versions, key=version_key)


def _check_entry(name: str, version: str, entry) -> None:
    """Refuse an entry without checksum/source, or whose optional `size` is not a positive byte count."""
    if not isinstance(entry, dict) or not entry.get("checksum") or not entry.get("source"):
        raise BundleDownloadError(f"bundle '{name}' v{version}: the index entry needs 'checksum' and 'source'")
    size = entry.get("size")
    if "size" in entry and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise BundleDownloadError(f"bundle '{name}' v{version}: the index entry's 'size' must be a positive number "
                                  f"of bytes, not {size!r}")


def resolve(index: dict, name: str, version: str | None = None) -> tuple[str, dict]:
    """(version, entry) of `name`: the given version, or the highest one when `version` is None."""
    if version is not None and not VERSION_RE.match(str(version)):
        raise BundleDownloadError(f"bundle '{name}': version {str(version)!r} is not {_VERSION_FORMAT}")
    versions = available_versions(index, name)
    if not versions:
        raise BundleDownloadError(f"bundle '{name}' is not in the index")
    version = versions[-1] if version is None else str(version)
    entry = index.get(f"{name}_v{version}")
    if entry is None:
        raise BundleDownloadError(f"bundle '{name}' has no version {version} in the index (it has {versions})")
    _check_entry(name, version, entry)
    return version, entry


def source_location(source: str, index: str) -> str:
    """`source` as an absolute path or URL; relative sources are taken relative to the index's location."""
    if _is_url(source) or os.path.isabs(source):
        return source
    if _is_url(index):
        return urllib.parse.urljoin(index, source)
    return os.path.join(os.path.dirname(os.path.abspath(index)), source)


def download_limit(entry: dict) -> tuple[int, str]:
    """(most bytes the download may hold, where that limit comes from) for an index entry."""
    if "size" in entry:
        return entry["size"], "the index entry's size"
    return MAX_ARCHIVE_BYTES, "MAX_ARCHIVE_BYTES, the index entry has no size"


def extraction_limit(archive_bytes: int) -> int:
    """Most bytes an archive of `archive_bytes` may expand to (see the module docstring)."""
    return min(MAX_EXTRACTED_BYTES, MAX_EXPANSION_RATIO * archive_bytes)


def _fetch(location: str, destination: str, limit: int) -> tuple[str, int]:
    """Copy `location` to `destination`; return (sha256, bytes) of what was written.

    Raises _TooLarge as soon as the stream holds more than `limit` bytes: at most one byte past the limit is read, so
    a wrong or hostile source cannot fill the disk.
    """
    digest, received = hashlib.sha256(), 0
    with _open(location) as stream, open(destination, "wb") as out:
        while chunk := stream.read(min(CHUNK_BYTES, limit + 1 - received)):
            received += len(chunk)
            if received > limit:
                raise _TooLarge(received)
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), received


def check_members(archive: zipfile.ZipFile, name: str) -> None:
    """Refuse members outside `<name>/`: absolute paths, drive letters, `..`, backslashes, links, odd file types,
    and encrypted members (no password to give; the standard library would fail half-way through)."""
    for info in archive.infolist():
        member = info.filename
        parts = member.split("/")
        mode = info.external_attr >> 16
        if (member.startswith("/") or "\\" in member or ":" in parts[0] or ".." in parts
                or parts[0] != name or len(parts) < 2):
            raise ValueError(f"member '{member}' would land outside {name}/")
        file_type = stat.S_IFMT(mode)  # 0 when the archiver stored permissions only (or nothing)
        if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ValueError(f"member '{member}' is a link or special file")
        if info.flag_bits & 0x1:
            raise ValueError(f"member '{member}' is encrypted")


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: str, extracted: int, limit: int) -> int:
    """Write member `info` to `target`; return `extracted` plus the bytes written.

    Counts the bytes actually written, not the declared size, against `limit`, and refuses a member whose bytes or
    CRC-32 differ from its header: zipfile stops quietly short of a declared size that is too large.
    """
    written, crc = 0, 0
    with archive.open(info) as source, open(target, "wb") as out:
        while chunk := source.read(CHUNK_BYTES):
            written += len(chunk)
            if extracted + written > limit:
                raise ValueError(f"it expands to more than {limit} bytes (reached at member '{info.filename}'; the "
                                 f"limit is the smaller of MAX_EXTRACTED_BYTES and {MAX_EXPANSION_RATIO} times the "
                                 "archive size)")
            crc = zlib.crc32(chunk, crc)
            out.write(chunk)
    if written != info.file_size:
        raise ValueError(f"member '{info.filename}' holds {written} bytes but its header says {info.file_size}")
    if crc != info.CRC:
        raise ValueError(f"member '{info.filename}' has CRC-32 {crc:08x} but its header says {info.CRC:08x}")
    return extracted + written


def _extract(archive: zipfile.ZipFile, root: str, limit: int) -> int:
    """Extract every member under `root`, at most `limit` bytes in all; return the bytes written."""
    root = os.path.realpath(root)
    extracted = 0
    for info in archive.infolist():
        target = os.path.realpath(os.path.join(root, *info.filename.split("/")))
        if os.path.commonpath([root, target]) != root:  # check_members already refused this; belt and braces
            raise ValueError(f"member '{info.filename}' would land outside {root}")
        if info.is_dir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        extracted = _copy_member(archive, info, target, extracted, limit)
    return extracted


def _process_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs; True when that cannot be told (never remove a live download)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        return True
    return True


def _read_marker(staging: str) -> tuple[int, str] | None:
    """(pid, host) from a staging folder's marker; None when it has none or it is unreadable (killed mid-write)."""
    try:
        with open(os.path.join(staging, PID_MARKER), encoding="utf-8") as f:
            pid, host = f.read().split("\n")[:2]
        return (int(pid), host) if int(pid) > 0 else None
    except (OSError, ValueError):
        return None


def _is_stale(staging: str) -> bool:
    """True for a staging folder whose owner process of this host is gone, or an unmarked one older than an hour."""
    owner = _read_marker(staging)
    if owner is None:
        return time.time() - os.lstat(staging).st_mtime > STALE_UNMARKED_S
    pid, host = owner
    return host == socket.gethostname() and not _process_alive(pid)


def remove_stale_staging(bundle_dir: str, name: str) -> list[str]:
    """Remove the staging folders `.<name>.XXXXXXXX` of killed downloads of `name`; return their paths."""
    if not os.path.isdir(bundle_dir):
        return []
    pattern = re.compile(rf"^\.{re.escape(name)}\.[a-z0-9_]{{8}}$")  # tempfile.mkdtemp's 8 random characters
    removed = []
    for entry in sorted(os.listdir(bundle_dir)):
        path = os.path.join(bundle_dir, entry)
        try:
            if pattern.match(entry) and stat.S_ISDIR(os.lstat(path).st_mode) and _is_stale(path):
                shutil.rmtree(path, ignore_errors=True)  # a folder we may not delete must not block the download
                if not os.path.lexists(path):
                    removed.append(path)
        except FileNotFoundError:  # another download cleaned it up or finished meanwhile
            continue
    return removed


def _make_staging(bundle_dir: str, name: str) -> str:
    """A fresh staging folder in `bundle_dir` (same file system: the final rename is atomic) with its pid marker."""
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=bundle_dir)
    try:
        with open(os.path.join(staging, PID_MARKER), "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n{socket.gethostname()}\n")
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _download_archive(label: str, source: str, entry: dict, archive_path: str) -> int:
    """Fetch the zip to `archive_path` and check its size and sha256 against the index; return its size."""
    limit, origin = download_limit(entry)
    try:
        checksum, received = _fetch(source, archive_path, limit)
    except OSError as error:
        raise BundleDownloadError(f"{label}: download failed: {error}") from error
    except _TooLarge as error:
        raise BundleDownloadError(f"{label}: the download is larger than {limit} bytes ({origin}); reading stopped "
                                  f"at {error.received} bytes, nothing was extracted") from None
    if "size" in entry and received != entry["size"]:
        raise BundleDownloadError(f"{label}: received {received} bytes but the index says {entry['size']}; the "
                                  "download was cut short or the file was replaced, nothing was extracted")
    if checksum != str(entry["checksum"]).lower():
        raise BundleDownloadError(f"{label}: sha256 {checksum} does not match the index ({entry['checksum']}); "
                                  "the file is corrupted or was replaced, nothing was extracted")
    return received


def _install(label: str, source: str, entry: dict, staging: str, target: str) -> None:
    """Download, verify and extract the bundle inside `staging`, then rename its folder to `target`."""
    name = os.path.basename(target)
    archive_path = os.path.join(staging, "archive.zip")
    archive_bytes = _download_archive(label, source, entry, archive_path)
    content = os.path.join(staging, "content")
    try:
        with zipfile.ZipFile(archive_path) as archive:
            check_members(archive, name)
            _extract(archive, content, extraction_limit(archive_bytes))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as error:
        raise BundleDownloadError(f"{label}: refused the archive: {error}") from error
    if not os.path.isfile(os.path.join(content, name, "configs", "metadata.json")):
        raise BundleDownloadError(f"{label}: the archive holds no {name}/configs/metadata.json")
    if os.path.lexists(target):
        raise BundleDownloadError(f"{label}: {target} appeared during the download; left untouched")
    os.rename(os.path.join(content, name), target)


def download(name: str, version: str | None = None, index: str | None = None, bundle_dir: str = ".") -> str:
    """Download, verify and extract bundle `name` into `<bundle_dir>/<name>`; return that path.

    Args:
        name: bundle name, e.g. "retinaunet_resencl_mae_detection".
        version: e.g. "0.1.0"; None takes the highest indexed version (numeric comparison).
        index: path or URL of `bundle_index.json`; None reads the `MEDDET_BUNDLE_INDEX` environment variable.
        bundle_dir: parent folder of the extracted bundle (created if needed).

    Raises:
        BundleDownloadError: unknown bundle/version, a version that is not a dotted number, a malformed index,
            unreadable source, a download or extraction over its size limit, checksum mismatch, unsafe archive or a
            member whose size/CRC-32 differs from its header, or an existing target folder; nothing is left behind.
    """
    if isinstance(version, float):  # a command line "0.10" arrives as the number 0.1: ambiguous, so refuse it
        raise BundleDownloadError(f"bundle '{name}': version {version!r} must be a string such as '0.1.0'")
    index = index or os.environ.get(INDEX_ENV)
    if not index:
        raise BundleDownloadError(f"no bundle index given: pass --index PATH_OR_URL or set {INDEX_ENV}")
    content = load_index(index)
    try:
        version, entry = resolve(content, name, version)
    except BundleDownloadError as error:  # name the index too: a malformed one is fixed there
        raise BundleDownloadError(f"{error} (index {index})") from None
    source = source_location(entry["source"], index)
    label = f"bundle '{name}' v{version} from {source}"
    target = os.path.join(os.path.abspath(bundle_dir), name)
    if os.path.lexists(target):
        raise BundleDownloadError(f"{label}: {target} already exists; remove it or choose another --bundle_dir")
    remove_stale_staging(bundle_dir, name)
    created_parent = not os.path.isdir(bundle_dir)
    staging = None
    try:
        try:
            os.makedirs(bundle_dir, exist_ok=True)
            staging = _make_staging(bundle_dir, name)
        except OSError as error:
            raise BundleDownloadError(f"{label}: cannot create a staging folder in {bundle_dir}: {error}") from error
        _install(label, source, entry, staging, target)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        if created_parent and os.path.isdir(bundle_dir) and not os.listdir(bundle_dir):
            os.rmdir(bundle_dir)
    return target


if __name__ == "__main__":
    import fire

    fire.Fire({"download": download})
