"""The Gradio page of ``cmkit serve``: four tabs over :class:`~cmkit.serve.backend.Backend`.

Every event handler goes through :func:`guarded`: a user error (:class:`~cmkit.errors.CmkitError`, a bad number)
becomes one line in the tab's status box, and anything unexpected one line naming the exception (its traceback
goes to the server's log, never to the page). Gradio runs the handlers on its worker threads behind a queue,
so the page stays responsive while a model works. Elements carry ``elem_id`` s (``sample-run``, ``edit-canvas``,
``runs-loss``...) that the browser test and the screenshots use.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
import traceback
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from ..errors import CmkitError, one_line
from ..formats.zoo import BEST_ONESTEP
from ..imageio import make_grid
from ..sampling import SAMPLERS
from .backend import Backend
from .common import MAX_FRAMES, MAX_SAMPLES, display_scale, upscale

SAMPLER_CHOICES = ["auto", *SAMPLERS]  # auto: the model's own (cmkit.generate.resolve_sampler)
TASK_LABELS = {
    "inpaint": "inpaint (draw the region to fill)",
    "stroke": "stroke-guided (paint strokes)",
    "colorize": "colorize",
    "superres": "super-resolve",
    "denoise": "denoise",
    "interpolate": "interpolate",
}
PANEL_LABELS = {
    "inpaint": "input | known region (white: generated) | output",
    "stroke": "strokes | output",
    "colorize": "grey input | output",
    "superres": "low-resolution input | output",
    "denoise": "noisy input | output",
    "interpolate": "frames",
}
PLOTS = (("loss", "loss"), ("grad_norm", "grad norm"), ("lr", "learning rate"), ("img_per_s", "images / s"))
PALETTE = ["#ffffff", "#000000", "#808080", "#c0c0c0", "#e02020", "#20a020", "#2040e0", "#f0d020"]
CSS = """
.cmkit-error { color: #b00020; font-weight: 600; }
#sample-out img, #edit-out img, #edit-panel img, #edit-mask img, #sample-cm-out img, #sample-teacher-out img
  { image-rendering: pixelated; }
"""


def error_md(message: str) -> str:
    return f'<span class="cmkit-error">⚠ Error: {message}</span>'


def guarded(fn: Callable[..., tuple], n_outputs: int) -> Callable[..., tuple]:
    """Run ``fn`` (whose last output is the tab's status text); on any error keep the other outputs and show
    one line in the status instead of a traceback."""
    import gradio as gr

    def run(*args: Any) -> tuple:
        try:
            out = fn(*args)
            return out if isinstance(out, tuple) else (out,)
        except CmkitError as e:
            message = one_line(e, 400)
        except (ValueError, FileNotFoundError) as e:
            message = one_line(e, 400) or type(e).__name__
        except Exception as e:  # a bug: one line here, the traceback in the server's log
            traceback.print_exc(file=sys.stderr)
            message = f"internal error ({type(e).__name__}: {one_line(e, 200)}); the server log has the details"
        return tuple(gr.skip() for _ in range(n_outputs - 1)) + (error_md(message),)

    run.__name__ = getattr(fn, "__name__", "run")
    return run


def _schedule_text(sigmas: list[float]) -> str:
    return ",".join(f"{s:.5g}" for s in sigmas)


def _editor_value(image: np.ndarray) -> dict[str, Any]:
    big = upscale(image, display_scale(image.shape[0]))
    return {"background": big, "layers": [], "composite": big}


_DOWNLOADS: list[Path] = []


def _write_png(images: np.ndarray, name: str) -> str:
    """The native-size output as a PNG to download (a grid when there are several), in one temporary folder
    per process that is removed at exit (Gradio serves a copy from its own cache)."""
    from PIL import Image

    if not _DOWNLOADS:
        _DOWNLOADS.append(Path(tempfile.mkdtemp(prefix="cmkit-serve-")))
        atexit.register(shutil.rmtree, _DOWNLOADS[0], True)
    a = images[0] if len(images) == 1 else make_grid(images, nrow=len(images))
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    path = _DOWNLOADS[0] / uuid.uuid4().hex / name
    path.parent.mkdir()
    Image.fromarray(a).save(path)
    return str(path)


def _plot(key: str, title: str) -> Any:
    import gradio as gr

    return gr.LinePlot(
        x="step",
        y="value",
        title=title,
        label=title,
        x_title="step",
        y_title=title,
        height=220,
        elem_id=f"runs-{key.replace('_', '-')}",
    )


@dataclass
class _Models:
    """The model lists the tabs offer: every model, the consistency models, the diffusion models (teachers)."""

    all: list[str]
    cm: list[str]

    @property
    def default(self) -> str | None:
        """The Sample tab's first model: the best one-step model (compared with its teacher there)."""
        for name in (BEST_ONESTEP, "fmnist-cd"):
            if name in self.all:
                return name
        return self.all[0] if self.all else None

    @property
    def default_cm(self) -> str | None:
        return "fmnist-cd" if "fmnist-cd" in self.cm else (self.cm[0] if self.cm else None)

    @property
    def edm(self) -> list[str]:
        return [m for m in self.all if m not in self.cm]


def build(backend: Backend, refresh_s: float = 5.0) -> Any:
    """The page (a ``gradio.Blocks``); ``launch`` it, or mount it in another FastAPI app. Each tab is built and
    wired by its own function; the page's first load fills the Sample and Edit tabs and the Runs view."""
    import gradio as gr

    models = _Models(backend.model_choices(), backend.model_choices(consistency_only=True))
    with gr.Blocks(title="cmkit", delete_cache=(3600, 3600)) as demo:  # Gradio's copies of outputs: an hour
        gr.Markdown(
            "## cmkit: consistency models, one network evaluation per image\n"
            "Sample, edit by drawing, decode latents and watch training runs. Models are loaded once and "
            "cached; files are read only under the paths given to `cmkit serve`."
        )
        with gr.Tabs():
            sample = _sample_tab(backend, models)
            edit = _edit_tab(backend, models)
            _decode_tab(backend)
            runs = _runs_tab(backend, refresh_s)

        def on_load(s_ref: str | None, e_ref: str | None, run: str | None) -> tuple:
            n = len(sample.outputs)
            out: list[Any] = list(guarded(sample.model_changed, n)(s_ref)) if s_ref else [gr.skip()] * n
            try:
                img = backend.held_out(e_ref, 0) if e_ref else None
                out += [
                    img,
                    _editor_value(img) if img is not None else gr.skip(),
                    "held-out image #0 loaded: draw on it, or upload your own" if img is not None else "",
                ]
            except Exception as e:  # no data set installed, or a damaged one: the page still opens
                out += [gr.skip(), gr.skip(), f"no held-out images ({one_line(e)}); upload an image instead"]
            out += list(guarded(runs.view, len(runs.outputs))(run))
            return tuple(out)

        demo.load(
            on_load,
            [sample.model, edit.model, runs.select],
            [*sample.outputs, edit.src, edit.canvas, edit.status, *runs.outputs],
        )
    return demo


@dataclass
class _Tab:
    """What the page's first load needs from a tab: its model (or run) selector, the outputs it fills, and the
    function that fills them."""

    model: Any = None
    outputs: list[Any] = field(default_factory=list)
    model_changed: Callable[..., tuple] | None = None
    select: Any = None
    view: Callable[..., tuple] | None = None
    src: Any = None
    canvas: Any = None
    status: Any = None


def _sample_tab(backend: Backend, models: _Models) -> _Tab:
    """Sample: any model with any sampler, and a consistency model beside its teacher on the same seeds."""
    import gradio as gr

    with gr.Tab("Sample", id="sample"):
        with gr.Row():
            with gr.Column(scale=1):
                s_model = gr.Dropdown(
                    models.all,
                    value=models.default,
                    allow_custom_value=True,
                    label="model (shipped name, or a model/run directory)",
                    elem_id="sample-model",
                )
                s_info = gr.Markdown(elem_id="sample-info")
                s_sampler = gr.Radio(
                    SAMPLER_CHOICES,
                    value="auto",
                    label="sampler (auto: 1-step for consistency models, Heun for diffusion models)",
                    elem_id="sample-sampler",
                )
                with gr.Row():
                    s_steps = gr.Number(1, precision=0, label="steps", minimum=1, elem_id="sample-steps")
                    s_seed = gr.Number(0, precision=0, label="seed", minimum=0, elem_id="sample-seed")
                    s_n = gr.Number(
                        16,
                        precision=0,
                        label=f"images (≤ {MAX_SAMPLES})",
                        minimum=1,
                        maximum=MAX_SAMPLES,
                        elem_id="sample-n",
                    )
                s_schedule = gr.Dropdown(
                    [], label="σ schedules of this model (fills the σ list)", elem_id="sample-schedule"
                )
                s_sigmas = gr.Textbox(
                    "", label="σ list for multistep (e.g. 80,1.9233; empty: from steps)", elem_id="sample-sigmas"
                )
                s_class = gr.Textbox("", label="class label(s), conditional models only", elem_id="sample-class")
                s_guidance, s_prompt = _conditioning_fields()
                s_run = gr.Button("Generate", variant="primary", elem_id="sample-run")
            with gr.Column(scale=2):
                s_status = gr.Markdown(elem_id="sample-status")
                s_out = gr.Image(
                    label="samples",
                    type="numpy",
                    format="png",
                    interactive=False,
                    elem_id="sample-out",
                    buttons=["download"],
                )
        compare = _compare_row(backend, models)

    model_changed = partial(_model_summary, backend)

    def do_sample(
        ref: str, sampler: str, steps: Any, sigmas: str, seed: Any, n: Any, classes: str, w: Any, prompts: str
    ) -> tuple:
        r = backend.sample(ref, sampler, steps, sigmas, seed, n, classes, w, prompts)
        return r.images["grid"], r.info

    def do_compare(ref: str, teacher: str, tsteps: Any, seed: Any, n: Any) -> tuple:
        r = backend.compare(ref, teacher, tsteps, seed, n)
        return r.images["cm"], r.images["teacher"], r.info

    outputs = [s_info, s_schedule, compare.teacher, s_sampler, s_steps, s_status]
    s_model.change(guarded(model_changed, len(outputs)), s_model, outputs)
    s_schedule.change(lambda v: v.split(":", 1)[1].strip() if v and ":" in v else gr.skip(), s_schedule, s_sigmas)
    inputs = [s_model, s_sampler, s_steps, s_sigmas, s_seed, s_n, s_class, s_guidance, s_prompt]
    s_run.click(guarded(do_sample, 2), inputs, [s_out, s_status])
    compare.button.click(
        guarded(do_compare, 3),
        [s_model, compare.teacher, compare.steps, s_seed, s_n],
        [compare.cm, compare.te, compare.status],
    )
    return _Tab(model=s_model, outputs=outputs, model_changed=model_changed)


def _conditioning_fields() -> tuple[Any, Any]:
    """The Sample tab's guidance scale w and prompts (one per line) fields."""
    import gradio as gr

    guidance = gr.Number(
        0,
        label="guidance scale w (0: the model's own; LCM models and label-dropout diffusion models)",
        minimum=0,
        elem_id="sample-guidance",
    )
    prompt = gr.Textbox("", lines=2, label="prompts, one per line (text-to-image pipelines)", elem_id="sample-prompt")
    return guidance, prompt


def _model_summary(backend: Backend, ref: str) -> tuple:
    """What the Sample tab shows when its model changes: kind and size, σ schedules, teacher, default steps."""
    import gradio as gr

    info = backend.model_info(ref)
    sched = [f"{k}: {_schedule_text(v)}" for k, v in info["schedules"].items()]
    text = (
        f"{info['kind']}, {info['channels']}×{info['resolution']}×{info['resolution']}"
        + (f", {info['num_classes']} classes" if info["num_classes"] else "")
        + (f". {info['description']}" if info["description"] else "")
    )
    teacher = backend.teacher_for(ref) if info["schedules"] else None
    return (text, gr.update(choices=sched, value=None), gr.update(value=teacher), "auto", info["default_steps"], "")


def _compare_row(backend: Backend, models: _Models) -> SimpleNamespace:
    """The Sample tab's teacher comparison: its teacher, Heun steps, button, status and two image outputs."""
    import gradio as gr

    gr.Markdown("### Consistency model vs teacher: the same seeds, 1 step against Heun")
    with gr.Row():
        teacher = gr.Dropdown(
            models.edm,
            value=None,
            allow_custom_value=True,
            label="teacher: a diffusion model (filled in from the model's recipe)",
            elem_id="sample-teacher",
        )
        steps = gr.Number(
            18, precision=0, label="teacher Heun steps (2N-1 evaluations)", minimum=2, elem_id="sample-teacher-steps"
        )
        button = gr.Button("Compare with the teacher", elem_id="sample-compare")
    status = gr.Markdown(elem_id="compare-status")
    with gr.Row():
        cm = gr.Image(
            label="consistency model, 1 step",
            type="numpy",
            format="png",
            interactive=False,
            height=240,
            elem_id="sample-cm-out",
        )
        te = gr.Image(
            label="teacher, Heun",
            type="numpy",
            format="png",
            interactive=False,
            height=240,
            elem_id="sample-teacher-out",
        )
    return SimpleNamespace(teacher=teacher, steps=steps, button=button, status=status, cm=cm, te=te)


def _edit_tab(backend: Backend, models: _Models) -> _Tab:
    """Edit: a held-out or uploaded image, a mask or strokes drawn on it, and one of the six editing tasks."""
    import gradio as gr

    with gr.Tab("Edit", id="edit"):
        e_src = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                e_model = gr.Dropdown(
                    models.cm,
                    value=models.default_cm,
                    allow_custom_value=True,
                    label="consistency model",
                    elem_id="edit-model",
                )
                with gr.Row():
                    e_index = gr.Number(0, precision=0, minimum=0, label="held-out image #", elem_id="edit-index")
                    e_load = gr.Button("Load held-out image", elem_id="edit-load")
                e_upload = gr.Image(
                    label="…or upload an image of the model's size",
                    type="numpy",
                    image_mode=None,
                    sources=["upload"],
                    format="png",
                    height=160,
                    elem_id="edit-upload",
                )
                e_task = gr.Radio(
                    [(v, k) for k, v in TASK_LABELS.items()], value="inpaint", label="task", elem_id="edit-task"
                )
                e_class = gr.Textbox(
                    "", label="class label, conditional models only (empty: random from the seed)", elem_id="edit-class"
                )
                settings = _edit_settings()
                e_run = gr.Button("Run", variant="primary", elem_id="edit-run")
            with gr.Column(scale=2):
                out = _edit_outputs()

    def load_held_out(ref: str, index: Any) -> tuple:
        img = backend.held_out(ref, index)
        return img, _editor_value(img), f"held-out image #{int(index)} of {ref}'s test split"

    def uploaded(ref: str, image: np.ndarray | None) -> tuple:
        if image is None:
            return gr.skip(), gr.skip(), ""
        img = backend.check_upload(ref, image)
        return img, _editor_value(img), f"uploaded image loaded ({img.shape[1]}×{img.shape[0]})"

    loaded = [e_src, out.canvas, out.status]
    e_load.click(guarded(load_held_out, 3), [e_model, e_index], loaded)
    e_model.change(guarded(lambda ref: load_held_out(ref, 0), 3), e_model, loaded)
    e_upload.upload(guarded(uploaded, 3), [e_model, e_upload], loaded)
    e_run.click(
        guarded(partial(_run_edit, backend), 5),
        [e_model, e_task, e_src, out.canvas, e_class, *settings],
        [out.mask, out.out, out.panel, out.file, out.status],
    )
    return _Tab(model=e_model, src=e_src, canvas=out.canvas, status=out.status)


def _run_edit(
    backend: Backend,
    ref: str,
    task: str,
    src: np.ndarray | None,
    canvas: dict | None,
    classes: str,
    steps: Any,
    sigma: float,
    sigma_start: float,
    factor: Any,
    between: str,
    seed: Any,
    seed2: Any,
    frames: Any,
) -> tuple:
    """The Edit tab's Run: the task on the loaded image and what was drawn on it, through ``Backend.edit``."""
    import gradio as gr

    canvas = canvas or {}
    image, image2 = src, None
    if task == "interpolate":
        image, image2 = (None, None) if between == "two seeds" else (src, backend.held_out(ref, seed2))
    r = backend.edit(
        ref,
        task,
        image,
        canvas.get("layers") or [],
        canvas.get("composite"),
        steps=steps,
        sigma=sigma,
        sigma_start=sigma_start,
        factor=factor,
        frames=frames,
        seed=seed,
        seed2=seed2,
        image2=image2,
        classes=classes,
    )
    panel = gr.update(value=r.images.get("panel", r.images.get("strip")), label=PANEL_LABELS[task])
    output = None if task == "interpolate" else r.images["output"]  # the frames are the panel
    return r.images.get("mask"), output, panel, _write_png(r.native, f"{task}.png"), r.info


def _edit_settings() -> list[Any]:
    """The Edit tab's settings, in the order ``do_edit`` takes them: steps, σ, σ start, factor, between, seed,
    second seed, frames."""
    import gradio as gr

    with gr.Accordion("settings", open=False):
        steps = gr.Number(
            0,
            precision=0,
            minimum=0,
            label="σ levels (0: every level of the model's training grid)",
            elem_id="edit-steps",
        )
        sigma = gr.Slider(
            0.01,
            2.0,
            value=0.3,
            step=0.01,
            label="denoise: noise σ added and removed; interpolate images: σ",
            elem_id="edit-sigma",
        )
        sigma_start = gr.Slider(
            0.5,
            20.0,
            value=5.0,
            step=0.1,
            label="stroke-guided: σ the strokes are noised to",
            elem_id="edit-sigma-start",
        )
        factor = gr.Dropdown([2, 4, 7, 8], value=4, label="super-resolution factor", elem_id="edit-factor")
        between = gr.Radio(
            ["two seeds", "the image and a second held-out image"],
            value="two seeds",
            label="interpolate between",
            elem_id="edit-between",
        )
        with gr.Row():
            seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="edit-seed")
            seed2 = gr.Number(1, precision=0, minimum=0, label="second seed / held-out #", elem_id="edit-seed2")
            frames = gr.Number(9, precision=0, minimum=2, maximum=MAX_FRAMES, label="frames", elem_id="edit-frames")
    return [steps, sigma, sigma_start, factor, between, seed, seed2, frames]


def _edit_outputs() -> SimpleNamespace:
    """The Edit tab's right column: status, the drawing canvas, mask, output, panel and download."""
    import gradio as gr

    status = gr.Markdown(elem_id="edit-status")
    canvas = gr.ImageEditor(
        type="numpy",
        image_mode="RGBA",
        sources=[],
        transforms=[],
        layers=False,
        canvas_size=(280, 280),
        height=380,
        brush=gr.Brush(default_size=18, colors=PALETTE, default_color="#ffffff", color_mode="defaults"),
        label="draw the mask (inpaint) or paint strokes here",
        elem_id="edit-canvas",
    )
    with gr.Row():
        mask = gr.Image(
            label="mask (white: generated)", type="numpy", format="png", interactive=False, elem_id="edit-mask"
        )
        out = gr.Image(label="output", type="numpy", format="png", interactive=False, elem_id="edit-out")
    panel = gr.Image(label="before | after", type="numpy", format="png", interactive=False, elem_id="edit-panel")
    file = gr.File(label="download the output (model's size, PNG)", elem_id="edit-download")
    return SimpleNamespace(status=status, canvas=canvas, mask=mask, out=out, panel=panel, file=file)


def _decode_tab(backend: Backend) -> None:
    """Decode: a latents file and decoder weights on the server → images."""
    import gradio as gr

    with gr.Tab("Decode", id="decode"):
        with gr.Row():
            with gr.Column(scale=1):
                d_latents = gr.Textbox(
                    label="latents file on the server (.npy, .pt, .safetensors)", elem_id="decode-latents"
                )
                d_weights = gr.Textbox(
                    label="decoder weights on the server (decoder.pt, diffusers safetensors or a "
                    "cmkit decoder directory)",
                    elem_id="decode-weights",
                )
                with gr.Row():
                    d_steps = gr.Number(2, precision=0, minimum=1, label="steps", elem_id="decode-steps")
                    d_schedule = gr.Textbox(
                        "", label="or a schedule (fractions, e.g. 1.0,0.5)", elem_id="decode-schedule"
                    )
                with gr.Row():
                    d_dtype = gr.Radio(["fp32", "bf16", "fp16"], value="fp32", label="dtype", elem_id="decode-dtype")
                    d_tile = gr.Number(
                        0, precision=0, minimum=0, label="tile (latent px, 0: none)", elem_id="decode-tile"
                    )
                    d_seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="decode-seed")
                d_run = gr.Button("Decode", variant="primary", elem_id="decode-run")
            with gr.Column(scale=2):
                d_status = gr.Markdown(elem_id="decode-status")
                d_out = gr.Image(label="decoded", type="numpy", format="png", interactive=False, elem_id="decode-out")

    def do_decode(latents: str, weights: str, steps: Any, schedule: str, dtype: str, tile: Any, seed: Any) -> tuple:
        r = backend.decode(latents, weights, steps, schedule, dtype, tile, seed)
        return r.images["image"], r.info

    d_run.click(
        guarded(do_decode, 2), [d_latents, d_weights, d_steps, d_schedule, d_dtype, d_tile, d_seed], [d_out, d_status]
    )


def _runs_tab(backend: Backend, refresh_s: float) -> _Tab:
    """Runs: a training run's curves, sample grids and config, refreshed while it trains."""
    import gradio as gr
    import pandas as pd

    with gr.Tab("Runs", id="runs"):
        runs = backend.list_runs()
        with gr.Row():
            r_select = gr.Dropdown(
                runs,
                value=runs[0] if runs else None,
                label=(f"runs under {backend.runs_root}" if backend.runs_root else "no --runs directory given"),
                elem_id="runs-select",
                scale=3,
            )
            r_refresh = gr.Button("Refresh", elem_id="runs-refresh", scale=1)
            r_auto = gr.Checkbox(True, label=f"refresh every {refresh_s:g} s", elem_id="runs-auto", scale=1)
        r_status = gr.Markdown(elem_id="runs-status")
        with gr.Row():
            r_plots = [_plot(key, title) for key, title in PLOTS[:2]]
        with gr.Row():
            r_plots += [_plot(key, title) for key, title in PLOTS[2:]]
        r_samples = gr.Gallery(
            label="sample grids over time", columns=4, height=320, object_fit="contain", elem_id="runs-samples"
        )
        r_config = gr.Code(language="json", label="run config", max_lines=20, elem_id="runs-config")
        timer = gr.Timer(refresh_s)
        r_seen = gr.State(None)  # what the last automatic refresh showed (backend.run_stamp)

    def run_view(name: str | None) -> tuple:
        names = backend.list_runs()
        if not name:
            msg = "no runs yet" if backend.runs_root else "start `cmkit serve --runs DIR` to see training runs"
            return (gr.update(choices=names), *[None] * len(PLOTS), [], "", msg)
        v = backend.run_view(name)
        frames = []
        for key, _ in PLOTS:
            pts = [
                (r["step"], r[key])
                for r in v["rows"]
                if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))
            ]
            frames.append(pd.DataFrame(pts, columns=["step", "value"]))
        return (gr.update(choices=names), *frames, v["samples"], json.dumps(v["config"], indent=2), v["status"])

    def tick(name: str | None, auto: bool, seen: Any) -> tuple:
        """Refresh only when the list of runs or the chosen run's log and samples changed."""
        stamp = backend.run_stamp(name)
        if not auto or stamp == seen:
            return tuple(gr.skip() for _ in range(len(view_out) + 1))
        return (stamp, *run_view(name))

    view_out = [r_select, *r_plots, r_samples, r_config, r_status]
    r_select.change(guarded(run_view, len(view_out)), r_select, view_out)
    r_refresh.click(guarded(run_view, len(view_out)), r_select, view_out)
    timer.tick(
        guarded(tick, len(view_out) + 1), [r_select, r_auto, r_seen], [r_seen, *view_out], show_progress="hidden"
    )
    return _Tab(select=r_select, outputs=view_out, view=run_view)


def theme() -> Any:
    """Gradio's default theme with the system's fonts: the page makes no request beyond this server."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
