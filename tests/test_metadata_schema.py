"""Every bundle's metadata.json against the collection's schema (`tools/meta_schema.json`), through MONAI's
`verify_metadata`, which uses an existing `--filepath` as the schema instead of downloading the file named in
the metadata's `schema` field."""

import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest
from monai.bundle import scripts, verify_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = os.path.join(REPO, "tools", "meta_schema.json")
with open(SCHEMA, "rb") as _f:
    SCHEMA_SHA256 = hashlib.sha256(_f.read()).hexdigest()  # MONAI refuses an existing schema file with another hash
BUNDLES = sorted(d for d in os.listdir(os.path.join(REPO, "bundles"))
                 if os.path.isfile(os.path.join(REPO, "bundles", d, "configs", "metadata.json")))


def _metadata_path(name: str) -> str:
    return os.path.join(REPO, "bundles", name, "configs", "metadata.json")


@pytest.fixture(autouse=True)
def _no_schema_download(monkeypatch):
    """Fail loudly if MONAI would fetch the schema instead of using the local file."""
    original = scripts.download_url

    def local_only(url, filepath="", **kwargs):
        assert os.path.isfile(filepath), f"verify_metadata would download {url}"
        return original(url=url, filepath=filepath, **kwargs)

    monkeypatch.setattr(scripts, "download_url", local_only)


def test_the_collection_has_bundles():
    assert len(BUNDLES) == 16  # 14 detection + 2 pre-training bundles


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_metadata_follows_the_schema(name):
    verify_metadata(meta_file=_metadata_path(name), filepath=SCHEMA, hash_val=SCHEMA_SHA256, hash_type="sha256")


def test_the_command_line_verifies_against_the_local_schema():
    # a proxy that cannot be reached: any download attempt fails instead of reaching out
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata",
                             "--meta_file", _metadata_path("retinaunet_resencl_mae_detection"), "--filepath", SCHEMA,
                             "--hash_val", SCHEMA_SHA256, "--hash_type", "sha256"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "metadata is verified with no error" in result.stdout + result.stderr


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("required_packages_version"), "'required_packages_version' is a required property"),
    (lambda m: m["required_packages_version"].pop("meddet"), "'meddet' is a required property"),
    (lambda m: m.pop("changelog"), "'changelog' is a required property"),
    (lambda m: m.pop("authors"), "'authors' is a required property"),
    (lambda m: m["network_data_format"]["outputs"]["pred"].pop("channel_def"), "'channel_def' is a required property"),
    (lambda m: m["network_data_format"].pop("inputs"), "'inputs' is a required property"),
    (lambda m: m["network_data_format"]["inputs"]["image"].pop("num_channels"),
     "'num_channels' is a required property"),
    (lambda m: m.__setitem__("version", "latest"), "'latest' does not match"),
])
def test_metadata_missing_a_required_field_fails(tmp_path, change, message):
    with open(_metadata_path("retinaunet_resencl_scratch_detection")) as f:
        metadata = json.load(f)
    broken = copy.deepcopy(metadata)
    change(broken)
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=message):
        verify_metadata(meta_file=str(path), filepath=SCHEMA, hash_val=SCHEMA_SHA256, hash_type="sha256")
