"""The config of a diffusion or consistency-model run (``Config``: model, data, loss, train, sample sections).

``ModelConfig`` builds the denoiser (a backbone of ``cmkit.nets`` in a ``cmkit.precond`` wrapper), ``LossConfig``
the method's loss (``cmkit.losses``); ``validate()`` checks the rules across sections before any data is read.
The override machinery and the sections shared with the autoencoder and decoder runs are in ``cmkit.config``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from .config import DATA_CLASSES, DataConfig, RunConfig, TrainConfig, require
from .discrete_vp import lcm_student, sigmas_of
from .errors import CmkitError
from .formats.diffusers_dir import lcm_timesteps, read_schedule, unet_config
from .losses import LOSSES, PRECOND_OF
from .losses.options import options_of, parameters
from .nets import ARCHS, build_net
from .nets.blocks import set_checkpointing
from .nets.edm import VEPrecond, VPPrecond
from .precond import TWO_TIME_KINDS, Precond
from .sampling import SAMPLER_NAMES
from .schedules import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN

Arch = Literal[(*ARCHS, "diffusers")]  # type: ignore[valid-type]  # unet mlp adm ddpmpp ncsnpp dhariwal (cmkit.nets)
# and diffusers (a diffusers UNet as an LCM student: cmkit.discrete_vp.lcm_student)
Embedding = Literal["positional", "fourier"]
PrecondKind = Literal["edm", "cm", "vp", "ve", "trigflow", "meanflow", "flowmap"]
Method = Literal[tuple(LOSSES)]  # type: ignore[valid-type]  # edm cd ct ict ect pd sct scd meanflow tcm (cmkit.losses)
TimeInput = Literal["default", "t", "log_sigma"]
SamplerName = Literal[SAMPLER_NAMES]  # type: ignore[valid-type]  # the registry of cmkit.sampling


#: EDM's networks (cmkit.nets.edm) and the noise embedding each has.
EDM_EMBEDDING = {"ddpmpp": "positional", "ncsnpp": "fourier", "dhariwal": "positional"}


@dataclass
class ModelConfig:
    """Backbone and preconditioning of a denoiser ``model(x, sigma, class_labels=None) -> x0``."""

    arch: Arch = "unet"  # unet | mlp | adm (the CM paper's released network) |
    # ddpmpp | ncsnpp | dhariwal (EDM's networks, cmkit.nets.edm) | diffusers (the UNet of model.diffusers)
    diffusers: str = ""  # arch=diffusers: the diffusers pipeline or UNet directory whose UNet the student is
    # (default: train.teacher; its weights come from train.init_from, which defaults to it too)
    img_resolution: int = 8  # image side
    in_channels: int = 1  # image channels
    model_channels: int = 32  # unet: width of the first level
    channel_mult: tuple[int, ...] = (1, 2)  # unet: width multipliers per level (one halving per level)
    num_blocks: int = 1  # unet: residual blocks per level
    attn_resolutions: tuple[int, ...] = ()  # unet: resolutions with self-attention
    dropout: float = 0.0  # dropout probability in residual blocks
    checkpointing: bool = False  # recompute block activations in the backward pass (less memory, 1 more forward)
    num_classes: int = 0  # class-conditional when > 0
    embedding: Embedding = "positional"  # noise embedding: positional | fourier
    fourier_scale: float = 16.0  # fourier embedding frequency scale
    positional_scale: float = 1000.0  # unet, mlp: positional embedding of scale·c_noise (ADM 1000;
    # sCM's stable c_noise(t) = t uses 1)
    head_channels: int = 64  # unet: channels per attention head
    hidden: int = 128  # mlp: hidden width
    depth: int = 3  # mlp: hidden layers
    scale_shift: bool = True  # adm: scale-shift noise conditioning (use_scale_shift_norm)
    resblock_updown: bool = True  # adm: resample inside residual blocks
    augment_dim: int = 0  # ddpmpp, ncsnpp, dhariwal: EDM's augmentation-label inputs (9 in
    # its released CIFAR-10/FFHQ/AFHQ models; no labels are passed)
    precond: PrecondKind = "cm"  # edm (diffusion teacher) | cm (boundary condition f(x, σ_min) = x)
    # | vp, ve (EDM's baseline-* teachers, sampling only)
    # | trigflow (sCM) | meanflow (two-time flow map)
    time_inputs: int = 1  # unet, mlp: 2 adds a second scalar input (meanflow's t − r; LCM's guidance scale w)
    time_input: TimeInput = "default"  # trigflow's noise input: default (= t, sCM) | t | log_sigma
    # (EDM's ln σ/4: to fine-tune an EDM-trained network)
    sigma_min: float = SIGMA_MIN  # σ_min (consistency boundary)
    sigma_max: float = SIGMA_MAX  # σ_max (one-step sampling starts here)
    sigma_data: float = SIGMA_DATA  # σ_data of the preconditioning and the weightings

    NET_KEYS: ClassVar[tuple[str, ...]] = (
        "img_resolution",
        "in_channels",
        "model_channels",
        "channel_mult",
        "num_blocks",
        "attn_resolutions",
        "dropout",
        "num_classes",
        "embedding",
        "fourier_scale",
        "positional_scale",
        "head_channels",
        "hidden",
        "depth",
        "scale_shift",
        "resblock_updown",
        "augment_dim",
        "time_inputs",
    )

    def build(self) -> Any:
        """Backbone + preconditioning (``cmkit.precond.Precond``) with freshly initialised weights; for
        ``arch=diffusers`` the diffusers UNet of ``model.diffusers`` as an LCM (``cmkit.discrete_vp.lcm_student``)."""
        if self.arch == "diffusers":
            return lcm_student(self.diffusers, self.time_inputs == 2, self.checkpointing)
        net = build_net(self.arch, **{k: getattr(self, k) for k in self.NET_KEYS})
        set_checkpointing(net, self.checkpointing)
        if self.precond in ("vp", "ve"):  # EDM's baseline-* teachers
            return VPPrecond(net) if self.precond == "vp" else VEPrecond(net)
        return Precond(net, self.precond, self.sigma_data, self.sigma_min, self.sigma_max, self.time_input)

    def check(self) -> None:
        require(
            not (self.checkpointing and self.arch == "mlp"),
            "model.checkpointing applies to the unet, adm and EDM networks' blocks; the mlp has none",
        )
        for key, most in (
            ("img_resolution", 4096),
            ("in_channels", 64),
            ("model_channels", 4096),
            ("num_blocks", 64),
            ("head_channels", 4096),
            ("hidden", 65536),
            ("depth", 256),
        ):
            value = getattr(self, key)
            require(1 <= value <= most, f"model.{key} must be between 1 and {most}, got {value}")
        require(
            0 <= self.num_classes <= 1_000_000,
            f"model.num_classes must be 0 (unconditional) to 1,000,000, got {self.num_classes}",
        )
        require(
            bool(self.channel_mult) and all(1 <= m <= 64 for m in self.channel_mult) and len(self.channel_mult) <= 12,
            f"model.channel_mult must be 1 to 12 integers between 1 and 64, got {list(self.channel_mult)}",
        )
        require(self.fourier_scale > 0, f"model.fourier_scale must be positive, got {self.fourier_scale}")
        require(self.positional_scale > 0, f"model.positional_scale must be positive, got {self.positional_scale}")
        require(
            self.positional_scale == 1000.0 or (self.arch in ("unet", "mlp") and self.embedding == "positional"),
            "model.positional_scale applies to model.arch=unet or mlp with model.embedding=positional",
        )
        require(
            0 < self.sigma_min < self.sigma_max,
            f"need 0 < model.sigma_min < model.sigma_max, got {self.sigma_min}, {self.sigma_max}",
        )
        require(self.sigma_data > 0, f"model.sigma_data must be positive, got {self.sigma_data}")
        require(0 <= self.dropout < 1, f"model.dropout must lie in [0, 1), got {self.dropout}")
        require(
            self.time_input == "default" or self.precond == "trigflow",
            f"model.time_input={self.time_input} applies to model.precond=trigflow only",
        )
        require(self.time_inputs in (1, 2), f"model.time_inputs must be 1 or 2, got {self.time_inputs}")
        require(
            self.precond not in TWO_TIME_KINDS or self.time_inputs == 2,
            f"model.precond={self.precond} needs model.time_inputs=2 (a flow map takes two times)",
        )
        require(
            self.time_inputs == 1 or self.arch in ("unet", "mlp", "diffusers"),
            f"model.time_inputs=2 needs model.arch=unet, mlp or diffusers, got {self.arch}",
        )
        self._check_arch()

    def _check_arch(self) -> None:
        """The rules particular to one architecture: embeddings, group-norm widths, levels and attention."""
        require(
            self.arch == "diffusers" or not self.diffusers,
            f"model.diffusers names the UNet of model.arch=diffusers (this network is model.arch={self.arch})",
        )
        if self.arch == "diffusers":
            require(
                self.precond == "cm",
                "model.arch=diffusers trains a diffusers UNet as a latent consistency model: model.precond=cm "
                "(loss.method=lcm)",
            )
        if self.arch == "adm":
            require(
                self.embedding == "positional",
                "model.arch=adm embeds the noise level positionally; set model.embedding=positional",
            )
            bad = [m * self.model_channels for m in self.channel_mult if (m * self.model_channels) % 32]
            require(not bad, f"model.arch=adm uses GroupNorm(32): widths {bad} are not multiples of 32")
        if self.arch in EDM_EMBEDDING:
            want = EDM_EMBEDDING[self.arch]
            require(
                self.embedding == want,
                f"model.arch={self.arch} embeds the noise level with {want} features; set model.embedding={want}",
            )
            widths = {m * self.model_channels for m in self.channel_mult} | {self.model_channels}
            bad = sorted(w for w in widths if w < 4 or w % min(32, w // 4))
            require(not bad, f"model.arch={self.arch} uses GroupNorm(min(32, C/4)): widths {bad} do not split")
            require(0 <= self.augment_dim <= 64, f"model.augment_dim must be 0 to 64, got {self.augment_dim}")
        else:
            require(
                self.augment_dim == 0,
                f"model.augment_dim is an option of EDM's networks (model.arch=ddpmpp, "
                f"ncsnpp or dhariwal), not of model.arch={self.arch}",
            )
        if self.arch in ("unet", "adm", *EDM_EMBEDDING):
            levels = 2 ** (len(self.channel_mult) - 1)
            require(
                self.img_resolution % levels == 0,
                f"model.img_resolution={self.img_resolution} must be divisible by {levels} "
                f"(2^(len(model.channel_mult) - 1))",
            )
            reached = {self.img_resolution // 2**i for i in range(len(self.channel_mult))}
            bad = sorted(set(self.attn_resolutions) - reached)
            require(not bad, f"model.attn_resolutions {bad} are never reached; the levels run at {sorted(reached)}")


class _LossSection:
    """The behaviour of the ``loss`` section; its fields are generated from the losses' declarations below."""

    method: str

    def options(self) -> dict[str, Any]:
        """The options set in this section (not ``None``), without the method."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "method" and getattr(self, f.name) is not None
        }

    def loss_class(self) -> Any:
        return LOSSES[self.method]

    def accepted(self) -> list[str]:
        """Option names the method's loss takes (its ``OPTIONS``)."""
        return list(self.loss_class().OPTIONS)

    def check(self) -> None:
        """Every set option is one the method takes, in its range or among its names; the method's rules across
        options (``RULES``, e.g. s1 ≥ s0) hold for the values it will use (the set ones, else its defaults)."""
        declared, given = options_of(self.loss_class()), self.options()
        unused = [k for k in given if k not in declared]
        require(
            not unused,
            f"loss.{unused[0] if unused else ''} is not an option of method {self.method!r} "
            f"(its options: {', '.join(declared) or 'none'})",
        )
        for key, value in given.items():
            opt = declared[key][2]
            problem = opt.problem(value)
            if problem and opt.choices is not None:
                raise CmkitError(f"loss.{key}={value!r} is not a {key} of method {self.method!r} (expected {problem})")
            require(problem is None, f"loss.{key} must be {problem}, got {value}")
        values = {name: given.get(name, default) for name, (_, default, _) in declared.items()}
        for rule, message, keys in getattr(self.loss_class(), "RULES", ()):
            shown = ", ".join(f"loss.{k}={values[k]}" for k in keys)
            require(rule(values), f"{message} (method {self.method!r}: {shown})")

    def describe(self, steps: int) -> str:
        """The method's options, one per line: the value it will use (set here, or its default; total_steps is
        train.steps = ``steps`` unless set) and the help."""
        given, declared = self.options(), options_of(self.loss_class())
        defaults = {name: steps if name == "total_steps" else default for name, (_, default, _) in declared.items()}
        rows = [
            (f"loss.{name}={given.get(name, defaults[name])}", "" if name in given else " (default)", opt.help)
            for name, (_, _, opt) in declared.items()
        ]
        width = max((len(a) + len(b) for a, b, _ in rows), default=0)
        return "\n".join(f"  {a + b:<{width}}  {h}" for a, b, h in rows)

    def build(self, model: ModelConfig, steps: int) -> Any:
        """The loss object of ``method`` with the set options, the σ range, σ_data and K."""
        cls = self.loss_class()
        params = parameters(cls)
        common = {
            "sigma_min": model.sigma_min,
            "sigma_max": model.sigma_max,
            "sigma_data": model.sigma_data,
            "total_steps": steps,
        }
        return cls(**{**{k: v for k, v in common.items() if k in params}, **self.options()})


def _loss_fields() -> list[tuple[str, Any, Any]]:
    """One field per option of any loss (``cmkit.losses``, each loss's ``OPTIONS``): ``Optional`` of the type its
    constructors give it, or of a ``Literal`` of every name it takes, defaulting to None (the method's default)."""
    types: dict[str, Any] = {}  # in the order the options first appear in LOSSES
    for cls in LOSSES.values():
        for name, (hint, _, opt) in options_of(cls).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            base = args[0] if len(args) == 1 else hint
            if opt.choices is not None:  # a Literal of every name any method takes
                seen = typing.get_args(types.get(name, Literal[()]))
                base = Literal[seen + tuple(c for c in opt.choices if c not in seen)]
            elif types.setdefault(name, base) != base:
                raise TypeError(f"loss option {name} has type {types[name]} in one loss and {base} in {cls.__name__}")
            types[name] = base
    return [(name, Optional[hint], field(default=None)) for name, hint in types.items()]


LossConfig = dataclasses.make_dataclass(
    "LossConfig",
    [("method", Method, field(default="ict")), *_loss_fields()],
    bases=(_LossSection,),
    namespace={
        "__module__": __name__,
        "__doc__": """The method and its options; ``None`` keeps the method's
    published default. The options are the union of every loss's ``OPTIONS`` (``cmkit.losses.options``): an option
    the chosen method does not take is an error (``check``); the σ range, σ_data and total_steps (= train.steps
    unless set) reach every method that uses them.""",
    },
)


@dataclass
class CMTrainConfig(TrainConfig):
    """``TrainConfig`` plus where a consistency model starts from."""

    teacher: str = ""  # cd, pd, scd: the EDM teacher; tcm: the frozen first stage (model/run dir or shipped name)
    init_from: str = ""  # initialise the online network from these weights (cd, ect: the teacher)
    lora_rank: int = 0  # > 0: train only rank-r adapters (LoRA) on the init_from weights (LCM-LoRA); 0 = all weights
    lora_alpha: float = 0.0  # the adapters' α (scale α/r; 0 = r, scale 1)
    autoguide: str = ""  # a weaker version of the EDM teacher: distil D_weak + w·(D − D_weak) (autoguidance)
    autoguide_w: float = 1.0  # w of autoguidance (1: the teacher alone)

    def check(self) -> None:
        super().check()
        require(self.autoguide_w >= 1, f"train.autoguide_w must be at least 1 (1: off), got {self.autoguide_w}")
        require(
            self.autoguide_w == 1 or bool(self.autoguide),
            f"train.autoguide_w={self.autoguide_w} guides the teacher by a weaker model: set train.autoguide=PATH",
        )
        require(self.lora_rank >= 0, f"train.lora_rank must be 0 (off) or a rank ≥ 1, got {self.lora_rank}")
        require(self.lora_alpha >= 0, f"train.lora_alpha must be 0 (= the rank) or positive, got {self.lora_alpha}")
        require(
            not self.lora_rank or bool(self.init_from),
            "train.lora_rank adapts the weights of train.init_from (e.g. the teacher's): set train.init_from",
        )


@dataclass
class SampleConfig:
    """Default sampler of the trained model (written into its config.json) and the training grids."""

    sampler: SamplerName = "onestep"  # onestep | multistep | heun | euler | progdist | flowmap (meanflow)
    sigmas: tuple[float, ...] = ()  # the multistep σ list (descending, in [σ_min, σ_max])
    steps: int = 18  # heun/euler: number of σ levels
    guidance: float = 1.0  # w: an LCM model's guidance input, or a diffusion model's classifier-free guidance (1: none)
    grid_size: int = 64  # images in the training sample grids


@dataclass
class LatentConfig:
    """Train in a frozen autoencoder's latent space (``cmkit.latent``: LDM, LCM); empty = pixel space."""

    autoencoder: str = ""  # a KL autoencoder (`cmkit train --preset fmnist-ae`): model/run dir or shipped name
    image_size: int = 32  # images are padded to this side and encoded (the autoencoder's training side)
    mean: tuple[float, ...] = ()  # raw-latent mean per channel (measured on the training images when empty)
    std: tuple[float, ...] = ()  # raw-latent std per channel (measured with the mean)
    crop: int = 0  # side samples are cropped to after decoding (set from the data when the run starts; 0 = none)
    stats_images: int = 5000  # training images the mean and std are measured on

    def check(self) -> None:
        if not self.autoencoder:
            return
        require(self.image_size >= 1, f"latent.image_size must be at least 1, got {self.image_size}")
        require(self.stats_images >= 1, f"latent.stats_images must be at least 1, got {self.stats_images}")
        require(
            len(self.mean) == len(self.std) and all(s > 0 for s in self.std),
            f"latent.mean and latent.std are both empty (measured) or one value per channel with std > 0, got "
            f"{list(self.mean)} and {list(self.std)}",
        )
        require(
            0 <= self.crop <= self.image_size,
            f"latent.crop must be in [0, latent.image_size={self.image_size}], got {self.crop}",
        )


def is_diffusion(precond: str, method: str | None) -> bool:
    """``Config.is_diffusion`` from the two fields (also for a config.json read as a dict)."""
    return precond in ("edm", "vp", "ve") or method in ("edm", "pd")


@dataclass
class Config(RunConfig):
    """A diffusion (EDM) or consistency-model run: model, data, loss, train, sample."""

    kind: ClassVar[str] = "denoiser"
    measured_keys: ClassVar[tuple[str, ...]] = ("latent.mean", "latent.std", "latent.crop")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: CMTrainConfig = field(default_factory=CMTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)

    def is_diffusion(self) -> bool:
        """A diffusion model, sampled by solving its ODE (Heun, Euler, PD's steps): EDM-preconditioned, EDM's VP/VE,
        or a TrigFlow network trained with the diffusion loss (sCM's teacher); otherwise a one-step generator."""
        return is_diffusion(self.model.precond, self.loss.method)

    def describe_diffusers_student(self) -> None:
        """``model.arch=diffusers``: the student is the UNet of ``model.diffusers`` (default ``train.teacher``), so
        its latent shape, σ range (the ends of its schedule's table, where LCM's boundary sits), initial weights
        (``train.init_from``) and, unless given, its sampling σ (LCM's 4 timesteps) are that model's."""
        m, t = self.model, self.train
        m.diffusers = m.diffusers or t.teacher
        require(
            bool(m.diffusers),
            "model.arch=diffusers is a diffusers UNet: set train.teacher (or model.diffusers) to a diffusers "
            "pipeline or UNet directory",
        )
        t.init_from = t.init_from or m.diffusers
        if not Path(m.diffusers).expanduser().is_dir():
            return  # named but absent: `missing_inputs` says so, before anything is built
        m.diffusers = str(Path(m.diffusers).expanduser().resolve())  # the exported model finds it from anywhere
        unet = unet_config(m.diffusers)
        size = unet.get("sample_size") or 0
        m.img_resolution = int(size[0] if isinstance(size, (list, tuple)) else size)
        m.in_channels = int(unet.get("in_channels", 4))
        _, alphas, _, scheduler_config = read_schedule(m.diffusers)
        table = sigmas_of(alphas)
        m.sigma_min, m.sigma_max = float(table[0]), float(table[-1])
        if not self.sample.sigmas:
            self.sample.sigmas = tuple(float(table[i]) for i in lcm_timesteps(scheduler_config, 4))

    def validate(self) -> None:
        m, method = self.model, self.loss.method
        if m.arch == "diffusers":
            require(method == "lcm", f"model.arch=diffusers is an LCM student: loss.method=lcm (got {method})")
            self.describe_diffusers_student()
        super().validate()
        m.check()
        self.loss.check()

        want = PRECOND_OF.get(method, "cm")
        if method == "edm" and m.precond == "trigflow":  # a TrigFlow diffusion model (sCM's teacher): EDM's
            want = "trigflow"  # scalings, so EDM's loss is its velocity loss
        why = {
            "edm": "a diffusion model (teacher or PD student) is EDM-preconditioned",
            "cm": "a consistency model needs the boundary condition f(x, σ_min) = x",
            "trigflow": "sCM trains TrigFlow's f = cos t·x_t − sin t·σ_d·F_θ",
            "meanflow": "MeanFlow trains a two-time flow map (also set model.time_inputs=2)",
            "flowmap": "AYF trains a two-time flow map in CTM's form (also set model.time_inputs=2)",
        }[want]
        require(m.precond == want, f"loss.method={method} needs model.precond={want} (got {m.precond}): {why}")
        guidance_input = m.time_inputs == 2 and m.precond not in TWO_TIME_KINDS
        require(
            guidance_input == (method == "lcm") or m.arch == "diffusers",  # LCM-LoRA: no guidance input
            "model.time_inputs=2 outside meanflow is LCM's guidance-scale input: loss.method=lcm and "
            f"model.time_inputs=2 go together (got loss.method={method}, model.time_inputs={m.time_inputs})",
        )
        require(
            method != "lcm" or m.num_classes > 0 or m.arch == "diffusers",
            "loss.method=lcm distils classifier-free guidance: it needs a class-conditional model (model.num_classes) "
            "or a text-conditioned one (model.arch=diffusers)",
        )
        distils = LOSSES[method].needs_teacher
        users = ", ".join(k for k, v in LOSSES.items() if v.needs_teacher)
        what = (
            "the frozen first-stage consistency model (e.g. an ECT run)"
            if method == "tcm"
            else "an EDM model or run directory"
        )
        require(
            not distils or bool(self.train.teacher),
            f"loss.method={method} needs a teacher: set train.teacher=PATH ({what})",
        )
        require(
            distils or not self.train.teacher,
            f"train.teacher is only used by loss.method={users} (this run is {method})",
        )
        diffusion_users = [k for k, v in LOSSES.items() if v.needs_teacher and not hasattr(v, "teacher_precond")]
        require(
            not self.train.autoguide or method in diffusion_users,
            f"train.autoguide guides a diffusion teacher: it applies to loss.method={', '.join(diffusion_users)} "
            f"(this run is {method})",
        )
        for option, default in (("label_dropout", 0.0), ("guidance", 1.0)):
            value = getattr(self.loss, option)
            require(
                value in (None, default) or m.num_classes > 0,
                f"loss.{option}={value} is classifier-free guidance: it needs a class-conditional model "
                f"(model.num_classes > 0)",
            )
        self.data.check()
        self.latent.check()
        classes = DATA_CLASSES.get(self.data.name)
        require(
            not m.num_classes or classes is None or 0 < m.num_classes <= classes,
            f"model.num_classes={m.num_classes} but data set {self.data.name!r} has "
            f"{'no labels' if not classes else f'{classes} classes'}",
        )
        require(self.sample.grid_size >= 1, f"sample.grid_size must be at least 1, got {self.sample.grid_size}")
        s = list(self.sample.sigmas)
        require(
            all(a > b for a, b in zip(s, s[1:])) and all(m.sigma_min <= v <= m.sigma_max for v in s),
            f"sample.sigmas must decrease within [{m.sigma_min}, {m.sigma_max}], got {s}",
        )
