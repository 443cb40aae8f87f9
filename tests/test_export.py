"""TorchScript export of every detector family with MONAI's own command, `monai.bundle ckpt_export`.

Per family: a temporary copy of the scratch bundle, its smoke-sized network with perturbed weights saved
as `models/model.pt`, then

    python -m monai.bundle ckpt_export --net_id export_network_def --filepath models/model.ts \
        --ckpt_file models/model.pt --config_file "['configs/inference.json','configs/smoke.json']" \
        --use_trace True --input_shape "[1, 1, 32, 32, 32]"

(`export_network_def` is given on the command line when the bundle does not define it). The exported
module must reproduce the eager network on inputs it was not traced with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from meddet.networks.export import (
    DEFORMABLE_DETR,
    RETINA_UNET,
    TupleOutputNetwork,
    network_outputs_to_tuple,
    tuple_to_network_outputs,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT_NETWORK_DEF = {"_target_": "meddet.networks.export.TupleOutputNetwork", "network": "@network_def"}
CONFIGS = ["configs/inference.json", "configs/smoke.json"]
# bundle -> (family, extra input shapes the trace must also serve besides the traced one)
FAMILIES = {
    "retinaunet_resencl_scratch_detection": (RETINA_UNET, [(2, 1, 64, 32, 48)]),
    "retinaunet_nndet_scratch_detection": (RETINA_UNET, [(2, 1, 64, 32, 48)]),
    # Deformable DETR's token grid is fixed by the traced shape: only the batch size may change
    "defdetr_resencl_scratch_detection": (DEFORMABLE_DETR, [(2, 1, 32, 32, 32)]),
}


def _parser(bundle_root: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([os.path.join(bundle_root, c) for c in CONFIGS])
    return parser


def _network(bundle_root: str) -> torch.nn.Module:
    return _parser(bundle_root).get_parsed_content("network_def", lazy=False).eval()


def export_command(bundle_root: str, input_shape) -> list[str]:
    """The `ckpt_export` command line, run from the bundle folder."""
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export",
        "--net_id", "export_network_def",
        "--filepath", "models/model.ts",
        "--ckpt_file", "models/model.pt",
        "--config_file", "[" + ",".join(f"'{c}'" for c in CONFIGS) + "]",
        "--use_trace", "True",
        "--input_shape", json.dumps(list(input_shape)),
    ]
    with open(os.path.join(bundle_root, "configs", "inference.json")) as f:
        if "export_network_def" not in json.load(f):
            command += ["--export_network_def", repr(EXPORT_NETWORK_DEF)]
    return command


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    name = request.param
    bundle_root = str(tmp_path_factory.mktemp("export") / name)
    shutil.copytree(os.path.join(REPO, "bundles", name), bundle_root)
    torch.manual_seed(0)
    network = _network(bundle_root)
    with torch.no_grad():  # every weight (also the zero-initialised heads) must reach the export
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    os.makedirs(os.path.join(bundle_root, "models"), exist_ok=True)
    torch.save(network.state_dict(), os.path.join(bundle_root, "models", "model.pt"))

    parser = _parser(bundle_root)
    input_shape = [1, int(parser["in_channels"]), *[int(s) for s in parser["patch_size"]]]
    command = export_command(bundle_root, input_shape)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=bundle_root, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return {"name": name, "root": bundle_root, "network": network, "input_shape": input_shape}


def test_exported_module_reproduces_the_eager_network(exported):
    torch.set_num_threads(1)
    family, other_shapes = FAMILIES[exported["name"]]
    extra_files = {"metadata.json": "", "inference.json": "", "smoke.json": ""}
    scripted = torch.jit.load(os.path.join(exported["root"], "models", "model.ts"), _extra_files=extra_files)
    assert json.loads(extra_files["metadata.json"])["version"]
    assert "network_def" in json.loads(extra_files["inference.json"])

    eager = _network(exported["root"])
    eager.load_state_dict(torch.load(os.path.join(exported["root"], "models", "model.pt"), weights_only=True))
    generator = torch.Generator().manual_seed(1)
    for shape in [tuple(exported["input_shape"]), *other_shapes]:
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = network_outputs_to_tuple(eager(x))
            actual = scripted(x)
        assert len(actual) == len(expected)
        for got, want in zip(actual, expected):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        rebuilt = tuple_to_network_outputs(actual, family)
        if family == RETINA_UNET:
            assert len(rebuilt["classification"]) == len(eager.detection_strides)
            assert "segmentation" not in rebuilt  # skipped in eval mode: nothing at inference reads it
        else:
            assert rebuilt["pred_boxes"].shape == (x.shape[0], eager.num_queries, 6)


def test_wrapper_loads_bare_and_prefixed_state_dicts():
    torch.manual_seed(0)
    parser = _parser(os.path.join(REPO, "bundles", "retinaunet_nndet_scratch_detection"))
    source = parser.get_parsed_content("network_def", lazy=False)
    wrapper = TupleOutputNetwork(parser.get_parsed_content("network_def", lazy=False))
    assert wrapper.family == RETINA_UNET and wrapper.detection_strides == tuple(source.detection_strides)
    wrapper.load_state_dict(source.state_dict())  # strict: the bare keys of models/model.pt
    for key, value in source.state_dict().items():
        assert torch.equal(wrapper.network.state_dict()[key], value)
    fresh = TupleOutputNetwork(parser.get_parsed_content("network_def", lazy=False))
    fresh.load_state_dict(wrapper.state_dict())  # its own, prefixed keys
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        for got, want in zip(fresh.eval()(x), network_outputs_to_tuple(source.eval()(x))):
            torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**source.state_dict(), "extra.weight": torch.zeros(1)})


def test_tuple_layouts_reject_malformed_outputs():
    maps = [torch.zeros(1)] * 4
    with pytest.raises(ValueError, match="2 \\* levels"):
        tuple_to_network_outputs(maps[:1], RETINA_UNET)
    assert "segmentation" in tuple_to_network_outputs(maps[:3], RETINA_UNET)
    assert "segmentation" not in tuple_to_network_outputs(maps, RETINA_UNET)
    with pytest.raises(ValueError, match="2 tensors"):
        tuple_to_network_outputs(maps[:3], DEFORMABLE_DETR)
    with pytest.raises(ValueError, match="family"):
        tuple_to_network_outputs(maps[:2], "yolo")
    with pytest.raises(ValueError, match="unknown output keys"):
        network_outputs_to_tuple({"logits": torch.zeros(1)})
    with pytest.raises(ValueError, match="box_regression maps"):
        network_outputs_to_tuple({"classification": maps[:2], "box_regression": maps[:1], "segmentation": maps[0]})
