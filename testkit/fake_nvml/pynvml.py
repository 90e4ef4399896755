"""A fake `pynvml` for tests: the NVML library boundary, nothing of the plugin's own code.

Put this directory first on PYTHONPATH. It reads its GPUs from the JSON file named by
FAKE_NVML_SCENARIO and takes injected faults as JSON datagrams on the unix socket named by
FAKE_NVML_CONTROL (see testkit/nvml_control.py). nvmlEventSetWait wakes the moment a
datagram arrives, so event-to-kubelet latency can be measured.

Scenario keys: gpus [{uuid, name, memory, minor, bus_id, events, topology_error}],
nvlinks [[a, b, count]], ancestors {"a,b": level}, default_ancestor, init_error,
failures {function: [NVML error code, how many calls fail]}.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_FEATURE_DISABLED = 0
NVML_FEATURE_ENABLED = 1
NVML_NVLINK_MAX_LINKS = 18
NVML_TOPOLOGY_INTERNAL = 0
NVML_TOPOLOGY_SINGLE = 10
NVML_TOPOLOGY_MULTIPLE = 20
NVML_TOPOLOGY_HOSTBRIDGE = 30
NVML_TOPOLOGY_NODE = 40
NVML_TOPOLOGY_CPU = NVML_TOPOLOGY_NODE
NVML_TOPOLOGY_SYSTEM = 50

nvmlEventTypeSingleBitEccError = 0x1
nvmlEventTypeDoubleBitEccError = 0x2
nvmlEventTypePState = 0x4
nvmlEventTypeXidCriticalError = 0x8
nvmlEventTypeClock = 0x10
nvmlMemory_v2 = 0x02000028

_NAMES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized", NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported", NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded", NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found", NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    _classes: dict[int, type] = {}

    def __new__(cls, value):
        if cls is NVMLError:
            cls = NVMLError._classes.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return _NAMES.get(self.value, f"NVML error {self.value}")


for _code, _name in list(_NAMES.items()):
    _cls = type("NVMLError_" + _name.title().replace(" ", ""), (NVMLError,), {})
    NVMLError._classes[_code] = _cls
    globals()[_cls.__name__] = _cls
NVMLError_GpuIsLost = NVMLError._classes[NVML_ERROR_GPU_IS_LOST]
NVMLError_Timeout = NVMLError._classes[NVML_ERROR_TIMEOUT]


class _Struct:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Handle:
    def __init__(self, index):
        self.index = index

    def __repr__(self):
        return f"<fake GPU handle {self.index}>"


_lock = threading.RLock()
_scenario: dict = {}
_state = {
    "initialised": 0, "lost": set(), "flags": {}, "events": [], "wait_errors": [],
    "init_failures": 0, "failures": {}, "hangs": {}, "crash_wait": 0,
}
_control: socket.socket | None = None


def _load() -> None:
    global _scenario, _control
    if _scenario:
        return
    path = os.environ.get("FAKE_NVML_SCENARIO")
    if not path:
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    with open(path) as fh:
        _scenario = json.load(fh)
    for fn, (code, count) in _scenario.get("failures", {}).items():
        _state["failures"][fn] = (code, count)
    ctl = os.environ.get("FAKE_NVML_CONTROL")
    if ctl and _control is None:
        try:
            os.unlink(ctl)
        except FileNotFoundError:
            pass
        _control = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _control.bind(ctl)
        _control.setblocking(False)


def _apply(cmd: dict) -> None:
    op = cmd["op"]
    if op == "xid":
        _state["events"].append((cmd["gpu"], nvmlEventTypeXidCriticalError, cmd["xid"]))
    elif op == "burst":
        _state["events"].extend((g, nvmlEventTypeXidCriticalError, x) for g, x in cmd["events"])
    elif op == "event":
        _state["events"].append((cmd["gpu"], cmd["type"], cmd.get("data", 0)))
    elif op == "remove_last":
        _scenario["gpus"].pop()
    elif op == "lose":
        _state["lost"].add(cmd["gpu"])
    elif op == "restore":
        _state["lost"].discard(cmd["gpu"])
        _state["flags"].pop(cmd["gpu"], None)
    elif op == "set":
        _state["flags"].setdefault(cmd["gpu"], {})[cmd["field"]] = cmd["value"]
    elif op == "wait_error":
        _state["wait_errors"].append(cmd["code"])
        _state["init_failures"] = cmd.get("init_failures", 0)
    elif op == "crash_wait":
        _state["crash_wait"] += 1
    elif op == "fail":
        _state["failures"][cmd["fn"]] = (cmd.get("code", NVML_ERROR_UNKNOWN), cmd.get("count", 1))
    elif op == "hang":
        _state["hangs"][cmd["fn"]] = cmd["seconds"]


def _drain() -> None:
    if _control is None:
        return
    while True:
        try:
            data = _control.recv(1 << 20)
        except (BlockingIOError, OSError):
            return
        with _lock:
            _apply(json.loads(data))


def _enter(fn: str) -> None:
    """Common prologue: apply pending commands, then injected hangs and failures."""
    _drain()
    with _lock:
        hang = _state["hangs"].pop(fn, 0)
        code, count = _state["failures"].get(fn, (None, 0))
        if count:
            _state["failures"][fn] = (code, count - 1)
    if hang:
        time.sleep(hang)
    if count:
        raise NVMLError(code)


def _gpu(handle) -> dict:
    if not isinstance(handle, _Handle):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    if handle.index in _state["lost"]:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    return _scenario["gpus"][handle.index]


def _flag(handle, name) -> bool:
    return bool(_state["flags"].get(handle.index, {}).get(name))


def nvmlInit():
    _load()
    _enter("nvmlInit")
    with _lock:
        if _state["init_failures"] > 0:
            _state["init_failures"] -= 1
            raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
        if _scenario.get("init_error"):
            raise NVMLError(_scenario["init_error"])
        _state["initialised"] += 1


def nvmlShutdown():
    with _lock:
        if _state["initialised"] <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        _state["initialised"] -= 1


def _need_init():
    if _state["initialised"] <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)


def nvmlSystemGetDriverVersion():
    _need_init()
    return _scenario.get("driver", "999.99")


def nvmlDeviceGetCount():
    _enter("nvmlDeviceGetCount")
    _need_init()
    return len(_scenario["gpus"])


def nvmlDeviceGetHandleByIndex(index):
    _enter("nvmlDeviceGetHandleByIndex")
    _need_init()
    if not 0 <= index < len(_scenario["gpus"]):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    handle = _Handle(index)
    _gpu(handle)
    return handle


def nvmlDeviceGetHandleByUUID(uuid):
    _enter("nvmlDeviceGetHandleByUUID")
    _need_init()
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    for index, gpu in enumerate(_scenario["gpus"]):
        if gpu["uuid"] == uuid:
            handle = _Handle(index)
            if _flag(handle, "unreachable"):
                raise NVMLError(NVML_ERROR_UNKNOWN)
            _gpu(handle)
            return handle
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetUUID(handle):
    _enter("nvmlDeviceGetUUID")
    return _gpu(handle)["uuid"]


def nvmlDeviceGetName(handle):
    return _gpu(handle).get("name", "NVIDIA Fake GPU")


def nvmlDeviceGetMemoryInfo(handle, version=None):
    total = _gpu(handle).get("memory", 16 << 30)
    return _Struct(total=total, free=total, used=0)


def nvmlDeviceGetMinorNumber(handle):
    return _gpu(handle).get("minor", handle.index)


def nvmlDeviceGetIndex(handle):
    return handle.index


def nvmlDeviceGetPciInfo(handle):
    bus = _gpu(handle).get("bus_id", f"00000000:{0x10 + handle.index:02X}:00.0")
    return _Struct(busId=bus.encode(), busIdLegacy=bus.encode())


def _topology_ok(handle):
    if _gpu(handle).get("topology_error"):
        raise NVMLError(NVML_ERROR_UNKNOWN)


def nvmlDeviceGetNvLinkState(handle, link):
    _topology_ok(handle)
    peers = [(b if a == handle.index else a, n) for a, b, n in _scenario.get("nvlinks", [])
             if handle.index in (a, b)]
    total = sum(n for _, n in peers)
    if not peers:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    if link >= total:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return NVML_FEATURE_ENABLED


def nvmlDeviceGetNvLinkRemotePciInfo(handle, link):
    _topology_ok(handle)
    peers = [(b if a == handle.index else a, n) for a, b, n in _scenario.get("nvlinks", [])
             if handle.index in (a, b)]
    for peer, count in peers:
        if link < count:
            return nvmlDeviceGetPciInfo(_Handle(peer))
        link -= count
    raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)


def nvmlDeviceGetTopologyCommonAncestor(a, b):
    _topology_ok(a)
    _topology_ok(b)
    key = f"{min(a.index, b.index)},{max(a.index, b.index)}"
    return _scenario.get("ancestors", {}).get(key, _scenario.get("default_ancestor", NVML_TOPOLOGY_SYSTEM))


def nvmlEventSetCreate():
    _need_init()
    return _Struct(registered={})


def nvmlDeviceGetSupportedEventTypes(handle):
    gpu = _gpu(handle)
    if gpu.get("events", True) is False:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return nvmlEventTypeXidCriticalError | nvmlEventTypeDoubleBitEccError | nvmlEventTypeSingleBitEccError


def nvmlDeviceRegisterEvents(handle, types, event_set):
    _enter("nvmlDeviceRegisterEvents")
    _gpu(handle)
    event_set.registered[handle.index] = types


def nvmlEventSetWait(event_set, timeoutms):
    deadline = time.monotonic() + timeoutms / 1000
    while True:
        _enter("nvmlEventSetWait")
        with _lock:
            if _state["crash_wait"]:
                _state["crash_wait"] -= 1
                raise RuntimeError("fake NVML: injected crash in nvmlEventSetWait")
            if _state["wait_errors"]:
                raise NVMLError(_state["wait_errors"].pop(0))
            while _state["events"]:
                index, etype, data = _state["events"].pop(0)
                if etype & event_set.registered.get(index, 0):
                    return _Struct(device=_Handle(index), eventType=etype, eventData=data,
                                   gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
        left = deadline - time.monotonic()
        if left <= 0:
            raise NVMLError(NVML_ERROR_TIMEOUT)
        if _control is None:
            time.sleep(left)
        else:
            select.select([_control], [], [], left)


def nvmlEventSetFree(event_set):
    event_set.registered.clear()


def nvmlDeviceGetRetiredPagesPendingStatus(handle):
    _enter("nvmlDeviceGetRetiredPagesPendingStatus")
    _gpu(handle)
    return NVML_FEATURE_ENABLED if _flag(handle, "retired_pending") else NVML_FEATURE_DISABLED


def nvmlDeviceGetRemappedRows(handle):
    _enter("nvmlDeviceGetRemappedRows")
    _gpu(handle)
    return (0, 0, int(_flag(handle, "remap_pending")), int(_flag(handle, "remap_failed")))
