import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from loopback_server import serve_folder
from meddet import hub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import package  # noqa: E402

NAME = "retinaunet_resencl_scratch_detection"


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _bundle_zip(path, name=NAME, version="0.1.0", extra=()) -> str:
    """A minimal bundle zip: `<name>/configs/metadata.json` plus (member, bytes or ZipInfo-mode) extras."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/configs/metadata.json", json.dumps({"version": version}))
        for member, content, mode in extra:
            info = zipfile.ZipInfo(member)
            info.create_system = 3
            info.external_attr = mode << 16
            archive.writestr(info, content)
    return str(path)


def _write_index(folder, entries: dict) -> str:
    path = os.path.join(folder, "bundle_index.json")
    with open(path, "w") as f:
        json.dump({"bundles": {NAME: {"latest_version": "ignored"}}, **entries}, f)
    return path


def test_download_over_loopback_http_extracts_the_packaged_bundle(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    packed = package.package_bundle(os.path.join(REPO, "bundles", NAME), str(served))
    zip_file = os.path.basename(packed["path"])
    # relative source: resolved against the index URL
    _write_index(served, {f"{NAME}_v{packed['version']}": {"checksum": packed["sha256"], "source": zip_file}})
    bundle_dir = tmp_path / "bundles"
    with serve_folder(served) as url:
        path = hub.download(NAME, index=f"{url}/bundle_index.json", bundle_dir=str(bundle_dir))
    assert path == str(bundle_dir / NAME)
    assert os.listdir(bundle_dir) == [NAME]  # no temporary folder left behind
    with open(os.path.join(REPO, "bundles", NAME, "configs", "train.json"), "rb") as f:
        assert (bundle_dir / NAME / "configs" / "train.json").read_bytes() == f.read()
    with open(os.path.join(REPO, "meddet", "hub.py"), "rb") as f:
        assert (bundle_dir / NAME / "meddet" / "hub.py").read_bytes() == f.read()


def test_a_flipped_byte_is_refused_before_anything_is_extracted(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    archive = _bundle_zip(served / "bundle.zip")
    checksum = _sha256(archive)
    data = bytearray(open(archive, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(archive, "wb") as f:
        f.write(data)
    index = _write_index(served, {f"{NAME}_v0.1.0": {"checksum": checksum, "source": "bundle.zip"}})
    bundle_dir = tmp_path / "bundles"
    with serve_folder(served) as url:
        with pytest.raises(hub.BundleDownloadError, match=rf"{NAME}' v0\.1\.0 from http.*sha256"):
            hub.download(NAME, index=f"{url}/bundle_index.json", bundle_dir=str(bundle_dir))
    assert not bundle_dir.exists()
    with pytest.raises(hub.BundleDownloadError, match="sha256"):  # the same from a local index and path
        hub.download(NAME, index=index, bundle_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["served"]


@pytest.mark.parametrize("member, mode, reason", [
    (f"{NAME}/../escaped.txt", 0o100644, "would land outside"),
    ("/tmp/escaped.txt", 0o100644, "would land outside"),
    ("other_bundle/escaped.txt", 0o100644, "would land outside"),
    (f"{NAME}/configs/link", 0o120777, "is a link"),
])
def test_members_outside_the_bundle_folder_and_links_are_refused(tmp_path, member, mode, reason):
    archive = _bundle_zip(tmp_path / "crafted.zip", extra=[(member, b"../../escaped.txt", mode)])
    index = _write_index(tmp_path, {f"{NAME}_v0.1.0": {"checksum": _sha256(archive), "source": archive}})
    bundle_dir = tmp_path / "bundles"
    bundle_dir.mkdir()
    with pytest.raises(hub.BundleDownloadError, match=f"refused the archive: member '{member}' {reason}"):
        hub.download(NAME, index=index, bundle_dir=str(bundle_dir))
    assert os.listdir(bundle_dir) == []
    assert not (tmp_path / "escaped.txt").exists()


def test_the_latest_version_is_the_numerically_highest(tmp_path):
    entries = {}
    for version in ("0.9.0", "0.10.0", "0.2.0"):
        archive = _bundle_zip(tmp_path / f"{NAME}_v{version}.zip", version=version)
        entries[f"{NAME}_v{version}"] = {"checksum": _sha256(archive), "source": os.path.basename(archive)}
    index = _write_index(tmp_path, entries)
    assert hub.available_versions(hub.load_index(index), NAME) == ["0.2.0", "0.9.0", "0.10.0"]
    path = hub.download(NAME, index=index, bundle_dir=str(tmp_path / "latest"))
    with open(os.path.join(path, "configs", "metadata.json")) as f:
        assert json.load(f)["version"] == "0.10.0"
    path = hub.download(NAME, version="0.9.0", index=index, bundle_dir=str(tmp_path / "pinned"))
    with open(os.path.join(path, "configs", "metadata.json")) as f:
        assert json.load(f)["version"] == "0.9.0"
    with pytest.raises(hub.BundleDownloadError, match=r"no version 1\.0\.0.*0\.10\.0"):
        hub.download(NAME, version="1.0.0", index=index, bundle_dir=str(tmp_path / "missing"))
    with pytest.raises(hub.BundleDownloadError, match="'unknown_detection' is not in the index"):
        hub.download("unknown_detection", index=index, bundle_dir=str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()


def test_an_existing_bundle_folder_is_not_overwritten(tmp_path):
    archive = _bundle_zip(tmp_path / "bundle.zip")
    index = _write_index(tmp_path, {f"{NAME}_v0.1.0": {"checksum": _sha256(archive), "source": archive}})
    existing = tmp_path / "bundles" / NAME
    existing.mkdir(parents=True)
    (existing / "mine.txt").write_text("keep")
    with pytest.raises(hub.BundleDownloadError, match="already exists"):
        hub.download(NAME, index=index, bundle_dir=str(tmp_path / "bundles"))
    assert os.listdir(existing) == ["mine.txt"] and os.listdir(tmp_path / "bundles") == [NAME]


def test_an_unreachable_source_is_named_in_the_error(tmp_path):
    index = _write_index(tmp_path, {f"{NAME}_v0.1.0": {"checksum": "0" * 64, "source": "http://127.0.0.1:9/x.zip"}})
    with pytest.raises(hub.BundleDownloadError, match=r"v0\.1\.0 from http://127\.0\.0\.1:9/x\.zip: download failed"):
        hub.download(NAME, index=index, bundle_dir=str(tmp_path / "bundles"))
    assert not (tmp_path / "bundles").exists()


def test_command_line_download(tmp_path):
    archive = _bundle_zip(tmp_path / "bundle.zip")
    index = _write_index(tmp_path, {f"{NAME}_v0.1.0": {"checksum": _sha256(archive), "source": archive}})
    result = subprocess.run([sys.executable, "-m", "meddet.hub", "download", "--name", NAME, "--index", index,
                             "--bundle_dir", str(tmp_path / "bundles")], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "bundles" / NAME)
    assert (tmp_path / "bundles" / NAME / "configs" / "metadata.json").is_file()
