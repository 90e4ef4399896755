#!/usr/bin/env python3
"""NVIDIA GPU device plugin for Kubernetes (kubelet device plugin API v1beta1).

Advertises the node's GPUs (or fixed-size memory slices of them) to the kubelet, keeps
their health from NVML events and probes, and answers Allocate with what the NVIDIA
container runtime needs.

Data flows through the sections of this file in order:

    Config -> XidPolicy -> NVML inventory -> DeviceState -> HealthMonitor
           -> allocation (pure) -> Servicer -> Metrics/liveness -> PluginServer
           -> Supervisor (kubelet watch, signals) -> main

Where an XID becomes Unhealthy: ``HealthMonitor._handle_event``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import http.server
import itertools
import logging
import math
import os
import re
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, NoReturn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # stubs and a copied-in pynvml.py

import grpc  # noqa: E402
import pynvml  # noqa: E402

import device_plugin_pb2 as api  # noqa: E402
import device_plugin_pb2_grpc as api_grpc  # noqa: E402

_LOG = logging.getLogger("nvidia-device-plugin")

API_VERSION = "v1beta1"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
GPU_RESOURCE = "nvidia.com/gpu"
KUBELET_MAX_MESSAGE = 4 * 1024 * 1024  # grpc-go's default receive limit, which the kubelet keeps
MESSAGE_BUDGET = KUBELET_MAX_MESSAGE - 256 * 1024  # the margin we keep under it
SERVER_MAX_RECEIVE = 8 * 1024 * 1024
MiB = 1024 * 1024
GiB = 1024 * MiB


class ConfigError(Exception):
    """A configuration value that cannot work; main exits 2 with its message."""


class InitError(Exception):
    """NVML could not give us an inventory; main exits 1 (or waits) with its message."""


# ############################################################################################
# Config: flags, each also read from an environment variable (flag > env > default).
# Parsed once in main; every other part receives the frozen Config.
# ############################################################################################

DEFAULT_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
DEVICE_LIST_STRATEGIES = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")
DEFAULT_NEVER_RECOVER_XIDS = "48,63,64,74,79,92,94,95,119,120"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Option:
    flag: str
    env: str | None
    default: str | None
    help: str
    aliases: tuple[str, ...] = ()


OPTIONS: tuple[Option, ...] = (
    Option("--device-plugin-path", "DEVICE_PLUGIN_PATH", DEFAULT_PLUGIN_DIR,
           "directory of the kubelet's device plugin sockets"),
    Option("--kubelet-socket", "KUBELET_SOCKET", None,
           "the kubelet's registration socket (default: <device-plugin-path>/kubelet.sock)"),
    Option("--fail-on-init-error", "FAIL_ON_INIT_ERROR", "true",
           "exit 1 when NVML cannot be initialised (false: log it and wait)"),
    Option("--device-id-strategy", "DEVICE_ID_STRATEGY", "uuid",
           "how GPUs are named to the container runtime: uuid or index"),
    Option("--nvidia-driver-root", "NVIDIA_DRIVER_ROOT", "/",
           "root of the driver installation (where libnvidia-ml.so.1 is found)", ("--driver-root",)),
    Option("--dev-root", "NVIDIA_DEV_ROOT", None,
           "root under which /dev/nvidia* are found (default: the driver root)", ("--nvidia-dev-root",)),
    Option("--log-level", "LOG_LEVEL", "info", "debug, info, warning or error"),
    Option("--simulate", "SIMULATE", None,
           "simulated GPUs instead of NVML: N[:MODEL[:MEMORY]], e.g. 4:NVIDIA H100:80Gi"),
    Option("--sysfs-root", "SYSFS_ROOT", "/sys", "where sysfs is mounted (PCI NUMA nodes are read there)"),
    Option("--health-probe-interval", "HEALTH_PROBE_INTERVAL", "30",
           "seconds between health probes of every GPU"),
    Option("--health-recovery", "HEALTH_RECOVERY", "false",
           "let GPUs made unhealthy by a probe or a recoverable XID become Healthy again"),
    Option("--health-recovery-quiet-period", "HEALTH_RECOVERY_QUIET_PERIOD", "300",
           "seconds without failures (every probe passing) before a GPU recovers"),
    Option("--never-recover-xids", "NEVER_RECOVER_XIDS", DEFAULT_NEVER_RECOVER_XIDS,
           "XIDs after which a GPU stays Unhealthy until the plugin restarts"),
    Option("--vgpu-memory", "VGPU_MEMORY", "0",
           "split each GPU into slices of this much memory (e.g. 2Gi); 0 = whole GPUs"),
    Option("--vgpu-resource-name", "VGPU_RESOURCE_NAME", "nvidia.com/vgpu",
           "resource name of the memory slices"),
    Option("--vgpu-span", "VGPU_SPAN", "deny",
           "deny or allow one container's slices on several GPUs"),
    Option("--vgpu-preload-lib", "VGPU_PRELOAD_LIB", None,
           "host path of a memory-enforcement library to mount read-only and preload"),
    Option("--device-list-strategy", "DEVICE_LIST_STRATEGY", "envvar",
           "comma list of envvar, volume-mounts, cdi-annotations, cdi-cri"),
    Option("--cdi-kind", "CDI_KIND", "nvidia.com/gpu", "CDI device kind (vendor/class) of CDI names"),
    Option("--cdi-annotation-prefix", "CDI_ANNOTATION_PREFIX", "cdi.k8s.io/",
           "prefix of the CDI annotation key"),
    Option("--pass-device-specs", "PASS_DEVICE_SPECS", "false",
           "add /dev/nvidia* device nodes to the Allocate answer"),
    Option("--health-port", "HEALTH_PORT", "0", "TCP port for /healthz and /metrics; 0 = off"),
    Option("--health-address", "HEALTH_ADDRESS", "0.0.0.0", "address that --health-port binds"),
)


@dataclass(frozen=True)
class SimulateSpec:
    count: int
    model: str
    memory_bytes: int


@dataclass(frozen=True)
class Config:
    plugin_dir: str
    kubelet_socket: str
    fail_on_init_error: bool
    device_id_strategy: str
    driver_root: str
    dev_root: str
    log_level: str
    simulate: SimulateSpec | None
    sysfs_root: str
    probe_interval: float
    health_recovery: bool
    recovery_quiet_period: float
    never_recover_xids: frozenset[int]
    vgpu_memory: int
    vgpu_resource_name: str
    vgpu_span: str
    vgpu_preload_lib: str | None
    device_list_strategies: tuple[str, ...]
    cdi_kind: str
    cdi_annotation_prefix: str
    pass_device_specs: bool
    health_port: int
    health_address: str
    probe: bool = False

    @property
    def resource_name(self) -> str:
        return self.vgpu_resource_name if self.vgpu_memory else GPU_RESOURCE

    @property
    def socket_path(self) -> str:
        """Socket named like NVIDIA's: nvidia-<name part of the resource>.sock."""
        return os.path.join(self.plugin_dir, f"nvidia-{self.resource_name.split('/', 1)[1]}.sock")


_SIZE_RE = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti)?$")
_SIZE_UNITS = {None: 1, "Ki": 1024, "Mi": MiB, "Gi": GiB, "Ti": 1024 * GiB}
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN_RE = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_NAME_PART_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def parse_size(text: str) -> int:
    """Parse a Kubernetes-style binary size ("2Gi", "512Mi", or bytes) into bytes."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise ValueError("a size such as 2Gi, 512Mi or a whole number of bytes")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def format_size(size: int) -> str:
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        if size % _SIZE_UNITS[unit] == 0 and size >= _SIZE_UNITS[unit]:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def is_extended_resource_name(name: str) -> bool:
    """The kubelet's rule for device plugin resource names (v1helper.IsExtendedResourceName)."""
    if "/" not in name or "kubernetes.io/" in name or name.startswith("requests."):
        return False
    parts = ("requests." + name).split("/")
    if len(parts) != 2:
        return False
    prefix, part = parts
    return (len(prefix) <= 253 and bool(_DNS_SUBDOMAIN_RE.match(prefix))
            and len(part) <= 63 and bool(_NAME_PART_RE.match(part)))


def parse_int_list(text: str) -> list[int]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if item:
            if not item.isdigit():
                raise ValueError("a comma list of non-negative integers")
            values.append(int(item))
    return values


def parse_simulate(text: str) -> SimulateSpec:
    parts = text.split(":")
    if not parts[0].strip().isdigit() or int(parts[0]) < 1 or len(parts) > 3:
        raise ValueError("N[:MODEL[:MEMORY]] with N >= 1, e.g. 4 or 8:NVIDIA H100 80GB HBM3:80Gi")
    model = parts[1].strip() if len(parts) > 1 and parts[1].strip() else "NVIDIA Simulated GPU"
    memory = parse_size(parts[2]) if len(parts) > 2 else 16 * GiB
    if memory < MiB:
        raise ValueError("a GPU memory of at least 1Mi")
    return SimulateSpec(int(parts[0]), model, memory)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_config(argv: Sequence[str], env: Mapping[str, str]) -> Config:
    """Build the Config; any invalid value raises ConfigError naming flag, value and what is allowed."""
    parser = _OneLineParser(prog="nvidia_device_plugin.py", description=__doc__.splitlines()[0])
    for opt in OPTIONS:
        env_note = f" [env {opt.env}]" if opt.env else ""
        default_note = f" (default: {opt.default})" if opt.default is not None else ""
        parser.add_argument(opt.flag, *opt.aliases, dest=opt.flag[2:].replace("-", "_"), default=None,
                            metavar="VALUE", help=opt.help + env_note + default_note)
    parser.add_argument("--probe", action="store_true",
                        help="liveness check of the running plugin: exit 0, or 1 naming the failure")
    args = parser.parse_args(list(argv))

    raw: dict[str, tuple[str | None, str]] = {}
    for opt in OPTIONS:
        value = getattr(args, opt.flag[2:].replace("-", "_"))
        source = opt.flag
        if value is None and opt.env and opt.env in env:
            value, source = env[opt.env], f"{opt.flag} (from {opt.env})"
        if value is None:
            value = opt.default
        raw[opt.flag] = (value, source)

    def get(flag: str, convert: Callable[[str], Any], allowed: str) -> Any:
        value, source = raw[flag]
        if value is None:
            return None
        try:
            return convert(value)
        except ValueError as exc:
            hint = str(exc) if str(exc) and "invalid literal" not in str(exc) else allowed
            raise ConfigError(f"invalid value {value!r} for {source}: allowed: {hint}") from None

    def boolean(text: str) -> bool:
        lowered = text.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ValueError("true or false")

    def choice(*allowed: str) -> Callable[[str], str]:
        def convert(text: str) -> str:
            if text.strip().lower() not in allowed:
                raise ValueError(", ".join(allowed))
            return text.strip().lower()
        return convert

    def seconds(text: str) -> float:
        number = float(text)
        if not math.isfinite(number) or number <= 0:
            raise ValueError("a number of seconds greater than 0")
        return number

    def port(text: str) -> int:
        number = int(text)
        if not 0 <= number <= 65535:
            raise ValueError("a TCP port from 0 to 65535")
        return number

    def strategies(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
        if not items or any(s not in DEVICE_LIST_STRATEGIES for s in items):
            raise ValueError("a comma list of " + ", ".join(DEVICE_LIST_STRATEGIES))
        return items

    def vgpu_memory(text: str) -> int:
        size = parse_size(text)
        if size and (size < MiB or size % MiB):
            raise ValueError("0 (whole GPUs) or a whole number of MiB of at least 1Mi, e.g. 2Gi")
        return size

    def resource_name(text: str) -> str:
        if not is_extended_resource_name(text) or text == GPU_RESOURCE:
            raise ValueError("an extended resource name such as nvidia.com/vgpu "
                             "(one '/', lower-case domain, not kubernetes.io, not nvidia.com/gpu)")
        return text

    def cdi_kind(text: str) -> str:
        if not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$", text):
            raise ValueError("a CDI kind vendor/class, e.g. nvidia.com/gpu")
        return text

    def absolute(text: str) -> str:
        if not text.startswith("/"):
            raise ValueError("an absolute path")
        return os.path.normpath(text)

    def never_recover(text: str) -> frozenset[int]:
        return frozenset(parse_int_list(text))

    plugin_dir = get("--device-plugin-path", absolute, "an absolute path")
    driver_root = get("--nvidia-driver-root", absolute, "an absolute path")
    return Config(
        plugin_dir=plugin_dir,
        kubelet_socket=get("--kubelet-socket", absolute, "an absolute path")
        or os.path.join(plugin_dir, "kubelet.sock"),
        fail_on_init_error=get("--fail-on-init-error", boolean, "true or false"),
        device_id_strategy=get("--device-id-strategy", choice("uuid", "index"), "uuid, index"),
        driver_root=driver_root,
        dev_root=get("--dev-root", absolute, "an absolute path") or driver_root,
        log_level=get("--log-level", choice("debug", "info", "warning", "error"), "debug, info, warning, error"),
        simulate=get("--simulate", parse_simulate, "N[:MODEL[:MEMORY]]"),
        sysfs_root=get("--sysfs-root", absolute, "an absolute path"),
        probe_interval=get("--health-probe-interval", seconds, "seconds > 0"),
        health_recovery=get("--health-recovery", boolean, "true or false"),
        recovery_quiet_period=get("--health-recovery-quiet-period", seconds, "seconds > 0"),
        never_recover_xids=get("--never-recover-xids", never_recover, "a comma list of XIDs"),
        vgpu_memory=get("--vgpu-memory", vgpu_memory, "a size such as 2Gi"),
        vgpu_resource_name=get("--vgpu-resource-name", resource_name, "an extended resource name"),
        vgpu_span=get("--vgpu-span", choice("deny", "allow"), "deny, allow"),
        vgpu_preload_lib=get("--vgpu-preload-lib", absolute, "an absolute path"),
        device_list_strategies=get("--device-list-strategy", strategies, ", ".join(DEVICE_LIST_STRATEGIES)),
        cdi_kind=get("--cdi-kind", cdi_kind, "vendor/class"),
        cdi_annotation_prefix=get("--cdi-annotation-prefix", str, "a prefix"),
        pass_device_specs=get("--pass-device-specs", boolean, "true or false"),
        health_port=get("--health-port", port, "0 to 65535"),
        health_address=get("--health-address", str, "an address"),
        probe=args.probe,
    )


# ############################################################################################
# XID policy: which XID events make a GPU Unhealthy. Built once in main from the
# environment (NVIDIA's variable names and precedence) and handed to the health monitor.
# ############################################################################################

APPLICATION_XIDS = frozenset({
    13,   # Graphics Engine Exception: usually an application fault
    31,   # GPU memory page fault: an application's illegal address
    43,   # GPU stopped processing: a user application fault
    45,   # Preemptive cleanup, due to a previous error
    68,   # NVDEC0 exception: video decoder, application input
    109,  # Context switch timeout: an application's hung kernel
})


@dataclass(frozen=True)
class XidPolicy:
    """Which XIDs are fatal. Precedence, strongest first:

    1. DP_ENABLE_HEALTHCHECKS: XIDs always fatal, whatever else says.
    2. DP_DISABLE_HEALTHCHECKS=all: no health checking at all (no probes, no events);
       DP_DISABLE_HEALTHCHECKS=xids: every XID ignored (probes and ECC events stay on).
    3. Application XIDs (13, 31, 43, 45, 68, 109) plus the extra XIDs listed in
       DP_DISABLE_HEALTHCHECKS are ignored; every other XID is fatal.
    """

    ignored: frozenset[int] = APPLICATION_XIDS
    enabled: frozenset[int] = frozenset()
    all_disabled: bool = False
    xids_disabled: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> XidPolicy:
        disabled, all_off, xids_off = cls._parse("DP_DISABLE_HEALTHCHECKS", env, special=True)
        enabled, _, _ = cls._parse("DP_ENABLE_HEALTHCHECKS", env, special=False)
        return cls(ignored=APPLICATION_XIDS | disabled, enabled=enabled,
                   all_disabled=all_off, xids_disabled=xids_off)

    @staticmethod
    def _parse(name: str, env: Mapping[str, str], special: bool) -> tuple[frozenset[int], bool, bool]:
        xids: set[int] = set()
        all_off = xids_off = False
        for item in env.get(name, "").split(","):
            token = item.strip().lower()
            if not token:
                continue
            if special and token == "all":
                all_off = True
            elif special and token == "xids":
                xids_off = True
            elif token.isdigit():
                xids.add(int(token))
            else:
                _LOG.warning("%s: ignoring malformed entry %r (expected an XID number%s)",
                             name, item.strip(), ", 'all' or 'xids'" if special else "")
        return frozenset(xids), all_off, xids_off

    @property
    def watching(self) -> bool:
        """False when health checking is off entirely: no thread, no probes."""
        return not self.all_disabled or bool(self.enabled)

    def is_fatal(self, xid: int) -> bool:
        if xid in self.enabled:
            return True
        if self.all_disabled or self.xids_disabled:
            return False
        return xid not in self.ignored


# ############################################################################################
# NVML inventory: what GPUs the node has. Real NVML is the pynvml module; the simulator
# below offers the same functions, so everything from enumeration on runs the same code.
# NVML is initialised once by main; afterwards only the health thread calls it, except
# re-enumeration on SIGHUP, which happens while the health thread is stopped.
# ############################################################################################

@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_bytes: int
    minor: int
    pci_bus_id: str
    numa_node: int | None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_error_code(exc: BaseException) -> int | None:
    return getattr(exc, "value", None) if isinstance(exc, pynvml.NVMLError) else None


def sysfs_pci_id(bus_id: str) -> str:
    """NVML's "00000000:3B:00.0" -> sysfs's "0000:3b:00.0" (as NVIDIA's plugin does)."""
    bus_id = bus_id.lower()
    return bus_id[4:] if len(bus_id) > 12 and bus_id.startswith("0000") else bus_id


def read_numa_node(sysfs_root: str, bus_id: str) -> int | None:
    path = os.path.join(sysfs_root, "bus/pci/devices", sysfs_pci_id(bus_id), "numa_node")
    try:
        with open(path, encoding="ascii") as fh:
            node = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def preload_nvml_from_driver_root(driver_root: str) -> None:
    """Load libnvidia-ml.so.1 from a driver root that is not on the loader path.

    pynvml opens the library by soname; once a copy with that soname is loaded globally,
    the dynamic loader hands that copy back.
    """
    if driver_root == "/":
        return
    for libdir in ("usr/lib64", "usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu",
                   "lib64", "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu"):
        candidate = os.path.join(driver_root, libdir, "libnvidia-ml.so.1")
        if os.path.exists(candidate):
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            _LOG.info("loaded NVML from the driver root: %s", candidate)
            return
    _LOG.warning("no libnvidia-ml.so.1 under driver root %s; relying on the loader path", driver_root)


def enumerate_gpus(nvml: Any, sysfs_root: str) -> list[GpuInfo]:
    """List every GPU NVML reports. A GPU that cannot be read is logged and left out."""
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            bus_id = _text(nvml.nvmlDeviceGetPciInfo(handle).busId)
            gpus.append(GpuInfo(
                index=index,
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                name=_text(nvml.nvmlDeviceGetName(handle)),
                memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                minor=int(nvml.nvmlDeviceGetMinorNumber(handle)),
                pci_bus_id=bus_id,
                numa_node=read_numa_node(sysfs_root, bus_id),
            ))
        except pynvml.NVMLError as exc:
            _LOG.error("GPU index %d: cannot read it from NVML (%s); it is not advertised", index, exc)
    return gpus


# Pair scores as in NVIDIA's go-gpuallocator: NVLinks win, then the closest PCIe ancestor.
_ANCESTOR_SCORES = {
    pynvml.NVML_TOPOLOGY_INTERNAL: 60,    # same board
    pynvml.NVML_TOPOLOGY_SINGLE: 50,      # one PCIe switch
    pynvml.NVML_TOPOLOGY_MULTIPLE: 40,    # several PCIe switches
    pynvml.NVML_TOPOLOGY_HOSTBRIDGE: 30,  # same host bridge
    pynvml.NVML_TOPOLOGY_NODE: 20,        # same CPU / NUMA node
    pynvml.NVML_TOPOLOGY_SYSTEM: 10,      # across CPUs
}
CROSS_CPU_SCORE = 10
NVLINK_SCORE = 100


def gpu_pair_scores(nvml: Any, gpus: Sequence[GpuInfo]) -> dict[tuple[int, int], int]:
    """Score every GPU pair once. A GPU whose topology cannot be read scores "across CPUs"
    with everyone and is logged once; this never fails (NVIDIA #2038)."""
    broken: set[int] = set()
    handles: dict[int, Any] = {}
    links: dict[tuple[int, int], int] = {}
    by_bus = {sysfs_pci_id(g.pci_bus_id): g.index for g in gpus}
    for gpu in gpus:
        try:
            handles[gpu.index] = handle = nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
            for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
                try:
                    if nvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                        continue
                    remote = sysfs_pci_id(_text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId))
                except pynvml.NVMLError as exc:
                    if nvml_error_code(exc) in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_INVALID_ARGUMENT):
                        break  # no (more) NVLinks on this GPU
                    raise
                peer = by_bus.get(remote)
                if peer is not None and peer != gpu.index:
                    key = (min(gpu.index, peer), max(gpu.index, peer))
                    links[key] = links.get(key, 0) + 1
        except pynvml.NVMLError as exc:
            broken.add(gpu.index)
            _LOG.warning("GPU %s (index %d): topology unreadable (%s); it scores as 'across CPUs'",
                         gpu.uuid, gpu.index, exc)
    scores: dict[tuple[int, int], int] = {}
    for a, b in itertools.combinations(sorted(g.index for g in gpus), 2):
        if a in broken or b in broken:
            scores[(a, b)] = CROSS_CPU_SCORE
        elif (a, b) in links:
            scores[(a, b)] = NVLINK_SCORE * (links[(a, b)] // 2 or 1)  # each link is seen from both ends
        else:
            try:
                level = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b])
                scores[(a, b)] = _ANCESTOR_SCORES.get(level, CROSS_CPU_SCORE)
            except pynvml.NVMLError as exc:
                for idx in (a, b):
                    if idx not in broken:
                        broken.add(idx)
                        _LOG.warning("GPU index %d: topology to GPU %d unreadable (%s); scoring as 'across CPUs'",
                                     idx, b if idx == a else a, exc)
                scores[(a, b)] = CROSS_CPU_SCORE
    return scores


class _SimHandle:
    def __init__(self, index: int) -> None:
        self.index = index


class _SimStruct:
    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


class SimulatedNvml:
    """A GPU-less stand-in with pynvml's function names, for demos, CI and scheduler tests.

    GPUs are healthy and never raise events; the first half of them share NUMA node 0 and
    one PCIe switch, the second half node 1, so topology-aware choices are visible.
    """

    def __init__(self, spec: SimulateSpec) -> None:
        self._spec = spec

    def nvmlInit(self) -> None:
        return None

    def nvmlShutdown(self) -> None:
        return None

    def nvmlSystemGetDriverVersion(self) -> str:
        return "simulated"

    def nvmlDeviceGetCount(self) -> int:
        return self._spec.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _SimHandle:
        return _SimHandle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> _SimHandle:
        for index in range(self._spec.count):
            if self.nvmlDeviceGetUUID(_SimHandle(index)) == uuid:
                return _SimHandle(index)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: _SimHandle) -> str:
        return f"GPU-5171a7ed-0000-4000-8000-{handle.index:012d}"

    def nvmlDeviceGetName(self, handle: _SimHandle) -> str:
        return self._spec.model

    def nvmlDeviceGetMemoryInfo(self, handle: _SimHandle) -> _SimStruct:
        return _SimStruct(total=self._spec.memory_bytes, free=self._spec.memory_bytes, used=0)

    def nvmlDeviceGetMinorNumber(self, handle: _SimHandle) -> int:
        return handle.index

    def nvmlDeviceGetPciInfo(self, handle: _SimHandle) -> _SimStruct:
        return _SimStruct(busId=f"00000000:{0x10 + handle.index:02X}:00.0")

    def nvmlDeviceGetNvLinkState(self, handle: _SimHandle, link: int) -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: _SimHandle, link: int) -> _SimStruct:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetTopologyCommonAncestor(self, a: _SimHandle, b: _SimHandle) -> int:
        half = max(1, self._spec.count // 2)
        same = a.index // half == b.index // half
        return pynvml.NVML_TOPOLOGY_SINGLE if same else pynvml.NVML_TOPOLOGY_SYSTEM

    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlDeviceGetSupportedEventTypes(self, handle: _SimHandle) -> int:
        return pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError

    def nvmlDeviceRegisterEvents(self, handle: _SimHandle, types: int, event_set: object) -> None:
        return None

    def nvmlEventSetWait(self, event_set: object, timeout_ms: int) -> NoReturn:
        time.sleep(timeout_ms / 1000)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    def nvmlEventSetFree(self, event_set: object) -> None:
        return None

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: _SimHandle) -> int:
        return pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetRemappedRows(self, handle: _SimHandle) -> tuple[int, int, int, int]:
        return (0, 0, 0, 0)


# ############################################################################################
# DeviceState: the one owner of device truth. Health is kept per physical GPU; the
# advertised devices (whole GPUs or their slices) are derived from it, so a GPU's health
# reaches every one of its slices. Outlives server restarts, so a kubelet restart or
# SIGHUP never forgets that a GPU is broken. Streams wait on its Condition.
# ############################################################################################

@dataclass(frozen=True)
class AdvertisedDevice:
    id: str
    gpu: GpuInfo
    slice_index: int | None = None


@dataclass
class GpuHealth:
    healthy: bool = True
    reason: str = "initial enumeration"
    permanent: bool = False
    last_failure: float = 0.0  # monotonic time of the last failure evidence


@dataclass(frozen=True)
class Snapshot:
    version: int
    response: Any  # api.ListAndWatchResponse
    devices: Mapping[str, AdvertisedDevice]
    healthy_gpus: frozenset[str]
    gpus: tuple[GpuInfo, ...]


def slice_count(gpu: GpuInfo, slice_bytes: int) -> int:
    return gpu.memory_bytes // slice_bytes


def build_layout(gpus: Sequence[GpuInfo], slice_bytes: int) -> list[AdvertisedDevice]:
    """Whole GPUs (ID = UUID) or floor(memory / slice) slices per GPU (ID = <UUID>::<j>)."""
    if not slice_bytes:
        return [AdvertisedDevice(g.uuid, g) for g in gpus]
    return [AdvertisedDevice(f"{g.uuid}::{j}", g, j) for g in gpus for j in range(slice_count(g, slice_bytes))]


def list_and_watch_response(layout: Sequence[AdvertisedDevice], healthy: Callable[[str], bool]) -> Any:
    devices = []
    for dev in layout:
        topology = (api.TopologyInfo(nodes=[api.NUMANode(ID=dev.gpu.numa_node)])
                    if dev.gpu.numa_node is not None else None)
        devices.append(api.Device(ID=dev.id, health=HEALTHY if healthy(dev.gpu.uuid) else UNHEALTHY,
                                  topology=topology))
    return api.ListAndWatchResponse(devices=devices)


@dataclass(frozen=True)
class Transition:
    """One GPU's health change, logged and counted once the state lock is released."""
    uuid: str
    index: int | None
    old: str
    new: str
    reason: str
    permanent: bool
    device_ids: tuple[str, ...]


class DeviceState:
    """Health per physical GPU, the advertised layout derived from it, and a version that
    ListAndWatch streams wait on. Every method is thread-safe."""

    def __init__(self, resource: str, slice_bytes: int, on_transition: Callable[[str, str, str], None]) -> None:
        self._resource = resource
        self._slice_bytes = slice_bytes
        self._on_transition = on_transition
        self._cond = threading.Condition()
        self._gpus: dict[str, GpuInfo] = {}
        self._health: dict[str, GpuHealth] = {}
        self._layout: list[AdvertisedDevice] = []
        self._snapshot: Snapshot | None = None
        self._version = 0

    def set_inventory(self, gpus: Sequence[GpuInfo]) -> None:
        """Adopt a (re-)enumeration. Known GPUs keep their health; a GPU that disappeared
        stays advertised as Unhealthy, so capacity shows the loss instead of hiding it."""
        with self._cond:
            fresh = {g.uuid: g for g in gpus}
            gone = [uuid for uuid in self._gpus if uuid not in fresh]
            for uuid in gone:
                fresh[uuid] = self._gpus[uuid]
            for uuid in fresh:
                self._health.setdefault(uuid, GpuHealth())
            self._gpus = dict(sorted(fresh.items(), key=lambda kv: kv[1].index))
            self._layout = build_layout(list(self._gpus.values()), self._slice_bytes)
            changes = [self._set(uuid, False, "no longer enumerated by NVML", permanent=True) for uuid in gone]
            self._bump()
        self._report(changes)

    @property
    def gpus(self) -> list[GpuInfo]:
        with self._cond:
            return list(self._gpus.values())

    def health_of(self, uuid: str) -> GpuHealth:
        with self._cond:
            h = self._health[uuid]
            return GpuHealth(h.healthy, h.reason, h.permanent, h.last_failure)

    def unhealthy(self) -> list[tuple[str, str]]:
        """(uuid, reason) of every Unhealthy GPU, for logs that must stand on their own."""
        with self._cond:
            return [(u, h.reason) for u, h in self._health.items() if not h.healthy and u in self._gpus]

    def mark_unhealthy(self, uuid: str, reason: str, permanent: bool = False) -> bool:
        with self._cond:
            change = self._set(uuid, False, reason, permanent)
            if change:
                self._bump()
        self._report([change])  # after the lock: streams send first, the log line can wait
        return change is not None

    def mark_healthy(self, uuid: str, reason: str) -> bool:
        with self._cond:
            change = None if self._health[uuid].permanent else self._set(uuid, True, reason)
            if change:
                self._bump()
        self._report([change])
        return change is not None

    def _set(self, uuid: str, healthy: bool, reason: str, permanent: bool = False) -> Transition | None:
        health = self._health.setdefault(uuid, GpuHealth())
        if not healthy:
            health.last_failure = time.monotonic()
            health.permanent = health.permanent or permanent
        if health.healthy == healthy:
            return None
        old = HEALTHY if health.healthy else UNHEALTHY
        health.healthy, health.reason = healthy, reason
        gpu = self._gpus.get(uuid)
        return Transition(uuid, gpu.index if gpu else None, old, HEALTHY if healthy else UNHEALTHY, reason,
                          health.permanent, tuple(d.id for d in self._layout if d.gpu.uuid == uuid))

    def _report(self, changes: Iterable[Transition | None]) -> None:
        for t in changes:
            if t is None:
                continue
            ids = list(t.device_ids)
            shown = ids if len(ids) <= 4 else ids[:2] + [f"... {len(ids)} devices in all"]
            log = _LOG.warning if t.new == UNHEALTHY else _LOG.info
            log("GPU %s (index %s): %s -> %s: %s%s; resource %s devices: %s", t.uuid,
                "?" if t.index is None else t.index, t.old, t.new, t.reason,
                " (stays until restart)" if t.permanent and t.new == UNHEALTHY else "",
                self._resource, ", ".join(shown))
            self._on_transition(t.uuid, t.new, t.reason)

    def _bump(self) -> None:
        self._version += 1
        self._snapshot = None
        self._cond.notify_all()

    def snapshot(self) -> Snapshot:
        with self._cond:
            if self._snapshot is None:
                healthy = frozenset(u for u, h in self._health.items() if h.healthy and u in self._gpus)
                self._snapshot = Snapshot(
                    version=self._version,
                    response=list_and_watch_response(self._layout, healthy.__contains__),
                    devices={d.id: d for d in self._layout},
                    healthy_gpus=healthy,
                    gpus=tuple(self._gpus.values()),
                )
            return self._snapshot

    def wait_newer(self, version: int, stopped: Callable[[], bool], timeout: float = 5.0) -> Snapshot | None:
        """Block until the state is newer than `version`; None once `stopped()` is true.
        Bursts coalesce: the caller gets the latest snapshot, not one per change."""
        with self._cond:
            while self._version == version and not stopped():
                self._cond.wait(timeout)
            if stopped():
                return None
        return self.snapshot()

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()


# ############################################################################################
# HealthMonitor: the health thread. It owns every NVML call after start-up.
#
#   what happens                               -> what it does
#   critical XID event, XID fatal by policy    -> that GPU (all its slices) Unhealthy
#   XID in --never-recover-xids, double-bit ECC-> Unhealthy until restart
#   application XID / XID ignored by policy    -> logged, nothing else
#   event registration NOT_SUPPORTED           -> warning once, probes only
#   event registration fails otherwise         -> that GPU Unhealthy
#   wait error GPU_IS_LOST                     -> probe all; lost GPUs Unhealthy for good
#   any other wait error                       -> keep last state, re-init NVML with capped
#                                                 backoff, probe all, mark only failures
#   probe: UUID unreachable / pending retired  -> Unhealthy (recoverable); row-remap failure
#          pages / pending row remap              and GPU_IS_LOST are permanent
#   --health-recovery, quiet period passed     -> recoverable GPU back to Healthy
# ############################################################################################

HEALTH_WAIT_MS = 5000  # as NVIDIA's; also bounds how long stopping the thread takes
HEALTH_STALL_LIMIT = HEALTH_WAIT_MS / 1000 + 5.0  # no heartbeat for this long: an NVML call hangs
NVML_RETRY_MAX = 30.0
_SKIP_CODES = (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)


class HealthMonitor:
    def __init__(self, nvml: Any, state: DeviceState, policy: XidPolicy, cfg: Config, metrics: Metrics) -> None:
        self._nvml = nvml
        self._state = state
        self._policy = policy
        self._cfg = cfg
        self._metrics = metrics
        self._stop = threading.Event()
        self._event_set: Any = None
        self._warned_unsupported: set[str] = set()
        self.heartbeat = time.monotonic()
        self.nvml_down_since: float | None = None

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Thread body. An exception escaping it means the thread died; the supervisor restarts it."""
        self._stop.clear()
        self.heartbeat = time.monotonic()
        next_probe = 0.0
        try:
            self._register_events()
            while not self._stop.is_set():
                self.heartbeat = now = time.monotonic()
                if now >= next_probe:
                    self.probe_all()
                    next_probe = time.monotonic() + self._cfg.probe_interval
                timeout_ms = max(1, min(HEALTH_WAIT_MS, int((next_probe - time.monotonic()) * 1000)))
                if self._event_set is None:
                    self._stop.wait(timeout_ms / 1000)
                    continue
                try:
                    event = self._nvml.nvmlEventSetWait(self._event_set, timeout_ms)
                except pynvml.NVMLError as exc:
                    code = nvml_error_code(exc)
                    if code == pynvml.NVML_ERROR_TIMEOUT:
                        continue
                    if code == pynvml.NVML_ERROR_GPU_IS_LOST:
                        _LOG.error("NVML event wait: a GPU is lost; probing every GPU to find it")
                        self.probe_all()
                        continue
                    self._recover_nvml(exc)
                    next_probe = 0.0
                    continue
                self._handle_event(event)
        finally:
            self._free_events()

    # -- events ---------------------------------------------------------------------------

    def _register_events(self) -> None:
        wanted = pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError
        self._event_set = self._nvml.nvmlEventSetCreate()
        registered = 0
        for gpu in self._state.gpus:
            if self._state.health_of(gpu.uuid).permanent:
                continue  # broken for good: nothing to watch
            try:
                handle = self._nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
                supported = self._nvml.nvmlDeviceGetSupportedEventTypes(handle) & wanted
                if not supported:
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
                self._nvml.nvmlDeviceRegisterEvents(handle, supported, self._event_set)
                registered += 1
            except pynvml.NVMLError as exc:
                code = nvml_error_code(exc)
                if code in _SKIP_CODES:
                    if gpu.uuid not in self._warned_unsupported:
                        self._warned_unsupported.add(gpu.uuid)
                        _LOG.warning("GPU %s (index %d): NVML events not supported; health comes from "
                                     "probes only", gpu.uuid, gpu.index)
                else:
                    self._state.mark_unhealthy(gpu.uuid, f"cannot register for NVML events: {exc}",
                                               permanent=code == pynvml.NVML_ERROR_GPU_IS_LOST)
        if not registered:
            self._free_events()

    def _free_events(self) -> None:
        if self._event_set is not None:
            try:
                self._nvml.nvmlEventSetFree(self._event_set)
            except pynvml.NVMLError:
                pass
            self._event_set = None

    def _handle_event(self, event: Any) -> None:
        try:
            uuid = _text(self._nvml.nvmlDeviceGetUUID(event.device))
        except pynvml.NVMLError as exc:
            _LOG.error("NVML event (type %#x, data %s) from a GPU that cannot be named (%s); probing every GPU",
                       event.eventType, event.eventData, exc)
            self.probe_all()
            return
        if event.eventType & pynvml.nvmlEventTypeXidCriticalError:
            xid = int(event.eventData)
            self._metrics.inc("xid_events_total", gpu=uuid, xid=str(xid))
            if not self._policy.is_fatal(xid):
                _LOG.info("GPU %s: XID %d ignored (application XID or disabled by DP_DISABLE_HEALTHCHECKS)",
                          uuid, xid)
                return
            permanent = xid in self._cfg.never_recover_xids
            self._state.mark_unhealthy(uuid, f"XID {xid}", permanent=permanent)
        elif event.eventType & pynvml.nvmlEventTypeDoubleBitEccError:
            self._state.mark_unhealthy(uuid, "double-bit ECC error", permanent=True)
        else:
            _LOG.debug("GPU %s: non-critical NVML event %#x ignored", uuid, event.eventType)

    # -- probes ---------------------------------------------------------------------------

    def probe_all(self) -> None:
        if self._policy.all_disabled:
            return
        now = time.monotonic()
        for gpu in self._state.gpus:
            if self._stop.is_set():
                return
            health = self._state.health_of(gpu.uuid)
            if health.permanent:
                continue
            failure = self._probe(gpu)
            if failure is not None:
                reason, permanent = failure
                self._state.mark_unhealthy(gpu.uuid, f"probe: {reason}", permanent=permanent)
            elif (not health.healthy and self._cfg.health_recovery
                  and now - health.last_failure >= self._cfg.recovery_quiet_period):
                self._state.mark_healthy(gpu.uuid, f"recovered: no failure for {self._cfg.recovery_quiet_period:g} s "
                                                   "and every probe passed")

    def _probe(self, gpu: GpuInfo) -> tuple[str, bool] | None:
        """None when the GPU looks fine, else (reason, permanent)."""
        try:
            handle = self._nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
        except pynvml.NVMLError as exc:
            return f"not reachable by UUID ({exc})", nvml_error_code(exc) == pynvml.NVML_ERROR_GPU_IS_LOST
        try:
            if self._nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle) == pynvml.NVML_FEATURE_ENABLED:
                return "retired memory pages pending (GPU reset needed)", False
        except pynvml.NVMLError as exc:
            if nvml_error_code(exc) not in _SKIP_CODES:
                return f"retired-pages query failed ({exc})", nvml_error_code(exc) == pynvml.NVML_ERROR_GPU_IS_LOST
        try:
            _, _, pending, failed = self._nvml.nvmlDeviceGetRemappedRows(handle)
            if failed:
                return "row remapping failed", True
            if pending:
                return "row remapping pending (GPU reset needed)", False
        except pynvml.NVMLError as exc:
            if nvml_error_code(exc) not in _SKIP_CODES:
                return f"row-remap query failed ({exc})", nvml_error_code(exc) == pynvml.NVML_ERROR_GPU_IS_LOST
        return None

    # -- losing NVML itself ---------------------------------------------------------------

    def _recover_nvml(self, cause: BaseException) -> None:
        """NVML itself failed (not one GPU): keep every GPU's last known health, re-init with
        capped backoff, then probe each GPU and mark only those that fail."""
        self.nvml_down_since = time.monotonic()
        _LOG.error("NVML event wait failed: %s. Health checking is suspended; keeping the last known "
                   "health of every GPU and re-initialising NVML", cause)
        self._free_events()
        delay = 0.1
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                try:
                    self._nvml.nvmlShutdown()
                except pynvml.NVMLError:
                    pass
                self._nvml.nvmlInit()
                break
            except pynvml.NVMLError as exc:
                _LOG.error("NVML is unusable (%s); GPU health is NOT being checked; retrying in %.1f s",
                           exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, NVML_RETRY_MAX)
        if self._stop.is_set():
            return
        _LOG.warning("NVML re-initialised after %.1f s; probing every GPU", time.monotonic() - self.nvml_down_since)
        self.nvml_down_since = None
        self._register_events()
        self.probe_all()


# ############################################################################################
# Allocation: pure functions over plain data, no gRPC and no NVML. GetPreferredAllocation
# picks well-connected GPUs or packs slices; Allocate turns IDs into the container's
# environment, mounts, device nodes and CDI names.
# ############################################################################################

class AllocationError(ValueError):
    """A request we refuse; the servicer answers INVALID_ARGUMENT with this text."""


EXACT_SEARCH_LIMIT = 3000  # combinations; beyond it a greedy search


def choose_gpus(pool: Sequence[int], must: Sequence[int], size: int,
                scores: Mapping[tuple[int, int], int]) -> list[int]:
    """The `size` GPUs (indices), including `must`, with the highest total pair score.
    Exact search while cheap, else greedy growth from every seed; ties go to lower indices."""
    must = sorted(set(must))
    rest = sorted(set(pool) - set(must))
    need = min(size, len(must) + len(rest)) - len(must)
    if need <= 0:
        return must[:max(size, len(must))]

    def score(a: int, b: int) -> int:
        return scores.get((min(a, b), max(a, b)), CROSS_CPU_SCORE)

    def total(group: Sequence[int]) -> int:
        return sum(score(a, b) for a, b in itertools.combinations(group, 2))

    best: tuple[int, tuple[int, ...]] | None = None
    if math.comb(len(rest), need) <= EXACT_SEARCH_LIMIT:
        for combo in itertools.combinations(rest, need):
            value = total(must + list(combo))
            if best is None or value > best[0]:
                best = (value, combo)
        assert best is not None
        return sorted(must + list(best[1]))
    seeds = [()] if must else [(s,) for s in rest]
    for seed in seeds:
        chosen = must + list(seed)
        candidates = [c for c in rest if c not in seed]
        while len(chosen) < len(must) + need:
            pick = max(candidates, key=lambda c: (sum(score(c, m) for m in chosen), -c))
            chosen.append(pick)
            candidates.remove(pick)
        value = total(chosen)
        key = tuple(sorted(chosen))
        if best is None or value > best[0] or (value == best[0] and key < best[1]):
            best = (value, key)
    assert best is not None
    return sorted(best[1])


def choose_slices(available: Sequence[AdvertisedDevice], must: Sequence[AdvertisedDevice],
                  size: int) -> list[AdvertisedDevice]:
    """Keep one container's slices on as few GPUs as possible: the must-include GPUs first,
    then the GPU that fits the rest leaving the fewest free slices (best fit); if none
    fits, the GPUs with the most free slices first."""
    chosen = list(dict.fromkeys(must))
    free: dict[str, list[AdvertisedDevice]] = {}
    for dev in sorted(set(available) - set(chosen), key=lambda d: (d.gpu.index, d.slice_index or 0)):
        free.setdefault(dev.gpu.uuid, []).append(dev)
    index_of = {d.gpu.uuid: d.gpu.index for d in available}
    need = size - len(chosen)
    for uuid in sorted({d.gpu.uuid for d in chosen}, key=lambda u: (-len(free.get(u, [])), index_of.get(u, 0))):
        take = free.pop(uuid, [])[:max(need, 0)]
        chosen += take
        need -= len(take)
    while need > 0 and free:
        fitting = [u for u, devs in free.items() if len(devs) >= need]
        if fitting:
            uuid = min(fitting, key=lambda u: (len(free[u]), index_of[u]))
        else:
            uuid = max(free, key=lambda u: (len(free[u]), -index_of[u]))
        take = free.pop(uuid)[:need]
        chosen += take
        need -= len(take)
    return chosen


def preferred_allocation(snapshot: Snapshot, available_ids: Sequence[str], must_ids: Sequence[str],
                         size: int, scores: Mapping[tuple[int, int], int]) -> list[str]:
    devices = snapshot.devices
    available = [devices[i] for i in dict.fromkeys(available_ids) if i in devices]
    must = [devices[i] for i in dict.fromkeys(must_ids) if i in devices]
    if any(d.slice_index is not None for d in available + must):
        return [d.id for d in choose_slices(available, must, size)]
    by_index = {d.gpu.index: d for d in available + must}
    picked = choose_gpus(list(by_index), [d.gpu.index for d in must], size, scores)
    return [by_index[i].id for i in picked]


@dataclass
class AllocationPlan:
    """What one container gets: its GPUs in index order and the memory granted on each."""
    gpus: list[GpuInfo]
    grants: dict[str, int] = field(default_factory=dict)  # uuid -> bytes (slices only)


def plan_allocation(snapshot: Snapshot, ids: Sequence[str], resource: str, slice_bytes: int,
                    span: str) -> AllocationPlan:
    unique = list(dict.fromkeys(ids))
    if not unique:
        raise AllocationError(f"empty container request for {resource}: no device IDs")
    gpus: dict[str, GpuInfo] = {}
    slices: dict[str, int] = {}
    for device_id in unique:
        dev = snapshot.devices.get(device_id)
        if dev is None:
            raise AllocationError(f"unknown device ID {device_id!r} for resource {resource}")
        if dev.gpu.uuid not in snapshot.healthy_gpus:
            raise AllocationError(f"device {device_id} of resource {resource} is Unhealthy; refusing to allocate it")
        gpus[dev.gpu.uuid] = dev.gpu
        slices[dev.gpu.uuid] = slices.get(dev.gpu.uuid, 0) + 1
    ordered = sorted(gpus.values(), key=lambda g: g.index)
    if not slice_bytes:
        return AllocationPlan(ordered)
    if len(ordered) > 1 and span == "deny":
        where = ", ".join(f"{slices[g.uuid]} on {g.uuid} (index {g.index})" for g in ordered)
        raise AllocationError(f"{len(unique)} slices of {resource} span {len(ordered)} GPUs: {where}; "
                              "--vgpu-span=deny requires one GPU per container")
    return AllocationPlan(ordered, {g.uuid: slices[g.uuid] * slice_bytes for g in ordered})


VOLUME_MOUNT_ROOT = "/var/run/nvidia-container-devices"
CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
PRELOAD_DIR = "/usr/local/vgpu"


def container_response(plan: AllocationPlan, cfg: Config) -> Any:
    """The ContainerAllocateResponse for one container, following NVIDIA's strategies."""
    names = [str(g.index) if cfg.device_id_strategy == "index" else g.uuid for g in plan.gpus]
    strategies = cfg.device_list_strategies
    only_cdi = all(s.startswith("cdi-") for s in strategies)
    resp = api.ContainerAllocateResponse()
    if "envvar" in strategies:
        resp.envs["NVIDIA_VISIBLE_DEVICES"] = ",".join(names)
    if "volume-mounts" in strategies:
        resp.envs["NVIDIA_VISIBLE_DEVICES"] = VOLUME_MOUNT_ROOT
        resp.mounts.extend(api.Mount(container_path=f"{VOLUME_MOUNT_ROOT}/{n}", host_path="/dev/null")
                           for n in names)
    cdi_names = [f"{cfg.cdi_kind}={n}" for n in names]
    if "cdi-annotations" in strategies:
        key = f"{cfg.cdi_annotation_prefix}nvidia-device-plugin_{cfg.resource_name.split('/', 1)[1]}"
        resp.annotations[key] = ",".join(cdi_names)
    if "cdi-cri" in strategies:
        resp.cdi_devices.extend(api.CDIDevice(name=n) for n in cdi_names)
    if cfg.pass_device_specs and not only_cdi:
        paths = [p for p in CONTROL_DEVICES if os.path.exists(_under(cfg.dev_root, p))]
        paths += [f"/dev/nvidia{g.minor}" for g in plan.gpus]
        resp.devices.extend(api.DeviceSpec(container_path=p, host_path=_under(cfg.dev_root, p), permissions="rw")
                            for p in paths)
    if plan.grants:
        add_memory_limits(resp, plan, names, cfg)
    return resp


def add_memory_limits(resp: Any, plan: AllocationPlan, names: Sequence[str], cfg: Config) -> None:
    """Hand the granted memory to enforcement libraries in their own conventions."""
    grants = [plan.grants[g.uuid] for g in plan.gpus]
    # cuda-wrapper: one per-process byte budget; it counts allocations on every GPU together.
    resp.envs["WRAPPER_MAX_MEMORY"] = str(sum(grants))
    for position, granted in enumerate(grants):  # HAMi-core: per visible GPU, in MiB
        resp.envs[f"CUDA_DEVICE_MEMORY_LIMIT_{position}"] = f"{granted // MiB}m"
    resp.envs["NVIDIA_VGPU_MEMORY_GRANT"] = ",".join(f"{n}={b}" for n, b in zip(names, grants, strict=True))
    if cfg.vgpu_preload_lib:
        target = f"{PRELOAD_DIR}/{os.path.basename(cfg.vgpu_preload_lib)}"
        resp.mounts.append(api.Mount(container_path=target, host_path=cfg.vgpu_preload_lib, read_only=True))
        resp.envs["LD_PRELOAD"] = target


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/")) if root != "/" else path


def check_message_sizes(layout: Sequence[AdvertisedDevice], gpus: Sequence[GpuInfo], slice_bytes: int) -> None:
    """Refuse a layout whose ListAndWatch (or GetPreferredAllocation) answer would exceed the
    kubelet's 4 MiB receive limit: past it the kubelet silently shows zero or stale capacity."""
    def sizes(devs: Sequence[AdvertisedDevice]) -> tuple[int, int]:
        law = list_and_watch_response(devs, lambda _: False).ByteSize()  # "Unhealthy" is the longer word
        pref = api.PreferredAllocationResponse(container_responses=[
            api.ContainerPreferredAllocationResponse(deviceIDs=[d.id for d in devs])]).ByteSize()
        return law, pref

    law, pref = sizes(layout)
    if max(law, pref) <= MESSAGE_BUDGET:
        return
    smallest = None
    if slice_bytes:
        low, high = slice_bytes // MiB, max(g.memory_bytes for g in gpus) // MiB
        while low < high:  # smallest slice (in MiB) whose layout fits
            mid = (low + high) // 2
            if max(sizes(build_layout(gpus, mid * MiB))) <= MESSAGE_BUDGET:
                high = mid
            else:
                low = mid + 1
        smallest = format_size(low * MiB)
    raise ConfigError(
        f"{len(layout)} devices make a ListAndWatch answer of {law} bytes (GetPreferredAllocation up to {pref}), "
        f"over the kubelet's {KUBELET_MAX_MESSAGE}-byte receive limit less a {KUBELET_MAX_MESSAGE - MESSAGE_BUDGET}"
        f"-byte margin" + (f"; the smallest slice that fits is --vgpu-memory={smallest}" if smallest else ""))


# ############################################################################################
# Servicer: the DevicePlugin gRPC service. Thin: it validates, calls the pure functions
# above, and maps AllocationError to INVALID_ARGUMENT. Runs on gRPC's worker threads.
# ############################################################################################

def plugin_options() -> Any:
    """One source for the options, used by Register and GetDevicePluginOptions alike."""
    return api.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)


class DevicePluginServicer(api_grpc.DevicePluginServicer):
    def __init__(self, state: DeviceState, cfg: Config, scores: Callable[[], Mapping[tuple[int, int], int]],
                 metrics: Metrics, server_stopped: threading.Event, on_stream_lost: Callable[[], None]) -> None:
        self._state = state
        self._on_stream_lost = on_stream_lost
        self._cfg = cfg
        self._scores = scores
        self._metrics = metrics
        self._server_stopped = server_stopped
        self._streams_lock = threading.Lock()
        self.streams = 0

    def GetDevicePluginOptions(self, request: Any, context: grpc.ServicerContext) -> Any:
        return plugin_options()

    def ListAndWatch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        done = threading.Event()

        def on_done() -> None:
            done.set()
            self._state.wake_all()

        context.add_callback(on_done)
        with self._streams_lock:
            self.streams += 1
        _LOG.info("ListAndWatch: kubelet attached a stream for %s", self._cfg.resource_name)
        try:
            version = -1
            while True:
                snap = self._state.wait_newer(version, lambda: done.is_set() or self._server_stopped.is_set())
                if snap is None:
                    _LOG.info("ListAndWatch: stream for %s ended", self._cfg.resource_name)
                    if not self._server_stopped.is_set():
                        self._on_stream_lost()
                    return
                version = snap.version
                yield snap.response
                self._metrics.inc("list_and_watch_messages_total")
        finally:
            with self._streams_lock:
                self.streams -= 1

    def GetPreferredAllocation(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._metrics.rpc("GetPreferredAllocation", context):
            snap = self._state.snapshot()
            responses = []
            for creq in request.container_requests:
                ids = preferred_allocation(snap, creq.available_deviceIDs, creq.must_include_deviceIDs,
                                           creq.allocation_size, self._scores())
                responses.append(api.ContainerPreferredAllocationResponse(deviceIDs=ids))
            return api.PreferredAllocationResponse(container_responses=responses)

    def Allocate(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._metrics.rpc("Allocate", context):
            if not request.container_requests:
                raise AllocationError(f"empty AllocateRequest for {self._cfg.resource_name}: no container requests")
            snap = self._state.snapshot()
            responses = []
            for creq in request.container_requests:
                plan = plan_allocation(snap, creq.devices_ids, self._cfg.resource_name, self._cfg.vgpu_memory,
                                       self._cfg.vgpu_span)
                responses.append(container_response(plan, self._cfg))
                _LOG.debug("Allocate %s: %s", self._cfg.resource_name, ", ".join(creq.devices_ids))
            return api.AllocateResponse(container_responses=responses)

    def PreStartContainer(self, request: Any, context: grpc.ServicerContext) -> Any:
        return api.PreStartContainerResponse()


# ############################################################################################
# Metrics and liveness: Prometheus text on /metrics, /healthz, and a status socket in the
# abstract namespace for `--probe` (an exec probe; needs no network and no file).
# ############################################################################################

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)
_HELP = {
    "devices": ("gauge", "Advertised devices by resource and health."),
    "xid_events_total": ("counter", "XID events received, by GPU and XID."),
    "health_transitions_total": ("counter", "GPU health transitions, by GPU and new state."),
    "rpc_calls_total": ("counter", "Allocate and GetPreferredAllocation calls."),
    "rpc_errors_total": ("counter", "Failed Allocate and GetPreferredAllocation calls, by gRPC code."),
    "rpc_duration_seconds": ("histogram", "Allocate and GetPreferredAllocation latency."),
    "registrations_total": ("counter", "Register calls to the kubelet, by result."),
    "kubelet_restarts_total": ("counter", "Kubelet restarts noticed."),
    "list_and_watch_messages_total": ("counter", "ListAndWatch messages sent."),
    "health_thread_restarts_total": ("counter", "Health thread restarts after it died."),
    "health_thread_up": ("gauge", "1 while the health thread runs."),
}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._hist: dict[tuple[tuple[str, str], ...], list[float]] = {}
        self.gauges: Callable[[], Iterable[tuple[str, dict[str, str], float]]] = lambda: ()

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def observe(self, seconds: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            row = self._hist.setdefault(key, [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    row[i] += 1
            row[-2] += 1
            row[-1] += seconds

    def rpc(self, method: str, context: grpc.ServicerContext) -> _RpcTimer:
        return _RpcTimer(self, method, context)

    def render(self) -> str:
        lines: list[str] = []
        rows: dict[str, list[str]] = {}

        def fmt(labels: Iterable[tuple[str, str]]) -> str:
            inner = ",".join(f'{k}="{v}"' for k, v in labels)
            return "{" + inner + "}" if inner else ""

        with self._lock:
            for (name, labels), value in sorted(self._values.items()):
                rows.setdefault(name, []).append(f"nvidia_device_plugin_{name}{fmt(labels)} {value:g}")
            for labels, row in sorted(self._hist.items()):
                out = rows.setdefault("rpc_duration_seconds", [])
                for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), row[:-2] + [row[-2]], strict=True):
                    le = bound if isinstance(bound, str) else f"{bound:g}"
                    out.append(f"nvidia_device_plugin_rpc_duration_seconds_bucket{fmt((*labels, ('le', le)))} "
                               f"{count:g}")
                out.append(f"nvidia_device_plugin_rpc_duration_seconds_count{fmt(labels)} {row[-2]:g}")
                out.append(f"nvidia_device_plugin_rpc_duration_seconds_sum{fmt(labels)} {row[-1]:.6f}")
        for name, labels_dict, value in self.gauges():
            rows.setdefault(name, []).append(f"nvidia_device_plugin_{name}{fmt(sorted(labels_dict.items()))} {value:g}")
        for name, samples in rows.items():
            kind, text = _HELP.get(name, ("untyped", name))
            lines += [f"# HELP nvidia_device_plugin_{name} {text}", f"# TYPE nvidia_device_plugin_{name} {kind}"]
            lines += samples
        return "\n".join(lines) + "\n"


class _RpcTimer:
    """Counts and times one RPC; turns AllocationError into INVALID_ARGUMENT."""

    def __init__(self, metrics: Metrics, method: str, context: grpc.ServicerContext) -> None:
        self._metrics, self._method, self._context = metrics, method, context

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._metrics.observe(time.perf_counter() - self._start, method=self._method)
        self._metrics.inc("rpc_calls_total", method=self._method)
        if exc is None:
            return
        code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, AllocationError) else grpc.StatusCode.INTERNAL
        self._metrics.inc("rpc_errors_total", method=self._method, code=code.name)
        if isinstance(exc, AllocationError):
            _LOG.warning("%s rejected: %s", self._method, exc)
        else:
            _LOG.exception("%s failed unexpectedly", self._method)
        self._context.abort(code, str(exc))  # raises: gRPC answers with this status


def status_socket_name(cfg: Config) -> bytes:
    return b"\0nvidia-device-plugin-status:" + cfg.socket_path.encode()


def run_probe(cfg: Config) -> int:
    """`--probe`: ask the running plugin for its liveness over the status socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(status_socket_name(cfg))
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    except OSError as exc:
        print(f"not live: no plugin answers for {cfg.socket_path} ({exc})")
        return 1
    text = answer.decode(errors="replace").strip()
    print(text)
    return 0 if text.startswith("ok") else 1


class StatusEndpoints:
    """Serves liveness on the abstract status socket and, with --health-port, HTTP."""

    def __init__(self, cfg: Config, liveness: Callable[[], tuple[bool, str]], metrics: Metrics) -> None:
        self._cfg, self._liveness, self._metrics = cfg, liveness, metrics
        self._sock: socket.socket | None = None
        self._http: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(status_socket_name(self._cfg))
        except OSError as exc:
            _LOG.warning("status socket unavailable (%s): --probe will report this plugin as not live", exc)
            self._sock.close()
            self._sock = None
        else:
            self._sock.listen(8)
            threading.Thread(target=self._serve_status, name="status-socket", daemon=True).start()
        if self._cfg.health_port:
            self._http = http.server.ThreadingHTTPServer((self._cfg.health_address, self._cfg.health_port),
                                                         self._http_handler())
            self._http.daemon_threads = True
            threading.Thread(target=self._http.serve_forever, name="health-http", daemon=True).start()
            _LOG.info("serving /healthz and /metrics on %s:%d", self._cfg.health_address, self._cfg.health_port)

    def stop(self) -> None:
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        if self._sock:
            self._sock.close()

    def _serve_status(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                live, why = self._liveness()
                try:
                    conn.sendall(f"{'ok' if live else 'not live'}: {why}\n".encode())
                except OSError:
                    pass

    def _http_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        endpoints = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path == "/healthz":
                    live, why = endpoints._liveness()
                    self._reply(200 if live else 503, f"{'ok' if live else 'not live'}: {why}\n", "text/plain")
                elif self.path == "/metrics":
                    self._reply(200, endpoints._metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
                else:
                    self._reply(404, "not found\n", "text/plain")

            def _reply(self, code: int, body: str, ctype: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt: str, *args: Any) -> None:
                _LOG.debug("http: " + fmt, *args)

        return Handler


# ############################################################################################
# PluginServer: one gRPC server on our socket, for one kubelet. Rebuilt on every kubelet
# restart or SIGHUP; the DeviceState and HealthMonitor outlive it.
# ############################################################################################

REGISTER_TIMEOUT = 10.0


class PluginServer:
    def __init__(self, cfg: Config, state: DeviceState, scores: Callable[[], Mapping[tuple[int, int], int]],
                 metrics: Metrics, on_stream_lost: Callable[[], None]) -> None:
        self._cfg = cfg
        self.stopped = threading.Event()
        self.servicer = DevicePluginServicer(state, cfg, scores, metrics, self.stopped, on_stream_lost)
        self._state = state
        self._server: grpc.Server | None = None
        self.socket_inode: int | None = None

    def start(self) -> None:
        """Serve on a fresh socket and return once the server answers."""
        path = self._cfg.socket_path
        if os.path.lexists(path):
            _LOG.info("removing stale socket %s", path)
            os.unlink(path)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc"),
                                   options=[("grpc.max_receive_message_length", SERVER_MAX_RECEIVE)])
        api_grpc.add_DevicePluginServicer_to_server(self.servicer, self._server)
        if not self._server.add_insecure_port(f"unix://{path}"):
            raise OSError(f"cannot listen on {path}")
        self._server.start()
        self.socket_inode = os.stat(path).st_ino
        self._ask_options(timeout=10, wait_for_ready=True)
        _LOG.info("serving %s on %s", self._cfg.resource_name, path)

    def stop(self) -> None:
        """Stop serving: streams end, the socket goes. Safe to call twice."""
        self.stopped.set()
        self._state.wake_all()
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        path = self._cfg.socket_path
        try:
            if self.socket_inode is not None and os.stat(path).st_ino == self.socket_inode:
                os.unlink(path)
        except FileNotFoundError:
            pass

    def answers(self) -> bool:
        try:
            self._ask_options(timeout=2, wait_for_ready=False)
            return True
        except grpc.RpcError:
            return False

    def _ask_options(self, timeout: float, wait_for_ready: bool) -> None:
        """Call our own server as the kubelet would; raises grpc.RpcError if it does not answer."""
        with grpc.insecure_channel(f"unix://{self._cfg.socket_path}") as channel:
            api_grpc.DevicePluginStub(channel).GetDevicePluginOptions(api.Empty(), timeout=timeout,
                                                                      wait_for_ready=wait_for_ready)

    def register(self) -> None:
        """Register with the kubelet; raises grpc.RpcError with the kubelet's reason."""
        kubelet = self._cfg.kubelet_socket
        if not wait_connectable(kubelet, 1.0):
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"nothing accepts connections on {kubelet}")
        # A fresh channel per attempt: a shared one could sit in gRPC's reconnect backoff.
        with grpc.insecure_channel(f"unix://{kubelet}",
                                   options=[("grpc.initial_reconnect_backoff_ms", 10)]) as channel:
            api_grpc.RegistrationStub(channel).Register(api.RegisterRequest(
                version=API_VERSION, endpoint=os.path.basename(self._cfg.socket_path),
                resource_name=self._cfg.resource_name, options=plugin_options()),
                timeout=REGISTER_TIMEOUT, wait_for_ready=True)


def wait_connectable(path: str, timeout: float) -> bool:
    """Wait until a unix socket accepts. The kubelet creates kubelet.sock a moment before it
    listens; inotify reports the creation, so we bridge that gap here, in microseconds."""
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
                return True
            except OSError:
                pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


# ############################################################################################
# Supervisor: the main thread's loop. Watches the socket directory with inotify (no
# polling; a restarted kubelet re-creates kubelet.sock within a millisecond, often with
# the same inode), handles signals, restarts the server, registers with capped backoff,
# and restarts the health thread if it dies.
# ############################################################################################

IN_CREATE, IN_DELETE, IN_MOVED_FROM, IN_MOVED_TO = 0x100, 0x200, 0x40, 0x80
IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED = 0x400, 0x800, 0x8000
_EVENT_HEADER = struct.Struct("iIII")
REGISTER_BACKOFF_MAX = 10.0
HEALTH_RESTART_MAX = 30.0
HEALTH_DOWN_LOG_INTERVAL = 10.0
NVML_INIT_RETRY = 30.0
STREAM_LOST_GRACE = 1.0


class DirectoryWatch:
    """inotify through ctypes on the directories holding our socket and kubelet.sock (one
    directory, normally). read() gives (path, mask) for entries created or removed, and
    (directory, IN_IGNORED) when a watched directory itself went away."""

    def __init__(self, directories: Iterable[str]) -> None:
        self._dirs = list(dict.fromkeys(directories))
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._by_wd: dict[int, str] = {}

    @property
    def watching(self) -> bool:
        return len(self._by_wd) == len(self._dirs)

    def arm(self) -> bool:
        """Watch every directory not yet watched; False while one of them is missing."""
        mask = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
        for directory in set(self._dirs) - set(self._by_wd.values()):
            wd = self._libc.inotify_add_watch(self.fd, directory.encode(), mask)
            if wd >= 0:
                self._by_wd[wd] = directory
        return self.watching

    def read(self) -> list[tuple[str, int]]:
        events: list[tuple[str, int]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _EVENT_HEADER.unpack_from(data, offset)
                raw = data[offset + _EVENT_HEADER.size: offset + _EVENT_HEADER.size + length]
                offset += _EVENT_HEADER.size + length
                directory = self._by_wd.get(wd)
                if directory is None:
                    continue
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                    del self._by_wd[wd]
                    events.append((directory, IN_IGNORED))
                else:
                    events.append((os.path.join(directory, raw.rstrip(b"\0").decode(errors="replace")), mask))

    def close(self) -> None:
        os.close(self.fd)


def socket_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_ctime_ns) if stat.S_ISSOCK(st.st_mode) else None


class Supervisor:
    def __init__(self, cfg: Config, nvml: Any, policy: XidPolicy, metrics: Metrics) -> None:
        self.cfg = cfg
        self.nvml = nvml
        self.policy = policy
        self.metrics = metrics
        self.state = DeviceState(cfg.resource_name, cfg.vgpu_memory, self._on_transition)
        self.scores: Mapping[tuple[int, int], int] = {}
        self.server: PluginServer | None = None
        self.monitor: HealthMonitor | None = None
        self.health_thread: threading.Thread | None = None
        self._health_exited = threading.Event()
        self.registered_with: tuple[int, int] | None = None  # kubelet.sock identity
        self.idle_reason: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._signals: list[int] = []
        self._need_restart = True
        self._register_at: float | None = None
        self._register_delay = 0.05
        self._health_restart_at: float | None = None
        self._health_delay = 0.5
        self._health_down_log_at = 0.0
        self._nvml_retry_at: float | None = None
        self._waiting_logged = False
        self._same_kubelet = False
        self._stream_check_at: float | None = None
        metrics.gauges = self._gauges

    # -- inventory ------------------------------------------------------------------------

    def load_inventory(self) -> bool:
        """Enumerate and adopt the GPUs. False: idle (nothing to advertise)."""
        try:
            gpus = enumerate_gpus(self.nvml, self.cfg.sysfs_root)
        except pynvml.NVMLError as exc:
            raise InitError(f"NVML enumeration failed: {exc}") from exc
        if not gpus and not self.state.gpus:
            self.idle_reason = "NVML reports no GPUs on this node; nothing to advertise"
            _LOG.warning("%s (not registering)", self.idle_reason)
            return False
        if self.cfg.vgpu_memory:
            too_small = [g for g in gpus if slice_count(g, self.cfg.vgpu_memory) == 0]
            if too_small:
                g = too_small[0]
                raise ConfigError(f"invalid value {format_size(self.cfg.vgpu_memory)!r} for --vgpu-memory: "
                                  f"larger than GPU {g.uuid} (index {g.index}) with "
                                  f"{format_size(g.memory_bytes // MiB * MiB)}; allowed: a slice that fits every GPU")
            check_message_sizes(build_layout(gpus, self.cfg.vgpu_memory), gpus, self.cfg.vgpu_memory)
        self.scores = gpu_pair_scores(self.nvml, gpus)
        self.state.set_inventory(gpus)
        for g in gpus:
            _LOG.info("GPU %d: %s %s, %s, PCI %s, minor %d, NUMA node %s", g.index, g.uuid, g.name,
                      format_size(g.memory_bytes // MiB * MiB), g.pci_bus_id, g.minor,
                      g.numa_node if g.numa_node is not None else "none")
        if self.cfg.vgpu_memory:
            _LOG.info("sharing: %d slices of %s under %s", len(self.state.snapshot().devices),
                      format_size(self.cfg.vgpu_memory), self.cfg.resource_name)
        self.idle_reason = None
        return True

    def init_nvml(self) -> bool:
        try:
            self.nvml.nvmlInit()
        except pynvml.NVMLError as exc:
            msg = (f"NVML failed to initialise: {exc}. Check that the NVIDIA driver is loaded (nvidia-smi works "
                   "on the host), that this container runs with the NVIDIA container runtime and "
                   "NVIDIA_VISIBLE_DEVICES=all / NVIDIA_DRIVER_CAPABILITIES=utility, and that "
                   "libnvidia-ml.so.1 is reachable (--nvidia-driver-root)")
            if self.cfg.fail_on_init_error:
                raise InitError(msg) from exc
            self.idle_reason = f"NVML unavailable ({exc}); retrying every {NVML_INIT_RETRY:g} s"
            _LOG.error("%s. --fail-on-init-error=false: not registering, retrying every %g s",
                       msg, NVML_INIT_RETRY)
            self._nvml_retry_at = time.monotonic() + NVML_INIT_RETRY
            return False
        self._nvml_retry_at = None
        return True

    # -- health thread ----------------------------------------------------------------------

    def start_health(self) -> None:
        if not self.policy.watching:
            _LOG.warning("DP_DISABLE_HEALTHCHECKS=all: GPU health is not checked; every GPU stays Healthy")
            return
        self.monitor = HealthMonitor(self.nvml, self.state, self.policy, self.cfg, self.metrics)
        self._spawn_health_thread()

    def _spawn_health_thread(self) -> None:
        self._health_exited.clear()
        self.health_thread = threading.Thread(target=self._health_body, name="nvml-health", daemon=True)
        self.health_thread.start()

    def _health_body(self) -> None:
        assert self.monitor is not None
        try:
            self.monitor.run()
        except Exception:  # noqa: BLE001 (whatever killed it, the supervisor restarts it)
            _LOG.exception("health thread died; GPU health is NOT being checked until it restarts")
        finally:
            self._health_exited.set()
            self._wake()

    def stop_health(self, timeout: float) -> bool:
        """Stop the health thread; False if it is stuck in an NVML call past `timeout` (it
        keeps its monitor then, and the supervisor restarts it once the call returns)."""
        if self.monitor is not None:
            self.monitor.stop()
        if self.health_thread is not None:
            self.health_thread.join(timeout)
            if self.health_thread.is_alive():
                return False
        self.monitor = self.health_thread = None
        self._health_restart_at = None
        return True

    def _check_health_thread(self, now: float) -> None:
        if self.monitor is None or not self._health_exited.is_set():
            return
        if self._health_restart_at is None:
            self._health_restart_at = now + self._health_delay
            self._health_down_log_at = now
        if now >= self._health_down_log_at:
            _LOG.error("health thread is down: GPU health is NOT being checked (restart in %.1f s)",
                       max(0.0, self._health_restart_at - now))
            self._health_down_log_at = now + HEALTH_DOWN_LOG_INTERVAL
        if now >= self._health_restart_at:
            self.metrics.inc("health_thread_restarts_total")
            _LOG.warning("restarting the health thread")
            self._health_restart_at = None
            self._health_delay = min(self._health_delay * 2, HEALTH_RESTART_MAX)
            self._spawn_health_thread()

    def health_alive(self) -> tuple[bool, str]:
        if not self.policy.watching:
            return True, "health checks disabled"
        if self.monitor is None or self._health_exited.is_set():
            return False, "health thread is not running"
        if self.monitor.nvml_down_since is not None:
            return False, f"NVML unusable for {time.monotonic() - self.monitor.nvml_down_since:.0f} s"
        stalled = time.monotonic() - self.monitor.heartbeat
        if stalled > HEALTH_STALL_LIMIT:
            return False, f"health thread stalled for {stalled:.0f} s (an NVML call hangs?)"
        return True, "health thread alive"

    # -- liveness and metrics ---------------------------------------------------------------

    def liveness(self) -> tuple[bool, str]:
        if self.idle_reason:
            return True, f"idle: {self.idle_reason}"
        server = self.server
        if server is None or not server.answers():
            return False, "gRPC server does not answer on " + self.cfg.socket_path
        if self.registered_with is None or self.registered_with != socket_identity(self.cfg.kubelet_socket):
            return False, "not registered with the current kubelet"
        if server.servicer.streams < 1:
            return False, "no ListAndWatch stream attached"
        ok, why = self.health_alive()
        if not ok:
            return False, why
        return True, f"serving {len(self.state.snapshot().devices)} {self.cfg.resource_name} devices"

    def _gauges(self) -> Iterable[tuple[str, dict[str, str], float]]:
        snap = self.state.snapshot()
        healthy = sum(1 for d in snap.devices.values() if d.gpu.uuid in snap.healthy_gpus)
        yield "devices", {"resource": self.cfg.resource_name, "health": HEALTHY}, healthy
        yield "devices", {"resource": self.cfg.resource_name, "health": UNHEALTHY}, len(snap.devices) - healthy
        alive = self.monitor is not None and not self._health_exited.is_set()
        yield "health_thread_up", {}, 1 if alive else 0

    def _on_transition(self, uuid: str, new: str, reason: str) -> None:
        self.metrics.inc("health_transitions_total", gpu=uuid, to=new)

    # -- main loop ----------------------------------------------------------------------------

    def _stream_lost(self) -> None:
        """A gRPC thread saw the kubelet end our stream while we serve. Either the kubelet is
        restarting (inotify will say so in a moment) or it dropped us while it keeps running
        (kubernetes #121994 and friends): after a grace period the main loop registers again."""
        self._stream_check_at = time.monotonic() + STREAM_LOST_GRACE
        self._wake()

    def _check_streams_lost(self, now: float) -> None:
        if self._stream_check_at is None or now < self._stream_check_at:
            return
        self._stream_check_at = None
        server = self.server
        if server is None or server.stopped.is_set() or self._need_restart or server.servicer.streams > 0:
            return
        if self.registered_with is None or self.registered_with != socket_identity(self.cfg.kubelet_socket):
            return  # not registered, or a new kubelet: the restart path handles it
        _LOG.warning("the running kubelet dropped our ListAndWatch stream; registering again")
        self._same_kubelet = True
        self.registered_with = None
        self._need_restart = True

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)
        self._wake()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        watch = DirectoryWatch([self.cfg.plugin_dir, os.path.dirname(self.cfg.kubelet_socket)])
        try:
            return self._loop(watch)
        finally:
            watch.close()
            self.shutdown()

    def _activate(self) -> bool:
        """NVML up, GPUs enumerated, health thread running; False while idle."""
        active = self.init_nvml() and self.load_inventory()
        if active:
            self.start_health()
        return active

    def _loop(self, watch: DirectoryWatch) -> int:
        active = self._activate()
        while True:
            now = time.monotonic()
            while self._signals:
                sig = self._signals.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT):
                    _LOG.info("%s: stopping", signal.Signals(sig).name)
                    return 0
                _LOG.info("SIGHUP: re-enumerating GPUs and registering again")
                active = self._reload()
            if not watch.watching and not watch.arm():
                if not self._waiting_logged:
                    _LOG.warning("directory %s (or that of %s) does not exist; waiting for it",
                                 self.cfg.plugin_dir, self.cfg.kubelet_socket)
                    self._waiting_logged = True
            if not active and self._nvml_retry_at is not None and now >= self._nvml_retry_at:
                active = self._activate()
            if active:
                self._check_health_thread(now)
                self._check_streams_lost(now)
                if self._need_restart and watch.watching:
                    self._restart_server()
                if self._register_at is not None and now >= self._register_at:
                    self._try_register()
            timeout = self._next_timeout(active, watch)
            readable, _, _ = select.select([watch.fd, self._wake_r], [], [], timeout)
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            if watch.fd in readable:
                self._on_dir_events(watch.read())

    def _next_timeout(self, active: bool, watch: DirectoryWatch) -> float | None:
        deadlines = []
        if not watch.watching:
            deadlines.append(time.monotonic() + 1.0)
        if not active and self._nvml_retry_at is not None:
            deadlines.append(self._nvml_retry_at)
        if active:
            if self._register_at is not None:
                deadlines.append(self._register_at)
            if self._health_restart_at is not None:
                deadlines.append(min(self._health_restart_at, self._health_down_log_at))
            if self._need_restart:
                deadlines.append(time.monotonic() + 0.5)
            if self._stream_check_at is not None:
                deadlines.append(self._stream_check_at)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _on_dir_events(self, events: list[tuple[str, int]]) -> None:
        kubelet_name = os.path.basename(self.cfg.kubelet_socket)
        for path, mask in events:
            if mask & IN_IGNORED:
                _LOG.warning("directory %s went away; re-watching once it exists", path)
                self.registered_with = None
                self._need_restart = True
            elif path == self.cfg.kubelet_socket and mask & (IN_CREATE | IN_MOVED_TO):
                current = socket_identity(self.cfg.kubelet_socket)
                if current is not None and current == self.registered_with:
                    continue  # the creation we already registered with
                self.metrics.inc("kubelet_restarts_total")
                self.registered_with = None
                if self._fresh_server_ready():
                    _LOG.info("kubelet restarted (%s re-created): registering our fresh server", kubelet_name)
                    self._register_at = time.monotonic()
                    self._register_delay = 0.05
                else:
                    _LOG.info("kubelet restarted (%s re-created): serving again and re-registering", kubelet_name)
                    self._need_restart = True
            elif path == self.cfg.socket_path and mask & (IN_DELETE | IN_MOVED_FROM):
                server = self.server
                if server is None or server.stopped.is_set() or self._our_socket_intact():
                    continue  # no server, or our own clean-up of an earlier socket
                _LOG.info("our socket %s was deleted (kubelet restart?): serving again and re-registering",
                          self.cfg.socket_path)
                self.registered_with = None
                self._need_restart = True

    def _our_socket_intact(self) -> bool:
        """The socket file on disk is the one our current server listens on."""
        identity = socket_identity(self.cfg.socket_path)
        return self.server is not None and identity is not None and identity[0] == self.server.socket_inode

    def _fresh_server_ready(self) -> bool:
        """True when our server was restarted after the kubelet's socket clean-up (we saw our
        socket deleted) and its socket survived: the new kubelet can register it as it is."""
        server = self.server
        return (server is not None and not self._need_restart and not server.stopped.is_set()
                and server.servicer.streams == 0 and self._our_socket_intact())

    def _restart_server(self) -> None:
        """Old server first, so the kubelet sees the old stream end before we register anew
        (kubernetes #121994); then a fresh socket, then Register."""
        self._need_restart = False
        if self.server is not None:
            self.server.stop()
        self.server = PluginServer(self.cfg, self.state, lambda: self.scores, self.metrics, self._stream_lost)
        try:
            self.server.start()
        except Exception as exc:  # noqa: BLE001 (any failure to serve is retried the same way)
            _LOG.error("cannot serve on %s: %s; retrying", self.cfg.socket_path, exc)
            self.server.stop()
            self.server = None
            self._need_restart = True
            return
        # Re-registering with the same kubelet (SIGHUP, a dropped stream): give it a moment to
        # see the old stream end first, or a baseline kubelet drops the new one (#121994).
        self._register_at = time.monotonic() + (0.05 if self._same_kubelet else 0.0)
        self._same_kubelet = False
        self._register_delay = 0.05

    def _try_register(self) -> None:
        kubelet = self.cfg.kubelet_socket
        identity = socket_identity(kubelet)
        if identity is None:
            if not self._waiting_logged:
                _LOG.info("waiting for the kubelet to create %s", kubelet)
                self._waiting_logged = True
            self._register_at = None  # inotify tells us when it appears
            self._need_restart = self._need_restart or self.server is None
            return
        try:
            self.server.register()  # type: ignore[union-attr]
        except (grpc.RpcError, OSError) as exc:
            self.metrics.inc("registrations_total", result="failed")
            reason = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
            _LOG.warning("Register %s with the kubelet at %s failed (%s); retrying in %.2f s",
                         self.cfg.resource_name, kubelet, reason, self._register_delay)
            self._register_at = time.monotonic() + self._register_delay
            self._register_delay = min(self._register_delay * 2, REGISTER_BACKOFF_MAX)
            return
        self.metrics.inc("registrations_total", result="ok")
        self.registered_with = identity
        self._register_at = None
        self._waiting_logged = False
        snap = self.state.snapshot()
        unhealthy = self.state.unhealthy()
        _LOG.info("registered %s with the kubelet: %d devices on %d GPUs (%d unhealthy%s)", self.cfg.resource_name,
                  len(snap.devices), len(snap.gpus), len(unhealthy),
                  "".join(f"; {uuid}: {reason}" for uuid, reason in unhealthy))

    def _reload(self) -> bool:
        if not self.stop_health(HEALTH_WAIT_MS / 1000 + 2):
            _LOG.error("SIGHUP: the health thread is stuck in an NVML call; registering again without "
                       "re-enumerating")
            self._serve_and_register_again()
            return not self.idle_reason
        try:
            if self.idle_reason and not self.init_nvml():
                return False
            active = self.load_inventory()
        except (InitError, ConfigError) as exc:
            _LOG.error("SIGHUP: re-enumeration failed (%s); keeping the previous inventory", exc)
            active = bool(self.state.gpus)
        if active:
            self.start_health()
            self._serve_and_register_again()
        return active

    def _serve_and_register_again(self) -> None:
        self._same_kubelet = self.registered_with is not None
        self.registered_with = None
        self._need_restart = True

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if not self.stop_health(0.2):
            # It sits in an event wait of up to 5 s. Shutting NVML down under it could crash;
            # process exit releases NVML just as well.
            _LOG.debug("health thread still inside NVML; exiting without nvmlShutdown")
            return
        try:
            self.nvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


# ############################################################################################
# main
# ############################################################################################

def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as exc:
        print(f"nvidia_device_plugin.py: error: {exc}", file=sys.stderr)
        return 2
    if cfg.probe:
        return run_probe(cfg)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    policy = XidPolicy.from_env(os.environ)
    if cfg.simulate:
        _LOG.warning("SIMULATED INVENTORY: advertising %d fake '%s' GPUs of %s; no real GPU is behind them",
                     cfg.simulate.count, cfg.simulate.model, format_size(cfg.simulate.memory_bytes))
        nvml: Any = SimulatedNvml(cfg.simulate)
    else:
        preload_nvml_from_driver_root(cfg.driver_root)
        nvml = pynvml
    metrics = Metrics()
    supervisor = Supervisor(cfg, nvml, policy, metrics)
    status = StatusEndpoints(cfg, supervisor.liveness, metrics)
    try:
        try:
            status.start()
        except OSError as exc:
            raise ConfigError(f"--health-port {cfg.health_port}: cannot listen on "
                              f"{cfg.health_address}:{cfg.health_port} ({exc.strerror or exc})") from exc
        return supervisor.run()
    except ConfigError as exc:
        _LOG.error("%s", exc)
        print(f"nvidia_device_plugin.py: error: {exc}", file=sys.stderr)
        return 2
    except InitError as exc:
        _LOG.error("%s", exc)
        return 1
    finally:
        status.stop()


if __name__ == "__main__":
    sys.exit(main())
