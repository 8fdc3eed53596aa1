"""Run the real relay as a subprocess (its real CLI, real sockets) for tests and benchmarks."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any


def sample(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """The value of one series in a Prometheus exposition (labels must match exactly);
    ``default`` for a series that does not exist yet (a counter created at its first event)."""
    want = sorted(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        key = line.split(" ")[0]
        if key.split("{")[0] == name and sorted(re.findall(r'\w+="[^"]*"', key)) == want:
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"no sample {name}{labels}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:``port`` can be listened on now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# A traced relay writes its own data file beside the test run's, which pytest-cov combines at the
# end; it saves it when it exits (SIGTERM ends the relay normally).
_COVERAGE = ("-m", "coverage", "run", "--parallel-mode")


def _coverage_on() -> bool:
    try:
        import coverage
    except ImportError:
        return False
    return coverage.Coverage.current() is not None


class Relay:
    """A `python -m spotrelay` process on 127.0.0.1 with its log captured to a file."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        port: int | None = None,
        nofile: int | None = None,
        code: str | None = None,
        covered: bool = False,
    ):
        """``code``: a folder holding another version's ``spotrelay`` package to run instead of
        this checkout's (a benchmark's baseline; ``RELAY_UNDER_TEST`` does the same for every
        relay of a run). ``covered``: the process is traced for the test run's coverage report
        (when one is being made): for the code that only runs in a relay process, like the RTSP
        server. Only where asked, since tracing slows the relay by a sixth. ``nofile``: its
        descriptor limit, set once it has started (not with ``preexec_fn``: forking a test
        process whose simulated robot runs gRPC threads can abort the child in gRPC's fork
        handling before it even execs, which CI once read as the relay crashing)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the process
            prefix="spotrelay-", suffix=".log", delete=False
        )
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SPOTRELAY_", "BOSDYN_"))
        }
        full_env.update(env or {})
        if os.environ.get("RELAY_UNDER_TEST"):  # another checkout's relay, to compare with
            full_env["PYTHONPATH"] = os.environ["RELAY_UNDER_TEST"]
        if code is not None:
            full_env["PYTHONPATH"] = code
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *(_COVERAGE if covered and _coverage_on() else ()),
                "-m",
                "spotrelay",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                *args,
            ],
            env=full_env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )
        self._log_text: str | None = None
        if nofile is not None:  # the relay's descriptor limit, soft and hard
            try:
                resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
            except (OSError, ValueError):
                self.stop()
                raise

    @classmethod
    def for_sim(cls, sim: Any, *extra: str, payload: bool = False, **kw: Any) -> Relay:
        args = ["--robot", "127.0.0.1", "--robot-port", str(sim.port), "--robot-cert", sim.ca_path]
        env = {}
        if payload:
            args += ["--guid", sim.payload_guid, "--secret", sim.payload_secret]
        else:
            env = {"BOSDYN_CLIENT_USERNAME": sim.username, "BOSDYN_CLIENT_PASSWORD": sim.password}
        return cls([*args, *extra], env=env, **kw)

    def log(self) -> str:
        if self._log_text is not None:
            return self._log_text
        with open(self.log_file.name, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def get(self, path: str, timeout: float = 10.0, headers: dict[str, str] | None = None):
        """(status, headers, body) without raising on HTTP errors."""
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def metric(self, name: str, default: float | None = None, **labels: str) -> float:
        return sample(self.get("/metrics")[2].decode(), name, default, **labels)

    def json(self, path: str) -> Any:
        status, _, body = self.get(path)
        assert status == 200, (status, body[:300])
        return json.loads(body)

    def wait_ready(self, timeout: float = 30.0) -> Relay:
        """Until /readyz says the robot is connected and frames flow (or fail with the log)."""
        end = time.time() + timeout
        last = None
        while time.time() < end:
            if self.proc.poll() is not None:
                self.stop()  # a fixture that fails here never reaches its own cleanup
                raise AssertionError(f"relay exited {self.proc.returncode}:\n{self.log()}")
            try:
                last = self.get("/readyz", timeout=2)
                if last[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"relay not ready after {timeout} s ({last}):\n{self.log()}")

    def stop(self, timeout: float = 5.0) -> float:
        """SIGTERM and wait; returns how long the process took to exit. Stopping twice is fine."""
        if self._log_text is not None:
            return 0.0
        start = time.time()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        took = time.time() - start
        self._log_text = self.log()  # kept for the test; the file goes
        self.log_file.close()
        os.unlink(self.log_file.name)
        return took
