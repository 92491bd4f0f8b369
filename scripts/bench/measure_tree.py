#!/usr/bin/env python3
"""Run a command and report its wall time and the peak memory of its whole process tree.

    measure_tree.py [--interval S] -- CMD ARGS...

Prints one line `wall_s=… peak_rss_mib=… peak_pss_mib=… processes=…` on stderr-free stdout
after the command exits, and exits with the command's status. The original implementation runs
as ~51 Python processes (server, one per branch, client), so its memory is only meaningful
summed over the tree; RSS double-counts shared pages, PSS shares them out. Sampled every
--interval seconds (default 0.05) from /proc, so short peaks between samples can be missed.
"""
import os
import subprocess
import sys
import time


def children_map():
    kids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The ppid is the second field after the parenthesised command name.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(root):
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def memory_kib(pid):
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def main():
    args = sys.argv[1:]
    interval = 0.05
    if args[:1] == ["--interval"]:
        interval, args = float(args[1]), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit("usage: measure_tree.py [--interval S] -- CMD ARGS...")
    start = time.monotonic()
    proc = subprocess.Popen(args)
    peak_rss = peak_pss = peak_procs = 0
    while proc.poll() is None:
        pids = tree(proc.pid)
        rss = pss = 0
        for pid in pids:
            r, p = memory_kib(pid)
            rss += r
            pss += p
        peak_rss, peak_pss, peak_procs = max(peak_rss, rss), max(peak_pss, pss), max(peak_procs, len(pids))
        time.sleep(interval)
    wall = time.monotonic() - start
    print(f"wall_s={wall:.3f} peak_rss_mib={peak_rss / 1024:.1f} peak_pss_mib={peak_pss / 1024:.1f} "
          f"processes={peak_procs}", flush=True)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
