"""Interoperability with diffusers (optional extra): decode parity, full-size key compatibility, loading
``save_pretrained`` output, and the pipeline-facing adapter. Skipped when diffusers is not installed."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from cmkit.decoder.config import DecoderConfig
from cmkit.decoder.decoder import ConsistencyDecoder
from cmkit.decoder.interop import DiffusersDecoderAdapter, from_diffusers
from cmkit.decoder.keys import check_keys
from cmkit.decoder.testing import randomize_, raw_latents
from cmkit.decoder.unet import DecoderUNet
from cmkit.decoder.weights import expected_shapes, load_weights, to_cmkit_names

TINY = DecoderConfig.tiny()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vae(seed: int = 0):
    """diffusers' ConsistencyDecoderVAE at cmkit's tiny decoder config (4 encoder levels: ×8 like SD)."""
    torch.manual_seed(seed)
    vae = diffusers.ConsistencyDecoderVAE(
        encoder_block_out_channels=(4, 4, 4, 4),
        encoder_layers_per_block=1,
        encoder_norm_num_groups=2,
        decoder_block_out_channels=TINY.block_out_channels,
        decoder_layers_per_block=TINY.layers_per_block,
        decoder_norm_num_groups=TINY.norm_num_groups,
    )
    randomize_(vae.decoder_unet, seed)
    return vae.eval()


def diffusers_decode(vae, z, seed):
    with torch.no_grad():
        return vae.decode(z, generator=torch.Generator().manual_seed(seed)).sample


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(1)


def test_decode_parity_with_diffusers(vae):
    """Same random weights, same generator, 2 steps, no clamp: cmkit == diffusers to 1e-5."""
    z = raw_latents(2, 5, 7, seed=3)
    ref = diffusers_decode(vae, z, seed=4)
    dec = from_diffusers(vae, channels_last=False)
    assert dec.config == TINY
    out = dec.decode(z, (1.0, 0.5), torch.Generator().manual_seed(4), clamp=False)
    assert out.shape == ref.shape == (2, 3, 40, 56)
    assert ref.abs().max() > 1  # the unclamped regime, where diffusers and OpenAI differ
    err = (out - ref).abs().max().item()
    print(f"parity: max |cmkit - diffusers| = {err:.3g} (NCHW)")
    assert err <= 1e-5
    err_cl = (
        (
            from_diffusers(vae, channels_last=True).decode(z, generator=torch.Generator().manual_seed(4), clamp=False)
            - ref
        )
        .abs()
        .max()
        .item()
    )
    print(f"parity: max |cmkit - diffusers| = {err_cl:.3g} (channels_last)")
    assert err_cl <= 1e-4
    # OpenAI's clamp changes only the unclamped regime: with it the result stays in [-1, 1]
    clamped = dec.decode(z, generator=torch.Generator().manual_seed(4))
    assert clamped.abs().max() <= 1 and (clamped - ref.clamp(-1, 1)).abs().max() > 0


def test_full_size_diffusers_state_dict_loads_without_missing_or_unexpected_keys():
    """The default ConsistencyDecoderVAE (= openai/consistency-decoder) on the meta device, fp16 and fp32."""
    with torch.device("meta"):
        full = diffusers.ConsistencyDecoderVAE()
    config = DecoderConfig.from_diffusers(dict(full.config))
    assert config == DecoderConfig()
    expected = expected_shapes(config)
    assert sum(torch.Size(s).numel() for s in expected.values()) == 621_277_702
    state = full.state_dict()
    for sd in (
        state,
        {k: v.half() for k, v in state.items()},
        {k: v for k, v in state.items() if k.startswith("decoder_unet.")},
    ):
        renamed, layout = to_cmkit_names(sd)
        assert layout == "diffusers"
        check_keys(renamed, expected, "full-size diffusers state dict")  # raises on any mismatch
        assert set(renamed) == set(expected)
    with torch.device("meta"):
        unet = DecoderUNet(config)
    unet.load_state_dict(renamed, strict=True, assign=True)  # torch's own strict check agrees


def test_load_diffusers_save_pretrained_fp32_and_fp16(tmp_path, vae):
    z = raw_latents(1, 4, 4, seed=5)
    ref = diffusers_decode(vae, z, seed=0)
    vae.save_pretrained(tmp_path / "fp32")
    dec = ConsistencyDecoder.from_pretrained(tmp_path / "fp32", channels_last=False)
    out = dec.decode(z, generator=torch.Generator().manual_seed(0), clamp=False)
    assert (out - ref).abs().max().item() <= 1e-5
    half = tiny_vae(1).half()
    half.save_pretrained(tmp_path / "fp16", variant="fp16")
    w = load_weights(tmp_path / "fp16")
    assert w.path.name == "diffusion_pytorch_model.fp16.safetensors" and w.config == TINY
    assert all(v.dtype == torch.float16 for v in w.state_dict.values())


def test_adapter_has_the_pipeline_decode_interface(vae):
    dec = from_diffusers(vae, channels_last=False)
    adapter = DiffusersDecoderAdapter(dec)
    z = raw_latents(1, 4, 4, seed=6)
    scaled = z * adapter.config.scaling_factor  # what a pipeline holds
    image = adapter.decode(
        scaled / adapter.config.scaling_factor, return_dict=False, generator=torch.Generator().manual_seed(2)
    )[0]
    assert torch.equal(image, dec.decode(z, generator=torch.Generator().manual_seed(2)))
    assert 2 ** (len(adapter.config.block_out_channels) - 1) == 8  # pipelines derive vae_scale_factor from this
    out = adapter.decode(z.half(), generator=torch.Generator().manual_seed(2), num_inference_steps=1)
    assert out.sample.dtype == torch.float16 and out.sample.shape == (1, 3, 32, 32)
