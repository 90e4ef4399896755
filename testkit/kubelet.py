"""A test kubelet: a real gRPC Registration server on kubelet.sock and a real client of the
plugin, behaving like the kubelet's device manager (shared/kubelet-device-plugin-api.md §3).

Imitated: socket directory set-up and clean-up (every socket but the checkpoint removed
before listening), Register validation with the kubelet's texts and UNKNOWN status, a
blocking 10 s dial with authority "localhost" and GetDevicePluginOptions inside Register,
exactly one ListAndWatch per registration, full-replacement updates, healthy only when
health == "Healthy", stream end -> every device unhealthy without reconnecting, the 4 MiB
receive limit, restart (delete sockets, re-create kubelet.sock, capacity 0 until the plugin
registers again), and both re-registration semantics: "baseline" (newest wins; when the old
stream ends the current client is disconnected, kubernetes #121994) and "newer"
(clients keyed by socket; a duplicate is rejected with "device plugin already connected").
Not imitated: pod admission, the checkpoint's contents, the 5-minute endpoint removal.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

import device_plugin_pb2 as api
import device_plugin_pb2_grpc as api_grpc

MAX_RECEIVE = 4 * 1024 * 1024
CHECKPOINT = "kubelet_internal_checkpoint"
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def is_extended_resource_name(name: str) -> bool:
    if "/" not in name or "kubernetes.io/" in name or name.startswith("requests."):
        return False
    parts = ("requests." + name).split("/")
    return (len(parts) == 2 and len(parts[0]) <= 253 and bool(_SUBDOMAIN.match(parts[0]))
            and len(parts[1]) <= 63 and bool(_NAME.match(parts[1])))


@dataclass
class Endpoint:
    resource: str
    socket: str
    channel: grpc.Channel
    stub: api_grpc.DevicePluginStub
    options: api.DevicePluginOptions
    stopped: bool = False
    updates: int = 0  # ListAndWatch messages received on this connection
    call: object = None  # the ListAndWatch call, to cancel it on disconnect

    def close(self) -> None:
        self.stopped = True
        if self.call is not None:
            self.call.cancel()  # the plugin sees its stream end now
        # grpcio's close() blocks ~0.2 s while a stream thread winds down: do it aside
        threading.Thread(target=self.channel.close, daemon=True).start()


@dataclass
class ResourceView:
    devices: dict[str, api.Device] = field(default_factory=dict)
    updates: int = 0
    last_update: float = 0.0

    @property
    def healthy(self) -> set[str]:
        return {i for i, d in self.devices.items() if d.health == "Healthy"}

    @property
    def capacity(self) -> int:
        return len(self.devices)

    @property
    def allocatable(self) -> int:
        return len(self.healthy)


class Kubelet:
    def __init__(self, directory: str, mode: str = "baseline") -> None:
        assert mode in ("baseline", "newer")
        self.dir = directory
        self.mode = mode
        self.socket = os.path.join(directory, "kubelet.sock")
        self.cond = threading.Condition()
        self.resources: dict[str, ResourceView] = {}
        self.endpoints: dict[tuple[str, str], Endpoint] = {}  # (resource, socket)
        self.current: dict[str, Endpoint] = {}  # baseline: newest client per resource
        self._all: list[Endpoint] = []  # every connection this kubelet instance made
        self.registrations: list[api.RegisterRequest] = []
        self.register_times: list[float] = []
        self.reject_next = 0
        self.stream_starts = 0
        self._server: grpc.Server | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Kubelet:
        os.makedirs(self.dir, mode=0o750, exist_ok=True)
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if name == CHECKPOINT or os.path.isdir(path):
                continue
            try:
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        api_grpc.add_RegistrationServicer_to_server(_Registration(self), self._server)
        self._server.add_insecure_port(f"unix://{self.socket}")
        self._server.start()
        return self

    def stop(self) -> None:
        with self.cond:
            endpoints, self._all = self._all, []
            self.endpoints.clear()
            self.current.clear()
        for ep in endpoints:
            ep.close()
        if self._server is not None:
            self._server.stop(None).wait(5)
            self._server = None

    def restart(self) -> None:
        """What a kubelet restart does to the plugin: connections closed, sockets deleted,
        a new kubelet.sock; checkpointed resources read back at capacity 0."""
        self.stop()
        with self.cond:
            for view in self.resources.values():
                view.devices = {}
            self.cond.notify_all()
        self.start()

    # -- registration -----------------------------------------------------------------------

    def _register(self, request: api.RegisterRequest, context: grpc.ServicerContext) -> api.Empty:
        with self.cond:
            self.registrations.append(request)
            self.register_times.append(time.monotonic())
            if request.version != "v1beta1":
                context.abort(grpc.StatusCode.UNKNOWN, f'requested API version "{request.version}" is not '
                                                       'supported by kubelet. Supported version is ["v1beta1"]')
            if not is_extended_resource_name(request.resource_name):
                context.abort(grpc.StatusCode.UNKNOWN, f'the ResourceName "{request.resource_name}" is invalid')
            if self.reject_next > 0:
                self.reject_next -= 1
                context.abort(grpc.StatusCode.UNKNOWN, "test kubelet: registration rejected on purpose")
        sock = os.path.normpath(os.path.join(self.dir, request.endpoint.lstrip("/")))
        key = (request.resource_name, sock)
        if self.mode == "newer":
            with self.cond:
                if key in self.endpoints and not self.endpoints[key].stopped:
                    context.abort(grpc.StatusCode.UNKNOWN, f"device plugin already connected: {sock}")
        channel = grpc.insecure_channel(f"unix://{sock}", options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE), ("grpc.default_authority", "localhost")])
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
        except grpc.FutureTimeoutError:
            channel.close()
            context.abort(grpc.StatusCode.UNKNOWN, "failed to dial device plugin: context deadline exceeded")
        stub = api_grpc.DevicePluginStub(channel)
        try:
            options = stub.GetDevicePluginOptions(api.Empty())
        except grpc.RpcError as exc:
            channel.close()
            context.abort(grpc.StatusCode.UNKNOWN, f"failed to get device plugin options: {exc.details()}")
        ep = Endpoint(request.resource_name, sock, channel, stub, options)
        with self.cond:
            self._all.append(ep)
            self.endpoints[key] = ep
            self.current[request.resource_name] = ep
            self.resources.setdefault(request.resource_name, ResourceView())
            self.cond.notify_all()
        threading.Thread(target=self._run_client, args=(ep,), daemon=True, name="kubelet-law").start()
        return api.Empty()

    def _run_client(self, ep: Endpoint) -> None:
        with self.cond:
            self.stream_starts += 1
        try:
            ep.call = ep.stub.ListAndWatch(api.Empty())
            for response in ep.call:
                with self.cond:
                    if ep.stopped:
                        return
                    view = self.resources.setdefault(ep.resource, ResourceView())
                    view.devices = {d.ID: d for d in response.devices}
                    view.updates += 1
                    ep.updates += 1
                    view.last_update = time.monotonic()
                    self.cond.notify_all()
        except grpc.RpcError:
            pass
        with self.cond:
            if ep.stopped:
                return
            # baseline looks the client up by resource name and disconnects whatever is current
            victim = self.current.get(ep.resource) if self.mode == "baseline" else ep
            if victim is None:
                return
            victim.close()
            self.endpoints.pop((victim.resource, victim.socket), None)
            if self.current.get(ep.resource) is victim:
                del self.current[ep.resource]
            view = self.resources.get(ep.resource)
            if view is not None:
                view.devices = {i: api.Device(ID=i, health="Unhealthy", topology=d.topology)
                                for i, d in view.devices.items()}
            self.cond.notify_all()

    # -- what a test asks ---------------------------------------------------------------------

    def view(self, resource: str = "nvidia.com/gpu") -> ResourceView:
        with self.cond:
            return self.resources.get(resource, ResourceView())

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                result = predicate()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"test kubelet: timed out waiting for {what}")
                self.cond.wait(min(left, 0.05))

    def connected(self, resource: str = "nvidia.com/gpu") -> Endpoint | None:
        with self.cond:
            ep = self.current.get(resource)
            return ep if ep is not None and not ep.stopped else None

    def wait_registered(self, count: int, resource: str = "nvidia.com/gpu", timeout: float = 10.0) -> Endpoint:
        """Wait for `count` registrations in all, a live endpoint and its first list."""
        self.wait_for(lambda: len(self.registrations) >= count and self.connected(resource) is not None
                      and self.connected(resource).updates > 0,
                      timeout, f"registration #{count} of {resource}")
        return self.connected(resource)

    def allocate(self, ids: list[str], resource: str = "nvidia.com/gpu") -> api.ContainerAllocateResponse:
        ep = self._endpoint(resource)
        response = ep.stub.Allocate(api.AllocateRequest(
            container_requests=[api.ContainerAllocateRequest(devices_ids=ids)]))
        if not response.container_responses:
            raise AssertionError("no containers return in allocation response")
        return response.container_responses[0]

    def preferred(self, available: list[str], must: list[str], size: int,
                  resource: str = "nvidia.com/gpu") -> list[str]:
        ep = self._endpoint(resource)
        if not ep.options.get_preferred_allocation_available:
            raise AssertionError("plugin did not offer GetPreferredAllocation")
        response = ep.stub.GetPreferredAllocation(api.PreferredAllocationRequest(container_requests=[
            api.ContainerPreferredAllocationRequest(available_deviceIDs=available, must_include_deviceIDs=must,
                                                    allocation_size=size)]))
        return list(response.container_responses[0].deviceIDs) if response.container_responses else []

    def _endpoint(self, resource: str) -> Endpoint:
        ep = self.connected(resource)
        if ep is None:
            raise AssertionError(f"endpoint for {resource} has been stopped")
        return ep


class _Registration(api_grpc.RegistrationServicer):
    def __init__(self, kubelet: Kubelet) -> None:
        self._kubelet = kubelet

    def Register(self, request, context):  # noqa: N802 (gRPC naming)
        return self._kubelet._register(request, context)
