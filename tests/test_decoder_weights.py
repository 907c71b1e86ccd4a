"""Decoder weights: key mapping, diffusers safetensors, OpenAI TorchScript (read without running it, SHA-256),
cmkit's format and the converter, and clear errors for anything else."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import pytest
import torch

from cmkit.decoder.config import DecoderConfig
from cmkit.decoder.decoder import ConsistencyDecoder
from cmkit.decoder.keys import cmkit_to_openai, openai_to_cmkit
from cmkit.decoder.testing import (
    openai_module,
    random_decoder,
    raw_latents,
    write_diffusers_checkpoint,
    write_openai_torchscript,
)
from cmkit.decoder.unet import DecoderUNet
from cmkit.decoder.weights import convert_decoder, load_weights
from cmkit.errors import CmkitError
from cmkit.formats.torchscript import OPENAI_DECODER_SHA256, read_torch_zip, sha256_of

TINY = DecoderConfig.tiny()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """A tiny random decoder and its state dict (cmkit names)."""
    dec = random_decoder(TINY, seed=11)
    return dec, {k: v.clone() for k, v in dec.unet.state_dict().items()}


def assert_same_state(state, ref, atol=0.0):
    assert set(state) == set(ref)
    for k in ref:
        assert state[k].shape == ref[k].shape
        assert (state[k].float() - ref[k].float()).abs().max().item() <= atol, k


def test_openai_key_mapping_examples_and_round_trip():
    """The two worked examples of reference §2.4 and a bijection over all 621M-parameter keys."""
    assert openai_to_cmkit("blocks.down_1_conv_0.gn_1.g") == "down_blocks.1.resnets.0.norm1.weight"
    assert openai_to_cmkit("blocks.up_3_upsamp.f_2.w") == "up_blocks.0.upsamplers.0.conv2.weight"
    assert openai_to_cmkit("blocks.embed_time.emb") == "time_proj.weight"
    assert openai_to_cmkit("blocks.output.gn.g") == "conv_norm_out.weight"
    assert openai_to_cmkit("blocks.up_0_conv_3.f_s.b") == "up_blocks.3.resnets.3.conv_shortcut.bias"
    with torch.device("meta"):
        keys = list(DecoderUNet().state_dict())
    openai = [cmkit_to_openai(k) for k in keys]
    assert len(set(openai)) == len(keys)
    assert [openai_to_cmkit(k) for k in openai] == keys
    with pytest.raises(CmkitError, match="unexpected OpenAI decoder parameter"):
        openai_to_cmkit("blocks.down_0_conv_0.attn.w")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("with_encoder", [True, False])
def test_diffusers_vae_safetensors(tmp_path, tiny, dtype, with_encoder):
    dec, state = tiny
    path = write_diffusers_checkpoint(state, TINY, tmp_path, dtype=dtype, with_encoder=with_encoder)
    for where in (path, tmp_path):  # the file, or its directory
        w = load_weights(where)
        assert w.source_format == "diffusers" and w.config == TINY
        assert_same_state(w.state_dict, state, atol=0.0 if dtype == torch.float32 else 2e-3)


def test_diffusers_unet_only_file_with_unet_config(tmp_path, tiny):
    """williamberman/consistency-decoder/unet layout: un-prefixed keys + a UNet2DModel config.json."""
    from safetensors.torch import save_file

    dec, state = tiny
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    unet_cfg = {
        "_class_name": "UNet2DModel",
        "block_out_channels": list(TINY.block_out_channels),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "in_channels": 7,
        "out_channels": 6,
        "time_embedding_type": "learned",
        "resnet_time_scale_shift": "scale_shift",
        "add_attention": False,
        "num_train_timesteps": 1024,
        "down_block_types": ["ResnetDownsampleBlock2D"] * 4,
        "up_block_types": ["ResnetUpsampleBlock2D"] * 4,
    }
    (tmp_path / "config.json").write_text(json.dumps(unet_cfg))
    w = load_weights(tmp_path)
    assert w.config == TINY
    assert_same_state(w.state_dict, state)
    unet_cfg["time_embedding_type"] = "positional"
    (tmp_path / "config.json").write_text(json.dumps(unet_cfg))
    with pytest.raises(CmkitError, match="time_embedding_type='positional'.*'learned'"):
        load_weights(tmp_path)


def test_config_is_inferred_for_full_width_and_refused_for_tiny(tmp_path, tiny):
    _, state = tiny
    path = write_diffusers_checkpoint(state, TINY, tmp_path, with_config=False)
    with pytest.raises(CmkitError, match="need a config.json"):
        load_weights(path)
    assert load_weights(path, config=TINY).config == TINY


def test_openai_torchscript_is_read_without_running_it(tmp_path, tiny):
    """A real torch.jit.script archive named like decoder.pt whose forward pins cuda:0 (no GPU here)."""
    dec, state = tiny
    path = write_openai_torchscript(state, tmp_path / "decoder.pt")
    tensors, is_script = read_torch_zip(path)
    assert is_script and "blocks.down_0_conv_0.gn_1.g" in tensors
    w = load_weights(path, config=TINY, verify=False)
    assert w.source_format == "openai-torchscript"
    assert_same_state(w.state_dict, state)
    # the hash check: OpenAI's release hash by default, any given one on request
    with pytest.raises(CmkitError, match=r"SHA-256 .* does not match .*c9cebd3132dd9c42.*--no-verify"):
        load_weights(path, config=TINY)
    ok = load_weights(path, config=TINY, expected_sha256=sha256_of(path))
    assert_same_state(ok.state_dict, state)
    # and the decoder built from it decodes like the original
    loaded = ConsistencyDecoder.from_weights(w, channels_last=False)
    z = raw_latents(1, 4, 4)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(loaded.decode(z, generator=g()), dec.decode(z, generator=g()))


def test_openai_time_table_stored_as_graph_constant(tmp_path, tiny):
    """If the 1024×320 table is not an attribute (reference §1.2: "stored separately"), the lone constant is used."""
    _, state = tiny
    table = state["time_proj.weight"]
    module = openai_module({k: v for k, v in state.items() if k != "time_proj.weight"})

    class WithConstant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module.blocks

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.embedding(t, table)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(WithConstant(), torch.tensor([3]), check_trace=False)
    traced.save(str(tmp_path / "decoder.pt"))
    tensors, _ = read_torch_zip(tmp_path / "decoder.pt")
    assert any(k.startswith("CONSTANTS.") for k in tensors)
    tensors = {k.replace("inner.", "blocks.", 1): v for k, v in tensors.items()}
    from cmkit.decoder.weights import to_cmkit_names

    renamed, layout = to_cmkit_names(tensors)
    assert layout == "openai" and torch.equal(renamed["time_proj.weight"], table)


def test_torch_save_state_dicts_in_any_layout(tmp_path, tiny):
    _, state = tiny
    openai_state = {cmkit_to_openai(k): v for k, v in state.items()}
    for name, sd in [
        ("openai.pt", openai_state),
        ("cmkit.pt", state),
        ("vae.pt", {"decoder_unet." + k: v for k, v in state.items()}),
    ]:
        torch.save(sd, tmp_path / name)
        w = load_weights(tmp_path / name, config=TINY)
        assert w.source_format == "torch-state-dict"
        assert_same_state(w.state_dict, state)


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_that_run_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    torch.save({"x": Exploit()}, tmp_path / "evil.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CmkitError, match=r"refusing to load (posix|os|nt)\.system"):
        load_weights(tmp_path / "evil.pt", config=TINY)
    assert not marker.exists()


def test_cmkit_format_round_trip_and_converter(tmp_path, tiny):
    dec, state = tiny
    dec.save_pretrained(tmp_path / "cm")
    assert json.loads((tmp_path / "cm" / "config.json").read_text())["config"]["block_out_channels"] == [8, 16, 16, 16]
    for where in (tmp_path / "cm", tmp_path / "cm" / "model.safetensors", tmp_path / "cm" / "config.json"):
        w = load_weights(where)
        assert w.source_format == "cmkit" and w.config == TINY
        assert_same_state(w.state_dict, state)
    # converter: OpenAI TorchScript (checked against its own hash here) -> cmkit fp16 -> loads
    src = write_openai_torchscript(state, tmp_path / "decoder.pt")
    with pytest.raises(CmkitError, match="need a config.json"):
        convert_decoder(src, tmp_path / "out", verify=False)
    out = convert_decoder(src, tmp_path / "from_openai", verify=False, config=TINY)
    assert_same_state(load_weights(out).state_dict, state)
    diffusers_dir = write_diffusers_checkpoint(state, TINY, tmp_path / "diff", dtype=torch.float32).parent
    out = convert_decoder(diffusers_dir, tmp_path / "out", dtype=torch.float16)
    w = load_weights(out)
    assert w.config == TINY and next(iter(w.state_dict.values())).dtype == torch.float16
    assert_same_state(w.state_dict, state, atol=2e-3)
    assert json.loads((out / "config.json").read_text())["source"]["format"] == "diffusers"


def test_anything_else_is_a_clear_one_line_error(tmp_path, tiny):
    _, state = tiny
    expected = "expected a diffusers ConsistencyDecoderVAE"
    with pytest.raises(CmkitError, match="no such file"):
        load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    for bad in ("notes.txt", "img.png"):
        with pytest.raises(CmkitError, match=f"unrecognised file format; {expected}") as e:
            load_weights(tmp_path / bad)
        assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CmkitError, match="no model.safetensors"):
        load_weights(tmp_path / "empty")
    from safetensors.torch import save_file

    broken = {k: v for k, v in state.items() if k != "conv_out.bias"}
    broken["extra.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CmkitError, match=r"1 missing \(e.g. \['conv_out.bias'\]\); 1 unexpected"):
        load_weights(tmp_path / "broken.safetensors", config=TINY)
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "sd_vae.safetensors"))
    with pytest.raises(CmkitError, match="no consistency decoder weights"):
        load_weights(tmp_path / "sd_vae.safetensors")
    assert OPENAI_DECODER_SHA256 == "c9cebd3132dd9c42936d803e33424145a748843c8f716c0814838bdc8a2fe7cb"


def test_weights_that_would_decode_silently_wrong_are_refused(tmp_path, tiny):
    """As for denoisers: NaN or integer tensors (an all-black image otherwise), and metadata that is not JSON."""
    from safetensors.torch import save_file

    dec, state = tiny
    name = sorted(state)[0]
    for label, value in (("nan", state[name].clone().fill_(float("nan"))), ("int", state[name].long())):
        save_file({**state, name: value}, str(tmp_path / f"{label}.safetensors"))
        message = "non-finite values" if label == "nan" else "dtype torch.int64"
        for load in (
            lambda p: load_weights(p, config=TINY),
            lambda p: convert_decoder(p, tmp_path / f"out-{label}", config=TINY),
        ):
            with pytest.raises(CmkitError, match=f"tensor {name} has {message}"):
                load(tmp_path / f"{label}.safetensors")
    assert not (tmp_path / "out-nan").exists() and not (tmp_path / "out-int").exists()
    dec.save_pretrained(tmp_path / "cm")
    from safetensors.torch import load_file

    save_file(
        load_file(tmp_path / "cm" / "model.safetensors"),
        str(tmp_path / "meta.safetensors"),
        metadata={"format": "cmkit", "kind": "decoder", "config": "{not json"},
    )
    with pytest.raises(CmkitError, match="not JSON"):
        load_weights(tmp_path / "meta.safetensors")


def test_full_size_config_is_inferred_from_openai_and_diffusers_names():
    """The released files carry no cmkit config: decoder.pt alone, or a diffusers file without config.json."""
    from cmkit.decoder.weights import expected_shapes, infer_config, to_cmkit_names

    with torch.device("meta"):
        state = DecoderUNet().state_dict()
    openai_state = {cmkit_to_openai(k): v for k, v in state.items()}
    for raw in (openai_state, {"decoder_unet." + k: v.half() for k, v in state.items()}):
        renamed, _ = to_cmkit_names(raw)
        assert infer_config(renamed, "file") == DecoderConfig()
        assert {k: tuple(v.shape) for k, v in renamed.items()} == expected_shapes(DecoderConfig())


def _rezip(src, dst, compression=None, replace=None):
    """Copy the torch zip ``src`` member by member (optionally deflated, some members replaced) to ``dst``."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression or zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = (replace or {}).get(info.filename.split("/", 1)[1], None)
            zout.writestr(info.filename, zin.read(info.filename) if data is None else data)
    return dst


def test_crafted_archives_are_refused_before_anything_large_is_read(tmp_path, monkeypatch):
    """A zip bomb (storages that inflate far beyond the file), a member larger than its tensor, a tensor that views
    more elements than its storage holds, too large pickles or totals: one-line errors, nothing allocated."""
    import zipfile

    import cmkit.formats.torchscript as ts

    def refused(path, match):
        with pytest.raises(CmkitError, match=match) as e:
            read_torch_zip(path)
        assert "\n" not in str(e.value)

    # a bomb: 64 MiB of zeros deflate to ~65 kB; the pickle's sizes match, so only the expansion bound catches it
    torch.save({"w": torch.zeros(16 * 2**20)}, tmp_path / "big.pt")
    bomb = _rezip(tmp_path / "big.pt", tmp_path / "bomb.pt", zipfile.ZIP_DEFLATED)
    (tmp_path / "big.pt").unlink()
    assert os.path.getsize(bomb) < 2**20
    refused(bomb, r"storages declare more bytes than the reader allows \(at most 8× the file's size")
    # a member that declares more bytes than its tensor needs (the pickle says 4 floats)
    torch.save({"w": torch.ones(4)}, tmp_path / "small.pt")
    refused(
        _rezip(tmp_path / "small.pt", tmp_path / "long.pt", zipfile.ZIP_DEFLATED, {"data/0": bytes(2**20)}),
        "storage 0 declares 1048576 bytes but its tensor needs 16",
    )
    refused(
        _rezip(tmp_path / "small.pt", tmp_path / "short.pt", None, {"data/0": bytes(8)}),
        r"storage 0 is truncated \(8 < 16 bytes\)",
    )
    # a tiny storage viewed as a huge tensor (stride 0) would be allocated by the first copy
    torch.save({"w": torch.zeros(1).expand(10**9)}, tmp_path / "expand.pt")
    refused(tmp_path / "expand.pt", r"shape \(1000000000,\) views a storage of only 1 elements")
    # the absolute bounds (4 GiB of storages, 64 MiB of pickle), scaled down
    monkeypatch.setattr(ts, "MAX_STORAGE_BYTES", 8)
    refused(tmp_path / "small.pt", "storage 0 alone declares 16 bytes")
    monkeypatch.setattr(ts, "MAX_STORAGE_BYTES", 4 * 2**30)
    monkeypatch.setattr(ts, "MAX_PICKLE_BYTES", 16)
    refused(tmp_path / "small.pt", r"data.pkl declares \d+ bytes, more than a module pickle needs")


def test_storages_are_streamed_into_their_tensors_and_recompressed_archives_still_load(tmp_path, tiny, monkeypatch):
    import tracemalloc
    import zipfile

    import cmkit.formats.torchscript as ts

    _, state = tiny
    src = write_openai_torchscript(state, tmp_path / "decoder.pt")
    ref, _ = read_torch_zip(src)
    deflated = _rezip(src, tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)  # random weights: ratio ~1.1
    again, script = read_torch_zip(deflated)
    assert script and set(again) == set(ref) and all(torch.equal(again[k], ref[k]) for k in ref)
    sd = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5),
        "c": torch.randn(2).half(),
        "d": torch.tensor([True, False]),
        "e": torch.randn(4, 4)[:, :2],
        "f": torch.zeros(0),
        "g": torch.randn(3).to(torch.bfloat16),
    }
    torch.save(sd, tmp_path / "sd.pt")
    out, script = read_torch_zip(tmp_path / "sd.pt")
    assert not script and all(torch.equal(out[k], sd[k]) for k in sd)
    # a 16 MiB storage goes from the zip into its tensor in chunks: no whole-member bytes, no second copy
    big = torch.randn(4 * 2**20)
    torch.save({"w": big}, tmp_path / "big.pt")
    monkeypatch.setattr(ts, "_CHUNK", 2**20)
    tracemalloc.start()
    out, _ = read_torch_zip(tmp_path / "big.pt")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert torch.equal(out["w"], big) and peak < 4 * 2**20  # reading it whole, then copying it: 32 MiB


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("in_channels", "7", "in_channels is '7'; expected a positive integer"),
        ("norm_num_groups", 0, "norm_num_groups is 0"),
        ("latent_std", [1, 0, 1, 1], "positive finite numbers"),
        ("block_out_channels", "abc", "non-empty list"),
        ("norm_eps", float("nan"), "positive finite number"),
    ],
)
def test_a_damaged_decoder_config_is_one_line(field, value, message):
    """Each field is checked for its type first: no TypeError or ZeroDivisionError from the rules after it."""
    with pytest.raises(CmkitError, match=message):
        DecoderConfig.from_dict({**TINY.to_dict(), field: value})
