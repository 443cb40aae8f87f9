"""Download a bundle of the collection from a bundle index: checksum first, then a safe, all-or-nothing extraction.

    python -m meddet.hub download --name retinaunet_resencl_mae_detection [--version 0.1.0] \\
        --index bundle_index.json --bundle_dir bundles

The index (`bundle_index.json`, written by `tools/package.py`) maps `<name>_v<version>` to
`{"checksum": <sha256 of the zip>, "source": <URL or path of the zip>}`, the MONAI model zoo's `model_info.json`
form; other top-level keys (the `bundles` section) are ignored here. `index` and `source` may be local paths,
`file://` or `http(s)://` URLs; a relative `source` is resolved against the index's location. Without `--version`
the highest version is taken, compared numerically (0.10.0 > 0.9.0). Without `--index`, the environment variable
`MEDDET_BUNDLE_INDEX` names it.

Steps: resolve the version -> download the zip into a temporary folder inside `bundle_dir` -> verify its sha256
-> check every member (it must lie under `<name>/`; absolute paths, `..` and links are refused) -> extract into
the temporary folder -> rename `<name>/` into place. Any failure removes the temporary folder; an existing
`<bundle_dir>/<name>` is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import urllib.parse
import urllib.request
import zipfile

INDEX_ENV = "MEDDET_BUNDLE_INDEX"
DOWNLOAD_TIMEOUT_S = 60
_VERSION = re.compile(r"^\d+(\.\d+)*$")
_ENTRY = re.compile(r"^(?P<name>.+)_v(?P<version>\d+(\.\d+)*)$")


class BundleDownloadError(RuntimeError):
    """A bundle could not be fetched, verified or extracted; the message names the bundle, version and source."""


def version_key(version: str) -> tuple[int, ...]:
    """Numeric sort key of a dotted version: "0.10.0" -> (0, 10, 0), so 0.10.0 sorts after 0.9.0."""
    if not _VERSION.match(str(version)):
        raise ValueError(f"version {version!r} is not a dotted number such as 0.1.0")
    return tuple(int(part) for part in str(version).split("."))


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
    """Versions of `name` listed in the index, lowest first (numeric order)."""
    versions = [m["version"] for m in map(_ENTRY.match, index) if m and m["name"] == name]
    return sorted(versions, key=version_key)


def resolve(index: dict, name: str, version: str | None = None) -> tuple[str, dict]:
    """(version, entry) of `name`: the given version, or the highest one when `version` is None."""
    versions = available_versions(index, name)
    if not versions:
        raise BundleDownloadError(f"bundle '{name}' is not in the index")
    version = versions[-1] if version is None else str(version)
    entry = index.get(f"{name}_v{version}")
    if entry is None:
        raise BundleDownloadError(f"bundle '{name}' has no version {version} in the index (it has {versions})")
    if not isinstance(entry, dict) or not entry.get("checksum") or not entry.get("source"):
        raise BundleDownloadError(f"bundle '{name}' v{version}: the index entry needs 'checksum' and 'source'")
    return version, entry


def source_location(source: str, index: str) -> str:
    """`source` as an absolute path or URL; relative sources are taken relative to the index's location."""
    if _is_url(source) or os.path.isabs(source):
        return source
    if _is_url(index):
        return urllib.parse.urljoin(index, source)
    return os.path.join(os.path.dirname(os.path.abspath(index)), source)


def _fetch(location: str, destination: str) -> str:
    """Copy `location` to `destination`; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with _open(location) as stream, open(destination, "wb") as out:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def check_members(archive: zipfile.ZipFile, name: str) -> None:
    """Refuse members outside `<name>/`: absolute paths, drive letters, `..`, backslashes, links, odd file types."""
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


def _extract(archive: zipfile.ZipFile, root: str) -> None:
    root = os.path.realpath(root)
    for info in archive.infolist():
        target = os.path.realpath(os.path.join(root, *info.filename.split("/")))
        if os.path.commonpath([root, target]) != root:  # check_members already refused this; belt and braces
            raise ValueError(f"member '{info.filename}' would land outside {root}")
        if info.is_dir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with archive.open(info) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out)


def download(name: str, version: str | None = None, index: str | None = None, bundle_dir: str = ".") -> str:
    """Download, verify and extract bundle `name` into `<bundle_dir>/<name>`; return that path.

    Args:
        name: bundle name, e.g. "retinaunet_resencl_mae_detection".
        version: e.g. "0.1.0"; None takes the highest indexed version (numeric comparison).
        index: path or URL of `bundle_index.json`; None reads the `MEDDET_BUNDLE_INDEX` environment variable.
        bundle_dir: parent folder of the extracted bundle (created if needed).

    Raises:
        BundleDownloadError: unknown bundle/version, unreadable source, checksum mismatch, unsafe archive, or an
            existing target folder; nothing is left behind.
    """
    if isinstance(version, float):  # a command line "0.10" arrives as the number 0.1: ambiguous, so refuse it
        raise BundleDownloadError(f"bundle '{name}': version {version!r} must be a string such as '0.1.0'")
    index = index or os.environ.get(INDEX_ENV)
    if not index:
        raise BundleDownloadError(f"no bundle index given: pass --index PATH_OR_URL or set {INDEX_ENV}")
    version, entry = resolve(load_index(index), name, version)
    source = source_location(entry["source"], index)
    label = f"bundle '{name}' v{version} from {source}"
    target = os.path.join(os.path.abspath(bundle_dir), name)
    if os.path.lexists(target):
        raise BundleDownloadError(f"{label}: {target} already exists; remove it or choose another --bundle_dir")
    created_parent = not os.path.isdir(bundle_dir)
    os.makedirs(bundle_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=bundle_dir)  # same file system: the final rename is atomic
    try:
        archive_path = os.path.join(staging, f"{name}_v{version}.zip")
        try:
            checksum = _fetch(source, archive_path)
        except OSError as error:
            raise BundleDownloadError(f"{label}: download failed: {error}") from error
        if checksum != str(entry["checksum"]).lower():
            raise BundleDownloadError(f"{label}: sha256 {checksum} does not match the index ({entry['checksum']}); "
                                      "the file is corrupted or was replaced, nothing was extracted")
        content = os.path.join(staging, "content")
        try:
            with zipfile.ZipFile(archive_path) as archive:
                check_members(archive, name)
                _extract(archive, content)
        except (zipfile.BadZipFile, ValueError, OSError) as error:
            raise BundleDownloadError(f"{label}: refused the archive: {error}") from error
        if not os.path.isfile(os.path.join(content, name, "configs", "metadata.json")):
            raise BundleDownloadError(f"{label}: the archive holds no {name}/configs/metadata.json")
        if os.path.lexists(target):
            raise BundleDownloadError(f"{label}: {target} appeared during the download; left untouched")
        os.rename(os.path.join(content, name), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_parent and not os.listdir(bundle_dir):
            os.rmdir(bundle_dir)
    return target


if __name__ == "__main__":
    import fire

    fire.Fire({"download": download})
