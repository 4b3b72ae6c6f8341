"""Spex's time, peak memory and mask F1 as cells, genes and factors grow (the spex-LVM paper's Figure 3).

Each sweep varies one size while the other two stay at the base (the paper's N = 10,000 cells, G = 8,000 genes,
K = 100 factors); data from ``noisy_annotations`` at ``--noise``. Every run goes through ``peers.py`` (a fresh
process per fit, the same scores), so ``--methods`` can add pathfactor's other models. Writes the records to
``--out`` (JSON, rewritten after every run, so a stopped sweep keeps what it did) and the figure to ``--figure``.

    python benchmarks/scaling.py                   # the full curves: base 10000x8000x100, noise 0.2 (hours)
    python benchmarks/scaling.py --base 1000x1000x20 --cells 500 1000 2000 --genes 500 1000 2000 \\
        --factors 10 20 40 --out /tmp/scaling.json --figure /tmp/scaling.png        # a quick look
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from common import RESULTS, parse_size  # noqa: E402

AXES = ("cells", "genes", "factors")


Size = tuple[int, int, int]


def configurations(base: Size, sweeps: dict[str, list[int]]) -> list[tuple[Size, list[str]]]:
    """Distinct (N, G, K) to run, in sweep order, each with the sweeps it belongs to (the base is in all)."""
    order: dict[Size, list[str]] = {}
    for i, axis in enumerate(AXES):
        for value in sweeps[axis]:
            size = list(base)
            size[i] = value
            order.setdefault(tuple(size), []).append(axis)
    return list(order.items())


def figure(records: list[dict], path: Path, title: str) -> None:
    """Seconds, peak memory and F1 against each swept size; one line per method, y-axes shared along rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [("seconds", "seconds", True), ("peak_rss_mb", "peak RSS (MiB)", True), ("f1", "mask F1", False)]
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 9), sharey="row", squeeze=False)
    keys = {"cells": "n_cells", "genes": "n_genes", "factors": "n_factors"}
    ok = [r for r in records if "seconds" in r]
    for j, axis in enumerate(AXES):
        swept = sorted((r for r in ok if axis in r.get("sweeps", [])), key=lambda r: r[keys[axis]])
        for method in dict.fromkeys(r["method"] for r in swept):
            mine = [r for r in swept if r["method"] == method]
            x = [r[keys[axis]] for r in mine]
            for i, (field, _, _) in enumerate(rows):
                axes[i][j].plot(x, [r.get(field) for r in mine], "o-", label=method)
            if method == swept[0]["method"]:
                axes[2][j].plot(x, [r.get("f1_truth") for r in mine], "k--", lw=1, label="true W")
                axes[2][j].plot(x, [r.get("f1_annotation") for r in mine], ":", color="grey", label="annotation")
        values = sorted({r[keys[axis]] for r in swept})
        for i, (_, label, log) in enumerate(rows):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_xticks(values, [f"{v:,}" for v in values])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if log:
                ax.set_yscale("log")
            if j == 0:
                ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        axes[-1][j].set_xlabel(f"{axis} (others at base)")
    axes[0][0].legend(fontsize=8)
    axes[2][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="10000x8000x100", help="CELLSxGENESxFACTORS held while another size sweeps")
    p.add_argument("--cells", type=int, nargs="*", default=[1000, 2000, 5000, 10000, 20000, 50000])
    p.add_argument("--genes", type=int, nargs="*", default=[1000, 2000, 4000, 8000, 16000])
    p.add_argument("--factors", type=int, nargs="*", default=[10, 20, 50, 100, 200])
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--methods", nargs="+", default=["pathfactor.Spex"], choices=list(peers.METHODS), metavar="METHOD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--spex-param", type=peers._param, action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--no-isolate", dest="isolate", action="store_false")
    p.add_argument("--timeout", type=float, default=None, help="seconds per fit")
    p.add_argument("--out", default=str(RESULTS / "scaling.json"))
    p.add_argument("--figure", default=str(RESULTS / "scaling.png"))
    args = p.parse_args(argv)
    base = parse_size(args.base)
    runs = configurations(base, {"cells": args.cells, "genes": args.genes, "factors": args.factors})
    for size, _ in runs:
        parse_size("x".join(map(str, size)))  # every size valid before any work
    opts = peers.parser().parse_args(["--threads", str(args.threads), "--seed", str(args.seed),
                                      "--device", args.device])
    opts.spex_params, opts.isolate, opts.timeout = dict(args.spex_param), args.isolate, args.timeout
    peers.limit_threads(args.threads)

    out = Path(args.out)
    header = {"command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "base": list(base), "noise": args.noise, "methods": args.methods}
    records: list[dict] = []
    for size, sweeps in runs:
        for record in peers.benchmark("x".join(map(str, size)), args.noise, args.methods, opts, out=None):
            records.append({**record, "sweeps": sweeps})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**header, "records": records}, indent=1) + "\n")
    figure(records, Path(args.figure), f"noise {args.noise}, base {args.base}, {args.threads} threads, "
                                        f"{args.device}")
    return records


if __name__ == "__main__":
    main()
