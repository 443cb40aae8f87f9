"""Package every bundle of the collection as a self-contained, byte-reproducible zip and index them.

    python tools/package.py --out_dir dist [--base_url URL]   # dist/<name>_v<version>.zip + dist/bundle_index.json
    python tools/package.py --check                           # exit 1 when a bundle changed without a version bump

Archive layout (what `python -m monai.bundle download --url` and `python -m meddet.hub download` extract):
every member sits under `<name>/`, and the bundle carries a copy of the `meddet` package (`*.py` files only, the
downloader `meddet/hub.py` left out) at `<name>/meddet/`, so `python -m monai.bundle run ...` started in the extracted folder imports that copy first
(`python -m` puts the current folder at the front of `sys.path`). Never packed: `models/`, `eval/`, the files
listed in `large_files.yml`, `__pycache__/`, compiled and hidden files.

Reproducibility: members in sorted order, every timestamp 1980-01-01 00:00:00, permissions 0644 (Unix), deflate
at level 9, no comments or extra fields; packaging the same content twice gives the same bytes (with the same
zlib build: a different deflate implementation may compress the same content differently).

Index (`bundle_index.json`, the MONAI model zoo's `model_info.json` form plus a per-bundle section):

    {"bundles": {"<name>": {"latest_version", "kind", "family", "detector", "initialisation", "description"}},
     "<name>_v<version>": {"checksum": "<sha256 of the zip>", "source": "<base_url>/<name>_v<version>.zip",
                           "size": <bytes of the zip>}, ...}

Entries of older versions are kept as they are (append-only: one written before `size` existed stays without it,
which `meddet.hub` accepts); the current version's entry is (re)written, with its `size` (the download limit of
`meddet.hub`). The index named by `--index` (default: the repository's `bundle_index.json`) is read for the older
entries and updated in place; pass `--index ""` to leave it alone and write only `<out_dir>/bundle_index.json`.

Download location: `source` is `<base_url>/<zip name>`. `base_url` is `--base_url` if given, else the environment
variable `MEDDET_BUNDLE_BASE_URL`, else `DEFAULT_BASE_URL` (the GitHub release where the zips are uploaded; set
one of the two others when publishing somewhere else).

`--check` packs every bundle into a temporary folder and fails, naming the bundle, when its current version is
missing from the committed index or the index's checksum or size differs from the fresh zip: a bundle whose files or
vendored `meddet` changed needs a version bump (and a changelog line in `tools/variants.py`) and a re-run of
this tool. The `bundles` section must also match what this tool would write.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import zipfile

import fire
import yaml

from meddet import hub, version_key

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
MEDDET_DIR = os.path.join(REPO_ROOT, "meddet")
INDEX_PATH = os.path.join(REPO_ROOT, "bundle_index.json")

# Where the released zips are downloaded from (a GitHub release of the collection's repository).
# distribution code: it fetches bundles, a bundle never runs it
NOT_VENDORED = frozenset({"hub.py"})
DEFAULT_BASE_URL = "https://github.com/meddet/meddet/releases/download/bundles"
BASE_URL_ENV = "MEDDET_BUNDLE_BASE_URL"

ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip header can hold
ZIP_FILE_MODE = 0o100644  # regular file, rw-r--r--
ZIP_COMPRESS_LEVEL = 9
NEVER_PACKED_FOLDERS = ("models", "eval")  # trained weights, downloaded checkpoints, evaluation outputs
# one version grammar for writing and reading the index: the package's and the downloader's
_ENTRY = hub.INDEX_ENTRY


def zip_name(name: str, version: str) -> str:
    return f"{name}_v{version}.zip"


def read_metadata(bundle_path: str) -> dict:
    path = os.path.join(bundle_path, "configs", "metadata.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{bundle_path}: no configs/metadata.json; not a bundle")
    with open(path) as f:
        metadata = json.load(f)
    version_key(metadata.get("version", ""))  # fail early, naming the file, on a missing or odd version
    return metadata


def large_files(bundle_path: str) -> set[str]:
    """Bundle-relative paths (forward slashes) listed in the bundle's `large_files.yml`."""
    path = os.path.join(bundle_path, "large_files.yml")
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        content = yaml.safe_load(f) or {}
    listed = set()
    for item in content.get("large_files", []):
        if "path" not in item:
            raise ValueError(f"{path}: entry {item} has no 'path'")
        listed.add(os.path.normpath(item["path"]).replace(os.sep, "/"))
    return listed


def _skipped(relative: str) -> bool:
    parts = relative.split("/")
    return (any(part.startswith(".") or part == "__pycache__" for part in parts)
            or relative.endswith((".pyc", ".pyo")))


def _files_under(folder: str) -> list[str]:
    """Folder-relative paths (forward slashes) of every file under `folder`, hidden/compiled ones left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for file in files:
            relative = os.path.relpath(os.path.join(root, file), folder).replace(os.sep, "/")
            if not _skipped(relative):
                found.append(relative)
    return found


def bundle_members(bundle_path: str, meddet_dir: str = MEDDET_DIR) -> list[tuple[str, str]]:
    """Sorted (archive member name, source file) pairs of one bundle's zip."""
    name = os.path.basename(os.path.normpath(bundle_path))
    excluded = large_files(bundle_path)
    members = []
    for relative in _files_under(bundle_path):
        if relative.split("/")[0] in NEVER_PACKED_FOLDERS or relative in excluded:
            continue
        if relative == "meddet" or relative.startswith("meddet/"):
            raise ValueError(f"{bundle_path}: holds its own meddet/ folder; the packaged copy would clash with it")
        members.append((f"{name}/{relative}", os.path.join(bundle_path, relative)))
    if not os.path.isfile(os.path.join(meddet_dir, "__init__.py")):
        raise FileNotFoundError(f"{meddet_dir}: not the meddet package (no __init__.py)")
    for relative in _files_under(meddet_dir):
        if relative.endswith(".py") and relative not in NOT_VENDORED:
            members.append((f"{name}/meddet/{relative}", os.path.join(meddet_dir, relative)))
    for member, source in members:
        if os.path.islink(source):
            raise ValueError(f"{source}: symbolic links are not packed; replace it by the file it points to")
    return sorted(members)


def zip_bytes(members: list[tuple[str, str]]) -> bytes:
    """The zip of `members` with fixed timestamps, permissions, order and compression."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, source in sorted(members):
            info = zipfile.ZipInfo(member, date_time=ZIP_DATE_TIME)
            info.create_system = 3  # Unix, so that external_attr carries the file mode on every platform
            info.external_attr = ZIP_FILE_MODE << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(source, "rb") as f:
                archive.writestr(info, f.read(), compresslevel=ZIP_COMPRESS_LEVEL)
    return buffer.getvalue()


def package_bundle(bundle_path: str, out_dir: str, meddet_dir: str = MEDDET_DIR) -> dict:
    """Write `<out_dir>/<name>_v<version>.zip`; return its name, version, path, sha256 and index section."""
    name = os.path.basename(os.path.normpath(bundle_path))
    metadata = read_metadata(bundle_path)
    details = metadata.get("meddet", {})
    missing = [key for key in ("kind", "family", "detector", "initialisation") if key not in details]
    if missing or "name" not in metadata:
        raise ValueError(f"{bundle_path}/configs/metadata.json: missing {missing or ['name']} "
                         "(the index lists kind, family, detector, initialisation and the display name)")
    data = zip_bytes(bundle_members(bundle_path, meddet_dir))
    path = os.path.join(out_dir, zip_name(name, metadata["version"]))
    with open(path, "wb") as f:
        f.write(data)
    section = {"latest_version": metadata["version"], "kind": details["kind"], "family": details["family"],
               "detector": details["detector"],
               "initialisation": details["initialisation"], "description": metadata["name"]}
    return {"name": name, "version": metadata["version"], "path": path, "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data), "section": section}


def bundle_paths(bundles_dir: str = BUNDLES_DIR) -> list[str]:
    """Every bundle folder (one holding configs/metadata.json) under `bundles_dir`, sorted by name."""
    if not os.path.isdir(bundles_dir):
        raise FileNotFoundError(f"{bundles_dir}: no bundles folder")
    paths = [os.path.join(bundles_dir, d) for d in sorted(os.listdir(bundles_dir))
             if os.path.isfile(os.path.join(bundles_dir, d, "configs", "metadata.json"))]
    if not paths:
        raise FileNotFoundError(f"{bundles_dir}: holds no bundle (no */configs/metadata.json)")
    return paths


def load_index(path: str | None) -> dict:
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        index = json.load(f)
    if not isinstance(index, dict):
        raise ValueError(f"{path}: a bundle index is a JSON object")
    return index


def versioned_entries(index: dict) -> dict[str, tuple[str, str]]:
    """Index key -> (bundle name, version) for every `<name>_v<version>` entry."""
    entries = {}
    for key in index:
        match = _ENTRY.match(key)
        if match:
            entries[key] = (match["name"], match["version"])
    return entries


def merged_index(previous: dict, packaged: list[dict], base_url: str) -> dict:
    """`previous` with the packaged versions' entries (re)written and the bundles section brought up to date."""
    base_url = base_url.rstrip("/")
    entries = {key: previous[key] for key in versioned_entries(previous)}
    sections = {name: dict(section) for name, section in previous.get("bundles", {}).items()}
    for item in packaged:
        key = f"{item['name']}_v{item['version']}"
        entries[key] = {"checksum": item["sha256"], "source": f"{base_url}/{zip_name(item['name'], item['version'])}",
                        "size": item["size"]}
        sections[item["name"]] = dict(item["section"])
    parsed = versioned_entries(entries)
    for name, section in sections.items():
        versions = [version for entry_name, version in parsed.values() if entry_name == name]
        if versions:  # an older version packaged again must not hide a newer one already released
            section["latest_version"] = max(versions, key=version_key)
    ordered = sorted(entries, key=lambda key: (parsed[key][0], version_key(parsed[key][1])))
    return {"bundles": {name: sections[name] for name in sorted(sections)}, **{key: entries[key] for key in ordered}}


def write_index(index: dict, path: str) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(index, indent=4) + "\n")


def package(out_dir: str, base_url: str | None = None, index: str | None = INDEX_PATH,
            bundles_dir: str = BUNDLES_DIR, meddet_dir: str = MEDDET_DIR) -> dict:
    """Zip every bundle into `out_dir`, write `<out_dir>/bundle_index.json` (and update `index`); return it."""
    base_url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    os.makedirs(out_dir, exist_ok=True)
    previous = load_index(index)
    packaged = [package_bundle(path, out_dir, meddet_dir) for path in bundle_paths(bundles_dir)]
    for item in packaged:
        old = previous.get(f"{item['name']}_v{item['version']}")
        if old and old.get("checksum") != item["sha256"]:
            print(f"note: {item['name']} v{item['version']} changed since it was indexed; its entry is rewritten "
                  "(bump the version if that version was already released)")
    result = merged_index(previous, packaged, base_url)
    write_index(result, os.path.join(out_dir, "bundle_index.json"))
    if index:
        write_index(result, index)
    return result


def check_index(index: str = INDEX_PATH, bundles_dir: str = BUNDLES_DIR, meddet_dir: str = MEDDET_DIR) -> list[str]:
    """Problems of the committed index against freshly packed bundles (empty when everything matches)."""
    committed = load_index(index)
    if not committed:
        return [f"{index}: missing or empty; run `python tools/package.py --out_dir DIR` to create it"]
    with tempfile.TemporaryDirectory() as scratch:
        packaged = [package_bundle(path, scratch, meddet_dir) for path in bundle_paths(bundles_dir)]
    problems = []
    for item in packaged:
        name, version = item["name"], item["version"]
        entry = committed.get(f"{name}_v{version}")
        if entry is None:
            problems.append(f"{name}: version {version} is not in {os.path.basename(index)}; "
                            "run `python tools/package.py --out_dir DIR` to package and index it")
        elif entry.get("checksum") != item["sha256"]:
            problems.append(f"{name}: version {version} changed since it was indexed (index {entry.get('checksum')}, "
                            f"now {item['sha256']}); bump its version and changelog in tools/variants.py, regenerate "
                            "the bundles and run `python tools/package.py --out_dir DIR`")
        elif entry.get("size") != item["size"]:  # meddet.hub refuses a download larger than this
            problems.append(f"{name}: version {version} has size {entry.get('size')} in {os.path.basename(index)}, "
                            f"the zip has {item['size']} bytes; run `python tools/package.py --out_dir DIR`")
    expected = merged_index(committed, packaged, DEFAULT_BASE_URL)["bundles"]
    for item in packaged:
        if committed.get("bundles", {}).get(item["name"]) != expected[item["name"]]:
            problems.append(f"{item['name']}: its 'bundles' section in {os.path.basename(index)} is out of date "
                            f"(want {expected[item['name']]}); run `python tools/package.py --out_dir DIR`")
    return problems


def main(out_dir: str | None = None, base_url: str | None = None, check: bool = False, index: str = INDEX_PATH,
         bundles_dir: str = BUNDLES_DIR) -> None:
    if check:
        problems = check_index(index, bundles_dir)
        if problems:
            print("bundle index check failed:")
            print("\n".join(f"  {line}" for line in problems))
            sys.exit(1)
        print(f"{len(bundle_paths(bundles_dir))} bundles match {index}")
        return
    if not out_dir:
        raise SystemExit("give --out_dir DIR (where the zips and bundle_index.json go) or --check")
    result = package(out_dir, base_url, index or None, bundles_dir)
    count = len(versioned_entries(result))
    print(f"packaged {len(bundle_paths(bundles_dir))} bundles into {out_dir}; the index lists {count} versions"
          + (f" (also written to {index})" if index else ""))


if __name__ == "__main__":
    fire.Fire(main)
