import pytest
import torch
from torch import nn

from cmkit.distances import default_huber_c, l1, l2, pseudo_huber
from cmkit.ema import make_copy
from cmkit.errors import CmkitError
from cmkit.losses.base import paired_passes
from cmkit.losses.cd import CDLoss
from cmkit.losses.ct import CTLoss
from cmkit.losses.ect import ECTLoss
from cmkit.losses.edm import EDMLoss
from cmkit.losses.ict import ICTLoss
from cmkit.nets.unet import UNet
from cmkit.precond import Precond
from cmkit.toy import GaussianMixture


def tiny(kind="cm", dropout=0.0):
    torch.manual_seed(0)
    model = Precond(UNet(8, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1, dropout=dropout), kind)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("dist", [l2, l1, pseudo_huber, lambda a, b: pseudo_huber(a, b, 0.0)])
def test_distances_zero_on_equal_and_positive_otherwise(dist):
    a = torch.randn(4, 1, 8, 8)
    assert torch.all(dist(a, a.clone()) == 0)
    assert torch.all(dist(a, a + 0.1) > 0)


def test_pseudo_huber_closed_form_and_default_c():
    a, b = torch.zeros(2, 3, 32, 32), torch.full((2, 3, 32, 32), 0.01)
    c = default_huber_c(a.shape[1:])
    assert c == pytest.approx(0.0299, abs=1e-4)  # CIFAR-10 value from iCT
    norm2 = 3 * 32 * 32 * 0.01**2
    assert torch.allclose(pseudo_huber(a, b), torch.tensor((norm2 + c * c) ** 0.5 - c))
    assert torch.allclose(pseudo_huber(a, b, 0.0), torch.tensor(norm2**0.5))


def grads_of(module: nn.Module) -> list:
    return [p.grad for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    "loss_cls,kw",
    [
        (CTLoss, {"total_steps": 100}),
        (ICTLoss, {"total_steps": 100}),
        (ECTLoss, {"double_steps": 10}),
        (CDLoss, {"mu": 0.95}),
    ],
)
def test_no_gradient_reaches_target_or_teacher(loss_cls, kw):
    model, teacher = tiny("cm"), tiny("edm")
    target = make_copy(model)
    target.requires_grad_(True)  # even if someone forgets to freeze it, the loss must not backprop into it
    teacher.requires_grad_(True)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    loss = loss_cls(**kw)(model, x0, step=3, target=target, teacher=teacher).mean()
    loss.backward()
    assert grads_of(model), "the student received no gradient"
    assert not grads_of(target) and not grads_of(teacher)


def test_losses_return_per_sample_values():
    model, teacher = tiny("cm"), tiny("edm")
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    for loss in (CTLoss(total_steps=10), ICTLoss(total_steps=10), ECTLoss(), CDLoss(), EDMLoss()):
        m = teacher if isinstance(loss, EDMLoss) else model
        out = loss(m, x0, step=0, target=model, teacher=teacher)
        assert out.shape == (5,) and torch.isfinite(out).all() and (out >= 0).all()


def test_shared_dropout_mask_between_passes():
    model = tiny("cm", dropout=0.5).train()
    x, s = torch.randn(3, 1, 8, 8), torch.full((3,), 1.0)
    a, b = paired_passes(model, model, (x, s), (x, s))
    assert torch.equal(a.detach(), b)  # same inputs, same weights, same dropout masks
    c = model(x, s)
    assert not torch.allclose(a.detach(), c)  # a fresh pass draws a different mask


def test_ct_target_is_euler_step_with_x0():
    """CD with the data point as the 'teacher' reduces to CT: x̂_{t2} = x0 + t2·z."""
    from cmkit.solvers import euler_step

    x0, z = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t, t2 = torch.full((4,), 3.0), torch.full((4,), 1.5)
    out = euler_step(lambda x, s: x0, x0 + 3.0 * z, t, t2)
    assert torch.allclose(out, x0 + 1.5 * z, atol=1e-6)


def test_heun_step_is_exact_for_a_point_mass():
    """For data at a single point m the PF-ODE is x(σ) = m + σ/σ'·(x(σ') - m): Heun is exact."""
    m = torch.full((2, 1, 4, 4), 0.3)
    gm = GaussianMixture(torch.tensor([[0.3] * 16]), torch.tensor([1.0]), 1e-6)
    from cmkit.solvers import heun_step

    x = m.reshape(2, 16, 1, 1) + 5.0 * torch.randn(2, 16, 1, 1)
    out = heun_step(gm, x, torch.full((2,), 5.0), torch.full((2,), 2.0))
    want = m.reshape(2, 16, 1, 1) + (x - m.reshape(2, 16, 1, 1)) * 2.0 / 5.0
    assert torch.allclose(out, want, atol=1e-5)


def test_ict_weighting_and_sigma_pairs_on_grid():
    loss = ICTLoss(total_steps=1000)
    asc, p = loss.grid_and_probs(11)
    assert asc[0].item() == pytest.approx(0.002) and asc[-1].item() == pytest.approx(80.0)
    assert len(p) == 10


def test_lpips_missing_weights_message(tmp_path):
    from cmkit.distances import get_distance

    lpips = get_distance("lpips", lpips_weights=str(tmp_path / "nope.safetensors"))  # read at the first use
    with pytest.raises(CmkitError, match="LPIPS weights not found: .*cmkit convert-lpips"):
        lpips.load()


def test_lpips_loads_user_weights_and_is_zero_on_equal(tmp_path):
    from safetensors.torch import save_file

    from cmkit.distances import get_distance
    from cmkit.lpips import LPIPS

    ref = LPIPS()
    sd = {k.replace("lins.", "lin"): v.abs() for k, v in ref.state_dict().items()}
    save_file(sd, tmp_path / "lpips.safetensors")
    d = get_distance("lpips", lpips_weights=str(tmp_path / "lpips.safetensors"))
    a = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.allclose(d(a, a), torch.zeros(2))
    assert (d(a, -a) > 0).all()
