"""``cmkit decode`` / ``cmkit convert-decoder`` through ``add_cli`` on a plain argparse parser."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from cmkit.cli.decoder import add_cli
from cmkit.decoder.config import DecoderConfig
from cmkit.decoder.testing import random_decoder, raw_latents, write_openai_torchscript
from cmkit.decoder.weights import load_weights
from cmkit.errors import CmkitError

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cmkit")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("weights")
    dec = random_decoder(DecoderConfig.tiny(), seed=5)
    dec.save_pretrained(out)
    return out, dec


def test_decode_npy_to_png_matches_the_api(tmp_path, weights, capsys):
    wdir, dec = weights
    z = raw_latents(1, 4, 6, seed=1)
    np.save(tmp_path / "z.npy", z.numpy())
    assert (
        run(
            "decode",
            tmp_path / "z.npy",
            "--weights",
            wdir,
            "--out",
            tmp_path / "out.png",
            "--seed",
            "3",
            "--threads",
            "1",
        )
        == 0
    )
    img = np.asarray(Image.open(tmp_path / "out.png"))
    assert img.shape == (32, 48, 3) and img.dtype == np.uint8
    expected = dec.decode(z, (1.0, 0.5), torch.Generator().manual_seed(3))
    ref = ((expected[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1
    assert "t=[1008, 512]" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_decode_batch_other_formats_steps_tiles_dtype(tmp_path, weights, fmt, capsys):
    wdir, _ = weights
    z = raw_latents(2, 6, 6, seed=2)
    if fmt == "pt":
        torch.save({"latents": z}, tmp_path / "z.pt")
    else:
        from safetensors.torch import save_file

        save_file({"latent": z}, str(tmp_path / "z.safetensors"))
    rc = run(
        "decode",
        tmp_path / f"z.{fmt}",
        "--weights",
        wdir,
        "-o",
        tmp_path / "img.png",
        "--steps",
        "1",
        "--tile",
        "4",
        "--tile-overlap",
        "2",
        "--dtype",
        "bf16",
    )
    assert rc == 0
    for i in range(2):
        assert Image.open(tmp_path / f"img_{i}.png").size == (48, 48)
    assert "t=[1008]" in capsys.readouterr().out


def test_decode_user_errors(tmp_path, weights):
    wdir, _ = weights
    cases = {
        "3d.npy": (raw_latents(1, 4, 4)[0], r"4-D .*got 3-D \(4, 4, 4\)"),
        "rgb.npy": (torch.zeros(1, 3, 4, 4), r"takes 4-channel latents .*image"),
        "scaled.npy": (raw_latents(1, 16, 16) * 0.18215, r"already multiplied by 0.18215 .*--latents scaled"),
    }
    for name, (z, pattern) in cases.items():
        np.save(tmp_path / name, z.numpy())
        with pytest.raises(CmkitError, match=pattern) as e:
            run("decode", tmp_path / name, "--weights", wdir, "-o", tmp_path / "x.png")
        assert "\n" not in str(e.value)
    # the same scaled latents are accepted once declared
    assert (
        run(
            "decode",
            tmp_path / "scaled.npy",
            "--weights",
            wdir,
            "-o",
            tmp_path / "s.png",
            "--latents",
            "scaled",
            "--steps",
            "1",
        )
        == 0
    )
    np.save(tmp_path / "ok.npy", raw_latents(1, 4, 4).numpy())
    with pytest.raises(CmkitError, match="no such latent file"):
        run("decode", tmp_path / "missing.npy", "--weights", wdir, "-o", tmp_path / "x.png")
    with pytest.raises(CmkitError, match="no such file or directory; expected"):
        run("decode", tmp_path / "ok.npy", "--weights", tmp_path / "nowhere", "-o", tmp_path / "x.png")
    with pytest.raises(CmkitError, match="either --steps or --schedule"):
        run(
            "decode",
            tmp_path / "ok.npy",
            "--weights",
            wdir,
            "-o",
            tmp_path / "x.png",
            "--steps",
            "2",
            "--schedule",
            "1,0.5",
        )
    with pytest.raises(CmkitError, match="comma-separated fractions"):
        run("decode", tmp_path / "ok.npy", "--weights", wdir, "-o", tmp_path / "x.png", "--schedule", "1;0.5")
    with pytest.raises(CmkitError, match=r"\.png"):
        run("decode", tmp_path / "ok.npy", "--weights", wdir, "-o", tmp_path / "x.jpg")
    torch.save({"a": torch.zeros(1), "b": torch.zeros(1)}, tmp_path / "two.pt")
    with pytest.raises(CmkitError, match="holds 2 tensors"):
        run("decode", tmp_path / "two.pt", "--weights", wdir, "-o", tmp_path / "x.png")


def test_convert_decoder_command(tmp_path, weights, capsys):
    _, dec = weights
    src = write_openai_torchscript(dec.unet.state_dict(), tmp_path / "decoder.pt")
    (tmp_path / "config.json").write_text((weights[0] / "config.json").read_text())  # tiny: config beside it
    with pytest.raises(CmkitError, match="SHA-256"):
        run("convert-decoder", src, "-o", tmp_path / "out")
    # the old --output spelling still works
    assert (
        run("convert-decoder", src, "--output", tmp_path / "out", "--dtype", "fp16", "--no-verify", "--threads", "1")
        == 0
    )
    w = load_weights(tmp_path / "out")
    assert w.source_format == "cmkit" and w.state_dict["conv_in.weight"].dtype == torch.float16
    torch.testing.assert_close(w.state_dict["conv_in.weight"].float(), dec.unet.conv_in.weight, atol=1e-3, rtol=0)
    assert "model.safetensors" in capsys.readouterr().out
