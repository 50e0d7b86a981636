"""plot.py RESULTS.json OUT.png -- start and stop time against N (run with the bench venv)."""
import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"floor": "black", "tprocess": "tab:red", "supervisord": "tab:blue",
          "circus": "tab:green", "pm2": "tab:purple"}


def series(samples, prefix, ns):
    xs, ys, lo, hi = [], [], [], []
    for n in ns:
        v = samples.get(f"{prefix}_{n}")
        if v:
            m = statistics.median(v)
            xs.append(n)
            ys.append(m)
            lo.append(m - min(v))
            hi.append(max(v) - m)
    return xs, ys, [lo, hi]


def main():
    d = json.load(open(sys.argv[1]))
    cfg = d["cfg"]
    panels = [("start", "start", cfg["start_ns"]), ("stop, idle workers", "stop_idle",
                                                   cfg["start_ns"]),
              ("stop, busy workers (2 s tasks)", "stop_busy", cfg["busy_ns"])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (title, prefix, ns) in zip(axes, panels, strict=True):
        order = [n for n in COLORS if n in d["samples"]] + \
            [n for n in d["samples"] if n not in COLORS]
        for name in order:
            samples = d["samples"][name]
            xs, ys, err = series(samples, prefix, ns)
            if xs:
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name,
                            color=COLORS.get(name))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("N workers")
        ax.set_ylabel("seconds (median, bars = min..max)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"tprocess bench ({d['mode']}, {cfg['reps']} runs per point)")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
