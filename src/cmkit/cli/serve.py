"""``cmkit serve``: the local web page (``pip install 'cmkit[ui]'``).

    cmkit serve [--host 127.0.0.1] [--port 7860] [--runs DIR] [--allow PATH ...] [--threads N]

Registered by ``add_cli(subparsers)`` without importing gradio; the handler imports it (one error line when the
``ui`` extra is missing).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import CmkitError, optional_import
from ..inputs import apply_threads, check_device, check_threads
from ..serve.app import CSS, build, theme
from ..serve.backend import Backend
from .options import add_device_option, add_threads_option

DEFAULT_PORT = 7860
#: the largest upload the page accepts (an image of a model's size is a few kB)
MAX_UPLOAD = "10mb"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_warning(host: str) -> str | None:
    """The warning printed for a non-local ``--host``, or None for a loopback address."""
    if is_loopback(host):
        return None
    return (
        f"cmkit serve: warning: --host {host} makes this page reachable from other machines; it has no "
        "login, and anyone who reaches it can run models here and read the files under --runs/--allow. "
        "Use the default 127.0.0.1 unless you mean it."
    )


def check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise CmkitError(f"--port must be between 0 and 65535; got {args.port}")
    if not args.host.strip():
        raise CmkitError("--host is empty; give an address such as 127.0.0.1")
    check_threads(args.threads)
    args.device = check_device(args.device)
    if args.runs is not None and not Path(args.runs).is_dir():
        raise CmkitError(f"--runs {args.runs}: not a directory")
    for p in args.allow:
        if not Path(p).exists():
            raise CmkitError(f"--allow {p}: no such file or directory")


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``cmkit serve``: check, warn about a non-local host, build the page and serve until Ctrl-C."""
    check_args(args)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports: the page talks to this server only
    optional_import("gradio", "ui", "cmkit serve")

    warning = bind_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    apply_threads(args.threads)
    backend = Backend(runs=args.runs, allow=args.allow, device=args.device)
    demo = build(backend, refresh_s=args.refresh)
    demo.queue(default_concurrency_limit=1)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(
        f"cmkit serve: http://{shown}:{args.port}/ (models: {', '.join(backend.model_choices()) or 'none'}; "
        f"readable paths: {', '.join(map(str, backend.policy.roots)) or 'shipped models only'})",
        flush=True,
    )
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        show_error=False,
        quiet=True,
        footer_links=["gradio"],
        allowed_paths=[],
        theme=theme(),
        css=CSS,
        ssr_mode=False,
        mcp_server=False,
        max_file_size=MAX_UPLOAD,
        prevent_thread_lock=False,
    )
    return 0


def add_cli(subparsers: Any) -> None:
    """Register ``cmkit serve``."""
    p = subparsers.add_parser(
        "serve",
        help="a local web page to sample, edit by drawing, decode and watch training runs",
        description="Serve a web page on this machine: sample any shipped or trained model (1-step, n-step, the "
        "teacher's Heun sampler, side by side with the speed-up), edit images by drawing masks or strokes, "
        "decode latents with a consistency decoder, and plot training runs as they train. Needs "
        "`pip install 'cmkit[ui]'`. The page reads files only under --runs and --allow.",
        epilog="examples:\n  cmkit serve\n  cmkit serve --runs runs --port 8000\n"
        "  cmkit serve --allow latents.npy --allow decoder_dir",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it, with a warning)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--runs", metavar="DIR", help="directory of training runs to list and plot (readable by the page)")
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PATH",
        help="another file or directory the page may read (model directories, latents, decoder weights); repeatable",
    )
    p.add_argument("--refresh", type=float, default=5.0, help="seconds between refreshes of the Runs tab (default 5)")
    add_threads_option(p)
    add_device_option(p)
    p.set_defaults(func=run_serve)
