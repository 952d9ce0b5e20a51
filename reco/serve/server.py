"""Running the app under uvicorn (`reco serve`): the host check, the socket, graceful shutdown."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
from typing import Any

GRACEFUL_S = 20  # at most this long for requests in flight after SIGTERM/SIGINT


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may resolve anywhere


def check_host(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise ValueError(
            f"--host {host} is not a loopback address: anyone who can reach it could search the "
            "memory; give --token (or $RECO_SERVE_TOKEN), or serve on 127.0.0.1"
        )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto
    # says TCP; without it Nagle holds each response's body (written after its headers) until
    # the client's delayed ACK of the headers, ~40 ms a request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    backend: str = "fused",
    device: str | None = None,
    max_batch: int = 64,
    max_wait_ms: float = 2.0,
    refresh_s: float = 5.0,
    checkpoint: str | None = None,
    config: str | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    model_configs: list[str] | None = None,
    allow_random_weights: bool = False,
    log_level: str = "warning",
) -> int:
    """Serves the memory at path until SIGTERM or SIGINT; 0 after a graceful shutdown. Prints
    `reco serve: listening on http://HOST:PORT` once the indices are built."""
    import uvicorn

    from .app import EncoderOptions, Service, create_app

    check_host(host, token)
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    if max_wait_ms < 0:
        raise ValueError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
    if not 0 <= port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    explainer: Any = None
    if checkpoint is not None and config is None:
        raise ValueError("--checkpoint needs --config (the experiment config it was trained with)")
    if config is not None:  # POST /explain; without it, a 404 {"error": ...}
        from .explain import Explainer

        explainer = Explainer.load(config, checkpoint)  # no checkpoint: the latest of out_dir
    encoders = EncoderOptions(model, pretrained, list(model_configs or []), device,
                              allow_random_weights)  # fmt: skip
    service = Service.open(
        path,
        backend=backend,
        device=device,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        refresh_s=refresh_s or None,
        encoders=encoders,
        explainer=explainer,
    )
    try:
        app = create_app(service, token=token)
        sock = bind(host, port)
    except BaseException:
        service.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    print(f"reco serve: listening on http://{shown}:{sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=log_level,
            timeout_graceful_shutdown=GRACEFUL_S,
            lifespan="on",
            access_log=False,
        )
    )
    # uvicorn re-raises the signal that stopped it once it is done: with these handlers that
    # ends in a return (exit 0) rather than death by the default action.
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stopped.append(s))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        service.close()
    if not server.started:
        print("reco serve: the server did not start", file=sys.stderr)
        return 1
    return 0
