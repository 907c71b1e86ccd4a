"""The committed key manifests of OpenAI's released checkpoints (src/cmkit/nets/manifests, written by
scripts/adm_manifests.py): the full-size networks, built on the meta device, have exactly those keys and shapes
in the openai ``.pt`` order, their counts are the reference ones, and the diffusers names are UNet2DModel's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cmkit.nets
from cmkit.formats.adm_weights import adm_config_from_state, diffusers_unet_config, openai_to_diffusers
from cmkit.nets.adm import ADMUNet

MANIFESTS = Path(cmkit.nets.__file__).parent / "manifests"
COUNTS = {"adm_imagenet64": (295_899_267, 541), "adm_lsun256": (526_304_771, 566)}  # facts of the release


def _load(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_full_size_network_state_dict_equals_the_manifest(name):
    m = _load(name)
    with torch.device("meta"):
        net = ADMUNet(**m["network"])
    state = net.state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == m["openai"]  # keys, shapes and order
    params, tensors = COUNTS[name]
    assert m["parameters"] == params == sum(p.numel() for p in net.parameters())
    assert m["tensors"] == tensors == len(state)
    assert sum(torch.Size(s).numel() for _, s in m["openai"]) == params  # every tensor is a parameter
    # the shape read back from the keys is the manifest's network
    cfg = adm_config_from_state(state)
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in m["network"]} == m["network"]


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_diffusers_names_of_the_manifest_are_the_mapped_openai_keys(name):
    m = _load(name)
    with torch.device("meta"):
        state = ADMUNet(**m["network"]).state_dict()
    mapped = {k: list(v.shape) for k, v in openai_to_diffusers(state).items()}
    assert mapped == dict((k, s) for k, s in m["diffusers"]) and len(m["diffusers"]) == len(mapped)
    assert m["diffusers_config"] == json.loads(json.dumps(diffusers_unet_config({**m["network"], "dropout": 0.0})))
    assert len(m["diffusers"]) == m["tensors"] + 2 * sum(".qkv." in k for k, _ in m["openai"])  # qkv → q, k, v
    assert sum(torch.Size(s).numel() for _, s in m["diffusers"]) == m["parameters"]


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_diffusers_unet2dmodel_has_the_manifest_keys_in_order(name):
    diffusers = pytest.importorskip("diffusers")
    m = _load(name)
    config = {k: v for k, v in m["diffusers_config"].items() if k != "_class_name"}
    with torch.device("meta"):
        unet = diffusers.UNet2DModel(**config)
    assert [[k, list(v.shape)] for k, v in unet.state_dict().items()] == m["diffusers"]


def test_manifests_name_every_released_file():
    files = [f for name in COUNTS for f in _load(name)["checkpoints"]]
    repos = [r for name in COUNTS for r in _load(name)["diffusers_repos"]]
    assert len(files) == 12 and len(set(files)) == 12  # EDM, CD-l2, CD-LPIPS, CT × ImageNet-64, bedroom, cat
    assert len(repos) == 9 and all(r.startswith("openai/diffusers-") for r in repos)  # no EDM teachers there
