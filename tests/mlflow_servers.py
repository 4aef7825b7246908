"""Start a real MLflow tracking server and a model-serving process for tests, and stop them cleanly.

Reusable by any test (``from mlflow_servers import mlflow_tracking_server``; tests/conftest.py puts tests/ on
sys.path). Everything a server writes (SQLite DB, artifacts, logs, HOME) lives under the folder the
caller gives, and both servers bind 127.0.0.1 only. Each server runs in its own process group, which is killed
on exit, so uvicorn workers do not outlive a failed test.

Example::

    with mlflow_tracking_server(tmp_path / "tracking") as tracking:
        register_car_model(f, g, f_cfg, g_cfg, tracking_uri=tracking.url)
        with mlflow_model_server("models:/car-lidc/1", tmp_path / "serve", tracking.url) as serving:
            requests.post(serving.url + "/invocations", json={"inputs": x.tolist()})
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ServerProcess",
    "free_port",
    "http_json",
    "mlflow_cli",
    "mlflow_model_server",
    "mlflow_tracking_server",
    "server_env",
    "wait_until_up",
]

#: the folder holding the car_med package, put on the servers' PYTHONPATH so they import this checkout
REPO_ROOT = Path(__file__).resolve().parents[1]


def mlflow_cli() -> list[str] | None:
    """The MLflow CLI of this Python (``python -m mlflow``), or ``None`` when the ``mlflow`` command is absent."""
    if shutil.which("mlflow") is None:
        return None
    # run it through this interpreter, so the servers see the same packages as the test
    return [sys.executable, "-m", "mlflow"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process could still take it before the server binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(home: Path, tracking_uri: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a server process: HOME under the test folder, no telemetry, this checkout importable."""
    env = dict(os.environ)
    home.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "true"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    # keep the servers from competing with the test for the two CPU cores
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    """A server started by this module: its base URL, process and log file."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left after ``timeout`` seconds."""
        if self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # uvicorn workers are in the same group; make sure none is left once the leader is gone
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def wait_until_up(server: ServerProcess, path: str, timeout: float) -> None:
    """Poll ``server.url + path`` until it answers 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server for {server.url} exited with code {server.process.returncode} before answering {path}; "
                f"log {server.log_path}:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(server.url + path, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(
        f"server for {server.url} did not answer {path} within {timeout:.0f} s; log {server.log_path}:\n"
        f"{server.log_tail()}"
    )


def _start(command: list[str], root: Path, name: str, port: int, env: dict[str, str]) -> ServerProcess:
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / f"{name}.log"
    log = log_path.open("wb")
    try:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    finally:
        log.close()  # the child holds its own handle
    return ServerProcess(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)


@contextmanager
def mlflow_tracking_server(root: Path, timeout: float = 120.0, workers: int = 1) -> Iterator[ServerProcess]:
    """Run ``mlflow server`` with a SQLite store and proxied artifacts under ``root``; yield it once it answers.

    The server's ``url`` is the tracking URI to give clients (``http://127.0.0.1:<port>``). Artifacts are
    uploaded through the server (``--artifacts-destination``), as with a remote team server.
    """
    cli = mlflow_cli()
    if cli is None:
        raise RuntimeError("the mlflow CLI is not installed")
    root = Path(root)
    port = free_port()
    command = cli + [
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", str(workers),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    server = _start(command, root, "tracking-server", port, server_env(root / "home"))
    try:
        wait_until_up(server, "/health", timeout)
        yield server
    finally:
        server.stop()


@contextmanager
def mlflow_model_server(
    model_uri: str, root: Path, tracking_uri: str | None = None, timeout: float = 180.0
) -> Iterator[ServerProcess]:
    """Run ``mlflow models serve -m model_uri --env-manager local``; yield it once ``/ping`` answers.

    ``tracking_uri`` (the tracking server's URL) resolves ``models:/`` URIs; the model is served from the
    environment of this test (``car_med`` must be importable, which ``server_env`` arranges).
    """
    cli = mlflow_cli()
    if cli is None:
        raise RuntimeError("the mlflow CLI is not installed")
    root = Path(root)
    port = free_port()
    command = cli + [
        "models", "serve",
        "-m", model_uri,
        "--env-manager", "local",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    server = _start(command, root, "model-server", port, server_env(root / "home", tracking_uri))
    try:
        wait_until_up(server, "/ping", timeout)
        yield server
    finally:
        server.stop()


def http_json(url: str, payload: Any, timeout: float = 120.0) -> tuple[int, Any]:
    """POST ``payload`` as JSON; return ``(status, decoded JSON body)``, also for 4xx/5xx answers."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            return err.code, json.loads(body)
        except ValueError:
            return err.code, body.decode(errors="replace")
