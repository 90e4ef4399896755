"""Tests: the plugin runs as its own process with NVML faked at the library boundary
(testkit/fake_nvml/pynvml.py), against a real gRPC test kubelet (testkit/kubelet.py) over
real unix sockets. Pure policy functions are also checked directly."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "testkit"))

from harness import GiB, Plugin, gpu_uuid, make_gpus, run_plugin_cli  # noqa: E402
from kubelet import Kubelet  # noqa: E402

import device_plugin_pb2 as api  # noqa: E402
import nvidia_device_plugin as dp  # noqa: E402

GPU = "nvidia.com/gpu"
VGPU = "nvidia.com/vgpu"


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="dpt")  # short: unix socket paths are limited to 108 bytes
    yield path
    if os.environ.get("KEEP_TEST_DIRS"):
        print("kept", path)
        return
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def plugin_dir(workdir):
    path = os.path.join(workdir, "dp")
    os.makedirs(path)
    return path


@pytest.fixture
def kubelet(plugin_dir):
    k = Kubelet(plugin_dir).start()
    yield k
    k.stop()


@pytest.fixture
def spawn(workdir, plugin_dir):
    started: list[Plugin] = []

    def make(gpus=None, args=(), env=None, scenario=None, name="p", **kw) -> Plugin:
        scen = dict(scenario or {})
        scen.setdefault("gpus", gpus if gpus is not None else make_gpus(4))
        p = Plugin(os.path.join(workdir, name), plugin_dir, scen, list(args), dict(env or {}), **kw)
        started.append(p.start())
        return p

    yield make
    for p in started:
        p.stop()


def healthy_map(kubelet, resource=GPU):
    return {i: d.health for i, d in kubelet.view(resource).devices.items()}


def wait_health(kubelet, device_id, health, resource=GPU, timeout=10.0):
    kubelet.wait_for(lambda: healthy_map(kubelet, resource).get(device_id) == health, timeout,
                     f"{device_id} to become {health}")


def rpc_error(fn, *args):
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value


# --------------------------------------------------------------------------------------------
# API stubs
# --------------------------------------------------------------------------------------------

def _stub_generator_python():
    candidates = [os.environ.get("STUBGEN_PYTHON"), os.path.join(ROOT, ".venv-gen", "bin", "python")]
    for python in candidates:
        if python and os.path.exists(python):
            return python
    return None


def test_committed_stubs_match_the_regeneration_command(tmp_path):
    python = _stub_generator_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("CI must provide the stub generator (STUBGEN_PYTHON)")
        pytest.skip("grpcio-tools 1.62.3 not installed (see requirements-stubgen.txt)")
    shutil.copy(os.path.join(ROOT, "device_plugin.proto"), tmp_path)
    subprocess.run([python, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
                    "--pyi_out=.", "device_plugin.proto"], cwd=tmp_path, check=True)
    for name in ("device_plugin_pb2.py", "device_plugin_pb2_grpc.py", "device_plugin_pb2.pyi"):
        with open(os.path.join(ROOT, name)) as committed, open(tmp_path / name) as fresh:
            assert committed.read() == fresh.read(), f"{name} differs from the regenerated one"


def test_method_paths_are_the_kubelets():
    with open(os.path.join(ROOT, "device_plugin_pb2_grpc.py")) as fh:
        source = fh.read()
    for path in ("/v1beta1.Registration/Register", "/v1beta1.DevicePlugin/GetDevicePluginOptions",
                 "/v1beta1.DevicePlugin/ListAndWatch", "/v1beta1.DevicePlugin/GetPreferredAllocation",
                 "/v1beta1.DevicePlugin/Allocate", "/v1beta1.DevicePlugin/PreStartContainer"):
        assert f"'{path}'" in source
    services = api.DESCRIPTOR.services_by_name
    assert "self.ListAndWatch = channel.unary_stream(" in source  # the one server-streaming RPC
    assert source.count("channel.unary_unary(") == 5
    assert services["Registration"].full_name == "v1beta1.Registration"


@pytest.mark.parametrize("message, fields", [
    ("DevicePluginOptions", {"pre_start_required": 1, "get_preferred_allocation_available": 2}),
    ("RegisterRequest", {"version": 1, "endpoint": 2, "resource_name": 3, "options": 4}),
    ("Device", {"ID": 1, "health": 2, "topology": 3}),
    ("NUMANode", {"ID": 1}),
    ("ContainerPreferredAllocationRequest",
     {"available_deviceIDs": 1, "must_include_deviceIDs": 2, "allocation_size": 3}),
    ("ContainerPreferredAllocationResponse", {"deviceIDs": 1}),
    ("ContainerAllocateRequest", {"devices_ids": 1}),
    ("ContainerAllocateResponse", {"envs": 1, "mounts": 2, "devices": 3, "annotations": 4, "cdi_devices": 5}),
    ("Mount", {"container_path": 1, "host_path": 2, "read_only": 3}),
    ("DeviceSpec", {"container_path": 1, "host_path": 2, "permissions": 3}),
    ("CDIDevice", {"name": 1}),
    ("Empty", {}),
])
def test_proto_fields_match_the_reference(message, fields):
    desc = api.DESCRIPTOR.message_types_by_name[message]
    assert {f.name: f.number for f in desc.fields} == fields
    assert desc.full_name == f"v1beta1.{message}"


# --------------------------------------------------------------------------------------------
# registration, ListAndWatch, Allocate
# --------------------------------------------------------------------------------------------

def test_registers_with_the_kubelet_fields(kubelet, spawn):
    spawn()
    kubelet.wait_registered(1)
    req = kubelet.registrations[0]
    assert req.version == "v1beta1"
    assert req.endpoint == "nvidia-gpu.sock"
    assert req.resource_name == GPU
    assert req.options.get_preferred_allocation_available
    ep = kubelet.connected()
    assert ep.options.get_preferred_allocation_available and not ep.options.pre_start_required
    assert kubelet.stream_starts == 1


def test_initial_list_has_every_gpu_with_numa(kubelet, spawn):
    spawn(make_gpus(4, numa=[0, 0, 1, -1]))
    kubelet.wait_registered(1)
    devices = kubelet.view().devices
    assert sorted(devices) == [gpu_uuid(i) for i in range(4)]
    assert all(d.health == "Healthy" for d in devices.values())
    assert [n.ID for n in devices[gpu_uuid(0)].topology.nodes] == [0]
    assert [n.ID for n in devices[gpu_uuid(2)].topology.nodes] == [1]
    assert not devices[gpu_uuid(3)].HasField("topology")


def test_allocate_one_and_several_gpus_by_uuid(kubelet, spawn):
    spawn()
    kubelet.wait_registered(1)
    one = kubelet.allocate([gpu_uuid(2)])
    assert dict(one.envs) == {"NVIDIA_VISIBLE_DEVICES": gpu_uuid(2)}
    several = kubelet.allocate([gpu_uuid(3), gpu_uuid(0), gpu_uuid(3), gpu_uuid(1)])
    assert several.envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(gpu_uuid(i) for i in (0, 1, 3))
    assert not several.mounts and not several.devices and not several.cdi_devices


def test_allocate_with_index_strategy(kubelet, spawn):
    spawn(args=["--device-id-strategy", "index"])
    kubelet.wait_registered(1)
    assert kubelet.allocate([gpu_uuid(3), gpu_uuid(1)]).envs["NVIDIA_VISIBLE_DEVICES"] == "1,3"


def test_bad_allocate_requests_are_rejected_and_the_plugin_keeps_serving(kubelet, spawn):
    p = spawn()
    ep = kubelet.wait_registered(1)
    err = rpc_error(kubelet.allocate, ["GPU-bogus"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "GPU-bogus" in err.details()
    err = rpc_error(ep.stub.Allocate, api.AllocateRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no container requests" in err.details()
    err = rpc_error(kubelet.allocate, [])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no device IDs" in err.details()
    p.send(op="xid", gpu=1, xid=48)
    wait_health(kubelet, gpu_uuid(1), "Unhealthy")
    err = rpc_error(kubelet.allocate, [gpu_uuid(0), gpu_uuid(1)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and gpu_uuid(1) in err.details()
    assert "Unhealthy" in err.details()
    assert kubelet.allocate([gpu_uuid(0)]).envs["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(0)
    assert p.proc.poll() is None


def test_preferred_allocation_respects_available_must_include_and_size(kubelet, spawn):
    spawn()
    kubelet.wait_registered(1)
    available = [gpu_uuid(i) for i in (0, 2, 3)]
    got = kubelet.preferred(available, [gpu_uuid(3)], 2)
    assert len(got) == 2 and gpu_uuid(3) in got and set(got) <= set(available)
    assert kubelet.preferred(available, [], 3) == sorted(available)


def test_pre_start_container_returns_empty(kubelet, spawn):
    spawn()
    ep = kubelet.wait_registered(1)
    assert ep.stub.PreStartContainer(api.PreStartContainerRequest(devices_ids=[gpu_uuid(0)])).ByteSize() == 0


# --------------------------------------------------------------------------------------------
# lifecycle
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["baseline", "newer"])
def test_kubelet_restarts_twenty_times(plugin_dir, spawn, mode):
    k = Kubelet(plugin_dir, mode=mode).start()
    try:
        spawn()
        k.wait_registered(1)
        for n in range(2, 22):
            k.restart()
            assert k.view().capacity == 0  # capacity 0 until the plugin registers again
            k.wait_registered(n)
            assert k.view().allocatable == 4
        assert len(k.registrations) == 21
        assert k.allocate([gpu_uuid(0)]).envs["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(0)
    finally:
        k.stop()


def test_kubelet_restart_keeps_gpu_health(kubelet, spawn):
    p = spawn()
    kubelet.wait_registered(1)
    p.send(op="xid", gpu=2, xid=79)
    wait_health(kubelet, gpu_uuid(2), "Unhealthy")
    kubelet.restart()
    kubelet.wait_registered(2)
    assert healthy_map(kubelet)[gpu_uuid(2)] == "Unhealthy"
    assert kubelet.view().allocatable == 3
    assert f"(1 unhealthy; {gpu_uuid(2)}: XID 79)" in p.log()


def test_kubelet_absent_at_start_then_appearing(plugin_dir, spawn):
    p = spawn()
    p.wait_log("waiting for the kubelet")
    time.sleep(0.3)
    assert "Traceback" not in p.log() and p.proc.poll() is None
    k = Kubelet(plugin_dir).start()
    try:
        k.wait_registered(1)
        assert len(k.registrations) == 1
    finally:
        k.stop()


def test_registration_rejected_then_accepted(kubelet, spawn):
    kubelet.reject_next = 3
    p = spawn()
    kubelet.wait_registered(4)
    log = p.wait_log("registered nvidia.com/gpu with the kubelet")
    assert log.count("registration rejected on purpose") == 3  # the kubelet's reason is logged
    assert kubelet.stream_starts == 1


def test_register_sent_only_after_the_server_answers(kubelet, spawn):
    # the test kubelet dials and asks for options inside Register, as the real one does
    spawn()
    kubelet.wait_registered(1)
    assert kubelet.connected().options is not None


def test_sighup_re_enumerates_and_keeps_health(kubelet, spawn):
    p = spawn()
    kubelet.wait_registered(1)
    p.send(op="xid", gpu=1, xid=48)
    wait_health(kubelet, gpu_uuid(1), "Unhealthy")
    p.signal(signal.SIGHUP)
    kubelet.wait_registered(2)
    p.wait_log("SIGHUP: re-enumerating")
    assert healthy_map(kubelet)[gpu_uuid(1)] == "Unhealthy"
    assert kubelet.view().capacity == 4 and kubelet.view().allocatable == 3


def test_sighup_keeps_a_gpu_that_vanished_as_unhealthy(kubelet, spawn):
    p = spawn(args=["--health-probe-interval", "30"])
    kubelet.wait_registered(1)
    p.send(op="remove_last")
    p.signal(signal.SIGHUP)
    kubelet.wait_registered(2)
    health = healthy_map(kubelet)
    assert len(health) == 4 and health[gpu_uuid(3)] == "Unhealthy"
    assert "no longer enumerated by NVML" in p.log()


def test_sigterm_removes_the_socket_and_exits_zero(kubelet, spawn, plugin_dir):
    p = spawn()
    kubelet.wait_registered(1)
    sock = os.path.join(plugin_dir, "nvidia-gpu.sock")
    assert os.path.exists(sock)
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
    assert not os.path.exists(sock)
    kubelet.wait_for(lambda: kubelet.view().allocatable == 0, what="stream end seen by the kubelet")


def test_kubelet_socket_in_another_directory(workdir, spawn):
    kubelet_dir = os.path.join(workdir, "kubelet")
    k = Kubelet(os.path.join(workdir, "dp"))
    k.socket = os.path.join(kubelet_dir, "kubelet.sock")  # a kubelet.sock outside the plugin dir
    os.makedirs(kubelet_dir)
    k.start()
    try:
        spawn(args=["--kubelet-socket", k.socket])
        k.wait_registered(1)
        os.unlink(k.socket)
        k.restart()  # re-created in its own directory: noticed there too
        k.wait_registered(2)
    finally:
        k.stop()


def test_health_port_in_use_exits_2(plugin_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_plugin_cli(["--device-plugin-path", plugin_dir, "--simulate", "1", "--health-port", str(port),
                                 "--health-address", "127.0.0.1"], fake_nvml=False)
    assert result.returncode == 2
    assert f"--health-port {port}: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_sigint_exits_zero(kubelet, spawn):
    p = spawn()
    kubelet.wait_registered(1)
    p.signal(signal.SIGINT)
    assert p.wait() == 0


def test_stale_socket_at_start_is_replaced(kubelet, spawn, plugin_dir):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(plugin_dir, "nvidia-gpu.sock"))
    stale.close()  # a socket file nobody listens on, as a killed plugin leaves it
    p = spawn()
    kubelet.wait_registered(1)
    assert "removing stale socket" in p.log()


def test_nvml_init_failure_exits_1_with_advice(plugin_dir):
    scen = os.path.join(plugin_dir, "s.json")
    with open(scen, "w") as fh:
        json.dump({"gpus": make_gpus(1), "init_error": 9}, fh)
    result = run_plugin_cli(["--device-plugin-path", plugin_dir], env={"FAKE_NVML_SCENARIO": scen})
    assert result.returncode == 1
    assert "NVML failed to initialise" in result.stderr and "driver" in result.stderr
    assert "NVIDIA_VISIBLE_DEVICES" in result.stderr


def test_nvml_init_failure_without_fail_on_init_error_waits(kubelet, spawn):
    p = spawn(scenario={"gpus": make_gpus(1), "init_error": 12}, args=["--fail-on-init-error", "false"])
    p.wait_log("not registering")
    time.sleep(0.5)
    assert p.proc.poll() is None and not kubelet.registrations
    p.signal(signal.SIGTERM)
    assert p.wait() == 0


def test_no_gpus_logs_and_does_not_register(kubelet, spawn):
    p = spawn(gpus=[])
    p.wait_log("no GPUs")
    time.sleep(0.3)
    assert not kubelet.registrations and p.proc.poll() is None


def test_simulated_inventory_without_fake_nvml(kubelet, spawn):
    p = spawn(args=["--simulate", "3:NVIDIA H100 80GB HBM3:80Gi"], fake_nvml=False)
    kubelet.wait_registered(1)
    assert kubelet.view().capacity == 3
    assert "SIMULATED INVENTORY" in p.log()
    assert "80Gi" in p.log()
    ids = sorted(kubelet.view().devices)
    assert kubelet.allocate(ids[:2]).envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(ids[:2])


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, env, names", [
    (["--device-id-strategy", "serial"], {}, ["--device-id-strategy", "'serial'", "uuid, index"]),
    ([], {"DEVICE_ID_STRATEGY": "mig"}, ["--device-id-strategy", "DEVICE_ID_STRATEGY", "'mig'"]),
    (["--fail-on-init-error", "maybe"], {}, ["--fail-on-init-error", "'maybe'", "true or false"]),
    ([], {"FAIL_ON_INIT_ERROR": "2"}, ["FAIL_ON_INIT_ERROR", "'2'"]),
    (["--log-level", "loud"], {}, ["--log-level", "'loud'", "debug"]),
    (["--device-plugin-path", "relative/dir"], {}, ["--device-plugin-path", "absolute path"]),
    (["--kubelet-socket", "kubelet.sock"], {}, ["--kubelet-socket", "absolute path"]),
    (["--nvidia-driver-root", "x"], {}, ["--nvidia-driver-root", "'x'"]),
    (["--dev-root", "x"], {}, ["--dev-root", "'x'"]),
    (["--sysfs-root", "sys"], {}, ["--sysfs-root", "'sys'"]),
    (["--simulate", "zero"], {}, ["--simulate", "'zero'", "N[:MODEL[:MEMORY]]"]),
    (["--simulate", "0"], {}, ["--simulate", "'0'"]),
    (["--health-probe-interval", "-1"], {}, ["--health-probe-interval", "'-1'", "greater than 0"]),
    (["--health-recovery", "sometimes"], {}, ["--health-recovery", "'sometimes'"]),
    (["--health-recovery-quiet-period", "soon"], {}, ["--health-recovery-quiet-period", "'soon'"]),
    (["--never-recover-xids", "79,x"], {}, ["--never-recover-xids", "'79,x'", "integers"]),
    (["--vgpu-memory", "0x"], {}, ["--vgpu-memory", "'0x'", "2Gi"]),
    (["--vgpu-memory=-1Gi"], {}, ["--vgpu-memory", "'-1Gi'"]),
    (["--vgpu-memory", "3Gb"], {}, ["--vgpu-memory", "'3Gb'"]),
    ([], {"VGPU_MEMORY": "1.5Gi"}, ["VGPU_MEMORY", "'1.5Gi'"]),
    (["--vgpu-memory", "1000Ki"], {}, ["--vgpu-memory", "whole number of MiB"]),
    (["--vgpu-resource-name", "Nvidia.com/vgpu"], {}, ["--vgpu-resource-name", "'Nvidia.com/vgpu'"]),
    (["--vgpu-resource-name", "vgpu"], {}, ["--vgpu-resource-name", "'vgpu'"]),
    (["--vgpu-resource-name", "kubernetes.io/vgpu"], {}, ["--vgpu-resource-name"]),
    (["--vgpu-span", "maybe"], {}, ["--vgpu-span", "deny, allow"]),
    (["--vgpu-preload-lib", "lib.so"], {}, ["--vgpu-preload-lib", "absolute path"]),
    (["--device-list-strategy", "envvar,files"], {}, ["--device-list-strategy", "volume-mounts"]),
    (["--device-list-strategy", ""], {}, ["--device-list-strategy"]),
    (["--cdi-kind", "gpu"], {}, ["--cdi-kind", "'gpu'", "vendor/class"]),
    (["--pass-device-specs", "yes please"], {}, ["--pass-device-specs"]),
    (["--health-port", "70000"], {}, ["--health-port", "'70000'", "65535"]),
    ([], {"HEALTH_PORT": "http"}, ["HEALTH_PORT", "'http'"]),
    (["--no-such-flag"], {}, ["unrecognized arguments", "--no-such-flag"]),
])
def test_invalid_configuration_exits_2_with_one_line(plugin_dir, args, env, names):
    result = run_plugin_cli(["--device-plugin-path", plugin_dir, *args], env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0]


def test_flag_beats_environment_beats_default(kubelet, spawn):
    spawn(args=["--device-id-strategy", "index"], env={"DEVICE_ID_STRATEGY": "uuid"})
    kubelet.wait_registered(1)
    assert kubelet.allocate([gpu_uuid(1)]).envs["NVIDIA_VISIBLE_DEVICES"] == "1"


def test_environment_is_read(kubelet, spawn):
    spawn(env={"DEVICE_ID_STRATEGY": "index"})
    kubelet.wait_registered(1)
    assert kubelet.allocate([gpu_uuid(2)]).envs["NVIDIA_VISIBLE_DEVICES"] == "2"


def test_help_lists_every_flag_with_its_environment_variable():
    result = run_plugin_cli(["--help"])
    assert result.returncode == 0
    for opt in dp.OPTIONS:
        assert opt.flag in result.stdout and opt.env in result.stdout


# --------------------------------------------------------------------------------------------
# health: XID policy
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, fatal, ignored", [
    ({}, [48, 62, 79, 94, 119], [13, 31, 43, 45, 68, 109]),
    ({"DP_DISABLE_HEALTHCHECKS": "62, 63"}, [48, 79], [62, 63, 13]),
    ({"DP_DISABLE_HEALTHCHECKS": "xids"}, [], [48, 79, 13]),
    ({"DP_DISABLE_HEALTHCHECKS": "XIDS"}, [], [48]),
    ({"DP_DISABLE_HEALTHCHECKS": "all"}, [], [48, 79]),
    ({"DP_ENABLE_HEALTHCHECKS": "31,43"}, [31, 43, 48], [13, 45]),
    ({"DP_DISABLE_HEALTHCHECKS": "all", "DP_ENABLE_HEALTHCHECKS": "48"}, [48], [79, 13]),
    ({"DP_DISABLE_HEALTHCHECKS": "13", "DP_ENABLE_HEALTHCHECKS": "13"}, [13], [31]),
], ids=["default", "extra", "xids", "xids-upper", "all", "enable", "all-but-enabled", "enable-wins"])
def test_xid_policy_precedence(env, fatal, ignored):
    policy = dp.XidPolicy.from_env(env)
    assert [x for x in fatal if policy.is_fatal(x)] == fatal
    assert [x for x in ignored if policy.is_fatal(x)] == []


def test_malformed_xid_entries_are_reported(caplog):
    policy = dp.XidPolicy.from_env({"DP_DISABLE_HEALTHCHECKS": "62,abc,-68,", "DP_ENABLE_HEALTHCHECKS": "x"})
    assert not policy.is_fatal(62)
    assert "'abc'" in caplog.text and "'-68'" in caplog.text and "'x'" in caplog.text


def test_each_application_xid_ignored_and_each_fatal_xid_marks_only_its_gpu(kubelet, spawn):
    p = spawn(make_gpus(8))
    kubelet.wait_registered(1)
    for xid in (13, 31, 43, 45, 68, 109):
        p.send(op="xid", gpu=0, xid=xid)
    fatal = [48, 62, 79, 94, 95, 119, 120]
    for gpu, xid in enumerate(fatal, start=1):
        p.send(op="xid", gpu=gpu, xid=xid)
    for gpu in range(1, 8):
        wait_health(kubelet, gpu_uuid(gpu), "Unhealthy")
    assert healthy_map(kubelet)[gpu_uuid(0)] == "Healthy"
    log = p.log()
    for xid in (13, 31, 43, 45, 68, 109):
        assert f"XID {xid} ignored" in log
    assert "XID 79" in log and "stays until restart" in log


def test_disable_and_enable_env_through_the_plugin(kubelet, spawn):
    p = spawn(env={"DP_DISABLE_HEALTHCHECKS": "xids,bogus", "DP_ENABLE_HEALTHCHECKS": "31"})
    kubelet.wait_registered(1)
    p.send(op="xid", gpu=0, xid=48)   # every XID disabled ...
    p.send(op="xid", gpu=1, xid=31)   # ... but 31 is always fatal
    wait_health(kubelet, gpu_uuid(1), "Unhealthy")
    assert healthy_map(kubelet)[gpu_uuid(0)] == "Healthy"
    assert "'bogus'" in p.log()


def test_health_checks_disabled_entirely(kubelet, spawn):
    p = spawn(env={"DP_DISABLE_HEALTHCHECKS": "all"})
    kubelet.wait_registered(1)
    p.send(op="set", gpu=0, field="unreachable", value=True)
    p.send(op="xid", gpu=0, xid=79)
    time.sleep(0.8)
    assert healthy_map(kubelet)[gpu_uuid(0)] == "Healthy"
    assert "GPU health is not checked" in p.log()


def test_double_bit_ecc_event_is_permanent(kubelet, spawn):
    p = spawn(args=["--health-recovery", "true", "--health-recovery-quiet-period", "0.3"])
    kubelet.wait_registered(1)
    p.send(op="event", gpu=3, type=0x2)
    wait_health(kubelet, gpu_uuid(3), "Unhealthy")
    time.sleep(1.0)
    assert healthy_map(kubelet)[gpu_uuid(3)] == "Unhealthy"


def test_xid_on_a_shared_gpu_marks_all_its_slices_and_only_them(kubelet, spawn):
    p = spawn(make_gpus(3, memory=8 * GiB), args=["--vgpu-memory", "2Gi"])
    kubelet.wait_registered(1, resource=VGPU)
    p.send(op="xid", gpu=1, xid=48)
    kubelet.wait_for(lambda: len(kubelet.view(VGPU).healthy) == 8, what="GPU 1's slices unhealthy")
    health = healthy_map(kubelet, VGPU)
    assert {i for i, h in health.items() if h == "Unhealthy"} == {f"{gpu_uuid(1)}::{j}" for j in range(4)}


def test_burst_of_1000_events_leaves_the_plugin_responsive_and_right(kubelet, spawn):
    p = spawn(make_gpus(8))
    kubelet.wait_registered(1)
    events = [[i % 8, (13, 31, 43)[i % 3]] for i in range(997)] + [[2, 48], [5, 79], [7, 62]]
    p.send(op="burst", events=events)
    for _ in range(50):  # Allocate keeps answering during the burst
        kubelet.allocate([gpu_uuid(0)])
    for gpu in (2, 5, 7):
        wait_health(kubelet, gpu_uuid(gpu), "Unhealthy")
    assert {i for i, h in healthy_map(kubelet).items() if h == "Unhealthy"} == {gpu_uuid(g) for g in (2, 5, 7)}
    assert kubelet.view().updates < 20  # bursts coalesce
    assert p.log().count("XID 13 ignored") > 100


def test_gpu_is_lost_marks_that_gpu(kubelet, spawn):
    p = spawn()
    kubelet.wait_registered(1)
    p.send(op="lose", gpu=2)
    p.send(op="wait_error", code=15)
    wait_health(kubelet, gpu_uuid(2), "Unhealthy")
    time.sleep(0.5)
    assert {i for i, h in healthy_map(kubelet).items() if h == "Unhealthy"} == {gpu_uuid(2)}


def test_wait_error_reinitialises_nvml_and_marks_only_the_broken_gpu(kubelet, spawn):
    p = spawn()
    kubelet.wait_registered(1)
    p.send(op="set", gpu=3, field="unreachable", value=True)
    p.send(op="wait_error", code=999, init_failures=2)
    p.wait_log("NVML re-initialised")
    wait_health(kubelet, gpu_uuid(3), "Unhealthy")
    assert {i for i, h in healthy_map(kubelet).items() if h == "Unhealthy"} == {gpu_uuid(3)}
    log = p.log()
    assert log.count("NVML is unusable") == 2 and "keeping the last known" in log
    p.send(op="xid", gpu=0, xid=48)  # events work again after the re-init
    wait_health(kubelet, gpu_uuid(0), "Unhealthy")


def test_probe_failure_marks_unhealthy_and_recovery_off_keeps_it(kubelet, spawn):
    p = spawn()
    kubelet.wait_registered(1)
    p.send(op="set", gpu=1, field="retired_pending", value=True)
    wait_health(kubelet, gpu_uuid(1), "Unhealthy")
    p.send(op="restore", gpu=1)
    time.sleep(1.0)
    assert healthy_map(kubelet)[gpu_uuid(1)] == "Unhealthy"
    assert "retired memory pages pending" in p.log()


def test_recovery_on_brings_back_recoverable_gpus_only(kubelet, spawn):
    p = spawn(args=["--health-recovery", "true", "--health-recovery-quiet-period", "0.5"])
    kubelet.wait_registered(1)
    p.send(op="set", gpu=0, field="remap_pending", value=True)
    p.send(op="xid", gpu=1, xid=62)   # recoverable XID
    p.send(op="xid", gpu=2, xid=79)   # fallen off the bus: never recovers
    p.send(op="set", gpu=3, field="remap_failed", value=True)
    for gpu in range(4):
        wait_health(kubelet, gpu_uuid(gpu), "Unhealthy")
    p.send(op="restore", gpu=0)
    p.send(op="restore", gpu=3)
    wait_health(kubelet, gpu_uuid(0), "Healthy")
    wait_health(kubelet, gpu_uuid(1), "Healthy")
    time.sleep(1.0)
    health = healthy_map(kubelet)
    assert health[gpu_uuid(2)] == "Unhealthy" and health[gpu_uuid(3)] == "Unhealthy"
    assert "recovered: no failure for 0.5 s" in p.log()


def test_gpu_without_event_support_gets_probes_and_one_warning(kubelet, spawn):
    gpus = make_gpus(2)
    gpus[1]["events"] = False
    p = spawn(gpus)
    kubelet.wait_registered(1)
    p.send(op="set", gpu=1, field="unreachable", value=True)
    wait_health(kubelet, gpu_uuid(1), "Unhealthy")
    assert p.log().count("events not supported") == 1


def test_health_thread_killed_is_restarted(kubelet, spawn):
    p = spawn()
    kubelet.wait_registered(1)
    p.send(op="crash_wait")
    p.wait_log("health thread died")
    p.wait_log("restarting the health thread")
    p.send(op="xid", gpu=0, xid=48)
    wait_health(kubelet, gpu_uuid(0), "Unhealthy")
    assert "GPU health is NOT being checked" in p.log()


def test_event_registration_failure_marks_that_gpu(kubelet, spawn):
    spawn(scenario={"gpus": make_gpus(3), "failures": {"nvmlDeviceRegisterEvents": [999, 1]}})
    kubelet.wait_registered(1)
    # the first registration attempt (GPU 0) fails: that GPU, and only it, is unhealthy
    wait_health(kubelet, gpu_uuid(0), "Unhealthy")
    assert {i for i, h in healthy_map(kubelet).items() if h == "Unhealthy"} == {gpu_uuid(0)}


# --------------------------------------------------------------------------------------------
# gpushare: memory slices
# --------------------------------------------------------------------------------------------

def vgpu_ids(gpu, count):
    return [f"{gpu_uuid(gpu)}::{j}" for j in range(count)]


def test_slice_counts_ids_and_resource(kubelet, spawn):
    gpus = make_gpus(3, numa=[0, 1, 1])
    gpus[0]["memory"], gpus[1]["memory"], gpus[2]["memory"] = 16 * GiB, 24 * GiB + 5, 40 * GiB - 1
    spawn(gpus, args=["--vgpu-memory", "4Gi"])
    kubelet.wait_registered(1, resource=VGPU)
    req = kubelet.registrations[0]
    assert req.resource_name == VGPU and req.endpoint == "nvidia-vgpu.sock"
    devices = kubelet.view(VGPU).devices
    assert sorted(devices) == sorted(vgpu_ids(0, 4) + vgpu_ids(1, 6) + vgpu_ids(2, 9))
    assert [n.ID for n in devices[f"{gpu_uuid(1)}::5"].topology.nodes] == [1]


def test_custom_vgpu_resource_name(kubelet, spawn):
    spawn(args=["--vgpu-memory", "8Gi", "--vgpu-resource-name", "example.com/gpu-mem"])
    kubelet.wait_registered(1, resource="example.com/gpu-mem")
    assert kubelet.registrations[0].endpoint == "nvidia-gpu-mem.sock"


def test_slices_of_a_request_are_packed_on_one_gpu_as_gpus_fill(kubelet, spawn):
    spawn(make_gpus(3, memory=8 * GiB), args=["--vgpu-memory", "2Gi"])
    kubelet.wait_registered(1, resource=VGPU)
    allocated: set[str] = set()
    for size in (1, 2, 3, 4, 1):
        available = [i for i in sorted(kubelet.view(VGPU).devices) if i not in allocated]
        got = kubelet.preferred(available, [], size, resource=VGPU)
        assert len(got) == size and set(got) <= set(available)
        assert len({i.split("::")[0] for i in got}) == 1, f"request of {size} spread: {got}"
        allocated |= set(got)
        kubelet.allocate(got, resource=VGPU)
    # best fit: 1 -> GPU0, 2 -> GPU0 (fits exactly 3 left? no: 3 free -> best fit), ...
    per_gpu = {g: sum(1 for i in allocated if i.startswith(gpu_uuid(g))) for g in range(3)}
    assert sorted(per_gpu.values()) == [3, 4, 4]


def test_best_fit_keeps_a_whole_gpu_free_through_requests_and_releases(kubelet, spawn):
    spawn(make_gpus(3, memory=8 * GiB), args=["--vgpu-memory", "2Gi"])
    kubelet.wait_registered(1, resource=VGPU)
    allocated: dict[str, list[str]] = {}

    def request(name, size):
        available = [i for i in sorted(kubelet.view(VGPU).devices)
                     if all(i not in ids for ids in allocated.values())]
        allocated[name] = kubelet.preferred(available, [], size, resource=VGPU)

    request("a", 3)
    request("b", 2)
    request("c", 1)   # best fit: the GPU with one slice left, not a fresh one
    allocated.pop("b")  # release
    request("d", 2)   # back into the hole b left
    request("e", 1)
    used = {i.split("::")[0] for ids in allocated.values() for i in ids}
    assert len(used) == 2, f"fragmented over {used}"
    available = [i for i in kubelet.view(VGPU).devices if all(i not in ids for ids in allocated.values())]
    whole = kubelet.preferred(available, [], 4, resource=VGPU)
    assert len({i.split("::")[0] for i in whole}) == 1


def test_must_include_slices_are_honoured(kubelet, spawn):
    spawn(make_gpus(2, memory=8 * GiB), args=["--vgpu-memory", "2Gi"])
    kubelet.wait_registered(1, resource=VGPU)
    every = sorted(kubelet.view(VGPU).devices)
    must = [f"{gpu_uuid(1)}::2"]
    got = kubelet.preferred(every, must, 3, resource=VGPU)
    assert must[0] in got and len(got) == 3 and all(i.startswith(gpu_uuid(1)) for i in got)


def test_no_gpu_fits_then_fewest_gpus(kubelet, spawn):
    spawn(make_gpus(3, memory=8 * GiB), args=["--vgpu-memory", "2Gi"])
    kubelet.wait_registered(1, resource=VGPU)
    available = vgpu_ids(0, 2) + vgpu_ids(1, 3) + vgpu_ids(2, 1)
    got = kubelet.preferred(available, [], 5, resource=VGPU)
    assert {i.split("::")[0] for i in got} == {gpu_uuid(0), gpu_uuid(1)}


def test_span_deny_rejects_and_allow_accepts(plugin_dir, spawn):
    k = Kubelet(plugin_dir).start()
    try:
        p = spawn(make_gpus(2, memory=8 * GiB), args=["--vgpu-memory", "2Gi"])
        k.wait_registered(1, resource=VGPU)
        ids = vgpu_ids(0, 2) + vgpu_ids(1, 1)
        err = rpc_error(k.allocate, ids, VGPU)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"2 on {gpu_uuid(0)}" in err.details() and f"1 on {gpu_uuid(1)}" in err.details()
        assert "--vgpu-span=deny" in err.details()
        p.stop()
        spawn(make_gpus(2, memory=8 * GiB), args=["--vgpu-memory", "2Gi", "--vgpu-span", "allow"], name="q")
        k.wait_registered(2, resource=VGPU)
        resp = k.allocate(ids, VGPU)
        assert resp.envs["NVIDIA_VISIBLE_DEVICES"] == f"{gpu_uuid(0)},{gpu_uuid(1)}"
    finally:
        k.stop()


def test_memory_limit_envs_for_one_gpu(kubelet, spawn):
    spawn(make_gpus(2, memory=8 * GiB), args=["--vgpu-memory", "2Gi"])
    kubelet.wait_registered(1, resource=VGPU)
    resp = kubelet.allocate([f"{gpu_uuid(1)}::3", f"{gpu_uuid(1)}::0", f"{gpu_uuid(1)}::0"], VGPU)
    assert dict(resp.envs) == {
        "NVIDIA_VISIBLE_DEVICES": gpu_uuid(1),
        "WRAPPER_MAX_MEMORY": str(4 * GiB),
        "CUDA_DEVICE_MEMORY_LIMIT_0": "4096m",
        "NVIDIA_VGPU_MEMORY_GRANT": f"{gpu_uuid(1)}={4 * GiB}",
    }


def test_memory_limit_envs_for_several_gpus_and_preload(kubelet, spawn, workdir):
    lib = os.path.join(workdir, "libvgpu.so")
    open(lib, "w").close()
    spawn(make_gpus(3, memory=8 * GiB), args=["--vgpu-memory", "2Gi", "--vgpu-span", "allow",
                                              "--vgpu-preload-lib", lib, "--device-id-strategy", "index"])
    kubelet.wait_registered(1, resource=VGPU)
    resp = kubelet.allocate([f"{gpu_uuid(2)}::0", f"{gpu_uuid(0)}::1", f"{gpu_uuid(0)}::2"], VGPU)
    assert dict(resp.envs) == {
        "NVIDIA_VISIBLE_DEVICES": "0,2",
        "WRAPPER_MAX_MEMORY": str(6 * GiB),
        "CUDA_DEVICE_MEMORY_LIMIT_0": "4096m",
        "CUDA_DEVICE_MEMORY_LIMIT_1": "2048m",
        "NVIDIA_VGPU_MEMORY_GRANT": f"0={4 * GiB},2={2 * GiB}",
        "LD_PRELOAD": "/usr/local/vgpu/libvgpu.so",
    }
    assert [(m.container_path, m.host_path, m.read_only) for m in resp.mounts] == [
        ("/usr/local/vgpu/libvgpu.so", lib, True)]


def test_size_guard_refuses_a_layout_over_the_kubelet_limit(plugin_dir, workdir):
    scen = os.path.join(workdir, "s.json")
    with open(scen, "w") as fh:
        json.dump({"gpus": make_gpus(8, memory=141 * GiB)}, fh)
    result = run_plugin_cli(["--device-plugin-path", plugin_dir, "--vgpu-memory", "16Mi"],
                            env={"FAKE_NVML_SCENARIO": scen})
    assert result.returncode == 2
    assert "72192 devices" in result.stderr and "4194304" in result.stderr
    assert "smallest slice that fits is --vgpu-memory=" in result.stderr
    smallest = result.stderr.split("--vgpu-memory=")[1].split()[0]
    assert dp.parse_size(smallest) > 16 * 1024 * 1024


def test_size_guard_passes_1128_devices_of_1gi():
    gpus = [dp.GpuInfo(i, gpu_uuid(i), "H200", 141 * GiB, i, f"0000:{i:02x}:00.0", i // 4) for i in range(8)]
    layout = dp.build_layout(gpus, GiB)
    assert len(layout) == 1128
    dp.check_message_sizes(layout, gpus, GiB)  # does not raise


def test_slice_larger_than_a_gpu_is_rejected(plugin_dir, workdir):
    scen = os.path.join(workdir, "s.json")
    with open(scen, "w") as fh:
        json.dump({"gpus": make_gpus(2, memory=16 * GiB)}, fh)
    result = run_plugin_cli(["--device-plugin-path", plugin_dir, "--vgpu-memory", "20Gi"],
                            env={"FAKE_NVML_SCENARIO": scen})
    assert result.returncode == 2
    assert "'20Gi' for --vgpu-memory" in result.stderr and "larger than GPU" in result.stderr


@pytest.mark.parametrize("text, size", [("2Gi", 2 * GiB), ("512Mi", 512 << 20), ("0", 0), ("1Ti", 1 << 40),
                                        ("1048576", 1 << 20)])
def test_parse_size(text, size):
    assert dp.parse_size(text) == size


@pytest.mark.parametrize("text", ["0x", "-1Gi", "3Gb", "1.5Gi", "Gi", "", "2 Gi"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        dp.parse_size(text)


# --------------------------------------------------------------------------------------------
# allocation: topology, strategies, device specs, CDI
# --------------------------------------------------------------------------------------------

def nvlink_two_groups():
    links = []
    for group in ((0, 1, 2, 3), (4, 5, 6, 7)):
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                links.append([a, b, 2])
    return {"gpus": make_gpus(8), "nvlinks": links, "default_ancestor": 50}


def test_topology_nvlink_groups(kubelet, spawn):
    spawn(scenario=nvlink_two_groups())
    kubelet.wait_registered(1)
    every = [gpu_uuid(i) for i in range(8)]
    group_a, group_b = set(every[:4]), set(every[4:])
    for size in (2, 4):
        got = set(kubelet.preferred(every, [], size))
        assert len(got) == size and (got <= group_a or got <= group_b)
    assert set(kubelet.preferred(every, [], 8)) == set(every)
    got = set(kubelet.preferred(every, [gpu_uuid(6)], 3))
    assert gpu_uuid(6) in got and got <= group_b
    # with group A partly taken, a request of 4 goes to the intact group B
    available = every[2:]
    assert set(kubelet.preferred(available, [], 4)) == group_b


def test_topology_pcie_two_sockets_respects_numa(kubelet, spawn):
    ancestors = {}
    for a in range(8):
        for b in range(a + 1, 8):
            same_socket = a // 4 == b // 4
            same_switch = a // 2 == b // 2
            ancestors[f"{a},{b}"] = 10 if same_switch else (40 if same_socket else 50)
    spawn(scenario={"gpus": make_gpus(8, numa=[0, 0, 0, 0, 1, 1, 1, 1]), "ancestors": ancestors})
    kubelet.wait_registered(1)
    every = [gpu_uuid(i) for i in range(8)]
    assert set(kubelet.preferred(every, [], 4)) in ({*every[:4]}, {*every[4:]})
    got = kubelet.preferred(every, [gpu_uuid(5)], 2)
    assert set(got) == {gpu_uuid(4), gpu_uuid(5)}  # same switch


def test_topology_failure_of_one_gpu_still_answers(kubelet, spawn):
    scen = nvlink_two_groups()
    scen["gpus"][2]["topology_error"] = True
    p = spawn(scenario=scen)
    kubelet.wait_registered(1)
    every = [gpu_uuid(i) for i in range(8)]
    for size in range(1, 9):
        got = kubelet.preferred(every, [gpu_uuid(2)], size)
        assert len(got) == size and gpu_uuid(2) in got
    assert "topology unreadable" in p.log()


def test_choose_gpus_exact_and_greedy_agree_on_groups():
    scores = {}
    for a in range(16):
        for b in range(a + 1, 16):
            scores[(a, b)] = 200 if a // 4 == b // 4 else 10
    assert dp.choose_gpus(list(range(16)), [], 4, scores) == [0, 1, 2, 3]
    assert dp.choose_gpus(list(range(16)), [9], 4, scores) == [8, 9, 10, 11]
    assert dp.choose_gpus(list(range(16)), [], 8, scores) == [0, 1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("strategy, id_strategy", [
    ("envvar", "uuid"), ("volume-mounts", "uuid"), ("cdi-annotations", "uuid"), ("cdi-cri", "index"),
    ("envvar,cdi-cri", "index"), ("volume-mounts,cdi-annotations", "index"),
])
def test_device_list_strategies(kubelet, spawn, strategy, id_strategy):
    spawn(args=["--device-list-strategy", strategy, "--device-id-strategy", id_strategy])
    kubelet.wait_registered(1)
    resp = kubelet.allocate([gpu_uuid(3), gpu_uuid(1)])
    names = ["1", "3"] if id_strategy == "index" else [gpu_uuid(1), gpu_uuid(3)]
    strategies = strategy.split(",")
    expected_env = {}
    if "envvar" in strategies:
        expected_env["NVIDIA_VISIBLE_DEVICES"] = ",".join(names)
    if "volume-mounts" in strategies:
        expected_env["NVIDIA_VISIBLE_DEVICES"] = "/var/run/nvidia-container-devices"
    assert dict(resp.envs) == expected_env
    mounts = [(m.container_path, m.host_path) for m in resp.mounts]
    assert mounts == ([(f"/var/run/nvidia-container-devices/{n}", "/dev/null") for n in names]
                      if "volume-mounts" in strategies else [])
    cdi = [f"nvidia.com/gpu={n}" for n in names]
    assert dict(resp.annotations) == ({"cdi.k8s.io/nvidia-device-plugin_gpu": ",".join(cdi)}
                                      if "cdi-annotations" in strategies else {})
    assert [c.name for c in resp.cdi_devices] == (cdi if "cdi-cri" in strategies else [])


def test_cdi_kind_and_annotation_prefix(kubelet, spawn):
    spawn(args=["--device-list-strategy", "cdi-annotations,cdi-cri", "--cdi-kind", "k8s.device-plugin.nvidia.com/gpu",
                "--cdi-annotation-prefix", "custom.cdi/"])
    kubelet.wait_registered(1)
    resp = kubelet.allocate([gpu_uuid(0)])
    name = f"k8s.device-plugin.nvidia.com/gpu={gpu_uuid(0)}"
    assert dict(resp.annotations) == {"custom.cdi/nvidia-device-plugin_gpu": name}
    assert [c.name for c in resp.cdi_devices] == [f"k8s.device-plugin.nvidia.com/gpu={gpu_uuid(0)}"]
    assert not resp.envs and not resp.devices


def test_pass_device_specs_with_a_fake_dev_root(kubelet, spawn, workdir):
    root = os.path.join(workdir, "driver")
    os.makedirs(os.path.join(root, "dev"))
    for name in ("nvidiactl", "nvidia-uvm"):
        open(os.path.join(root, "dev", name), "w").close()
    gpus = make_gpus(4)
    gpus[2]["minor"] = 7
    spawn(gpus, args=["--pass-device-specs", "true", "--dev-root", root])
    kubelet.wait_registered(1)
    resp = kubelet.allocate([gpu_uuid(2), gpu_uuid(0)])
    assert [(d.container_path, d.host_path, d.permissions) for d in resp.devices] == [
        ("/dev/nvidiactl", f"{root}/dev/nvidiactl", "rw"),
        ("/dev/nvidia-uvm", f"{root}/dev/nvidia-uvm", "rw"),
        ("/dev/nvidia0", f"{root}/dev/nvidia0", "rw"),
        ("/dev/nvidia7", f"{root}/dev/nvidia7", "rw"),
    ]


def test_device_specs_follow_driver_root_and_are_skipped_for_cdi_only(kubelet, spawn, workdir):
    root = os.path.join(workdir, "drv")
    os.makedirs(os.path.join(root, "dev"))
    spawn(args=["--pass-device-specs", "true", "--nvidia-driver-root", root, "--device-list-strategy", "cdi-cri"])
    kubelet.wait_registered(1)
    resp = kubelet.allocate([gpu_uuid(1)])
    assert not resp.devices and not resp.envs


@pytest.mark.parametrize("strategy", ["envvar", "volume-mounts", "cdi-annotations", "cdi-cri"])
def test_vgpu_slices_under_every_strategy(kubelet, spawn, strategy):
    spawn(make_gpus(2, memory=8 * GiB), args=["--vgpu-memory", "2Gi", "--device-list-strategy", strategy,
                                              "--pass-device-specs", "true"])
    kubelet.wait_registered(1, resource=VGPU)
    resp = kubelet.allocate([f"{gpu_uuid(1)}::0", f"{gpu_uuid(1)}::1"], VGPU)
    listed = (list(resp.envs.get("NVIDIA_VISIBLE_DEVICES", "").split(",")) + [m.container_path for m in resp.mounts]
              + list(resp.annotations.values()) + [c.name for c in resp.cdi_devices])
    text = " ".join(listed)
    assert text.count(gpu_uuid(1)) == 1 and "::" not in text  # physical GPU, de-duplicated
    assert resp.envs["WRAPPER_MAX_MEMORY"] == str(4 * GiB)
    if strategy.startswith("cdi"):
        assert not resp.devices
    else:
        assert [d.container_path for d in resp.devices] == ["/dev/nvidia1"]


# --------------------------------------------------------------------------------------------
# liveness and metrics
# --------------------------------------------------------------------------------------------

def probe(plugin_dir, *extra):
    return run_plugin_cli(["--device-plugin-path", plugin_dir, "--probe", *extra], fake_nvml=False)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_reports_live_and_each_failing_condition(plugin_dir, spawn):
    assert probe(plugin_dir).returncode == 1  # nothing running
    k = Kubelet(plugin_dir).start()
    p = spawn()
    k.wait_registered(1)
    result = probe(plugin_dir)
    assert result.returncode == 0 and result.stdout.startswith("ok: serving 4 nvidia.com/gpu devices")
    k.stop()  # streams end; kubelet.sock gone
    k.wait_for(lambda: True)
    deadline = time.monotonic() + 5
    while (result := probe(plugin_dir)).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert result.returncode == 1
    assert "not registered with the current kubelet" in result.stdout or "no ListAndWatch" in result.stdout
    p.send(op="crash_wait")
    p.wait_log("health thread died")
    k = Kubelet(plugin_dir).start()
    try:
        k.wait_registered(1)
        p.wait_log("restarting the health thread")
        assert probe(plugin_dir).returncode == 0
    finally:
        k.stop()


def test_probe_reports_a_stalled_health_thread(kubelet, spawn):
    p = spawn()
    kubelet.wait_registered(1)
    p.send(op="hang", fn="nvmlEventSetWait", seconds=12)
    deadline = time.monotonic() + 14
    result = probe(kubelet.dir)
    while "stalled" not in result.stdout and time.monotonic() < deadline:
        time.sleep(0.2)
        result = probe(kubelet.dir)
    assert result.returncode == 1 and "health thread stalled" in result.stdout
    assert kubelet.allocate([gpu_uuid(0)]).envs  # serving goes on while NVML hangs
    deadline = time.monotonic() + 6
    while probe(kubelet.dir).returncode != 0:
        assert time.monotonic() < deadline, "never live again after the hang"
        time.sleep(0.2)


def test_healthz_and_metrics(kubelet, spawn):
    port = free_port()
    p = spawn(args=["--health-port", str(port), "--health-address", "127.0.0.1"])
    kubelet.wait_registered(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.status == 200 and resp.read().startswith(b"ok")
    kubelet.allocate([gpu_uuid(0)])
    rpc_error(kubelet.allocate, ["nope"])
    kubelet.preferred([gpu_uuid(0), gpu_uuid(1)], [], 1)
    p.send(op="xid", gpu=1, xid=48)
    p.send(op="xid", gpu=1, xid=13)
    wait_health(kubelet, gpu_uuid(1), "Unhealthy")
    time.sleep(0.2)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for line in (
        'nvidia_device_plugin_devices{health="Healthy",resource="nvidia.com/gpu"} 3',
        'nvidia_device_plugin_devices{health="Unhealthy",resource="nvidia.com/gpu"} 1',
        f'nvidia_device_plugin_xid_events_total{{gpu="{gpu_uuid(1)}",xid="48"}} 1',
        f'nvidia_device_plugin_xid_events_total{{gpu="{gpu_uuid(1)}",xid="13"}} 1',
        f'nvidia_device_plugin_health_transitions_total{{gpu="{gpu_uuid(1)}",to="Unhealthy"}} 1',
        'nvidia_device_plugin_rpc_calls_total{method="Allocate"} 2',
        'nvidia_device_plugin_rpc_errors_total{code="INVALID_ARGUMENT",method="Allocate"} 1',
        'nvidia_device_plugin_rpc_calls_total{method="GetPreferredAllocation"} 1',
        'nvidia_device_plugin_rpc_duration_seconds_count{method="Allocate"} 2',
        'nvidia_device_plugin_registrations_total{result="ok"} 1',
        'nvidia_device_plugin_health_thread_up 1',
        '# TYPE nvidia_device_plugin_rpc_duration_seconds histogram',
    ):
        assert line in text, line
    assert "nvidia_device_plugin_list_and_watch_messages_total 2" in text
    kubelet.restart()
    kubelet.wait_registered(2)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert "nvidia_device_plugin_kubelet_restarts_total 1" in resp.read().decode()
    kubelet.stop()
    deadline = time.monotonic() + 5
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and b"not" in exc.read()
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# faults and load
# --------------------------------------------------------------------------------------------

def resources_of(pid):
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def settle_to(pid, baseline, slack=(0, 0), timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        fds, threads = resources_of(pid)
        if fds <= baseline[0] + slack[0] and threads <= baseline[1] + slack[1]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"fds/threads {fds}/{threads} never returned to {baseline}")
        time.sleep(0.1)


def warmed_baseline(kubelet, p):
    """fds and threads once gRPC's bounded worker pool has grown to its size."""
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda _: kubelet.allocate([gpu_uuid(0)]), range(200)))
    time.sleep(0.3)
    return resources_of(p.proc.pid)


def test_200_kubelet_restarts_in_a_row(kubelet, spawn):
    p = spawn()
    kubelet.wait_registered(1)
    kubelet.restart()
    kubelet.wait_registered(2)
    baseline = warmed_baseline(kubelet, p)
    for n in range(3, 203):
        kubelet.restart()
        kubelet.wait_registered(n)
    assert kubelet.view().allocatable == 4 and len(kubelet.registrations) == 202
    assert kubelet.allocate([gpu_uuid(1)]).envs["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(1)
    settle_to(p.proc.pid, baseline, slack=(2, 2))


def test_sigkill_then_start_again_over_the_stale_socket(kubelet, spawn, plugin_dir):
    p = spawn()
    kubelet.wait_registered(1)
    p.kill()
    kubelet.wait_for(lambda: kubelet.view().allocatable == 0, what="stream end after SIGKILL")
    assert os.path.exists(os.path.join(plugin_dir, "nvidia-gpu.sock"))  # left behind
    spawn(name="again")
    kubelet.wait_registered(2)
    assert kubelet.view().allocatable == 4


def test_10000_concurrent_allocates(kubelet, spawn):
    p = spawn(make_gpus(8))
    kubelet.wait_registered(1)
    baseline = warmed_baseline(kubelet, p)
    ids = [gpu_uuid(i) for i in range(8)]

    def one(n):
        chosen = [ids[n % 8], ids[(n * 3 + 1) % 8]]
        env = kubelet.allocate(chosen).envs["NVIDIA_VISIBLE_DEVICES"]
        return env == ",".join(sorted(set(chosen), key=ids.index))

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(10000)))
    assert all(results)
    assert kubelet.allocate([ids[5]]).envs["NVIDIA_VISIBLE_DEVICES"] == ids[5]
    settle_to(p.proc.pid, baseline, slack=(2, 2))


def test_garbage_bytes_and_half_open_connections(kubelet, spawn, plugin_dir):
    p = spawn()
    kubelet.wait_registered(1)
    baseline = warmed_baseline(kubelet, p)
    path = os.path.join(plugin_dir, "nvidia-gpu.sock")
    half_open = []
    for n in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        if n % 2:
            s.sendall(os.urandom(256))
            s.close()
        else:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # preface, then silence
            half_open.append(s)
    assert kubelet.allocate([gpu_uuid(2)]).envs["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(2)
    for s in half_open:
        s.close()
    assert kubelet.view().allocatable == 4 and p.proc.poll() is None
    settle_to(p.proc.pid, baseline, slack=(2, 2))


def test_oversized_request_is_refused_and_serving_goes_on(kubelet, spawn):
    p = spawn()
    ep = kubelet.wait_registered(1)
    huge = ["GPU-" + "x" * 1000] * 10000  # ~10 MiB
    err = rpc_error(ep.stub.Allocate, api.AllocateRequest(
        container_requests=[api.ContainerAllocateRequest(devices_ids=huge)]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert kubelet.allocate([gpu_uuid(0)]).envs and p.proc.poll() is None


def test_duplicate_ids_in_one_request(kubelet, spawn):
    spawn()
    kubelet.wait_registered(1)
    resp = kubelet.allocate([gpu_uuid(1), gpu_uuid(1), gpu_uuid(1)])
    assert resp.envs["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(1)


def test_nvml_calls_failing_mid_run(kubelet, spawn):
    p = spawn()
    kubelet.wait_registered(1)
    baseline = warmed_baseline(kubelet, p)
    p.send(op="fail", fn="nvmlDeviceGetRemappedRows", code=999, count=1)
    p.send(op="hang", fn="nvmlDeviceGetHandleByUUID", seconds=1.0)
    time.sleep(0.1)
    started = time.monotonic()
    assert kubelet.allocate([gpu_uuid(3)]).envs  # no NVML on the Allocate path
    assert time.monotonic() - started < 0.5
    kubelet.wait_for(lambda: kubelet.view().allocatable == 3, what="the failed probe")
    assert "row-remap query failed" in p.log()
    settle_to(p.proc.pid, baseline, slack=(2, 2))


def test_ten_streams_do_not_block_each_other(kubelet, spawn):
    p = spawn()
    ep = kubelet.wait_registered(1)
    seen = []

    def watch():
        stream = ep.stub.ListAndWatch(api.Empty())
        first = next(stream)
        second = next(stream)
        seen.append((len(first.devices), sum(d.health == "Unhealthy" for d in second.devices)))
        stream.cancel()

    threads = [threading.Thread(target=watch) for _ in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    p.send(op="xid", gpu=0, xid=48)
    for t in threads:
        t.join(10)
    assert seen == [(4, 1)] * 10
    wait_health(kubelet, gpu_uuid(0), "Unhealthy")


# --------------------------------------------------------------------------------------------
# real GPU: the same behaviour against real NVML; skipped where NVML is absent
# --------------------------------------------------------------------------------------------

def _real_gpus():
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 (no library, no driver, no GPU: all mean "skip")
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            bus = pynvml.nvmlDeviceGetPciInfo(h).busId
            bus = bus.decode() if isinstance(bus, bytes) else bus
            gpus.append({"uuid": pynvml.nvmlDeviceGetUUID(h), "bus_id": bus,
                         "memory": pynvml.nvmlDeviceGetMemoryInfo(h).total,
                         "numa": dp.read_numa_node("/sys", bus)})
        return gpus
    finally:
        pynvml.nvmlShutdown()


REAL_GPUS = _real_gpus()
real_gpu = pytest.mark.skipif(not REAL_GPUS, reason="no real NVIDIA GPU / NVML here")


@real_gpu
def test_real_gpu_inventory_registration_allocate_and_quiet_health(kubelet, spawn):
    p = spawn(fake_nvml=False, args=["--health-probe-interval", "1"])
    kubelet.wait_registered(1, timeout=30)
    devices = kubelet.view().devices
    assert sorted(devices) == sorted(g["uuid"] for g in REAL_GPUS)
    for gpu in REAL_GPUS:
        nodes = [n.ID for n in devices[gpu["uuid"]].topology.nodes]
        assert nodes == ([gpu["numa"]] if gpu["numa"] is not None else [])
    first = REAL_GPUS[0]["uuid"]
    assert kubelet.allocate([first]).envs["NVIDIA_VISIBLE_DEVICES"] == first
    time.sleep(5)  # a few seconds of event waits and probes: no false Unhealthy
    assert all(d.health == "Healthy" for d in kubelet.view().devices.values()), p.log()
    print(p.log())


@real_gpu
def test_real_gpu_memory_slices(kubelet, spawn):
    spawn(fake_nvml=False, args=["--vgpu-memory", "4Gi"])
    kubelet.wait_registered(1, resource=VGPU, timeout=30)
    expected = sum(g["memory"] // (4 * GiB) for g in REAL_GPUS)
    assert kubelet.view(VGPU).capacity == expected


# --------------------------------------------------------------------------------------------
# packaging: the image's layout, without Docker
# --------------------------------------------------------------------------------------------

def test_image_layout_runs_with_only_the_target_directory(kubelet, spawn):
    target = os.environ.get("IMAGE_SITE_PACKAGES")
    if not target:
        if os.environ.get("CI") and os.environ.get("REQUIRE_IMAGE_LAYOUT"):
            pytest.fail("CI must build IMAGE_SITE_PACKAGES")
        pytest.skip("IMAGE_SITE_PACKAGES not set (.ci/run builds it as the Dockerfile does)")
    app = os.path.join(os.path.dirname(target), "app")
    os.makedirs(app, exist_ok=True)
    for name in ("nvidia_device_plugin.py", "device_plugin_pb2.py", "device_plugin_pb2_grpc.py"):
        shutil.copy(os.path.join(ROOT, name), app)
    p = Plugin(os.path.join(kubelet.dir, "..", "img"), kubelet.dir, {"gpus": []}, ["--simulate", "2"],
               fake_nvml=False, python_path=[target], isolated_python=True,
               script=os.path.join(app, "nvidia_device_plugin.py")).start()
    try:
        kubelet.wait_registered(1)
        ids = sorted(kubelet.view().devices)
        assert kubelet.allocate(ids).envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(ids)
    finally:
        p.stop()
