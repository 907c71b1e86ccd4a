"""Ground truth in closed form: CD with the exact Gaussian-mixture denoiser as teacher."""
import copy

import torch

from cmkit.ema import ema_update
from cmkit.losses import CDLoss
from cmkit.nets import MLPNet
from cmkit.precond import Precond
from cmkit.sampling import sample_multistep
from cmkit.toy import GaussianMixture


def test_cd_with_exact_teacher_matches_mixture_statistics():
    torch.manual_seed(0)
    gm = GaussianMixture(torch.tensor([[-0.6, -0.6], [0.6, -0.6], [0.0, 0.7]]), torch.tensor([0.5, 0.3, 0.2]), 0.08)
    model = Precond(MLPNet(1, 2, hidden=96, depth=3), "cm")
    ema = copy.deepcopy(model)
    loss = CDLoss(num_scales=18, mu=0.0, solver="heun", distance="l2")
    steps = 1200
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        l = loss(model, gm.sample(512), step=step, target=model, teacher=gm).mean()
        opt.zero_grad()
        l.backward()
        opt.step()
        sched.step()
        ema_update(ema, model, 0.99)
    ema.eval()
    for sigmas in ([80.0], [80.0, 0.5]):
        x = sample_multistep(ema, (4000, 2, 1, 1), sigmas, generator=torch.Generator().manual_seed(2))
        k = gm.assign(x)
        props = torch.bincount(k, minlength=3).float() / len(x)
        assert torch.allclose(props, gm.weights, atol=0.03), (sigmas, props)
        for j in range(3):
            xj = x[k == j].flatten(1)
            assert torch.allclose(xj.mean(0), gm.means[j], atol=0.06), (sigmas, j, xj.mean(0))
            # clustered: spread well below the 0.6+ distance between components (true std 0.08)
            assert xj.std(0).max() < 0.25, (sigmas, j, xj.std(0))
