"""The parameter counts the README, the bundle docs and the metadata print are those of the networks the bundles
build (full size, one class, the default 27 anchors / 12 queries)."""

from __future__ import annotations

import json
import os

import pytest
from monai.bundle import ConfigParser

from bundle_helpers import REPO, bundle_dir
from bundle_docs import PARAMETER_COUNTS
from variants import VARIANTS


def _count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize("family", sorted(PARAMETER_COUNTS))
def test_printed_parameter_counts_are_the_built_networks(family):
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir(f"{family}_scratch_detection"), "configs", "inference.json"))
    parser["device"] = "cpu"
    network = parser.get_parsed_content("network_def")
    measured = f"{_count(network):.2f} M (encoder {_count(network.encoder):.2f} M)"
    assert measured == PARAMETER_COUNTS[family]

    with open(os.path.join(REPO, "README.md")) as f:
        assert f"| {measured} |" in f.read()
    for variant in VARIANTS:
        if variant["family"] == family:
            with open(os.path.join(bundle_dir(variant["name"]), "configs", "metadata.json")) as f:
                metadata = json.load(f)
            assert measured in json.dumps(metadata), variant["name"]
            with open(os.path.join(bundle_dir(variant["name"]), "docs", "README.md")) as f:
                assert measured in f.read(), variant["name"]
