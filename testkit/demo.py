#!/usr/bin/env python3
"""Quick-start demo: runs the real plugin on a simulated inventory against the test kubelet
in a temporary directory, and shows what it registers, advertises and answers.

    python3 testkit/demo.py [--simulate SPEC] [any other plugin flags]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from kubelet import Kubelet  # noqa: E402


def main() -> int:
    args = sys.argv[1:] or ["--simulate", "4:NVIDIA H100 80GB HBM3:80Gi"]
    workdir = tempfile.mkdtemp(prefix="dpdemo")
    kubelet = Kubelet(workdir).start()
    plugin = subprocess.Popen([sys.executable, os.path.join(ROOT, "nvidia_device_plugin.py"),
                               "--device-plugin-path", workdir, *args])
    try:
        kubelet.wait_for(lambda: kubelet.registrations and kubelet.current, 15, "registration")
        resource = kubelet.registrations[-1].resource_name
        ep = kubelet.wait_registered(1, resource=resource)
        req = kubelet.registrations[-1]
        print(f"\n== Register: version={req.version} endpoint={req.endpoint} resource={req.resource_name}")
        view = kubelet.view(resource)
        print(f"== ListAndWatch: {view.capacity} devices, {view.allocatable} healthy")
        for dev in list(view.devices.values())[:8]:
            numa = [n.ID for n in dev.topology.nodes] or "-"
            print(f"   {dev.ID}  {dev.health}  NUMA {numa}")
        ids = sorted(view.devices)
        size = min(2, len(ids))
        preferred = kubelet.preferred(ids, [], size, resource=resource)
        print(f"== GetPreferredAllocation(size {size}): {preferred}")
        answer = kubelet.allocate(preferred, resource=resource)
        print("== Allocate:", dict(answer.envs), [m.container_path for m in answer.mounts],
              [c.name for c in answer.cdi_devices], dict(answer.annotations))
        print(f"== options: {ep.options}".rstrip())
    finally:
        plugin.send_signal(signal.SIGTERM)
        code = plugin.wait(15)
        kubelet.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"== plugin exited with {code} after SIGTERM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
