#!/usr/bin/env python3
"""tools/gpu/ncu-sum.py CSV — summarise `ncu --csv --page raw` output of tools/gpu/ncu-run.sh.

One line per (kernel, grid size): launches, mean duration, DRAM bytes read per launch, the read
bandwidth those give, ncu's DRAM throughput % of peak, achieved occupancy, registers; then the
totals of the profiled launches. The CSV may hold the profiled program's own output lines
(they do not start with a quoted launch ID) and ncu's ==PROF== lines: both are skipped.
"""
import csv
import sys
from collections import OrderedDict


def num(s):
    try:
        return float(s.replace(",", ""))
    except (ValueError, AttributeError):
        return 0.0


def short(name):
    """'void k_mv_qd<4, 1, ...>(mv_args)' -> 'k_mv_qd<4, 1, ...>'"""
    if name.startswith("void "):
        name = name[5:]
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def main(path):
    with open(path, newline="", errors="replace") as f:
        lines = [l for l in f if l.startswith('"')]
    rows = list(csv.reader(lines))
    hdr = next((i for i, r in enumerate(rows) if r and r[0] == "ID"), None)
    if hdr is None:
        print(f"ncu-sum: no ncu table in {path}")
        return 1
    head, units = rows[hdr], rows[hdr + 1]
    col = {h: i for i, h in enumerate(head)}
    unit = {h: units[i] for i, h in enumerate(head)}

    def get(r, name, scale_to=None):
        v = num(r[col[name]]) if name in col and col[name] < len(r) else 0.0
        u = unit.get(name, "")
        if scale_to == "us":
            v *= {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}.get(u, 1.0)
        if scale_to == "B":
            v *= {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}.get(u, 1)
        return v

    groups = OrderedDict()
    tot_us = tot_b = 0.0
    n = 0
    for r in rows[hdr + 2:]:
        if not r or not r[0].isdigit():
            continue
        name = short(r[col["Kernel Name"]])
        key = (name, r[col["Grid Size"]] if "Grid Size" in col else "", r[col["Block Size"]] if "Block Size" in col else "")
        d = get(r, "gpu__time_duration.sum", "us")
        b = get(r, "dram__bytes_read.sum", "B")
        g = groups.setdefault(key, [0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
        g[0] += 1
        g[1] += d
        g[2] += b
        g[3] += get(r, "dram__throughput.avg.pct_of_peak_sustained_elapsed")
        g[4] += get(r, "sm__warps_active.avg.pct_of_peak_sustained_active")
        g[5] = get(r, "launch__registers_per_thread")
        g[6] += get(r, "lts__t_sector_hit_rate.pct")
        tot_us += d
        tot_b += b
        n += 1
    print(f"{path}: {n} launches profiled, {tot_us:.1f} us, {tot_b / 1e6:.1f} MB read from DRAM, "
          f"{tot_b / max(tot_us, 1e-9) / 1e3:.0f} GB/s over the sum of durations")
    print("| kernel | grid | block | launches | us each | MB read each | GB/s | DRAM % | occupancy % | L2 hit % | regs | share of time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, grid, block), g in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        c = g[0]
        print(f"| {name} | {grid} | {block} | {c} | {g[1] / c:.2f} | {g[2] / c / 1e6:.2f} | "
              f"{g[2] / max(g[1], 1e-9) / 1e3:.0f} | {g[3] / c:.0f} | {g[4] / c:.0f} | {g[6] / c:.0f} | {g[5]:.0f} | "
              f"{100 * g[1] / max(tot_us, 1e-9):.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
