import json

import pytest
import torch
from safetensors.torch import load_file

from cmkit.checkpoint import load_model
from cmkit.errors import CmkitError
from cmkit.train import Trainer, train

from conftest import tiny_config


def fixed_loss(trainer: Trainer, seed: int = 123) -> float:
    """The objective on a fixed batch, noise, dropout and schedule point (step 0)."""
    x0, labels = trainer.batches.get(0)
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(sum(trainer.compute_loss(x0, labels, step=0) for _ in range(4)) / 4)


METHODS = [("digits-edm", [], 40), ("digits-ct", [], 40), ("digits-ict", [], 40), ("digits-cd", ["teacher"], 40),
           ("digits-ect", ["init"], 40)]


@pytest.mark.parametrize("preset,needs,steps", METHODS)
def test_every_method_trains_and_loss_goes_down(preset, needs, steps, tmp_path, teacher_dir):
    extra = [f"train.steps={steps}", "train.lr=1e-3", "train.optimizer=adam"]
    if "teacher" in needs:
        extra += [f"train.teacher={teacher_dir}", f"train.init_from={teacher_dir}"]
    if "init" in needs:
        extra += [f"train.init_from={teacher_dir}"]
    trainer = Trainer(tiny_config(preset, tmp_path / "run", *extra), progress=False)
    before = fixed_loss(trainer)
    summary = trainer.run()
    after = fixed_loss(trainer)
    assert summary["steps"] == steps and summary["skipped"] == 0
    assert after < before, f"{preset}: loss {before:.4g} -> {after:.4g}"
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert list((tmp_path / "run" / "samples").glob("*.png"))


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_config("digits-ict", tmp_path / "run", "train.steps=3", "train.ema_rates=0.9,0.99")
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    model, loaded_cfg = load_model(tmp_path / "run")
    assert loaded_cfg == cfg
    ema = trainer.emas[0].state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    ckpt = load_file(tmp_path / "run" / "checkpoint" / "ema_0.99.safetensors")
    assert all(torch.equal(v, trainer.emas[1].state_dict()[k]) for k, v in ckpt.items())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x, 1.0), trainer.emas[0].eval()(x, 1.0))


@pytest.mark.parametrize("preset", ["digits-ct", "digits-ict"])
def test_resume_continues_bit_for_bit(preset, tmp_path):
    common = ["train.steps=6", "model.dropout=0.1", "data.flip=true", "train.ema_rates=0.9"]
    straight = Trainer(tiny_config(preset, tmp_path / "a", *common), progress=False)
    straight.run()

    first = Trainer(tiny_config(preset, tmp_path / "b", *common), progress=False)
    for _ in range(3):  # an interrupted run: 3 of 6 steps, then a checkpoint
        first.train_step()
    first.save_checkpoint()
    resumed = Trainer(tiny_config(preset, tmp_path / "b", *common, "train.resume=true"), progress=False)
    assert resumed.step == 3
    resumed.run()
    for a, b in [(straight.model, resumed.model), (straight.emas[0], resumed.emas[0])]:
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k
    if straight.target is not None:
        assert all(torch.equal(v, w) for v, w in zip(straight.target.state_dict().values(),
                                                       resumed.target.state_dict().values()))
    sa, sb = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_existing_run_is_not_overwritten(tmp_path):
    train(tiny_config("digits-ict", tmp_path / "run", "train.steps=2"), progress=False)
    with pytest.raises(CmkitError, match="already holds a training run"):
        Trainer(tiny_config("digits-ict", tmp_path / "run", "train.steps=2"), progress=False)


def test_nan_guard_skips_step_without_advancing(tmp_path):
    trainer = Trainer(tiny_config("digits-ct", tmp_path / "run", "train.steps=5"), progress=False)
    real = trainer.loss.__call__
    calls = {"n": 0}

    class Poisoned:
        uses_target, needs_teacher = True, False
        target_mu = trainer.loss.target_mu
        stats = trainer.loss.stats

        def __call__(self, *a, **k):
            calls["n"] += 1
            out = real(*a, **k)
            return out * float("nan") if calls["n"] == 2 else out

    trainer.loss = Poisoned()
    trainer.train_step()
    params = [p.detach().clone() for p in trainer.model.parameters()]
    ema = [p.detach().clone() for p in trainer.emas[0].parameters()]
    target = [p.detach().clone() for p in trainer.target.parameters()]
    stats = trainer.train_step()
    assert stats["skipped"] and trainer.step == 1 and trainer.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema, trainer.emas[0].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(target, trainer.target.parameters()))
    trainer.train_step()
    assert trainer.step == 2


def test_cd_without_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(CmkitError, match="needs a teacher"):
        Trainer(tiny_config("digits-cd", tmp_path / "run", "train.teacher=", "train.init_from="), progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train(tiny_config("digits-ict", tmp_path / "run", "train.steps=1"), progress=False)
    (tmp_path / "run" / "model" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CmkitError, match="corrupt"):
        load_model(tmp_path / "run")
