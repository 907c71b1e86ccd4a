"""``cmkit serve``: a local web page to sample, edit by drawing, decode latents and watch training runs.

Four tabs (``app.py``) over one backend (``backend.py``) that only calls cmkit's API: ``cmkit.formats.zoo`` and
``cmkit.load.load_model`` for models, ``generate.generate``/``resolve_sampler`` for sampling,
``cmkit.editing.tasks`` for the six editing tasks, ``cmkit.decoder.ConsistencyDecoder`` for decoding, and
``cmkit.formats.run_dir.RunDir`` for a run's ``log.jsonl``, sample grids and config.

Why Gradio (``pip install 'cmkit[ui]'``, gradio 6): it is what the papers and model releases of this field ship
their demos with, so users know it; it has the two components this page needs and that would otherwise be
hand-written JavaScript, an image editor with a brush and layers (masks and stroke paintings drawn on the image)
and real plots (``LinePlot``); it queues requests onto worker threads (the page stays responsive while a model
works); its file routes serve only files it wrote itself unless told otherwise (``allowed_paths=[]`` here), and it
needs no network at run time (analytics off, system fonts). It installs next to torch 2.13 (CPU) and diffusers
0.42 without torchvision. Its one cost is size (FastAPI, pandas and a bundled front end), which is why it is an
optional extra, imported only by ``cmkit serve``. Streamlit re-runs the whole script on every interaction (models
would have to be cached around it and a drawing canvas is a third-party component); a hand-written page on
``http.server`` would need its own canvas, plotting and upload code, all untested elsewhere.

Security: the server binds 127.0.0.1 unless ``--host`` says otherwise (a non-local address prints a warning), and
a request reads files only under the paths given on the command line (``--runs``, ``--allow``; ``..`` and symbolic
links are resolved first, ``backend.PathPolicy``); shipped models are chosen by name.
"""

from __future__ import annotations

from .backend import Backend, PathPolicy

__all__ = ["Backend", "PathPolicy"]
