"""Shared fixtures: devices, dtypes, the per-dtype tolerance table and data isolation."""

from __future__ import annotations

import functools
import http.server
import os
import threading
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from manifold_nets import fused
from manifold_nets.experiments import data

# Build the fused kernel once, before any test: where it cannot be built, the one warning
# goes here and every test runs on the pure-torch step (tests/test_fused.py is skipped).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    fused.load()

settings.register_profile("default", deadline=None, max_examples=40)
settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]

#: Tolerances for identities that hold exactly in exact arithmetic.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float64: dict(atol=1e-11, rtol=1e-11),
}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
    return request.param


#: The local MNIST / Fashion-MNIST mirror (the Makefile exports MANIFOLD_NETS_MIRROR).
SHARED = Path(
    os.environ.get("MANIFOLD_NETS_MIRROR") or Path(__file__).resolve().parents[2] / "shared/data"
)
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir(), reason=f"no local MNIST mirror at {SHARED}"
)


@pytest.fixture(autouse=True)
def no_public_mirrors(monkeypatch, tmp_path):
    """No test may leave 127.0.0.1: no public mirrors, and an empty cache."""
    monkeypatch.setattr(data, "DEFAULT_MIRRORS", {k: () for k in data.DEFAULT_MIRRORS})
    monkeypatch.setenv("MANIFOLD_NETS_CACHE", str(tmp_path / "cache"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, queue, work, args) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        queue.put((rank, work(rank, *args)))
    finally:
        dist.destroy_process_group()
    # The result is sent; leave without the interpreter's teardown, where torch 2.13's gloo
    # threads can abort the process ("terminate called without an active exception") after
    # the work has finished. A failing ``work`` raises above and still exits non-zero.
    queue.close()
    queue.join_thread()
    os._exit(0)


def run_on_ranks(work, *args, world: int = 2, timeout: float = 300) -> dict:
    """``work(rank, *args)`` in ``world`` spawned processes of one gloo process group on
    127.0.0.1 (one torch thread each); returns every rank's result, by rank. ``work`` must
    be a module-level function (the processes import it)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, queue, work, args))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@pytest.fixture
def serve():
    """Start an HTTP server on 127.0.0.1 serving a folder; returns its base URL."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
