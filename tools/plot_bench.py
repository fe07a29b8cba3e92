#!/usr/bin/env python3
"""Plots benchmark JSONL (bench/results/*.jsonl): logical GB/s versus tokens and versus SMs, per op and EP.

    tools/plot_bench.py RESULTS.jsonl OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    rows = [json.loads(line) for line in open(src) if line.strip()]
    rows = [r for r in rows if r.get("mode") == "ht"]
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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
