"""Latency benchmark: pruned nets against the stock timm nets of equal FLOPs, on this CPU, side by side in one run.

For each (parent, stock) pair -- resnet50 -> resnet18, efficientnet_b1 -> efficientnet_b0, mobilenetv3_large_100 ->
mobilenetv3_large_075 -- three nets are timed beside the stock one: the parent pruned by the FLOPs knapsack to the
stock net's GMACs, the parent pruned by the latency knapsack (`kpid_zoo.latency`) to the stock net's measured
latency, and the parent itself; plus timm's efficientnet_b1_pruned (the KPID authors' widths) beside
efficientnet_b0. Weights are random (latency does not depend on them; no Hub here); importance is magnitude (no
data needed). Two settings: batch 1 on 1 thread at 224 px, and batch 32 on all threads at 64 px (224 px would
take about an hour of lookup tables on 2 cores; its table samples 3 widths per group instead of 5). The final
timings interleave the arms (round-robin over every net within each repeat, so machine noise hits all arms
alike); each arm's ratio to its stock net is taken repeat by repeat, reported as median and interquartile range.

    python benchmarks/latency.py            # ~10 minutes on 2 quiet cores; writes docs/latency_benchmark.{md,png}
    python benchmarks/latency.py --quick    # smaller inputs and fewer repeats, for a smoke run (no docs written)

Run it on a quiet machine: `echo "latency benchmark $(date)" > /work/QUIET` first, `rm /work/QUIET` after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from kpid_zoo.flops import count_flops, count_params
from kpid_zoo.groups import discover_groups
from kpid_zoo.importance import magnitude_importance
from kpid_zoo.latency import (GRID_FRACTIONS, LatencySetting, Timing, device_name, example_input, fixed_threads,
                              measure_model)
from kpid_zoo.prune import knapsack_prune, latency_knapsack_prune
from kpid_zoo.recipe import BudgetSpec

from _figures import save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "latency.json"
CASES = [("resnet50", "resnet18"), ("efficientnet_b1", "efficientnet_b0"),
         ("mobilenetv3_large_100", "mobilenetv3_large_075")]
EXTRA = [("efficientnet_b1_pruned", "efficientnet_b0")]  # timm's KPID release beside the stock net of its FLOPs


@dataclass
class Setting:
    label: str
    latency: LatencySetting
    px: int
    repeats: int          # interleaved rounds of the final comparison
    measure_repeats: int  # timed calls per measurement inside the pruning loop
    table_repeats: int    # timed calls per grid point of the lookup table
    fractions: tuple[float, ...] = GRID_FRACTIONS  # the table's width grid


def create(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"zero_init_last": False} if name.startswith("resnet") else {}
    return timm.create_model(name, **kwargs).eval()


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def prune_arms(parent_name: str, stock_name: str, settings: list[Setting], log) -> dict:
    """The FLOPs-knapsack net (one architecture, pruned at 224 px) and one latency-knapsack net per setting."""
    parent = create(parent_name)
    size = (3, 224, 224)
    graph = discover_groups(parent, size)
    importance = magnitude_importance(parent, graph)
    stock_gmacs = count_flops(create(stock_name), size).gmacs
    t0 = time.time()
    flops_net = knapsack_prune(parent, graph, importance, stock_gmacs, arch=parent_name, input_size=size,
                               progress=False)
    log(f"  {parent_name}: FLOPs knapsack -> {flops_net.report.achieved_gmacs:.3f} GMACs "
        f"(stock {stock_name} {stock_gmacs:.3f}) in {time.time() - t0:.0f}s")
    arms = {"flops": flops_net.model, "latency": {}, "latency_reports": {}}
    stock = create(stock_name)
    for s in settings:
        input_size = (3, s.px, s.px)

        def measure(model, input_size, setting, _s=s):
            return measure_model(model, input_size, setting, warmup=2, repeats=_s.measure_repeats)
        measure(stock, input_size, s.latency)  # untimed: a network's first calls at a new batch run cold
        stock_ms = measure(stock, input_size, s.latency).median_ms
        budget = BudgetSpec(latency_ms=stock_ms, device="cpu", batch_size=s.latency.batch_size,
                            threads=s.latency.threads, tolerance=0.05)
        t0 = time.time()
        graph_s = discover_groups(parent, input_size)
        try:
            result = latency_knapsack_prune(parent, graph_s, importance, budget, arch=parent_name,
                                            input_size=input_size, measure=measure, progress=False, log=log,
                                            table_kwargs={"warmup": 1, "repeats": s.table_repeats,
                                                          "fractions": s.fractions})
        except ValueError as e:  # the stock net is faster than anything the parent can be pruned to
            log(f"  {parent_name} [{s.label}]: no latency-knapsack net: {e}")
            arms["latency"][s.label] = None
            arms["latency_reports"][s.label] = {"budget_ms": stock_ms, "unreachable": str(e)}
            continue
        out = result.report.latency
        log(f"  {parent_name} [{s.label}]: latency knapsack to {stock_name}'s {stock_ms:.2f} ms -> measured "
            f"{out.measured_ms:.2f} ms, {result.report.achieved_gmacs:.3f} GMACs, {len(result.report.rounds)} "
            f"rounds in {time.time() - t0:.0f}s{' (' + out.note + ')' if out.note else ''}")
        arms["latency"][s.label] = result.model
        arms["latency_reports"][s.label] = {"budget_ms": stock_ms, "rounds": result.report.rounds,
                                            "measured_ms": out.measured_ms, "within_budget": out.within_budget,
                                            "noise": out.noise, "note": out.note,
                                            "gmacs": result.report.achieved_gmacs}
    arms["flops_gmacs"] = flops_net.report.achieved_gmacs
    return arms


def interleaved(nets: dict[str, torch.nn.Module], setting: Setting) -> dict[str, list[float]]:
    """Round-robin timing: in every repeat each net runs once (after one warm-up call), in the same order."""
    x = example_input((3, setting.px, setting.px), setting.latency)
    samples = {name: [] for name in nets}
    with fixed_threads(setting.latency), torch.inference_mode():
        for net in nets.values():
            net(x), net(x)  # warm-up: allocator, oneDNN primitives
        for _ in range(setting.repeats):
            for name, net in nets.items():
                t0 = time.perf_counter()
                net(x)
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def ratio_stats(arm: list[float], stock: list[float]) -> tuple[float, float, float]:
    ratios = [a / s for a, s in zip(arm, stock)]
    t = Timing.of(ratios)
    return t.median_ms, t.q1_ms, t.q3_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs and few repeats; writes no docs")
    parser.add_argument("--docs-only", action="store_true",
                        help="rewrite docs/latency_benchmark.{md,png} from benchmarks/results/latency.json")
    args = parser.parse_args()
    if args.docs_only:
        saved = json.loads(RESULTS.read_text())
        write_doc(saved["meta"], saved["results"])
        return
    cores = os.cpu_count() or 1
    if args.quick:
        settings = [Setting("batch 1, 1 thread, 96 px", LatencySetting("cpu", 1, 1), 96, 5, 5, 3)]
    else:
        settings = [Setting("batch 1, 1 thread, 224 px", LatencySetting("cpu", 1, 1), 224, 30, 9, 5),
                    # batch 32 at 224 px would take an hour of tables on 2 cores: 64 px, a coarser grid
                    Setting(f"batch 32, {cores} threads, 64 px", LatencySetting("cpu", 32, cores), 64, 8, 3, 2,
                            (0.25, 0.5, 1.0))]
    started, load_before = time.time(), load_avg()
    log = lambda m: print(m, flush=True)  # noqa: E731
    log(f"load average before: {load_before}; {device_name('cpu')}")
    arms = {parent: prune_arms(parent, stock, settings, log) for parent, stock in CASES}
    results = {}
    for s in settings:
        nets = {}
        for parent, stock in CASES:
            nets[stock] = create(stock)
            nets[f"{parent} FLOPs-knapsack"] = arms[parent]["flops"]
            if arms[parent]["latency"][s.label] is not None:
                nets[f"{parent} latency-knapsack"] = arms[parent]["latency"][s.label]
            nets[parent] = create(parent)
        for extra, _ in EXTRA:
            nets[extra] = create(extra)
        size = (3, s.px, s.px)
        gmacs = {name: count_flops(net, size).gmacs for name, net in nets.items()}
        params = {name: count_params(net) / 1e6 for name, net in nets.items()}
        log(f"timing {len(nets)} nets interleaved, {s.repeats} rounds [{s.label}]")
        samples = interleaved(nets, s)
        rows = []
        stock_of = {**{f"{p} FLOPs-knapsack": q for p, q in CASES}, **{f"{p} latency-knapsack": q for p, q in CASES},
                    **{p: q for p, q in CASES}, **{q: q for _, q in CASES}, **dict(EXTRA)}
        for name, ms in samples.items():
            t = Timing.of(ms)
            r, r1, r3 = ratio_stats(ms, samples[stock_of[name]])
            rows.append({"net": name, "stock": stock_of[name], "gmacs": gmacs[name], "params_m": params[name],
                         "median_ms": t.median_ms, "q1_ms": t.q1_ms, "q3_ms": t.q3_ms, "min_ms": t.min_ms,
                         "ratio": r, "ratio_q1": r1, "ratio_q3": r3,
                         "min_ratio": t.min_ms / min(samples[stock_of[name]]), "samples_ms": ms})
            log(f"  {name:<42} {gmacs[name]:6.3f} GMACs {t.median_ms:9.2f} ms [{t.q1_ms:.2f}-{t.q3_ms:.2f}]  "
                f"x{r:.3f} [{r1:.3f}-{r3:.3f}] of {stock_of[name]}")
        results[s.label] = {"rows": rows, "px": s.px, "batch_size": s.latency.batch_size,
                            "threads": s.latency.threads, "repeats": s.repeats,
                            "loops": {p: arms[p]["latency_reports"][s.label] for p, _ in CASES}}
    load_after = load_avg()
    minutes = (time.time() - started) / 60
    log(f"load average after: {load_after}; {minutes:.1f} min")
    if args.quick:
        return
    meta = {"device": device_name("cpu"), "torch": torch.__version__, "timm": timm.__version__,
            "load_before": load_before, "load_after": load_after, "minutes": minutes,
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=ROOT).stdout.strip(), "flops_gmacs": {p: arms[p]["flops_gmacs"]
                                                                                for p, _ in CASES}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_doc(meta, results)


def verdict(row: dict) -> str:
    """Faster / slower only where the interquartile range of the per-round ratios lies wholly on one side of 1."""
    if row["net"] == row["stock"]:
        return ""
    if row["ratio_q3"] < 1:
        return "faster"
    if row["ratio_q1"] > 1:
        return "**slower**"
    return "not resolved (IQR spans 1)"


def write_doc(meta: dict, results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Latency: pruned nets vs stock nets of equal FLOPs (CPU)", "",
             f"`python benchmarks/latency.py` on {meta['device']}, timm {meta['timm']}, commit {meta['commit']}, "
             f"{meta['minutes']:.1f} minutes. Load average (1, 5, 15 min) before: {meta['load_before']}, after: "
             f"{meta['load_after']} (a quiet 2-core machine reads below 1)."
             + (" **The machine was not quiet**: other jobs shared its 2 cores throughout, so every figure here "
                "carries their noise, the 2-thread setting most (a 2-thread forward pass waits at each barrier for "
                "whichever thread was preempted)." if float(meta["load_before"].split()[0]) > 1.5 else ""), "",
             "The pruning loop times each candidate alone, back to back (its weights stay warm in the caches); "
             "the comparison below runs every net in turn, so each call starts with the others' data in the "
             "caches. A latency-knapsack net measured at its budget in the loop can therefore land above it here.",
             "",
             "Random-init weights (latency does not depend on them), magnitude importance, `round_to: 8`, "
             "`min_channels: 8`. Per setting, every net is timed once per round, round-robin, after two warm-up "
             "calls; the ratio to the stock net is taken round by round and reported as median [IQR]; on a busy "
             "machine the fastest call of each net (min ms) is the one least disturbed, so the ratio of minimums "
             "is given too. "
             "FLOPs-knapsack: the parent pruned to the stock net's GMACs at 224 px (one architecture for both "
             "settings). Latency-knapsack: the parent pruned to the stock net's latency as measured just before, "
             "in that setting (its own lookup table, 5% tolerance, widened to twice the measured noise where "
             "that is larger). Lookup tables are reused from the cache when one was measured for the same key. "
             "No GPU was lent to this task: the GPU column (item 5 of the issue) is not measured.", ""]
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), dpi=110, squeeze=False)
    for ax, (label, res) in zip(axes[0], results.items()):
        lines += [f"## {label}", "",
                  "| net | GMACs | params (M) | median ms [IQR] | x stock [IQR] | stock | vs stock | min ms | "
                  "x stock (mins) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            mins = (f" {r['min_ms']:.2f} | {r['min_ratio']:.3f} |" if "min_ms" in r else " - | - |")
            lines.append(f"| {r['net']} | {r['gmacs']:.3f} | {r['params_m']:.2f} | {r['median_ms']:.2f} "
                         f"[{r['q1_ms']:.2f}-{r['q3_ms']:.2f}] | {r['ratio']:.3f} [{r['ratio_q1']:.3f}-"
                         f"{r['ratio_q3']:.3f}] | {r['stock']} | {verdict(r)} |{mins}")
        lines += ["", "Latency-knapsack loop, predicted (table, corrected) vs measured ms per round:", ""]
        for parent, loop in res["loops"].items():
            if "unreachable" in loop:
                lines.append(f"- {parent}: budget {loop['budget_ms']:.2f} ms: no net: {loop['unreachable']}")
                continue
            rounds = ", ".join(f"{r['predicted_ms']:.2f}/{r['measured_ms']:.2f}" for r in loop["rounds"])
            status = "within budget" if loop["within_budget"] else "NOT within budget"
            lines.append(f"- {parent}: budget {loop['budget_ms']:.2f} ms -> {rounds} ({status}, noise "
                         f"{100 * loop['noise']:.1f}%){'; ' + loop['note'] if loop['note'] else ''}")
        lines.append("")
        pruned = [r for r in res["rows"] if "knapsack" in r["net"] or r["net"].endswith("_pruned")]
        for i, r in enumerate(pruned):
            color = "#1f77b4" if "FLOPs" in r["net"] else "#ff7f0e" if "latency" in r["net"] else "#2ca02c"
            ax.bar(i, r["ratio"], color=color, label=None)
            ax.errorbar(i, r["ratio"], yerr=[[r["ratio"] - r["ratio_q1"]], [r["ratio_q3"] - r["ratio"]]],
                        color="black", capsize=3)
        ax.axhline(1.0, color="grey", lw=1, ls="--", label="stock net of equal FLOPs / latency")
        ax.set_xticks(range(len(pruned)))
        ax.set_xticklabels([r["net"].replace("-knapsack", "\n-knapsack").replace("mobilenetv3_large_100", "mnv3_l_100")
                            for r in pruned], rotation=60, fontsize=7, ha="right")
        ax.set_title(label, fontsize=9)
    save_figure(fig, ROOT / "docs" / "latency_benchmark.png", "latency / stock net's (median, IQR)", "")
    plt.close(fig)
    lines.insert(5, "![ratio to stock](latency_benchmark.png)\n")
    (ROOT / "docs" / "latency_benchmark.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
