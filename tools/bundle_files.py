"""Files every bundle of the collection shares, detection and pre-training alike: the pinned versions and the
metadata entries built on them, `configs/logging.conf`, the licence notice and the `large_files.yml` manifest."""

from __future__ import annotations

import meddet
from variants import HF

MEDDET_REQUIREMENT = meddet.__version__
MONAI_VERSION = "1.6.1"
PYTORCH_VERSION = "2.14.1"
NUMPY_VERSION = "2.3.5"


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=logging.StreamHandler
level=INFO
formatter=fullFormatter
args=()

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

APACHE_NOTICE = """Copyright (c) {year} the meddet authors

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this bundle except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.
{weights_note}"""


def metadata_common(variant: dict) -> dict:
    """Metadata entries every bundle of the collection shares (versions, packages, authorship, intended use)."""
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": variant["version"],
        "changelog": dict(sorted(variant["changelog"].items(), key=lambda kv: meddet.version_key(kv[0]), reverse=True)),
        "monai_version": MONAI_VERSION,
        "pytorch_version": PYTORCH_VERSION,
        "numpy_version": NUMPY_VERSION,
        "required_packages_version": {
            "meddet": MEDDET_REQUIREMENT,
            "nibabel": "5.4.2",
            "itk": "5.4.7",
            "pytorch-ignite": "0.5.5",
            "dynamic-network-architectures": "0.4.4",
            "scipy": "1.17.1",
            "tensorboard": "2.21.0",
            "matplotlib": "3.11.2",
        },
        "supported_apps": {},
        "authors": "meddet contributors",
        "copyright": "Copyright (c) meddet contributors",
        "data_type": "nibabel",
        "eval_metrics": {},
        "intended_use": "This is an example, not to be used for diagnostic purposes",
    }


def large_files(spec: dict | None) -> str | None:
    """`large_files.yml` for a bundle whose encoder comes from the release `spec` (None: no such file)."""
    if spec is None:
        return None
    # no published checksum: the release lists none, and inventing one would make every download fail
    return (f"large_files:\n  - path: \"models/checkpoint_final.pth\"\n    url: \"{HF.format(repo=spec['repo'])}\"\n"
            f"    hash_val: \"\"\n    hash_type: \"\"\n")
