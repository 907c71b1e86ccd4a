import torch

from cmkit.nets.mlp import MLPNet
from cmkit.nets.unet import UNet
from cmkit.precond import Precond, cm_scalings, edm_scalings


def tiny_unet(**kw):
    return UNet(8, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1, **kw)


def randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_boundary_condition_exact_at_sigma_min():
    model = randomise(Precond(tiny_unet(), "cm"))
    x = torch.randn(4, 1, 8, 8) * 3
    out = model(x, torch.full((4,), 0.002))
    assert torch.equal(out, x)


def test_boundary_condition_under_bf16_autocast():
    model = randomise(Precond(tiny_unet(), "cm"))
    x = torch.randn(3, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, 0.002)
    assert out.dtype == torch.float32 and torch.equal(out, x)


def test_edm_model_does_not_satisfy_boundary_but_cm_scalings_do():
    sigma = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in = cm_scalings(sigma)
    assert c_skip[0] == 1 and c_out[0] == 0
    e_skip, e_out, e_in = edm_scalings(sigma)
    assert e_out[0] > 0
    # closed forms at σ = σ_d = 0.5: c_skip = 1/2, c_out = σ_d/√2, c_in = 1/(σ_d√2)
    assert torch.allclose(e_skip[1], torch.tensor(0.5)) and torch.allclose(e_out[1], torch.tensor(0.5 / 2**0.5))
    assert torch.allclose(e_in[1], torch.tensor(1 / (0.5 * 2**0.5)))
    assert torch.allclose(c_in, e_in)  # c_in is not shifted
    # c_out denominator uses σ, not σ - σ_min
    assert torch.allclose(c_out[2], (80 - 0.002) * 0.5 / torch.tensor(80.0**2 + 0.25).sqrt())


def test_class_conditional_requires_labels_and_uses_them():
    model = randomise(Precond(tiny_unet(num_classes=3), "edm"))
    x = torch.randn(2, 1, 8, 8)
    a = model(x, 1.0, class_labels=torch.tensor([0, 0]))
    b = model(x, 1.0, class_labels=torch.tensor([1, 2]))
    assert not torch.allclose(a, b)
    try:
        model(x, 1.0)
    except ValueError as e:
        assert "class_labels" in str(e)
    else:
        raise AssertionError("missing labels were accepted")


def test_fourier_embedding_and_mlp_shapes():
    net = MLPNet(1, 2, hidden=32, embedding="fourier", fourier_scale=0.02)
    out = Precond(net, "cm")(torch.randn(5, 2, 1, 1), torch.rand(5) + 0.1)
    assert out.shape == (5, 2, 1, 1)
