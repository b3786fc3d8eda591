"""``ttaperso serve``: the HTTP API in one process, or in front of Ray Serve replicas.

Registered in :mod:`ttaperso.cli` by :func:`add_parser`; imports FastAPI, uvicorn and Ray
only when the command runs (they are the ``serve`` extra).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["add_parser", "run_serve_command", "TOKEN_ENV"]

log = logging.getLogger("ttaperso.serve")

#: environment variable holding the server token (preferred to --token: not in `ps`)
TOKEN_ENV = "TTAPERSO_TOKEN"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``ttaperso`` sub-commands."""
    from ..personalizer.personalizer import DEFAULT_STRATEGY

    serve = subparsers.add_parser(
        "serve",
        help="serve personalization over HTTP (FastAPI; --ray for Ray Serve replicas)",
        description="Serve a Personalizer over HTTP with OpenAPI docs at /docs. Default: one "
        "process, states in a local folder (--states). With --ray: replicas on Ray Serve "
        "routed by subject id, states in a shared store (--store redis://...). Every endpoint "
        f"but /health needs `Authorization: Bearer <token>` (--token, --token-file or "
        f"${TOKEN_ENV}). See docs/serving.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument(
        "--token", help=f"server token (prefer ${TOKEN_ENV} or --token-file: not in `ps`)"
    )
    serve.add_argument("--token-file", metavar="FILE", help="file holding the server token")
    serve.add_argument(
        "--model",
        default="fer-mini-xception",
        help="a `ttaperso models` name, 'tiny' (test model) or package.module:function "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--strategy", default=DEFAULT_STRATEGY, help="strategy (default: %(default)s)"
    )
    serve.add_argument(
        "--options", default="{}", metavar="JSON", help="strategy options, e.g. '{\"lr\": 1e-4}'"
    )
    store = serve.add_mutually_exclusive_group()
    store.add_argument(
        "--states", metavar="DIR", help="state folder (FolderStore; the default: ./states)"
    )
    store.add_argument(
        "--store", metavar="URL", help="shared store: redis://host:port/db (RedisStore)"
    )
    serve.add_argument("--namespace", default="ttaperso", help="Redis key prefix")
    serve.add_argument(
        "--keep-versions", type=int, default=8, help="versions kept per subject (default: 8)"
    )
    serve.add_argument(
        "--audit",
        metavar="DIR",
        help="audit log folder (default: <states>/audit with --states; none with --store)",
    )
    serve.add_argument("--no-audit", action="store_true", help="no audit log")
    serve.add_argument(
        "--save-every",
        type=float,
        default=0.0,
        metavar="S",
        help="0 (default): save each subject before answering; S > 0: every S seconds and on "
        "shutdown (one process only; answers may then be acknowledged before they are stored)",
    )
    serve.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024)
    serve.add_argument("--max-frames", type=int, default=64, help="frames per request")
    serve.add_argument("--max-image-pixels", type=int, default=1024 * 1024)
    serve.add_argument("--max-subjects", type=int, default=64, help="subjects per predict_many")
    serve.add_argument("--threads", type=int, default=1, help="torch threads per process")
    serve.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="serve through Ray Serve replicas; ADDRESS of a running cluster, or none for a "
        "local one on loopback",
    )
    serve.add_argument("--replicas", type=int, default=2, help="Ray replicas (default: 2)")
    serve.add_argument(
        "--max-resident", type=int, default=4096, help="hot subjects per replica (LRU)"
    )
    serve.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica")
    serve.add_argument("--access-log", action="store_true", help="log every request line")
    return serve


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    else:
        token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise ConfigError(
            f"ttaperso serve needs a token: set ${TOKEN_ENV}, or pass --token-file FILE or "
            '--token (e.g. python -c "import secrets; print(secrets.token_urlsafe(32))")'
        )
    if len(token) < 16:
        raise ConfigError("the server token must have at least 16 characters")
    return token


def spec_from_args(args: argparse.Namespace) -> Any:
    """The :class:`ServiceSpec` the flags describe."""
    from .service import ServiceSpec

    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--options is not JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise ConfigError(f"--options must be a JSON object, got {args.options!r}")
    if args.ray is not None and not args.store:
        raise ConfigError(
            "--ray needs a shared store: --store redis://host:port/db (replicas cannot share "
            "a local folder safely)"
        )
    store = args.store or args.states or "states"
    audit = None
    if not args.no_audit:
        audit = args.audit or (None if args.store else str(Path(store) / "audit"))
    return ServiceSpec(
        model=args.model,
        strategy=args.strategy,
        options=options,
        store=store,
        keep_versions=args.keep_versions,
        namespace=args.namespace,
        audit=audit,
        save_every=args.save_every,
        threads=args.threads,
    )


def run_serve_command(args: argparse.Namespace) -> int:
    """Run the server until interrupted; pending states are saved on the way out."""
    try:
        import uvicorn

        from .app import create_app
        from .decode import Limits
        from .models import resolve_model
        from .service import SubjectService
    except ImportError as exc:
        raise ConfigError(
            f"ttaperso serve needs the serve extra ({exc.name} is missing): "
            "pip install 'ttaperso[serve]'"
        ) from exc

    token = _token(args)
    spec = spec_from_args(args)
    limits = Limits(
        max_request_bytes=args.max_request_bytes,
        max_frames=args.max_frames,
        max_image_pixels=args.max_image_pixels,
        max_subjects=args.max_subjects,
    )
    model = resolve_model(spec.model)  # the front's copy (prepare, labels); warms the cache
    backend: Any
    if args.ray is None:
        backend = SubjectService.from_spec(spec, model=model)
        mode = "one process"
    else:
        from .ray_backend import RayBackend

        backend = RayBackend.start(
            spec,
            address=None if args.ray == "local" else args.ray,
            replicas=args.replicas,
            max_resident=args.max_resident,
            replica_cpus=args.replica_cpus,
            num_cpus=max(os.cpu_count() or 1, int(args.replicas * args.replica_cpus + 0.999)),
        )
        mode = f"Ray Serve, {args.replicas} replica(s)"
    store_kind = "redis" if spec.store.startswith(("redis://", "rediss://")) else "folder"
    description = {
        "strategy": spec.strategy,
        "store": store_kind,
        "mode": mode,
        "save_policy": "write-through" if spec.save_every == 0 else f"every {spec.save_every} s",
        "audit": spec.audit is not None,
    }
    app = create_app(backend, model, token, limits=limits, description=description)
    log.info(
        "serving %s (%s, strategy %s, %s store) on http://%s:%d (docs at /docs)",
        spec.model,
        mode,
        spec.strategy,
        store_kind,
        args.host,
        args.port,
    )
    # The app's shutdown closes the backend (pending states saved) before uvicorn re-raises
    # SIGTERM/SIGINT; the finally covers a server that failed to start.
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            access_log=args.access_log,
            log_level="info" if args.access_log else "warning",
            timeout_graceful_shutdown=30,
        )
    finally:
        backend.close()
    return 0
