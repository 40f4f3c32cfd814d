"""One system's driver process, seen from serving_peers.py: start, command, close.

A peer runs only if its venv (made by setup.sh) is complete; otherwise, or if its driver
fails, the benchmark skips it and says why (`Unavailable` carries the reason).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess

READY_MARKER = "jenga-peer-ready"  # written by setup.sh when a venv's install finished
HERE = pathlib.Path(__file__).resolve().parent


class Unavailable(RuntimeError):
    """A system that cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class System:
    """How to start one system's driver: its interpreter, script and environment."""

    name: str
    python: str
    script: str  # file name in benchmarks/peers/
    env: dict  # added to the environment (each driver reports its thread settings)


def default_peers_dir() -> pathlib.Path:
    return pathlib.Path(
        os.environ.get("JENGA_PEERS_DIR", pathlib.Path.home() / ".cache/jenga-jax/peers")
    )


def peer_python(name: str, peers_dir: pathlib.Path) -> str:
    """The interpreter of peer `name`'s venv; Unavailable if setup.sh has not made it."""
    venv = pathlib.Path(peers_dir) / name
    python = venv / "bin" / "python"
    if not python.exists():
        raise Unavailable(f"no venv at {venv}: run benchmarks/peers/setup.sh {name}")
    if not (venv / READY_MARKER).exists():
        raise Unavailable(
            f"{venv} is incomplete (setup.sh did not finish): run benchmarks/peers/setup.sh {name}"
        )
    return str(python)


def _tail(path: pathlib.Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class Driver:
    """A running driver (see protocol.py). Its stderr goes to `log_path`."""

    def __init__(self, system: System, checkpoint, trace_path, log_path: pathlib.Path):
        self.system = system
        self.log_path = pathlib.Path(log_path)
        self._log = open(self.log_path, "w")
        env = {**os.environ, **system.env}
        self.proc = subprocess.Popen(
            [system.python, str(HERE / system.script), "--checkpoint", str(checkpoint),
             "--trace", str(trace_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: close() can end its children
        )  # fmt: skip

    def read(self) -> dict:
        """The driver's next reply; Unavailable if it failed or exited."""
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise Unavailable(
                f"{self.system.name} driver exited with code {rc}; the end of "
                f"{self.log_path}:\n{_tail(self.log_path)}"
            )
        msg = json.loads(line)
        if msg.get("event") == "error":
            self.proc.wait()
            raise Unavailable(f"{self.system.name} failed: {msg['error']} (log: {self.log_path})")
        return msg

    def command(self, cmd: str) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this driver leads
                self.proc.wait()
        self._log.close()
