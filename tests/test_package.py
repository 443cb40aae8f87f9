import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from loopback_server import serve_folder

import package

from meddet import hub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRATCH = "retinaunet_resencl_scratch_detection"
PRETRAINED = "retinaunet_resencl_mae_detection"  # has a large_files.yml
BASE_URL = "https://example.org/meddet/bundles"


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _repo_meddet_sources() -> set[str]:
    found = set()
    for root, dirs, files in os.walk(os.path.join(REPO, "meddet")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found |= {os.path.relpath(os.path.join(root, f), os.path.join(REPO, "meddet")).replace(os.sep, "/")
                  for f in files if f.endswith(".py")}
    return found


def _copy_bundles(tmp_path, names) -> str:
    bundles = tmp_path / "bundles"
    for name in names:
        shutil.copytree(os.path.join(REPO, "bundles", name), bundles / name,
                        ignore=shutil.ignore_patterns("models", "eval"))
    return str(bundles)


def _set_version(bundles_dir: str, name: str, version: str) -> None:
    path = os.path.join(bundles_dir, name, "configs", "metadata.json")
    with open(path) as f:
        metadata = json.load(f)
    metadata["version"] = version
    metadata["changelog"] = {version: "test release", **metadata["changelog"]}
    with open(path, "w") as f:
        json.dump(metadata, f, indent=4)


def _version(name: str) -> str:
    with open(os.path.join(REPO, "bundles", name, "configs", "metadata.json")) as f:
        return json.load(f)["version"]


def test_packaging_twice_gives_identical_bytes(tmp_path):
    first = package.package(str(tmp_path / "a"), BASE_URL, index=None)
    second = package.package(str(tmp_path / "b"), BASE_URL, index=None)
    assert first == second
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and len(names) == 17  # 16 zips + the index
    for file in names:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_the_index_lists_every_bundle_with_the_zip_checksum(tmp_path):
    out = tmp_path / "dist"
    index = package.package(str(out), BASE_URL + "/", index=None)
    with open(out / "bundle_index.json") as f:
        assert json.load(f) == index
    bundles = package.bundle_paths()
    assert set(index["bundles"]) == {os.path.basename(p) for p in bundles}
    for path in bundles:
        name = os.path.basename(path)
        with open(os.path.join(path, "configs", "metadata.json")) as f:
            metadata = json.load(f)
        zip_name = f"{name}_v{metadata['version']}.zip"
        entry = index[f"{name}_v{metadata['version']}"]
        assert entry == {"checksum": hashlib.sha256((out / zip_name).read_bytes()).hexdigest(),
                         "source": f"{BASE_URL}/{zip_name}", "size": (out / zip_name).stat().st_size}
        assert index["bundles"][name] == {
            "latest_version": metadata["version"], "kind": metadata["meddet"]["kind"],
            "family": metadata["meddet"]["family"],
            "detector": metadata["meddet"]["detector"], "initialisation": metadata["meddet"]["initialisation"],
            "description": metadata["name"]}


def test_zips_vendor_meddet_and_leave_out_weights_and_outputs(tmp_path):
    bundles_dir = _copy_bundles(tmp_path, [PRETRAINED])
    folder = os.path.join(bundles_dir, PRETRAINED)
    for relative in ("models/checkpoint_final.pth", "models/model.pt", "eval/metrics.json", "configs/.hidden",
                     "configs/__pycache__/x.pyc", "docs/extra.md"):
        os.makedirs(os.path.dirname(os.path.join(folder, relative)), exist_ok=True)
        with open(os.path.join(folder, relative), "w") as f:
            f.write("x")
    with open(os.path.join(folder, "large_files.yml"), "a") as f:  # a large file outside models/
        f.write('  - path: "docs/extra.md"\n    url: "https://example.org/extra.md"\n')
    package.package(str(tmp_path / "dist"), BASE_URL, index=None, bundles_dir=bundles_dir)
    with zipfile.ZipFile(tmp_path / "dist" / f"{PRETRAINED}_v{_version(PRETRAINED)}.zip") as archive:
        infos = archive.infolist()
    names = [info.filename for info in infos]
    assert names == sorted(names)
    assert all(name.startswith(f"{PRETRAINED}/") for name in names)
    inside = {name[len(PRETRAINED) + 1:] for name in names}
    assert not any(name.startswith(("models/", "eval/")) or "__pycache__" in name or "/." in name
                   for name in inside)
    assert "docs/extra.md" not in inside
    assert {"configs/metadata.json", "configs/train.json", "LICENSE", "large_files.yml", "docs/README.md"} <= inside
    # every module of the package except the downloader, which fetches bundles and is never run by one
    assert {name[len("meddet/"):] for name in inside if name.startswith("meddet/")} == _repo_meddet_sources() - {
        "hub.py"}
    for info in infos:
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.external_attr >> 16 == 0o100644
        assert info.compress_type == zipfile.ZIP_DEFLATED


def test_older_versions_stay_in_the_index_and_latest_is_numeric(tmp_path):
    bundles_dir = _copy_bundles(tmp_path, [SCRATCH])
    index_path = str(tmp_path / "bundle_index.json")
    for version in ("0.9.0", "0.10.0"):
        _set_version(bundles_dir, SCRATCH, version)
        package.package(str(tmp_path / "dist"), BASE_URL, index=index_path, bundles_dir=bundles_dir)
    _set_version(bundles_dir, SCRATCH, "0.2.0")  # re-packaging an older version must not lower the latest
    package.package(str(tmp_path / "dist"), BASE_URL, index=index_path, bundles_dir=bundles_dir)
    with open(index_path) as f:
        index = json.load(f)
    assert [key for key in index if key != "bundles"] == [f"{SCRATCH}_v0.2.0", f"{SCRATCH}_v0.9.0",
                                                          f"{SCRATCH}_v0.10.0"]
    assert index["bundles"][SCRATCH]["latest_version"] == "0.10.0"
    for version in ("0.2.0", "0.9.0", "0.10.0"):
        assert (tmp_path / "dist" / f"{SCRATCH}_v{version}.zip").is_file()


def test_check_fails_when_a_bundle_changes_without_a_version_bump(tmp_path):
    bundles_dir = _copy_bundles(tmp_path, [SCRATCH, PRETRAINED])
    index_path = str(tmp_path / "bundle_index.json")
    package.package(str(tmp_path / "dist"), BASE_URL, index=index_path, bundles_dir=bundles_dir)
    assert package.check_index(index_path, bundles_dir) == []

    with open(os.path.join(bundles_dir, SCRATCH, "docs", "README.md"), "a") as f:
        f.write("\nchanged\n")
    problems = package.check_index(index_path, bundles_dir)
    current = _version(SCRATCH)
    assert len(problems) == 1 and problems[0].startswith(f"{SCRATCH}: version {current} changed since it was indexed")

    command = [sys.executable, os.path.join(REPO, "tools", "package.py"), "--check", "--index", index_path,
               "--bundles_dir", bundles_dir]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and f"{SCRATCH}: version {current} changed" in result.stdout

    _set_version(bundles_dir, SCRATCH, "0.99.0")
    problems = package.check_index(index_path, bundles_dir)
    assert problems[0] == (f"{SCRATCH}: version 0.99.0 is not in bundle_index.json; run "
                           "`python tools/package.py --out_dir DIR` to package and index it")

    package.package(str(tmp_path / "dist"), BASE_URL, index=index_path, bundles_dir=bundles_dir)
    assert package.check_index(index_path, bundles_dir) == []
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_older_entries_without_size_are_kept_as_they_are(tmp_path):
    bundles_dir = _copy_bundles(tmp_path, [SCRATCH])
    index_path = str(tmp_path / "bundle_index.json")
    old = {"checksum": "ab" * 32, "source": f"{BASE_URL}/{SCRATCH}_v0.0.1.zip"}  # indexed before "size" existed
    with open(index_path, "w") as f:
        json.dump({f"{SCRATCH}_v0.0.1": old}, f)
    index = package.package(str(tmp_path / "dist"), BASE_URL, index=index_path, bundles_dir=bundles_dir)
    assert index[f"{SCRATCH}_v0.0.1"] == old
    current = f"{SCRATCH}_v{_version(SCRATCH)}"
    assert index[current]["size"] == (tmp_path / "dist" / f"{current}.zip").stat().st_size
    assert package.check_index(index_path, bundles_dir) == []  # an older entry without size is valid


def test_check_fails_when_the_current_entry_lacks_its_size(tmp_path):
    bundles_dir = _copy_bundles(tmp_path, [SCRATCH])
    index_path = str(tmp_path / "bundle_index.json")
    package.package(str(tmp_path / "dist"), BASE_URL, index=index_path, bundles_dir=bundles_dir)
    with open(index_path) as f:
        index = json.load(f)
    current = f"{SCRATCH}_v{_version(SCRATCH)}"
    size = index[current].pop("size")
    package.write_index(index, index_path)
    assert package.check_index(index_path, bundles_dir) == [
        f"{SCRATCH}: version {_version(SCRATCH)} has size None in bundle_index.json, the zip has {size} bytes; run "
        "`python tools/package.py --out_dir DIR`"]


def test_check_fails_when_the_vendored_meddet_changes(tmp_path):
    bundles_dir = _copy_bundles(tmp_path, [SCRATCH])
    meddet_dir = tmp_path / "meddet"
    shutil.copytree(os.path.join(REPO, "meddet"), meddet_dir, ignore=shutil.ignore_patterns("__pycache__"))
    index_path = str(tmp_path / "bundle_index.json")
    package.package(str(tmp_path / "dist"), BASE_URL, index=index_path, bundles_dir=bundles_dir,
                    meddet_dir=str(meddet_dir))
    assert package.check_index(index_path, bundles_dir, str(meddet_dir)) == []
    with open(meddet_dir / "data" / "boxes.py", "a") as f:
        f.write("\n# changed\n")
    assert package.check_index(index_path, bundles_dir, str(meddet_dir))[0].startswith(
        f"{SCRATCH}: version {_version(SCRATCH)} changed since it was indexed")


def test_committed_index_matches_the_bundles():
    """What CI runs: every bundle's current version is indexed with the checksum of its freshly packed zip."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "package.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_monai_bundle_download_accepts_the_zip(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    packed = package.package_bundle(os.path.join(REPO, "bundles", SCRATCH), str(served))
    target = tmp_path / "downloaded"
    with serve_folder(served) as url:
        result = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "download", "--name", SCRATCH, "--version", packed["version"],
             "--url", f"{url}/{os.path.basename(packed['path'])}", "--bundle_dir", str(target), "--progress", "False"],
            capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 0, result.stdout + result.stderr
    with zipfile.ZipFile(packed["path"]) as archive:
        for name in archive.namelist():
            assert (target / name).read_bytes() == archive.read(name)
    assert (target / SCRATCH / "meddet" / "__init__.py").is_file()


@pytest.mark.slow
def test_downloaded_bundle_trains_and_infers_with_its_vendored_meddet(tmp_path):
    from bundle_helpers import easy_dataset_with_plans
    from quickstart import bundle_command

    served = tmp_path / "served"
    served.mkdir()
    packed = package.package_bundle(os.path.join(REPO, "bundles", SCRATCH), str(served))
    with open(served / "bundle_index.json", "w") as f:
        json.dump({f"{SCRATCH}_v{packed['version']}": {"checksum": packed["sha256"],
                                                      "source": os.path.basename(packed["path"])}}, f)
    with serve_folder(served) as url:
        bundle = hub.download(SCRATCH, index=f"{url}/bundle_index.json", bundle_dir=str(tmp_path / "bundles"))
    data_dir, datalist, plans = easy_dataset_with_plans(str(tmp_path), SCRATCH, num_training=4, num_validation=2)

    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env["OMP_NUM_THREADS"] = "1"

    def run(command, log_name):
        with open(tmp_path / log_name, "w") as log:
            result = subprocess.run(command, cwd=bundle, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=600)
        assert result.returncode == 0, (tmp_path / log_name).read_text()[-4000:]

    imported = subprocess.run([sys.executable, "-c", "import meddet; print(meddet.__file__)"], cwd=bundle, env=env,
                              capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == os.path.join(bundle, "meddet", "__init__.py")

    common = dict(dataset_dir=data_dir, data_list_file_path=datalist)
    smoke = ["configs/smoke.json", plans]
    run(bundle_command(bundle, ["configs/train.json", *smoke], max_epochs=1, epoch_length=2, val_interval=1,
                       warmup_iterations=1, **common), "train.log")
    assert os.path.isfile(os.path.join(bundle, "models", "model.pt"))
    run(bundle_command(bundle, ["configs/inference.json", *smoke], **common), "inference.log")
    with open(os.path.join(bundle, "eval", "predictions.json")) as f:
        predictions = json.load(f)
    assert len(predictions) == 2 and all({"image", "box", "label", "label_scores"} <= set(p) for p in predictions)
    # the runs compiled the vendored copy: it is what the bundle imported
    assert os.path.isdir(os.path.join(bundle, "meddet", "networks", "__pycache__"))
