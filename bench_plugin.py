#!/usr/bin/env python3
"""Benchmark: starts the plugin (fake NVML) against the test kubelet and prints a table of
figures beside their targets, then one JSON line. Figures only: nothing here fails a build.

    python3 bench_plugin.py           # full run (about 2 minutes on 2 cores)
    python3 bench_plugin.py --quick   # smaller counts, under 30 s
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "testkit"))

from harness import GiB, Plugin, gpu_uuid, make_gpus  # noqa: E402
from kubelet import Kubelet  # noqa: E402

import nvidia_device_plugin as dp  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of the process, in ns resolution (schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return total / 1e9


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.dir = tempfile.mkdtemp(prefix="dpb")
        self.results: dict[str, float] = {}
        self.rows: list[tuple[str, str, str, str]] = []

    def record(self, key: str, label: str, value: float, unit: str, target: str, ok: bool | None) -> None:
        self.results[key] = round(value, 4)
        verdict = "" if ok is None else ("ok" if ok else "MISSED")
        self.rows.append((label, f"{value:.3f} {unit}", target, verdict))

    def start(self, name: str, gpus: list[dict], args: list[str] = ()):
        plugin_dir = os.path.join(self.dir, name, "dp")
        os.makedirs(plugin_dir)
        k = Kubelet(plugin_dir).start()
        p = Plugin(os.path.join(self.dir, name, "p"), plugin_dir, {"gpus": gpus},
                   ["--log-level", "warning", *args])
        return k, p

    def startup(self) -> None:
        times, lists = [], []
        for n in range(3 if self.quick else 5):
            k, p = self.start(f"start{n}", make_gpus(8))
            t0 = time.monotonic()
            p.start()
            ep = k.wait_registered(1, timeout=30)
            times.append(k.register_times[0] - t0)
            k.wait_for(lambda ep=ep: ep.updates > 0)
            lists.append(k.view().last_update - t0)
            p.stop()
            k.stop()
        self.record("startup_to_registered_s", "start to Register (median)", statistics.median(times), "s",
                    "< 0.3 s", statistics.median(times) < 0.3)
        self.record("startup_to_first_list_s", "start to first ListAndWatch (median)", statistics.median(lists),
                    "s", "< 0.3 s (NVIDIA 0.021)", statistics.median(lists) < 0.3)

    def serving(self) -> None:
        k, p = self.start("serve", make_gpus(8), ["--health-probe-interval", "30"])
        p.start()
        k.wait_registered(1, timeout=30)
        pid = p.proc.pid
        time.sleep(0.5)
        self.record("rss_after_start_mib", "RSS after start", rss_mib(pid), "MiB", "< 40 MiB (NVIDIA 21)",
                    rss_mib(pid) < 40)
        ids = [gpu_uuid(i) for i in range(8)]
        calls = 1000 if self.quick else 5000
        for conc in (1, 16):
            lat: list[float] = []

            def one(n: int, lat: list[float] = lat) -> None:
                t = time.perf_counter()
                k.allocate([ids[n % 8], ids[(n + 3) % 8]])
                lat.append(time.perf_counter() - t)

            cpu0 = cpu_seconds(pid)
            with concurrent.futures.ThreadPoolExecutor(conc) as pool:
                list(pool.map(one, range(calls)))
            cpu = (cpu_seconds(pid) - cpu0) / calls
            self.record(f"allocate_c{conc}_p50_ms", f"Allocate p50, concurrency {conc}", pct(lat, 50) * 1e3, "ms",
                        "(NVIDIA 0.36-0.44)", None)
            self.record(f"allocate_c{conc}_p99_ms", f"Allocate p99, concurrency {conc}", pct(lat, 99) * 1e3, "ms",
                        "< 1 ms", pct(lat, 99) < 1e-3 if conc == 1 else None)
            if conc == 1:
                self.record("plugin_cpu_per_allocate_us", "plugin CPU per Allocate", cpu * 1e6, "us",
                            "< 250 us (NVIDIA 110-160)", cpu < 250e-6)
        rss_before = rss_mib(pid)
        many = 10000 if self.quick else 50000
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: k.allocate([ids[n % 8]]), range(many)))
        rss_after = rss_mib(pid)
        self.record("rss_after_allocates_mib", f"RSS after {many} more Allocates", rss_after, "MiB", "< 40 MiB",
                    rss_after < 40)
        self.record("rss_growth_mib", "RSS growth over them", rss_after - rss_before, "MiB", "< 1 MiB",
                    rss_after - rss_before < 1)

        p.stop()
        k.stop()
        self.health_latency()

    def health_latency(self) -> None:
        # recoverable XIDs and fast recovery, so one GPU can take event after event
        k, p = self.start("health", make_gpus(8), ["--health-recovery", "true",
                                                    "--health-recovery-quiet-period", "0.02",
                                                    "--health-probe-interval", "0.05"])
        p.start()
        k.wait_registered(1, timeout=30)
        events = 50 if self.quick else 200
        lat = []
        for n in range(events):
            gpu = n % 8
            target = gpu_uuid(gpu)
            k.wait_for(lambda t=target: k.view().devices[t].health == "Healthy", 10, "recovery")
            t0 = time.monotonic()
            p.send(op="xid", gpu=gpu, xid=62)
            k.wait_for(lambda t=target: k.view().devices[t].health == "Unhealthy", 10, "event")
            lat.append(k.view().last_update - t0)
        self.record("health_p50_ms", "XID to kubelet-visible Unhealthy p50", pct(lat, 50) * 1e3, "ms",
                    "(NVIDIA 0.3-0.45)", None)
        self.record("health_p99_ms", "XID to kubelet-visible Unhealthy p99", pct(lat, 99) * 1e3, "ms",
                    "< 1 ms (NVIDIA 0.4-0.7)", pct(lat, 99) < 1e-3)
        self.record("health_max_ms", "XID to kubelet-visible Unhealthy max", max(lat) * 1e3, "ms", "", None)
        p.stop()
        k.stop()

    def restarts(self) -> None:
        k, p = self.start("restart", make_gpus(8), ["--health-probe-interval", "30"])
        p.start()
        k.wait_registered(1, timeout=30)
        to_register, to_list = [], []
        for n in range(2, (12 if self.quick else 52)):
            k.stop()
            k.start()
            listening = time.monotonic()
            ep = k.wait_registered(n, timeout=10)
            k.wait_for(lambda ep=ep: ep.updates > 0)
            to_register.append(k.register_times[-1] - listening)
            to_list.append(k.view().last_update - listening)
        self.record("restart_register_p50_ms", "kubelet restart to Register p50", pct(to_register, 50) * 1e3, "ms",
                    "", None)
        self.record("restart_register_p99_ms", "kubelet restart to Register p99", pct(to_register, 99) * 1e3, "ms",
                    "< 10 ms (NVIDIA 3.6-7)", pct(to_register, 99) < 0.010)
        self.record("restart_list_p99_ms", "kubelet restart to first list p99", pct(to_list, 99) * 1e3, "ms",
                    "< 20 ms (NVIDIA 10-12)", pct(to_list, 99) < 0.020)
        pid = p.proc.pid
        idle = 3.0 if self.quick else 10.0
        cpu0 = cpu_seconds(pid)
        time.sleep(idle)
        per10 = (cpu_seconds(pid) - cpu0) * 10 / idle
        self.record("idle_cpu_s_per_10s", f"plugin CPU while idle ({idle:g} s, per 10 s)", per10, "s",
                    "< 0.01 s (NVIDIA 0.000)", per10 < 0.01)
        p.stop()
        k.stop()

    def layouts(self) -> None:
        gpus = [dp.GpuInfo(i, gpu_uuid(i), "H200", 141 * GiB, i, f"0000:{i:02x}:00.0", i // 4) for i in range(8)]
        layout = dp.build_layout(gpus, GiB)
        t = time.perf_counter()
        for _ in range(20):
            msg = dp.list_and_watch_response(layout, lambda _: True)
            size = msg.ByteSize()
        build = (time.perf_counter() - t) / 20
        self.record("vgpu_devices", "largest vGPU layout: devices (8 x 141 GiB / 1 GiB)", len(layout), "", "", None)
        self.record("vgpu_law_bytes", "its ListAndWatch message size", size, "bytes", "< 4194304", size < 4194304)
        self.record("vgpu_law_build_ms", "its ListAndWatch build time", build * 1e3, "ms", "< 5 ms", build < 5e-3)
        k, p = self.start("vgpu", make_gpus(8, memory=141 * GiB), ["--vgpu-memory", "1Gi"])
        p.start()
        k.wait_registered(1, resource="nvidia.com/vgpu", timeout=30)
        every = sorted(k.view("nvidia.com/vgpu").devices)
        lat = []
        for n in range(50 if self.quick else 200):
            t = time.perf_counter()
            k.preferred(every, [], 1 + n % 16, resource="nvidia.com/vgpu")
            lat.append(time.perf_counter() - t)
        self.record("vgpu_gpa_p50_ms", "GetPreferredAllocation, 1,128 slices (RPC p50)", pct(lat, 50) * 1e3, "ms",
                    "< 5 ms", pct(lat, 50) < 5e-3)
        p.stop()
        k.stop()
        scores = {(a, b): (200 if a // 4 == b // 4 else 10) for a in range(16) for b in range(a + 1, 16)}
        for count in (8, 16):
            worst = 0.0
            for size in range(1, 9):
                t = time.perf_counter()
                for _ in range(10):
                    dp.choose_gpus(list(range(count)), [], size, scores)
                worst = max(worst, (time.perf_counter() - t) / 10)
            self.record(f"gpa_{count}gpus_worst_ms", f"GetPreferredAllocation choice, {count} GPUs (worst size 1-8)",
                        worst * 1e3, "ms", "< 2 ms" if count == 8 else "", worst < 2e-3 if count == 8 else None)

    def report(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        print(f"{'figure':<{width}}  {'measured':>16}  {'target':<26} verdict")
        for label, value, target, verdict in self.rows:
            print(f"{label:<{width}}  {value:>16}  {target:<26} {verdict}")
        print(json.dumps({"quick": self.quick, **self.results}, sort_keys=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts; finishes in under 30 s")
    args = parser.parse_args()
    bench = Bench(args.quick)
    try:
        bench.startup()
        bench.serving()
        bench.restarts()
        bench.layouts()
    finally:
        shutil.rmtree(bench.dir, ignore_errors=True)
    bench.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
