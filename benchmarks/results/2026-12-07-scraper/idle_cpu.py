"""Per-process CPU of an idle deployment over a window (psutil): every process whose command line
names pd_runtime or vllm. Usage: idle_cpu.py SECONDS"""

import sys
import time

import psutil

window = float(sys.argv[1])


def procs():
    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "pd_runtime" in cmd or "vllm" in cmd.lower():
            out[p.pid] = (p, cmd)
    return out


ps = procs()
t0 = {}
for pid, (p, _cmd) in ps.items():
    try:
        t = p.cpu_times()
        t0[pid] = t.user + t.system
    except psutil.Error:
        pass
time.sleep(window)
rows = []
for pid, (p, cmd) in ps.items():
    try:
        t = p.cpu_times()
        rows.append((1000 * (t.user + t.system - t0[pid]) / window, pid, cmd[:150]))
    except (psutil.Error, KeyError):
        pass
for ms, pid, cmd in sorted(rows, reverse=True):
    if ms > 0.05:
        print(f"{ms:8.2f} ms/s  {pid:7d}  {cmd}")
