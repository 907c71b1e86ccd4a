"""EDM-style pickles read without running anything from them (cmkit/nets/edm_pickle.py, nets/released.py).

The tests build their own pickles with the reduce structure of NVlabs/edm's ``torch_utils.persistence``: every
network object reduces to ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = {type, version,
module_src, class_name, state}``, sub-module dicts are ``torch.nn.ModuleDict``, tensors go through
``torch._utils._rebuild_tensor_v2``/``_rebuild_parameter`` and ``torch.storage._load_from_bytes``, numbers in the
init kwargs are numpy scalars, and the snapshot is ``dict(ema, loss_fn, augment_pipe, dataset_kwargs)`` with a
``dnnlib.util.EasyDict``. The embedded source, and the fake ``_reconstruct_persistent_obj`` itself, would create a
marker file if anything ran them.
"""

from __future__ import annotations

import builtins
import io
import json
import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from cmkit.errors import CmkitError
from cmkit.nets.edm import DDPMpp, DhariwalUNet, NCSNpp

TINY = dict(
    img_resolution=8,
    in_channels=1,
    model_channels=16,
    channel_mult=(1, 2),
    num_blocks=1,
    attn_resolutions=(4,),
    dropout=0.0,
)
#: EDM's train.py network kwargs of each architecture (--arch ddpmpp / ncsnpp / adm)
ARCH_KWARGS = {
    "ddpmpp": dict(
        model_type="SongUNet",
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
    ),
    "ncsnpp": dict(
        model_type="SongUNet",
        embedding_type="fourier",
        encoder_type="residual",
        decoder_type="standard",
        channel_mult_noise=2,
        resample_filter=[1, 3, 3, 1],
    ),
    "dhariwal": dict(model_type="DhariwalUNet"),
}
CLASSES = {"ddpmpp": DDPMpp, "ncsnpp": NCSNpp, "dhariwal": DhariwalUNet}


def marker_source(marker) -> str:
    return f"open({str(marker)!r}, 'w').write('the embedded source ran')\nclass SongUNet: pass\n"


class Holder(torch.nn.Module):
    """Stands in for EDM's preconditioner: the network is its sub-module ``model``."""

    def __init__(self, net):
        super().__init__()
        self.model = net


class EDMPickler(pickle.Pickler):
    """Pickles cmkit modules the way EDM's persistent classes reduce: (``_reconstruct_persistent_obj``, (meta,))."""

    def __init__(self, f, reconstruct, source, names, protocol=4):
        super().__init__(f, protocol=protocol)
        self.reconstruct, self.source, self.names = reconstruct, source, names

    def reducer_override(self, obj):
        name = self.names.get(id(obj))
        if name is None:
            return NotImplemented
        class_name, init_kwargs = name
        state = dict(obj.__dict__, _init_args=(), _init_kwargs=init_kwargs)
        meta = dict(type="class", version=6, module_src=self.source, class_name=class_name, state=state)
        return self.reconstruct, (meta,)


@pytest.fixture
def fake_edm_modules(tmp_path, monkeypatch):
    """``torch_utils.persistence`` and ``dnnlib.util`` modules that exist only while a test pickles; the fake
    reconstructor execs the embedded source exactly as EDM's loader does."""
    marker = tmp_path / "marker"
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # what EDM's loader does: exec the source (must never be reached)
        exec(meta["module_src"], {})
        raise AssertionError("the persistent object was reconstructed by running its code")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    dnnlib = types.ModuleType("dnnlib")
    util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict
    root = types.ModuleType("torch_utils")
    root.persistence = persistence
    dnnlib.util = util
    for name, mod in (
        ("torch_utils", root),
        ("torch_utils.persistence", persistence),
        ("dnnlib", dnnlib),
        ("dnnlib.util", util),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    yield types.SimpleNamespace(
        marker=marker, reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict, source=marker_source(marker)
    )
    assert not marker.exists()


def edm_kwargs(arch, net_kwargs, precond_kwargs):
    """EDMPrecond's recorded init kwargs as EDM's train.py passes them (numpy numbers included)."""
    return dict(
        img_resolution=net_kwargs["img_resolution"],
        img_channels=net_kwargs["in_channels"],
        label_dim=net_kwargs.get("num_classes", 0),
        use_fp16=False,
        augment_dim=net_kwargs.get("augment_dim", 0),
        dropout=np.float64(net_kwargs["dropout"]),
        model_channels=net_kwargs["model_channels"],
        channel_mult=list(net_kwargs["channel_mult"]),
        num_blocks=net_kwargs["num_blocks"],
        attn_resolutions=list(net_kwargs["attn_resolutions"]),
        **ARCH_KWARGS[arch],
        **precond_kwargs,
    )


def write_edm_pickle(
    fake,
    path,
    arch="ncsnpp",
    precond="EDMPrecond",
    seed=0,
    classes=0,
    augment_dim=9,
    extra=None,
    save=False,
    **precond_kwargs,
):
    """A network with random weights, pickled as EDM snapshots are; returns the network."""
    torch.manual_seed(seed)
    kwargs = dict(TINY, num_classes=classes, augment_dim=augment_dim)
    if arch == "dhariwal":
        kwargs["model_channels"] = 32
    net = CLASSES[arch](**kwargs)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    holder = Holder(net)
    names = {
        id(holder): (precond, edm_kwargs(arch, kwargs, precond_kwargs)),
        id(net): (
            "SongUNet" if arch != "dhariwal" else "DhariwalUNet",
            {
                "img_resolution": 8,
                "in_channels": 1,
                "out_channels": 1,
                "label_dim": classes,
                "augment_dim": augment_dim,
                **{
                    k: v
                    for k, v in kwargs.items()
                    if k not in ("img_resolution", "in_channels", "num_classes", "augment_dim")
                },
            },
        ),
    }
    for m in net.modules():  # every EDM layer is a persistent class too
        if m is not net and not isinstance(m, torch.nn.ModuleDict):
            names[id(m)] = (type(m).__name__, {"skip_scale": np.float64(np.sqrt(0.5))})
    data = {
        "ema": holder,
        "loss_fn": None,
        "augment_pipe": None,
        "dataset_kwargs": fake.EasyDict(
            class_name="training.dataset.ImageFolderDataset", path="cifar10.zip", xflip=False, cache=True
        ),
        **(extra or {}),
    }
    buf = io.BytesIO()
    EDMPickler(buf, fake.reconstruct, fake.source, names).dump(data)
    if save:  # a torch.save training state (ECT's) holding the same objects: a zip archive

        class SavePickler(EDMPickler):
            def __init__(self, f, protocol=2):
                super().__init__(f, fake.reconstruct, fake.source, names, protocol)

        torch.save(
            {"net": holder, "optimizer_state": {}},
            path,
            pickle_module=types.SimpleNamespace(Pickler=SavePickler, __name__="edm_pickler"),
        )
    else:
        path.write_bytes(buf.getvalue())
    return net


def forget_fake_modules(monkeypatch):
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.mark.parametrize("arch", ["ncsnpp", "ddpmpp", "dhariwal"])
def test_snapshot_reads_without_running_its_code_and_tensors_round_trip(arch, fake_edm_modules, tmp_path, monkeypatch):
    from cmkit.formats.edm_pickle import read_edm_pickle

    path = tmp_path / "network-snapshot.pkl"
    net = write_edm_pickle(fake_edm_modules, path, arch, classes=3)
    forget_fake_modules(monkeypatch)  # reading must need (and import) neither torch_utils nor dnnlib
    model, state, notes = read_edm_pickle(path)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    assert not fake_edm_modules.marker.exists()
    own = net.state_dict()
    assert state.keys() == own.keys()
    assert all(torch.equal(state[k], own[k]) and state[k].dtype == own[k].dtype for k in own)
    assert notes == {
        "precond_class": "EDMPrecond",
        "network_class": "SongUNet" if arch != "dhariwal" else "DhariwalUNet",
    }
    assert model["arch"] == arch and model["precond"] == "edm" and model["num_classes"] == 3
    assert model["augment_dim"] == 9 and model["channel_mult"] == (1, 2) and model["dropout"] == 0.0


def test_converted_network_gives_cmkits_denoiser_output(fake_edm_modules, tmp_path, monkeypatch, one_thread):
    """A converted tiny EDM network = cmkit's own network with the same weights, as an EDM-preconditioned
    denoiser; the model directory written by ``cmkit convert`` samples."""
    from cmkit.cli.main import main
    from cmkit.load import load_model
    from cmkit.precond import Precond

    path = tmp_path / "edm-tiny.pkl"
    net = write_edm_pickle(fake_edm_modules, path, "ncsnpp")
    forget_fake_modules(monkeypatch)
    assert main(["convert", str(path), "-o", str(tmp_path / "converted")]) == 0
    model, cfg = load_model(tmp_path / "converted")
    assert (cfg.model.arch, cfg.model.precond, cfg.model.augment_dim, cfg.sample.sampler) == (
        "ncsnpp",
        "edm",
        9,
        "heun",
    )
    meta = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert meta["source"]["format"] == "edm-pickle"
    ours = Precond(net.eval(), "edm")
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.05, 30.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigma), ours(x, sigma), rtol=0, atol=0)
    assert (
        main(
            [
                "sample",
                "--model",
                str(tmp_path / "converted"),
                "--sampler",
                "heun",
                "--steps",
                "3",
                "-n",
                "2",
                "-o",
                str(tmp_path / "s.png"),
            ]
        )
        == 0
    )


def test_ect_and_vp_preconditioners_map_onto_cmkit(fake_edm_modules, tmp_path, monkeypatch):
    from cmkit.formats.edm_pickle import read_edm_pickle

    write_edm_pickle(fake_edm_modules, tmp_path / "ecm.pkl", "ddpmpp", precond="ECMPrecond", sigma_min=0.002)
    write_edm_pickle(fake_edm_modules, tmp_path / "vp.pkl", "ddpmpp", precond="VPPrecond")
    write_edm_pickle(fake_edm_modules, tmp_path / "iddpm.pkl", "dhariwal", precond="iDDPMPrecond")
    forget_fake_modules(monkeypatch)
    model, _, _ = read_edm_pickle(tmp_path / "ecm.pkl")
    assert (model["precond"], model["sigma_min"]) == ("cm", 0.002)  # ECT's boundary-shifted scalings
    assert read_edm_pickle(tmp_path / "vp.pkl")[0]["precond"] == "vp"
    with pytest.raises(CmkitError, match="iDDPM"):
        read_edm_pickle(tmp_path / "iddpm.pkl")


class Exploit:
    """An extra global that would create the marker file if it were ever called."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('exploit ran')",)


class SystemExploit(Exploit):
    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("exploit", [Exploit, SystemExploit])
def test_a_pickle_with_another_global_is_refused_in_one_line(exploit, fake_edm_modules, tmp_path, monkeypatch):
    from cmkit.cli.main import main

    path = tmp_path / "evil.pkl"
    write_edm_pickle(fake_edm_modules, path, extra={"payload": exploit(fake_edm_modules.marker)})
    forget_fake_modules(monkeypatch)
    with pytest.raises(CmkitError, match="refused: it needs (builtins.exec|posix.system|nt.system)") as err:
        from cmkit.formats.edm_pickle import read_edm_pickle

        read_edm_pickle(path)
    assert "\n" not in str(err.value) and "nothing from the file was run" in str(err.value)
    assert main(["convert", str(path), "-o", str(tmp_path / "out")]) == 2
    assert not fake_edm_modules.marker.exists() and not (tmp_path / "out").exists()
    live = tmp_path / "live"  # the payload is real: plain pickle runs it
    pickle.loads(pickle.dumps(exploit(live)))
    assert live.exists()


def test_a_storage_that_needs_full_unpickling_is_refused(fake_edm_modules, tmp_path, monkeypatch):
    """``_load_from_bytes`` goes through torch.load(weights_only=True): a payload hidden in it is refused."""
    marker = fake_edm_modules.marker

    class Storage:
        def __reduce__(self):
            inner = io.BytesIO()
            pickle.dump(Exploit(marker), inner, protocol=2)
            return load_from_bytes, (inner.getvalue(),)

    def load_from_bytes(b):
        raise AssertionError("never called while pickling")

    load_from_bytes.__module__, load_from_bytes.__qualname__ = "torch.storage", "_load_from_bytes"
    original = torch.storage._load_from_bytes
    monkeypatch.setattr(torch.storage, "_load_from_bytes", load_from_bytes)
    path = tmp_path / "storage.pkl"
    path.write_bytes(pickle.dumps({"ema": Storage()}, protocol=4))
    monkeypatch.setattr(torch.storage, "_load_from_bytes", original)
    from cmkit.formats.edm_pickle import load_pickle

    with pytest.raises(CmkitError, match="not a plain torch storage"):
        load_pickle(path)
    assert not marker.exists()


def test_a_torch_save_training_state_reads_the_same(fake_edm_modules, tmp_path, monkeypatch):
    """ECT's training states: torch.save(dict(net=..., optimizer_state=...)), a zip archive."""
    from cmkit.formats.detect import checkpoint_format
    from cmkit.formats.edm_pickle import read_edm_pickle

    path = tmp_path / "training-state.pt"
    net = write_edm_pickle(fake_edm_modules, path, "ddpmpp", save=True)
    forget_fake_modules(monkeypatch)
    assert checkpoint_format(path) == "edm-pickle"
    _, state, _ = read_edm_pickle(path)
    assert (
        all(torch.equal(state[k], v) for k, v in net.state_dict().items()) and state.keys() == net.state_dict().keys()
    )
    assert not fake_edm_modules.marker.exists()


def test_damaged_and_foreign_files_are_one_line(tmp_path):
    from cmkit.formats.edm_pickle import read_edm_pickle

    bad = tmp_path / "cut.pkl"
    bad.write_bytes(pickle.dumps({"ema": [1, 2, 3]}, protocol=4)[:-3])
    with pytest.raises(CmkitError, match="not a readable EDM pickle"):
        read_edm_pickle(bad)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"weights": 1}, protocol=4))
    with pytest.raises(CmkitError, match="no EDM network"):
        read_edm_pickle(other)
    with pytest.raises(CmkitError, match="not found"):
        read_edm_pickle(tmp_path / "missing.pkl")


@pytest.mark.parametrize("method", ["ect", "cd"])
def test_ect_and_cd_start_from_an_edm_pickle_and_train(method, fake_edm_modules, tmp_path, monkeypatch, one_thread):
    """ECT and CD start from an EDM pickle (init_from; CD's teacher is the pickle converted by ``cmkit convert``)
    and train a few steps on 8×8 digits with EDM's NCSN++; the pickle's augmentation input is dropped for the
    student, which has none."""
    from conftest import tiny_config

    from cmkit.cli.main import main
    from cmkit.training.loop import train

    pkl = tmp_path / "edm-digits.pkl"
    net = write_edm_pickle(fake_edm_modules, pkl, "ncsnpp")
    forget_fake_modules(monkeypatch)
    assert main(["convert", str(pkl), "-o", str(tmp_path / "teacher")]) == 0
    extra = [f"train.teacher={tmp_path / 'teacher'}"] if method == "cd" else []
    cfg = tiny_config(
        f"digits-{method}",
        tmp_path / "run",
        "model.arch=ncsnpp",
        "model.embedding=fourier",
        "model.attn_resolutions=4",
        "train.steps=3",
        "train.batch_size=8",
        f"train.init_from={pkl}",
        *extra,
    )
    from cmkit.training.denoiser import DenoiserTask
    from cmkit.training.task import Context

    task = DenoiserTask(cfg, Context(device=torch.device("cpu")))
    own = net.state_dict()
    assert all(torch.equal(task.model.net.state_dict()[k], own[k]) for k in task.model.net.state_dict())
    assert "map_augment.weight" in own and "map_augment.weight" not in task.model.net.state_dict()
    result = train(cfg, progress=False)
    assert (
        result["steps"] == 3
        and math.isfinite(result["final_loss"])
        and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    )


def test_init_from_a_pickle_of_another_network_is_one_line(fake_edm_modules, tmp_path, monkeypatch):
    from conftest import tiny_config

    from cmkit.training.loop import train

    pkl = tmp_path / "ddpmpp.pkl"
    write_edm_pickle(fake_edm_modules, pkl, "ddpmpp")
    forget_fake_modules(monkeypatch)
    cfg = tiny_config(
        "digits-ect",
        tmp_path / "run",
        "model.arch=ncsnpp",
        "model.embedding=fourier",
        "model.attn_resolutions=4",
        "train.steps=1",
        f"train.init_from={pkl}",
    )
    with pytest.raises(CmkitError, match="another network: model.arch='ddpmpp'"):
        train(cfg, progress=False)


def test_formats_are_told_apart_by_content(fake_edm_modules, tmp_path, monkeypatch):
    from cmkit.formats.detect import checkpoint_format

    write_edm_pickle(fake_edm_modules, tmp_path / "snapshot.bin", "ddpmpp")  # an EDM pickle under another name
    forget_fake_modules(monkeypatch)
    torch.save({"w": torch.ones(2)}, tmp_path / "zip.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "state").write_bytes(b"\x83\xa4step\x01\xa1a\xc0\xa1b\xc0")  # a msgpack map
    (tmp_path / "text.txt").write_text("hello")
    assert checkpoint_format(tmp_path / "snapshot.bin") == "edm-pickle"
    assert checkpoint_format(tmp_path / "zip.pt") == checkpoint_format(tmp_path / "legacy.pt") == "torch"
    assert checkpoint_format(tmp_path / "state") == "flax-msgpack"
    assert checkpoint_format(tmp_path) == checkpoint_format("runs/not-there") == "model-dir"
    with pytest.raises(CmkitError, match="not a model directory"):
        checkpoint_format(tmp_path / "text.txt")
    with pytest.raises(CmkitError, match="checkpoint not found: .*edm-cifar10-32x32-uncond-vp.pkl"):
        checkpoint_format("edm-cifar10-32x32-uncond-vp.pkl")  # cifar10-ect's init_from, before it is downloaded
