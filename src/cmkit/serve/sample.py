"""The Sample tab: any model with any sampler, and a consistency model beside its teacher."""

from __future__ import annotations

import time

from ..errors import CmkitError
from ..generate import sample_images
from ..imageio import to_uint8
from ..inputs import check_seed, parse_sigmas
from ..schedules import off_grid_note
from .common import MAX_PAGE_STEPS, MAX_SAMPLES, Result, as_float, as_int, grid_image


class SampleTab:
    """The Sample tab's work; a part of ``Backend``, which holds the models."""

    def sample(
        self,
        ref: str,
        sampler: str = "auto",
        steps: int | None = None,
        sigmas: str = "",
        seed: int = 0,
        n: int = 16,
        classes: str = "",
        guidance: float | None = None,
        prompts: str = "",
    ) -> Result:
        """``n`` images of model ``ref``; ``guidance`` w (None or 0: the model's own), ``prompts`` one per line
        (cycled; a text-to-image pipeline's)."""
        n, seed = as_int(n, "number of images", 1, MAX_SAMPLES), as_int(seed, "seed", 0, 2**62)
        w = None if guidance in (None, "", 0) else as_float(guidance, "guidance scale w", 0.0, 30.0, "the range")
        texts = [line.strip() for line in (prompts or "").splitlines() if line.strip()] or None
        steps = None if steps in (None, "", 0) else as_int(steps, "steps", 1, MAX_PAGE_STEPS)
        check_seed(seed, count=n)
        sigma_list = parse_sigmas(sigmas) if (sigmas or "").strip() else None
        if sigma_list and len(sigma_list) > MAX_PAGE_STEPS:
            raise CmkitError(f"at most {MAX_PAGE_STEPS} σ levels; got {len(sigma_list)}")
        m = self.load(ref)
        t0 = time.perf_counter()
        s = sample_images(
            m.model,
            m.cfg,
            n,
            sampler=None if sampler in ("", "auto", None) else sampler,
            steps=steps,
            sigmas=sigma_list,
            classes=classes or None,
            guidance=w,
            prompts=texts,
            seed=seed,
            batch_size=MAX_SAMPLES,
            device=self.device,
            progress=False,
        )
        x, sampler_name, sigma_list, evals = s.images, s.sampler, s.sigmas, s.nfe
        ms = 1000 * (time.perf_counter() - t0) / n
        sig = f", σ = {', '.join(f'{s:.4g}' for s in sigma_list)}" if sampler_name in ("onestep", "multistep") else ""
        info = (
            f"**{ref}**: {sampler_name}, {evals} network evaluation{'s' if evals > 1 else ''} (NFE){sig}; "
            f"{n} image{'s' if n > 1 else ''}, **{ms:.1f} ms per image**"
        )
        if (sigmas or "").strip() and sampler_name == "multistep":
            note = off_grid_note(sigma_list, m.grid)
            info += f"  \nnote: {note}" if note else ""

        r = Result({"grid": grid_image(x, nrow=min(8, n))}, info, to_uint8(x))
        r.extra.update(nfe=evals, ms_per_image=ms, sampler=sampler_name)
        return r

    def compare(self, ref: str, teacher: str = "", teacher_steps: int = 18, seed: int = 0, n: int = 16) -> Result:
        """The consistency model in one step beside its teacher's Heun sampler, same seeds, with the speed-up."""
        teacher = (teacher or "").strip() or self.teacher_for(ref)
        if not teacher:
            raise CmkitError(f"no teacher found for {ref!r}: choose a diffusion (EDM) model as the teacher")
        if not self.load(ref).is_cm:
            raise CmkitError(f"{ref!r} is a diffusion model: compare a consistency model with it as the teacher")
        if self.load(teacher).is_cm:
            raise CmkitError(f"teacher {teacher!r} is a consistency model; choose a diffusion (EDM) model")
        tsteps = as_int(teacher_steps, "teacher steps", 2, MAX_PAGE_STEPS)
        self.sample(ref, "onestep", 1, "", seed, 1)  # warm-up: first calls pay one-time costs, not the method
        self.sample(teacher, "heun", 2, "", seed, 1)
        cm = self.sample(ref, "onestep", 1, "", seed, n)
        te = self.sample(teacher, "heun", tsteps, "", seed, n)
        speed = te.extra["ms_per_image"] / max(cm.extra["ms_per_image"], 1e-9)
        info = (
            f"consistency model **{ref}**: 1 NFE, {cm.extra['ms_per_image']:.1f} ms/image · teacher "
            f"**{teacher}**: Heun, {te.extra['nfe']} NFE, {te.extra['ms_per_image']:.1f} ms/image · "
            f"**measured speed-up {speed:.0f}×**"
        )
        r = Result({"cm": cm.images["grid"], "teacher": te.images["grid"]}, info)
        r.extra.update(speedup=speed, teacher=teacher)
        return r
