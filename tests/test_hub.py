import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zipfile

import pytest

from loopback_server import serve_folder
from meddet import hub

import package

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    _write_index(served, {f"{NAME}_v{packed['version']}": {"checksum": packed["sha256"], "source": zip_file,
                                                          "size": packed["size"]}})
    bundle_dir = tmp_path / "bundles"
    with serve_folder(served) as url:
        path = hub.download(NAME, index=f"{url}/bundle_index.json", bundle_dir=str(bundle_dir))
    assert path == str(bundle_dir / NAME)
    assert os.listdir(bundle_dir) == [NAME]  # no temporary folder left behind
    with open(os.path.join(REPO, "bundles", NAME, "configs", "train.json"), "rb") as f:
        assert (bundle_dir / NAME / "configs" / "train.json").read_bytes() == f.read()
    with open(os.path.join(REPO, "meddet", "inference", "sliding_window.py"), "rb") as f:
        assert (bundle_dir / NAME / "meddet" / "inference" / "sliding_window.py").read_bytes() == f.read()
    assert not (bundle_dir / NAME / "meddet" / "hub.py").exists()  # the downloader is not vendored


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


def _patch_headers(path, member, file_size=None, crc=None) -> None:
    """Overwrite `member`'s uncompressed size and/or CRC-32 in its local and central directory headers (a lying zip)."""
    with zipfile.ZipFile(path) as archive:
        local, central = archive.getinfo(member).header_offset, archive.start_dir
    with open(path, "rb") as f:
        data = bytearray(f.read())
    name = member.encode()
    while (struct.unpack_from("<H", data, central + 28)[0] != len(name)
           or data[central + 46:central + 46 + len(name)] != name):
        central += 46 + sum(struct.unpack_from("<HHH", data, central + 28))  # next central directory record
    assert data[local:local + 4] == b"PK\x03\x04" and data[central:central + 4] == b"PK\x01\x02"
    for offset, crc_at, size_at in ((local, 14, 22), (central, 16, 24)):
        if file_size is not None:
            struct.pack_into("<I", data, offset + size_at, file_size)
        if crc is not None:
            struct.pack_into("<I", data, offset + crc_at, crc)
    with open(path, "wb") as f:
        f.write(data)


def _index_of(folder, archive, **entry) -> str:
    """An index listing `archive` as NAME v0.1.0 with its real checksum (plus `entry`'s fields)."""
    return _write_index(folder, {f"{NAME}_v0.1.0": {"checksum": _sha256(archive), "source": str(archive), **entry}})


def test_a_download_larger_than_the_indexed_size_stops_reading_and_is_refused(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    archive = _bundle_zip(served / "bundle.zip", extra=[(f"{NAME}/weights.bin", os.urandom(3 << 20), 0o100644)])
    actual = os.path.getsize(archive)
    read = {}
    real_open = hub._open

    class Counting:  # counts what is read from each location
        def __init__(self, location):
            self.location, self.stream = location, real_open(location)

        def read(self, n=-1):
            chunk = self.stream.read(n)
            read[self.location] = read.get(self.location, 0) + len(chunk)
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    monkeypatch.setattr(hub, "_open", Counting)
    index = _write_index(served, {f"{NAME}_v0.1.0": {"checksum": _sha256(archive), "source": "bundle.zip",
                                                     "size": 1000}})
    bundle_dir = tmp_path / "bundles"
    with serve_folder(served) as url:
        source = f"{url}/bundle.zip"
        with pytest.raises(hub.BundleDownloadError, match=rf"'{NAME}' v0\.1\.0 from {source}: the download is larger "
                                                          r"than 1000 bytes \(the index entry's size\); reading "
                                                          r"stopped at 1001 bytes"):
            hub.download(NAME, index=f"{url}/bundle_index.json", bundle_dir=str(bundle_dir))
    assert read[source] == 1001  # not the whole 3 MiB
    assert not bundle_dir.exists()
    index = _index_of(served, archive, size=actual + 10)  # a short download is named as such, not as a bad checksum
    with pytest.raises(hub.BundleDownloadError, match=rf"received {actual} bytes but the index says {actual + 10}"):
        hub.download(NAME, index=index, bundle_dir=str(bundle_dir))
    assert not bundle_dir.exists()


def test_an_entry_without_size_is_capped_by_max_archive_bytes(tmp_path, monkeypatch):
    archive = _bundle_zip(tmp_path / "bundle.zip")
    monkeypatch.setattr(hub, "MAX_ARCHIVE_BYTES", os.path.getsize(archive) - 1)
    with pytest.raises(hub.BundleDownloadError, match=r"larger than \d+ bytes \(MAX_ARCHIVE_BYTES, the index entry "
                                                      r"has no size\)"):
        hub.download(NAME, index=_index_of(tmp_path, archive), bundle_dir=str(tmp_path / "bundles"))
    assert not (tmp_path / "bundles").exists()
    monkeypatch.setattr(hub, "MAX_ARCHIVE_BYTES", os.path.getsize(archive))  # exactly at the limit is fine
    assert os.path.isdir(hub.download(NAME, index=_index_of(tmp_path, archive), bundle_dir=str(tmp_path / "bundles")))


@pytest.mark.parametrize("size", ["123", -1, 0, True, 1.5, None])
def test_a_size_that_is_not_a_byte_count_is_refused(tmp_path, size):
    archive = _bundle_zip(tmp_path / "bundle.zip")
    with pytest.raises(hub.BundleDownloadError, match=r"v0\.1\.0: the index entry's 'size' must be a positive "
                                                      r"number of bytes"):
        hub.download(NAME, index=_index_of(tmp_path, archive, size=size), bundle_dir=str(tmp_path / "bundles"))
    assert not (tmp_path / "bundles").exists()


def test_a_zip_bomb_is_refused_by_the_expansion_ratio(tmp_path):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{NAME}/configs/metadata.json", json.dumps({"version": "0.1.0"}))
        archive.writestr(f"{NAME}/zeros.bin", bytes(8 << 20))  # 8 MiB of zeros deflate to ~8 KiB
    size = os.path.getsize(tmp_path / "bomb.zip")
    assert size * hub.MAX_EXPANSION_RATIO < 8 << 20
    bundle_dir = tmp_path / "bundles"
    bundle_dir.mkdir()
    with pytest.raises(hub.BundleDownloadError, match=rf"refused the archive: it expands to more than "
                                                      rf"{size * hub.MAX_EXPANSION_RATIO} bytes \(reached at member "
                                                      rf"'{NAME}/zeros.bin'"):
        hub.download(NAME, index=_index_of(tmp_path, tmp_path / "bomb.zip", size=size), bundle_dir=str(bundle_dir))
    assert os.listdir(bundle_dir) == []


def test_the_extracted_total_is_capped_by_max_extracted_bytes(tmp_path, monkeypatch):
    archive = _bundle_zip(tmp_path / "bundle.zip", extra=[(f"{NAME}/a.bin", os.urandom(600), 0o100644),
                                                          (f"{NAME}/b.bin", os.urandom(600), 0o100644)])
    monkeypatch.setattr(hub, "MAX_EXTRACTED_BYTES", 1000)  # each member fits, both together do not
    with pytest.raises(hub.BundleDownloadError, match=rf"more than 1000 bytes \(reached at member '{NAME}/b.bin'"):
        hub.download(NAME, index=_index_of(tmp_path, archive), bundle_dir=str(tmp_path / "bundles"))
    assert not (tmp_path / "bundles").exists()


def test_a_member_whose_header_overstates_its_size_is_refused(tmp_path):
    member, content = f"{NAME}/configs/train.json", b'{"lr": 0.01}' * 50
    path = tmp_path / "lying.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{NAME}/configs/metadata.json", json.dumps({"version": "0.1.0"}))
        archive.writestr(member, content)
    _patch_headers(path, member, file_size=len(content) + 1000)
    with zipfile.ZipFile(path) as archive:  # the lie is real, and zipfile alone does not notice it
        assert archive.getinfo(member).file_size == len(content) + 1000
        assert archive.read(member) == content
    bundle_dir = tmp_path / "bundles"
    with pytest.raises(hub.BundleDownloadError, match=rf"refused the archive: member '{member}' holds {len(content)} "
                                                      rf"bytes but its header says {len(content) + 1000}"):
        hub.download(NAME, index=_index_of(tmp_path, path), bundle_dir=str(bundle_dir))
    assert not bundle_dir.exists()


def test_a_member_with_a_wrong_crc_is_refused(tmp_path):
    """A regression guard: zipfile refuses a wrong CRC-32 itself, and the copy checks it again."""
    member = f"{NAME}/configs/train.json"
    path = _bundle_zip(tmp_path / "lying.zip", extra=[(member, b"{}" * 100, 0o100644)])
    _patch_headers(path, member, crc=0x12345678)
    with pytest.raises(hub.BundleDownloadError, match=rf"refused the archive: .*CRC-32.*'{member}'|{member}.*CRC-32"):
        hub.download(NAME, index=_index_of(tmp_path, path), bundle_dir=str(tmp_path / "bundles"))
    assert not (tmp_path / "bundles").exists()


def _staging(bundle_dir, suffix, marker=None, age_s=0, name=NAME) -> str:
    path = bundle_dir / f".{name}.{suffix}"
    path.mkdir()
    (path / "partial.zip").write_bytes(b"partial")
    if marker is not None:
        (path / "pid").write_text(marker)
    if age_s:
        old = time.time() - age_s
        os.utime(path, (old, old))
    return path.name


def test_stale_staging_folders_of_the_bundle_are_removed_and_live_ones_kept(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host = socket.gethostname()
    bundle_dir = tmp_path / "bundles"
    bundle_dir.mkdir()
    removed = {_staging(bundle_dir, "dead0000", f"{finished.pid}\n{host}\n"),
               _staging(bundle_dir, "unmarked", age_s=2 * 3600),
               _staging(bundle_dir, "garbled0", "", age_s=2 * 3600)}  # killed while writing its marker
    kept = {_staging(bundle_dir, "live0000", f"{os.getpid()}\n{host}\n", age_s=10 * 3600),
            _staging(bundle_dir, "fresh000"),  # just created; its marker may not be written yet
            _staging(bundle_dir, "remote00", f"{finished.pid}\nanother-host\n"),  # liveness unknown there
            _staging(bundle_dir, "dead0001", f"{finished.pid}\n{host}\n", name="other_bundle"),
            ".not_a_staging_folder"}
    (bundle_dir / ".not_a_staging_folder").mkdir()
    archive = _bundle_zip(tmp_path / "bundle.zip")
    hub.download(NAME, index=_index_of(tmp_path, archive), bundle_dir=str(bundle_dir))
    assert set(os.listdir(bundle_dir)) == kept | {NAME}
    assert not removed & set(os.listdir(bundle_dir))


def test_the_staging_folder_names_its_owner_process(tmp_path, monkeypatch):
    markers = []
    real_fetch = hub._fetch

    def fetch(location, destination, *args):
        with open(os.path.join(os.path.dirname(destination), "pid")) as f:
            markers.append(f.read().split("\n")[:2])
        return real_fetch(location, destination, *args)

    monkeypatch.setattr(hub, "_fetch", fetch)
    archive = _bundle_zip(tmp_path / "bundle.zip")
    hub.download(NAME, index=_index_of(tmp_path, archive), bundle_dir=str(tmp_path / "bundles"))
    assert markers == [[str(os.getpid()), socket.gethostname()]]
    assert os.listdir(tmp_path / "bundles") == [NAME]


def test_versions_that_do_not_parse_are_errors(tmp_path):
    archive = _bundle_zip(tmp_path / "bundle.zip")
    entry = {"checksum": _sha256(archive), "source": archive}
    other = {f"{NAME}_vnext_detection_v0.1.0": entry}  # another bundle whose name starts with NAME_v
    malformed = _write_index(tmp_path, {f"{NAME}_v0.1.0": entry, f"{NAME}_v0.2.0-rc1": entry, **other})
    with pytest.raises(hub.BundleDownloadError, match=rf"the index is malformed: \['{NAME}_v0\.2\.0-rc1'\] carry a "
                                                      r"version that is not a dotted number"):
        hub.available_versions(hub.load_index(malformed), NAME)
    with pytest.raises(hub.BundleDownloadError, match=rf"malformed: \['{NAME}_v0\.2\.0-rc1'\].*"
                                                      rf"\(index {malformed}\)"):
        hub.download(NAME, index=malformed, bundle_dir=str(tmp_path / "bundles"))
    for version in ("0.2.0-rc1", "v0.1.0", "latest"):
        with pytest.raises(hub.BundleDownloadError, match=rf"'{NAME}': version '{version}' is not a dotted number "
                                                          r"such as 0\.1\.0 \(digits separated by dots"):
            hub.download(NAME, version=version, index=malformed, bundle_dir=str(tmp_path / "bundles"))
    assert not (tmp_path / "bundles").exists()
    clean = _write_index(tmp_path, {f"{NAME}_v0.1.0": entry, **other})
    assert hub.available_versions(hub.load_index(clean), NAME) == ["0.1.0"]
    assert os.path.isdir(hub.download(NAME, index=clean, bundle_dir=str(tmp_path / "bundles")))
