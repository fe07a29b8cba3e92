#!/usr/bin/env python3
"""Plots benchmark JSONL (bench/results/*.jsonl). High-throughput rows: logical GB/s versus tokens and versus
SMs, per op and EP, into OUT.png. Low-latency rows (if any): median and p99 latency versus tokens per rank for
dispatch and combine beside the NCCL baseline, into OUT-ll.png.

    tools/plot_bench.py RESULTS.jsonl OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_ht(rows, dst):
    fig, (by_tokens, by_sms) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = sorted({(r["op"], r["dtype"], r["ep"]) for r in rows})
    for op, dtype, ep in keys:
        sel = [r for r in rows if (r["op"], r["dtype"], r["ep"]) == (op, dtype, ep)]
        sms = [r for r in sel if r["tokens"] == 4096 and r["sms"] > 0]
        if sms:
            sms.sort(key=lambda r: r["sms"])
            by_sms.plot([r["sms"] for r in sms], [r["logical_gbps"] for r in sms], "o-", label=f"{op} {dtype} EP{ep}")
        at = {}
        for r in sel:
            if r["sms"] in (0, 24):
                at[r["tokens"]] = r["logical_gbps"]
        if len(at) > 1:
            t = sorted(at)
            by_tokens.plot(t, [at[k] for k in t], "o-", label=f"{op} {dtype} EP{ep}")
    by_tokens.set_xlabel("tokens per rank")
    by_tokens.set_ylabel("logical GB/s")
    by_tokens.set_title("bandwidth vs tokens (ours: 24 SMs; NCCL: its own)")
    by_sms.set_xlabel("SMs")
    by_sms.set_title("bandwidth vs SMs (4096 tokens)")
    for ax in (by_tokens, by_sms):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


LL_PANELS = (("dispatch", ("ll_dispatch", "nccl_dispatch")),
             ("combine", ("ll_combine", "ll_combine_logfmt", "ll_combine_per_rank", "nccl_combine")))


def plot_ll(rows, dst):
    fig, axes = plt.subplots(1, len(LL_PANELS), figsize=(12, 4.5))
    for ax, (title, ops) in zip(axes, LL_PANELS):
        for op in ops:
            for ep in sorted({r["ep"] for r in rows if r["op"] == op}):
                sel = sorted((r for r in rows if r["op"] == op and r["ep"] == ep), key=lambda r: r["tokens"])
                if not sel:
                    continue
                t = [r["tokens"] for r in sel]
                line, = ax.plot(t, [r["time_us"] for r in sel], "o-", label=f"{op} EP{ep} median")
                ax.plot(t, [r["p99_us"] for r in sel], "--", color=line.get_color(), alpha=0.6,
                        label=f"{op} EP{ep} p99")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("us per call (device time)")
        ax.set_title(f"low-latency {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


def main(src, dst):
    rows = [json.loads(line) for line in open(src) if line.strip()]
    ht = [r for r in rows if r.get("mode") == "ht"]
    ll = [r for r in rows if r.get("mode") == "ll"]
    if ht:
        plot_ht(ht, dst)
    if ll:
        plot_ll(ll, dst[:-4] + "-ll.png" if dst.endswith(".png") else dst + "-ll.png")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
