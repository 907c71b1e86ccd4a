"""Reading EDM-style pickles without running anything from them: NVlabs/edm's ``network-snapshot-*.pkl`` and
released ``edm-*.pkl``/``baseline-*.pkl`` files, ECT's snapshots (locuslab/ect), and ``torch.save``d training
states that embed such modules (ECT's ``training-state-*.pt``).

EDM pickles are a trap: each network object reduces to ``torch_utils.persistence._reconstruct_persistent_obj``
with the full source of ``networks.py``, which EDM's loader ``exec``s, and storages go through
``torch.storage._load_from_bytes`` (a full ``torch.load``). ``SafeUnpickler`` resolves a fixed list of globals
to cmkit's own inert replacements and refuses every other one:

* ``_reconstruct_persistent_obj(meta)`` → a ``Persistent`` record (class name, the object's ``__dict__``);
  the embedded source is never compiled, only its length is kept;
* ``torch.nn`` containers (``ModuleDict``, ``Sequential``, …) → a ``TorchModule`` record, never torch's class;
* ``_load_from_bytes`` → ``torch.load(weights_only=True)``; ``torch._utils._rebuild_*`` (tensors, parameters),
  ``torch.Size``, ``collections.OrderedDict``, numpy scalars/dtypes/arrays, ``dnnlib`` ``EasyDict`` (a dict);
* anything else (``os.system``, ``builtins.exec``, another module's class…) is one ``CmkitError`` line.

``read_edm_pickle`` returns the network record (``ema`` of a snapshot, ``net`` of a training state);
``module_state_dict`` walks ``_modules``/``_parameters``/``_buffers`` into a state dict; ``edm_model_config``
maps the init kwargs onto a cmkit ``model`` config section (``ddpmpp``, ``ncsnpp`` or ``dhariwal`` with EDM,
VP, VE or — ECT's ``ECMPrecond`` — CM preconditioning).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CmkitError


class Persistent:
    """An inert record of a ``torch_utils.persistence`` object: ``class_name``, ``state`` (its ``__dict__``),
    ``init_kwargs`` (the constructor's keyword arguments as recorded by EDM) and the length of the source
    that EDM would have executed (``source_chars``)."""

    def __init__(self, class_name: str, state: dict[str, Any], source_chars: int = 0):
        self.class_name, self.state, self.source_chars = class_name, state, source_chars

    @property
    def init_kwargs(self) -> dict[str, Any]:
        kwargs = self.state.get("_init_kwargs")
        return dict(kwargs) if isinstance(kwargs, dict) else {}

    def __repr__(self) -> str:
        return f"Persistent({self.class_name})"


class TorchModule:
    """An inert record of a plain ``torch.nn`` module (``ModuleDict`` and the like) met inside a pickle."""

    def __init__(self, class_name: str = ""):
        self.class_name, self.state = class_name, {}

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"TorchModule({self.class_name})"


def _torch_module_class(name: str) -> type:
    """A record class named after a ``torch.nn`` class, created by NEWOBJ without touching torch's class."""
    return type(name, (TorchModule,), {"__init__": lambda self: TorchModule.__init__(self, name)})


class EasyDict(dict):
    """``dnnlib.util.EasyDict`` as a plain dict (its attributes are ignored)."""

    def __setstate__(self, state: Any) -> None:
        pass


def _persistent(meta: Any) -> Persistent:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise CmkitError("a torch_utils.persistence object in the pickle is not a class record")
    state = meta.get("state")
    src = meta.get("module_src")
    return Persistent(
        meta["class_name"], state if isinstance(state, dict) else {}, len(src) if isinstance(src, str) else 0
    )


def _load_from_bytes(data: Any) -> Any:
    """A storage that ``torch.save`` wrote inside the pickle, read with ``weights_only=True``."""
    if not isinstance(data, (bytes, bytearray)):
        raise CmkitError("a storage in the pickle is not bytes")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CmkitError(
            f"a storage in the pickle is not a plain torch storage ({' '.join(str(e).split())[:160]})"
        ) from None


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's scalar reconstructor for plain numeric dtypes only (no object scalars)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise CmkitError("a numpy scalar in the pickle is not a plain number")
    return np.frombuffer(bytes(data), dtype=dtype)[0].item()


def _numpy_dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(name, str):
        raise CmkitError("a numpy dtype in the pickle is not named by a string")
    return np.dtype(name, bool(align), bool(copy))


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``: how protocol-2 pickles (``torch.save``) write bytes; strings only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CmkitError("a byte string in the pickle is not an encoded string")
    return text.encode(encoding)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 pickles of objects), only for cmkit's record classes."""
    if not (isinstance(cls, type) and issubclass(cls, (TorchModule, EasyDict))) or base is not object:
        raise CmkitError(f"refused: the pickle rebuilds a {getattr(cls, '__name__', cls)!r} object")
    return cls()


#: (module, name) → the callable the restricted unpickler gives for it. Nothing else resolves.
ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): OrderedDict,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("_codecs", "encode"): _encode,
    ("builtins", "frozenset"): frozenset,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
}
try:  # numpy arrays: numpy's own reconstructor (object arrays hold only what this unpickler built)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
ALLOWED.update(
    {
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
    }
)
# protocol-2 pickles (torch.save) name these by their Python 2 modules
ALLOWED.update(
    {
        ("__builtin__" if m == "builtins" else "copy_reg", n): f
        for (m, n), f in list(ALLOWED.items())
        if m in ("builtins", "copyreg")
    }
)


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that imports nothing: the globals of ``ALLOWED`` map to cmkit's own callables,
    ``torch.nn`` container classes to inert records, and every other global is one ``CmkitError`` line."""

    source = "the pickle"

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle's hook
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if (
            module.startswith("torch.nn.modules.")
            and name.isidentifier()
            and isinstance(getattr(torch.nn, name, None), type)
        ):
            return _torch_module_class(name)
        raise CmkitError(
            f"{self.source}: refused: it needs {module}.{name}, which is not an EDM network record, a "
            "tensor or plain data (nothing from the file was run)"
        )


class _PickleModule:
    """What ``torch.load(pickle_module=...)`` needs to read a ``torch.save`` zip archive through ``SafeUnpickler``
    (storages then come from the archive's data records, read by torch)."""

    __name__ = "cmkit_safe_pickle"
    Unpickler = SafeUnpickler

    @staticmethod
    def load(f: Any, **kwargs: Any) -> Any:
        return SafeUnpickler(f, **kwargs).load()


def load_pickle(path: str | Path) -> Any:
    """The objects of an EDM-style ``.pkl`` or a ``torch.save`` archive, read with ``SafeUnpickler`` only."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CmkitError(f"checkpoint not found: {p} (expected an EDM .pkl snapshot)")
    SafeUnpickler.source = str(p)
    try:
        if zipfile.is_zipfile(p):  # torch.save archive: torch reads the storages, our unpickler the rest
            return torch.load(p, map_location="cpu", pickle_module=_PickleModule, weights_only=False)
        with open(p, "rb") as f:
            return SafeUnpickler(f).load()
    except CmkitError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        AttributeError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        RuntimeError,
        OSError,
    ) as e:
        raise CmkitError(
            f"{p} is not a readable EDM pickle ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    finally:
        SafeUnpickler.source = "the pickle"


NETWORK_CLASSES = ("SongUNet", "DhariwalUNet")
PRECOND_CLASSES = ("EDMPrecond", "VPPrecond", "VEPrecond", "ECMPrecond", "iDDPMPrecond")


def find_network(obj: Any, source: str = "the pickle") -> Persistent:
    """The network in what an EDM-style pickle holds: ``ema`` of a snapshot dict, ``net`` of a training state,
    or the object itself."""
    if isinstance(obj, Persistent) and obj.class_name in PRECOND_CLASSES + NETWORK_CLASSES:
        return obj
    if isinstance(obj, dict):
        for key in ("ema", "net", "model"):
            if isinstance(obj.get(key), Persistent):
                return find_network(obj[key], source)
        found = sorted(str(k) for k in obj)
        raise CmkitError(f"{source} holds no EDM network: no 'ema' or 'net' entry (it has {', '.join(found[:8])})")
    name = obj.class_name if isinstance(obj, Persistent) else type(obj).__name__
    raise CmkitError(
        f"{source} holds a {name}, not an EDM network (expected one of {', '.join(PRECOND_CLASSES + NETWORK_CLASSES)})"
    )


def module_state_dict(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """The state dict of a module record: its parameters, persistent buffers, then its sub-modules by name."""
    if not isinstance(obj, (Persistent, TorchModule)):
        raise CmkitError(f"{prefix or 'the network'} is a {type(obj).__name__}, not a module record")
    state = obj.state
    out: dict[str, Tensor] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(value, Tensor):
                raise CmkitError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[f"{prefix}{name}"] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


#: The SongUNet variants of EDM's ``train.py``: (embedding, encoder, resampling filter, noise width) → arch.
SONG_VARIANTS = {("positional", "standard", (1, 1), 1): "ddpmpp", ("fourier", "residual", (1, 3, 3, 1), 2): "ncsnpp"}
#: EDM's constructor defaults (``SongUNet``, ``DhariwalUNet``) for kwargs a pickle leaves out.
DEFAULTS = {
    "SongUNet": {
        "model_channels": 128,
        "channel_mult": (1, 2, 2, 2),
        "num_blocks": 4,
        "attn_resolutions": (16,),
        "dropout": 0.10,
        "augment_dim": 0,
        "embedding_type": "positional",
        "encoder_type": "standard",
        "decoder_type": "standard",
        "resample_filter": (1, 1),
        "channel_mult_noise": 1,
        "channel_mult_emb": 4,
    },
    "DhariwalUNet": {
        "model_channels": 192,
        "channel_mult": (1, 2, 3, 4),
        "num_blocks": 3,
        "attn_resolutions": (32, 16, 8),
        "dropout": 0.10,
        "augment_dim": 0,
        "channel_mult_emb": 4,
    },
}


def edm_model_config(net: Persistent, source: str = "the pickle") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cmkit ``model`` config section, state dict of the backbone) of an EDM network record.

    A preconditioner record (``EDMPrecond`` …) gives the preconditioning and holds the network as ``model``;
    a bare ``SongUNet``/``DhariwalUNet`` is taken as EDM-preconditioned.
    """
    precond_name, outer = ("EDMPrecond", {})
    if net.class_name in PRECOND_CLASSES:
        precond_name, outer = net.class_name, net.init_kwargs
        inner = (net.state.get("_modules") or {}).get("model")
        if not isinstance(inner, Persistent):
            raise CmkitError(f"{source}: the {net.class_name} holds no network record as 'model'")
        backbone = inner
    else:
        backbone = net
    if precond_name == "iDDPMPrecond":
        raise CmkitError(
            f"{source}: iDDPM preconditioning (EDM's ADM baseline) is not supported; EDMPrecond, "
            "VPPrecond, VEPrecond and ECMPrecond are"
        )
    model_type = backbone.class_name
    if model_type not in NETWORK_CLASSES:
        raise CmkitError(f"{source}: network {model_type!r} is not one of EDM's ({', '.join(NETWORK_CLASSES)})")
    kw = {**DEFAULTS[model_type], **{k: v for k, v in outer.items() if k != "model_type"}, **backbone.init_kwargs}
    if "img_channels" in kw and "in_channels" not in kw:
        kw["in_channels"] = kw["img_channels"]
    out_channels = kw.get("out_channels") or kw.get("in_channels")
    try:
        side, channels = int(kw["img_resolution"]), int(kw["in_channels"])
    except (KeyError, TypeError, ValueError):
        raise CmkitError(
            f"{source}: the network record does not say its image size and channels "
            "(no img_resolution / in_channels in its init kwargs)"
        ) from None
    if int(out_channels) != channels:
        raise CmkitError(
            f"{source}: the network has {out_channels} output channels for {channels} input channels; "
            "only denoisers with equal counts are supported"
        )
    if int(kw.get("channel_mult_emb", 4)) != 4:
        raise CmkitError(f"{source}: channel_mult_emb={kw['channel_mult_emb']} is not EDM's 4")
    if model_type == "SongUNet":
        variant = (
            kw["embedding_type"],
            kw["encoder_type"],
            tuple(int(v) for v in kw["resample_filter"]),
            int(kw["channel_mult_noise"]),
        )
        arch = SONG_VARIANTS.get(variant)
        if arch is None or kw["decoder_type"] != "standard":
            raise CmkitError(
                f"{source}: SongUNet variant {variant + (kw['decoder_type'],)} is neither DDPM++ nor "
                "NCSN++ as EDM's train.py builds them"
            )
    else:
        arch = "dhariwal"
    model: dict[str, Any] = {
        "arch": arch,
        "img_resolution": side,
        "in_channels": channels,
        "model_channels": int(kw["model_channels"]),
        "channel_mult": tuple(int(m) for m in kw["channel_mult"]),
        "num_blocks": int(kw["num_blocks"]),
        "attn_resolutions": tuple(int(r) for r in kw["attn_resolutions"]),
        "dropout": float(kw["dropout"]),
        "num_classes": int(kw.get("label_dim") or 0),
        "augment_dim": int(kw.get("augment_dim") or 0),
        "embedding": "fourier" if arch == "ncsnpp" else "positional",
    }
    precond = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve", "ECMPrecond": "cm"}[precond_name]
    model["precond"] = precond
    if precond in ("edm", "cm"):
        model["sigma_data"] = float(outer.get("sigma_data", 0.5))
    if precond == "cm":
        model["sigma_min"] = float(outer.get("sigma_min", 0.003))  # ECMPrecond's default
    state = module_state_dict(backbone)
    return model, state


def read_edm_pickle(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """(model config section, backbone state dict, notes) of an EDM-style pickle; notes: the class names."""
    obj = load_pickle(path)
    net = find_network(obj, str(path))
    model, state = edm_model_config(net, str(path))
    inner = (net.state.get("_modules") or {}).get("model")
    notes = {
        "precond_class": net.class_name if net.class_name in PRECOND_CLASSES else None,
        "network_class": inner.class_name if isinstance(inner, Persistent) else net.class_name,
    }
    return model, state, notes
