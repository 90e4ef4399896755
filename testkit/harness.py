"""Run the plugin as a separate process against the fake NVML, and talk to that fake."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "nvidia_device_plugin.py")
FAKE_NVML_DIR = os.path.join(ROOT, "testkit", "fake_nvml")
GiB = 1 << 30


def gpu_uuid(i: int) -> str:
    return f"GPU-00000000-0000-4000-8000-{i:012x}"


def make_gpus(count: int, memory: int = 16 * GiB, numa: list[int] | None = None, **extra) -> list[dict]:
    gpus = []
    for i in range(count):
        gpu = {"uuid": gpu_uuid(i), "name": "NVIDIA Fake A100", "memory": memory, "minor": i,
               "bus_id": f"00000000:{0x10 + i:02X}:00.0"}
        if numa is not None:
            gpu["numa"] = numa[i]
        gpu.update(extra)
        gpus.append(gpu)
    return gpus


def write_sysfs(root: str, gpus: list[dict]) -> None:
    """A fake sysfs with each GPU's PCI numa_node, where the scenario gives one."""
    for gpu in gpus:
        bus = gpu["bus_id"].lower()[4:]
        path = os.path.join(root, "bus/pci/devices", bus)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "numa_node"), "w") as fh:
            fh.write(f"{gpu.get('numa', -1)}\n")


@dataclass
class Plugin:
    """One plugin process. `args` are extra flags; `env` extra environment."""

    workdir: str
    plugin_dir: str
    scenario: dict
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    fake_nvml: bool = True
    python_path: list[str] = field(default_factory=list)
    isolated_python: bool = False
    script: str = PLUGIN  # another copy of the plugin, e.g. the image layout's
    proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "plugin.log")

    @property
    def control_path(self) -> str:
        return os.path.join(self.workdir, "nvml-control.sock")

    def start(self) -> Plugin:
        os.makedirs(self.workdir, exist_ok=True)
        scenario_path = os.path.join(self.workdir, "scenario.json")
        with open(scenario_path, "w") as fh:
            json.dump(self.scenario, fh)
        sysfs = os.path.join(self.workdir, "sys")
        write_sysfs(sysfs, self.scenario.get("gpus", []))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DP_", "FAKE_NVML"))}
        paths = ([FAKE_NVML_DIR] if self.fake_nvml else []) + self.python_path
        env.update({"PYTHONPATH": os.pathsep.join(paths), "FAKE_NVML_SCENARIO": scenario_path,
                    "FAKE_NVML_CONTROL": self.control_path, "PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        sysfs_args = ["--sysfs-root", sysfs] if self.fake_nvml else []  # real NVML: the real /sys
        cmd = [sys.executable, self.script, "--device-plugin-path", self.plugin_dir, *sysfs_args,
               "--health-probe-interval", "0.2", *self.args]
        if self.isolated_python:
            # -I -S: no PYTHONPATH, no user or system site-packages; only `paths` are importable
            cmd = [sys.executable, "-I", "-S", "-c",
                   "import sys, runpy; sys.path[:0] = sys.argv[1].split(':'); del sys.argv[:2]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')", os.pathsep.join(paths), *cmd[1:]]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir)
        return self

    def send(self, **command) -> None:
        """Inject a fault or event into the fake NVML of this plugin."""
        deadline = time.monotonic() + 10
        while not os.path.exists(self.control_path):
            if time.monotonic() > deadline:
                raise AssertionError("fake NVML control socket never appeared")
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(json.dumps(command).encode(), self.control_path)

    def log(self) -> str:
        with open(self.log_path, "rb") as fh:
            return fh.read().decode(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if log.count(text) >= count:
                return log
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"plugin exited ({self.proc.returncode}) before logging {text!r}:\n{log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"plugin never logged {text!r} ({count}x):\n{log[-4000:]}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)


def run_plugin_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 20.0,
                   fake_nvml: bool = True) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_NVML")}
    if fake_nvml:
        full_env["PYTHONPATH"] = FAKE_NVML_DIR
    full_env.update(env or {})
    return subprocess.run([sys.executable, PLUGIN, *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
