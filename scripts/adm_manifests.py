"""Write the key manifests of OpenAI's released consistency-model checkpoints (src/cmkit/nets/manifests/*.json).

For each checkpoint family (ImageNet-64; LSUN-256, bedroom and cat) the manifest records, as facts the tests
check ``cmkit.nets.adm.ADMUNet`` against: the released files, the network configuration, the parameter and
tensor counts, the ordered (key, shape) list of the openai ``.pt`` state dict, and the same tensors under the
diffusers ``UNet2DModel`` names of the ``openai/diffusers-*`` copies (mapped by ``cmkit.formats.adm_weights``,
listed in ``UNet2DModel``'s own state-dict order, which needs diffusers installed). Everything is built on the
meta device: no memory, no download.

    python scripts/adm_manifests.py                     # (re)write the manifests
    python scripts/adm_manifests.py --check             # only compare with the committed files
    python scripts/adm_manifests.py --check-openai DIR  # also build cm/unet.py's UNetModel from a
                                                        # consistency_models checkout and compare its keys
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

from cmkit.formats.adm_weights import diffusers_unet_config, openai_to_diffusers
from cmkit.nets.adm import ADMUNet

OUT = Path(__file__).resolve().parents[1] / "src" / "cmkit" / "nets" / "manifests"

# The launch commands' flags (scripts/launch.sh of openai/consistency_models) as ADMUNet arguments.
FAMILIES = {
    "adm_imagenet64": {
        "description": "ImageNet-64, class-conditional: --image_size 64 --num_channels 192 --num_res_blocks 3 "
        "--attention_resolutions 32,16,8 --num_head_channels 64 --class_cond True "
        "--use_scale_shift_norm True --resblock_updown True",
        "checkpoints": ["edm_imagenet64_ema.pt", "cd_imagenet64_l2.pt", "cd_imagenet64_lpips.pt", "ct_imagenet64.pt"],
        "diffusers_repos": [
            "openai/diffusers-cd_imagenet64_l2",
            "openai/diffusers-cd_imagenet64_lpips",
            "openai/diffusers-ct_imagenet64",
        ],
        "network": {
            "img_resolution": 64,
            "in_channels": 3,
            "model_channels": 192,
            "channel_mult": [1, 2, 3, 4],
            "num_blocks": 3,
            "attn_resolutions": [32, 16, 8],
            "num_classes": 1000,
            "head_channels": 64,
            "scale_shift": True,
            "resblock_updown": True,
        },
    },
    "adm_lsun256": {
        "description": "LSUN Bedroom-256 and Cat-256, unconditional: --image_size 256 --num_channels 256 "
        "--num_res_blocks 2 --attention_resolutions 32,16,8 --num_head_channels 64 "
        "--class_cond False --use_scale_shift_norm False --resblock_updown True",
        "checkpoints": [
            "edm_bedroom256_ema.pt",
            "cd_bedroom256_l2.pt",
            "cd_bedroom256_lpips.pt",
            "ct_bedroom256.pt",
            "edm_cat256_ema.pt",
            "cd_cat256_l2.pt",
            "cd_cat256_lpips.pt",
            "ct_cat256.pt",
        ],
        "diffusers_repos": [
            "openai/diffusers-cd_bedroom256_l2",
            "openai/diffusers-cd_bedroom256_lpips",
            "openai/diffusers-ct_bedroom256",
            "openai/diffusers-cd_cat256_l2",
            "openai/diffusers-cd_cat256_lpips",
            "openai/diffusers-ct_cat256",
        ],
        "network": {
            "img_resolution": 256,
            "in_channels": 3,
            "model_channels": 256,
            "channel_mult": [1, 1, 2, 2, 4, 4],
            "num_blocks": 2,
            "attn_resolutions": [32, 16, 8],
            "num_classes": 0,
            "head_channels": 64,
            "scale_shift": False,
            "resblock_updown": True,
        },
    },
}


def _shapes(state: dict[str, torch.Tensor]) -> list[list]:
    return [[k, list(v.shape)] for k, v in state.items()]


def manifest(name: str) -> dict:
    fam = FAMILIES[name]
    with torch.device("meta"):
        net = ADMUNet(**fam["network"])
    state = net.state_dict()
    mapped = openai_to_diffusers(state)
    config = diffusers_unet_config({**fam["network"], "dropout": 0.0})
    from diffusers import UNet2DModel

    with torch.device("meta"):
        order = list(UNet2DModel(**{k: v for k, v in config.items() if k != "_class_name"}).state_dict().items())
    theirs = {k: list(v.shape) for k, v in order}
    ours = {k: list(v.shape) for k, v in mapped.items()}
    if theirs != ours:
        raise SystemExit(
            f"{name}: the mapped keys differ from diffusers' UNet2DModel: "
            f"{sorted(set(theirs) ^ set(ours))[:5]} / shapes {[k for k in ours if theirs.get(k) != ours[k]][:5]}"
        )
    return {
        "family": name,
        "description": fam["description"],
        "checkpoints": fam["checkpoints"],
        "diffusers_repos": fam["diffusers_repos"],
        "network": fam["network"],
        "parameters": sum(p.numel() for p in net.parameters()),
        "tensors": len(state),
        "openai": _shapes(state),
        "diffusers_config": config,
        "diffusers": [[k, theirs[k]] for k, _ in order],
    }


def dumps(m: dict) -> str:
    """JSON with one (key, shape) pair per line: small diffs when a manifest changes."""
    head = {k: v for k, v in m.items() if k not in ("openai", "diffusers")}
    text = json.dumps(head, indent=1)[:-2]
    for part in ("openai", "diffusers"):
        rows = ",\n".join(f"  {json.dumps(row)}" for row in m[part])
        text += f',\n "{part}": [\n{rows}\n ]'
    return text + "\n}\n"


def openai_unet_keys(checkout: Path, network: dict) -> list[list]:
    """(key, shape) of ``cm.unet.UNetModel`` from a consistency_models checkout, built as ``create_model`` does
    for the launch flags (flash attention's modules stubbed when flash_attn/einops are not installed; they hold
    no parameters)."""
    for mod, attrs in (
        ("einops", {"rearrange": None}),
        ("flash_attn", {}),
        ("flash_attn.flash_attention", {"FlashAttention": lambda **kw: torch.nn.Identity()}),
    ):
        try:
            __import__(mod)
        except ImportError:
            sys.modules[mod] = types.SimpleNamespace(**attrs)  # type: ignore[assignment]
    sys.path.insert(0, str(checkout))
    from cm.unet import UNetModel

    side = network["img_resolution"]
    with torch.device("meta"):
        net = UNetModel(
            image_size=side,
            in_channels=3,
            model_channels=network["model_channels"],
            out_channels=3,
            num_res_blocks=network["num_blocks"],
            attention_resolutions=tuple(side // r for r in network["attn_resolutions"]),
            dropout=0.0,
            channel_mult=tuple(network["channel_mult"]),
            num_classes=network["num_classes"] or None,
            num_head_channels=network["head_channels"],
            use_scale_shift_norm=network["scale_shift"],
            resblock_updown=network["resblock_updown"],
        )
    return _shapes(net.state_dict())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed manifests, write nothing")
    ap.add_argument(
        "--check-openai",
        type=Path,
        metavar="DIR",
        help="a consistency_models checkout: compare cm/unet.py's keys and shapes too",
    )
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    ok = True
    for name in FAMILIES:
        m = manifest(name)
        path = OUT / f"{name}.json"
        if args.check_openai:
            ref = openai_unet_keys(args.check_openai, m["network"])
            same = ref == m["openai"]
            ok &= same
            print(
                f"{name}: cm/unet.py UNetModel {'matches' if same else 'DIFFERS from'} the manifest "
                f"({len(ref)} tensors)"
            )
        if args.check:
            same = path.is_file() and json.loads(path.read_text()) == json.loads(dumps(m))
            ok &= same
            print(f"{name}: {'up to date' if same else 'differs from ' + str(path)}")
        else:
            path.write_text(dumps(m))
            print(f"wrote {path}: {m['parameters']:,} parameters in {m['tensors']} tensors")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
