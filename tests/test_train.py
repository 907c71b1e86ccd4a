import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from cmkit.errors import CmkitError
from cmkit.load import load_model
from cmkit.training.loop import Loop, train


def fixed_loss(trainer: Loop, seed: int = 123) -> float:
    """The objective on a fixed batch, noise, dropout and schedule point (step 0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(sum(trainer.task.loss(trainer.net, 0, trainer.generator)[0] for _ in range(4)) / 4)


METHODS = [
    ("digits-edm", [], 40),
    ("digits-ct", [], 120),
    ("digits-ict", [], 40),
    ("digits-cd", ["teacher"], 40),
    ("digits-ect", ["init"], 80),
    ("digits-cmt", ["teacher"], 40),
]


@pytest.mark.parametrize("preset,needs,steps", METHODS)
def test_every_method_trains_and_loss_goes_down(preset, needs, steps, tmp_path, teacher_dir, bound):
    """Each method lowers its own loss on a fixed batch (step 0's noise levels). Measured with
    ``scripts/bound_spread.py`` (seeds 0–4 × 1 and 2 threads; ratio after / before, bound < 1): EDM 0.665–0.671,
    CT 0.984–0.988 in 120 steps (0.991–0.994 in 40: CT's loss moves little, but by 3–4 times its spread),
    iCT 0.917–0.954 in 40 steps (80 steps were not safer: 0.87–1.006), CD 0.36–0.53, ECT 0.860–0.865 in 80,
    CMT 0.214–0.227."""
    extra = [f"train.steps={steps}", "train.lr=1e-3", "train.optimizer=adam"]
    if "teacher" in needs:
        extra += [f"train.teacher={teacher_dir}", f"train.init_from={teacher_dir}"]
    if "init" in needs:
        extra += [f"train.init_from={teacher_dir}"]
    trainer = Loop(tiny_config(preset, tmp_path / "run", *extra), progress=False)
    before = fixed_loss(trainer)
    summary = trainer.run()
    after = fixed_loss(trainer)
    assert summary["steps"] == steps and summary["skipped"] == 0
    bound("fixed-batch loss after / before", after / before, 1.0)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert list((tmp_path / "run" / "samples").glob("*.png"))


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_config("digits-ict", tmp_path / "run", "train.steps=3", "train.ema_rates=0.9,0.99")
    trainer = Loop(cfg, progress=False)
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
    straight = Loop(tiny_config(preset, tmp_path / "a", *common), progress=False)
    straight.run()

    first = Loop(tiny_config(preset, tmp_path / "b", *common), progress=False)
    for _ in range(3):  # an interrupted run: 3 of 6 steps, then a checkpoint
        first.train_step()
    first.save_checkpoint()
    first.close()  # the interrupted process ends
    resumed = Loop(tiny_config(preset, tmp_path / "b", *common, "train.resume=true"), progress=False)
    assert resumed.step == 3
    resumed.run()
    for a, b in [(straight.model, resumed.model), (straight.emas[0], resumed.emas[0])]:
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k
    if straight.task.target is not None:
        assert all(
            torch.equal(v, w)
            for v, w in zip(straight.task.target.state_dict().values(), resumed.task.target.state_dict().values())
        )
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_existing_run_is_not_overwritten(tmp_path):
    train(tiny_config("digits-ict", tmp_path / "run", "train.steps=2"), progress=False)
    with pytest.raises(CmkitError, match="already holds a training run"):
        Loop(tiny_config("digits-ict", tmp_path / "run", "train.steps=2"), progress=False)


def test_resume_with_a_changed_setting_is_refused_and_the_record_kept(tmp_path):
    run = tmp_path / "run"
    train(tiny_config("digits-ict", run, "train.steps=2"), progress=False)
    record = (run / "config.json").read_text()
    for changed, key in [
        ("train.lr=1e-3", "train.lr"),
        ("train.batch_size=16", "train.batch_size"),
        ("train.seed=1", "train.seed"),
        ("train.optimizer=radam", "train.optimizer"),
        ("loss.huber_c=0.1", "loss.huber_c"),
        ("data.flip=true", "data.flip"),
        ("train.bf16=true", "train.bf16"),
        ("train.grad_clip=1", "train.grad_clip"),
    ]:
        with pytest.raises(CmkitError, match=rf"cannot resume .*settings differ from the run's: {key} "):
            Loop(tiny_config("digits-ict", run, "train.steps=4", "train.resume=true", changed), progress=False)
    assert (run / "config.json").read_text() == record
    # run control (steps, logging and checkpoint intervals, threads) may change
    summary = train(
        tiny_config(
            "digits-ict", run, "train.steps=4", "train.log_every=1", "train.num_threads=1", "train.resume=true"
        ),
        progress=False,
    )
    assert summary["steps"] == 4 and summary["steps_run"] == 2


def test_a_run_saved_before_a_setting_existed_resumes(tmp_path):
    """A saved config without a key added to cmkit later (here model.time_inputs, loss.jvp) reads as the key's
    default, so the resume is accepted; a saved key that differs is still refused."""
    import json

    run = tmp_path / "run"
    train(tiny_config("digits-ict", run, "train.steps=2", "train.ckpt_every=2"), progress=False)
    for path in (run / "checkpoint" / "config.json",):
        saved = json.loads(path.read_text())
        del saved["model"]["time_inputs"], saved["loss"]["jvp"]
        path.write_text(json.dumps(saved))
    summary = train(tiny_config("digits-ict", run, "train.steps=3", "train.resume=true"), progress=False)
    assert summary["steps_run"] == 1
    with pytest.raises(CmkitError, match="model.time_inputs"):
        Loop(
            tiny_config(
                "digits-ict",
                run,
                "train.steps=4",
                "train.resume=true",
                "model.precond=meanflow",
                "model.time_inputs=2",
                "loss.method=meanflow",
            ),
            progress=False,
        )


def test_nan_guard_skips_step_without_advancing(tmp_path):
    trainer = Loop(tiny_config("digits-ct", tmp_path / "run", "train.steps=5"), progress=False)
    real = trainer.task.loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        value, stats = real(*a, **k)
        return (value * float("nan") if calls["n"] == 2 else value), stats

    trainer.task.loss = poisoned
    trainer.train_step()
    params = [p.detach().clone() for p in trainer.model.parameters()]
    ema = [p.detach().clone() for p in trainer.emas[0].parameters()]
    target = [p.detach().clone() for p in trainer.task.target.parameters()]
    stats = trainer.train_step()
    assert stats["skipped"] and trainer.step == 1 and trainer.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema, trainer.emas[0].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(target, trainer.task.target.parameters()))
    trainer.train_step()
    assert trainer.step == 2


def test_cd_without_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(CmkitError, match="needs a teacher"):
        Loop(tiny_config("digits-cd", tmp_path / "run", "train.teacher=", "train.init_from="), progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train(tiny_config("digits-ict", tmp_path / "run", "train.steps=1"), progress=False)
    (tmp_path / "run" / "model" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CmkitError, match="corrupt"):
        load_model(tmp_path / "run")
