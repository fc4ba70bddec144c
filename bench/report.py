"""Turn the measurements of one benchmark run into a BENCHMARKS.md section (torch-free).

`render(results)` -> markdown; `write_section(path, heading, text)` replaces that section and
keeps every other one (the preprocess section is written by bench/preprocess_throughput.py).

`results` (what bench/__main__.py collects; every key optional unless noted):
  mode, command, heading (required), started, seconds, machine{}, versions{}, baseline_source{},
  standin, models{kind: {label, resolution}}, steps{kind: n}, rounds, warmup,
  matmul[{best_gflops, median_gflops}], unavailable{method: why}, notes[],
  runs[{side: danlu|baseline, method, kind, round, step_times[[step, s]], step_cpu_times,
        ttfs_call_s, ttfs_spawn_s, ttfs_cached_s, model_load_s, rss_at_last_step_mib,
        rss_exit_mib, flops, preview_s[], error}],
  ui{cli_s_per_step[], page_s_per_step[], poll_s[], long_history_poll_s, kind, steps},
  commands{name: str}
"""
from __future__ import annotations

import statistics
from pathlib import Path

METHOD_LABELS = {"textual_inversion": "Textual inversion", "hypernetwork": "Hypernetwork",
                 "lora": "LoRA (rank 4)",
                 "lora_cached": "LoRA (rank 4), text-encoder outputs cached",
                 "dreambooth": "DreamBooth (full U-Net)",
                 "lora_flux": "Flux.1 LoRA (rank 4), latents and text outputs cached",
                 "lora_te": "LoRA (rank 4), U-Net + text encoder",
                 "locon": "LoCon (rank 4, conv rank 4)"}
SCRIPT_NAMES = {"textual_inversion": "textual_inversion.py", "lora": "train_dreambooth_lora.py",
                "lora_cached": "train_dreambooth_lora.py --pre_compute_text_embeddings",
                "dreambooth": "train_dreambooth.py",
                "lora_flux": "train_dreambooth_lora_flux.py --cache_latents"}
# Targets from issue 8: Danlu / script seconds per step on the SD1.5-shaped model at 256 px.
# Flux.1 LoRA: issue #20's target, on the small Flux-shaped model at 256 px.
SPEED_TARGETS = {"textual_inversion": 0.8, "lora": 0.8, "lora_cached": 0.8, "dreambooth": 1.0,
                 "lora_flux": 0.8}
RSS_TARGET = 1.0
TTFS_TARGET_S = 2.0
UI_TARGET = 0.03
TARGET_KINDS = ("sd15", "flux")  # the models the targets are set for
WARMUP = 2


# ---------------------------------------------------------------- numbers

def steady(run: dict, key: str = "step_times", warmup: int = WARMUP) -> list[float]:
    """Seconds of the steps after the warm-up (the FLOP-counted step is inside the warm-up)."""
    flop_step = run.get("flop_step")
    return [seconds for step, seconds in run.get(key) or []
            if step > warmup and step != flop_step]


def run_median(run: dict, key: str = "step_times", warmup: int = WARMUP) -> float | None:
    values = steady(run, key, warmup)
    return statistics.median(values) if values else None


def _med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _range(values):
    values = [v for v in values if v is not None]
    return (min(values), max(values)) if values else None


def summarize(results: dict) -> dict:
    """Per (kind, method): medians, ranges and ratios of both sides."""
    warmup = results.get("warmup", WARMUP)
    table: dict = {}
    for run in results.get("runs", []):
        key = (run.get("kind"), run.get("method"))
        entry = table.setdefault(key, {"danlu": [], "baseline": []})
        entry[run.get("side", "danlu")].append(run)
    out = {}
    for key, sides in table.items():
        row = {}
        for side, runs in sides.items():
            good = [r for r in runs if not r.get("error") and not r.get("unavailable")]
            per_run = [run_median(r, "step_times", warmup) for r in good]
            row[side] = {
                "runs": len(good), "errors": [r["error"] for r in runs if r.get("error")],
                "unavailable": next((r["unavailable"] for r in runs if r.get("unavailable")), None),
                "s_per_step": _med(per_run), "s_range": _range(per_run),
                "per_round": {r.get("round"): m for r, m in zip(good, per_run)},
                "cpu_per_step": _med([run_median(r, "step_cpu_times", warmup) for r in good]),
                "best": min((v for r in good for v in steady(r, "step_times", warmup)), default=None),
                "rss_last_step": _med([r.get("rss_at_last_step_mib") for r in good]),
                "rss_exit": _med([r.get("rss_exit_mib") for r in good]),
                "ttfs_spawn": _med([r.get("ttfs_spawn_s") for r in good]),
                "ttfs_call": _med([r.get("ttfs_call_s") for r in good]),
                "ttfs_cached": _med([r.get("ttfs_cached_s") for r in good]),
                "ttfs_cached_cpu": _med([r.get("ttfs_cached_cpu_s") for r in good]),
                "ttfs_warm_imports": _med([r.get("ttfs_warm_imports_s") for r in good]),
                "warm_model_load": _med([r.get("warm_model_load_s") for r in good]),
                "model_load": _med([r.get("model_load_s") for r in good]),
                "import": _med([r.get("import_s") for r in good]),
                "flops": _med([r.get("flops") for r in good]),
                "flops_by_module": next((r.get("flops_by_module") for r in good
                                         if r.get("flops_by_module")), {}),
                "preview": [s for r in good for s in r.get("preview_s") or []],
                "steps_timed": _med([len(steady(r, "step_times", warmup)) for r in good]),
            }
        d, b = row.get("danlu"), row.get("baseline")
        if d and b and d["s_per_step"] and b["s_per_step"]:
            # the ratio of each round's two runs (run back to back, so under similar load),
            # then the median over rounds: robust when the load changes between rounds
            paired = [d["per_round"][r] / b["per_round"][r] for r in d["per_round"]
                      if r in b["per_round"] and d["per_round"][r] and b["per_round"][r]]
            row["ratio_of_medians"] = d["s_per_step"] / b["s_per_step"]
            row["ratio"] = statistics.median(paired) if paired else row["ratio_of_medians"]
            row["round_ratios"] = paired
            row["ratio_range"] = _range(paired)
            if d["best"] and b["best"]:
                row["best_ratio"] = d["best"] / b["best"]
            if d["cpu_per_step"] and b["cpu_per_step"]:
                row["cpu_ratio"] = d["cpu_per_step"] / b["cpu_per_step"]
            if d["rss_last_step"] and b["rss_last_step"]:
                row["rss_ratio"] = d["rss_last_step"] / b["rss_last_step"]
            if d["rss_exit"] and b["rss_exit"]:
                row["rss_exit_ratio"] = d["rss_exit"] / b["rss_exit"]
            if d["ttfs_spawn"] and b["ttfs_spawn"]:
                row["ttfs_ratio"] = d["ttfs_spawn"] / b["ttfs_spawn"]
        out[key] = row
    return out


def paired_ratio(pair: dict, warmup: int = WARMUP) -> dict | None:
    """Seconds per step of both sides of a paired (concurrent) run, counting only the steps
    that ran while the other side was stepping too."""
    intervals = {}
    for side in ("danlu", "baseline"):
        run = pair.get(side) or {}
        walls = run.get("step_walls") or []
        if run.get("error") or len(walls) < warmup + 2:
            return None
        intervals[side] = [(walls[i - 1][1], walls[i][1]) for i in range(1, len(walls))
                           if walls[i][0] > warmup]
    start = max(spans[0][0] for spans in intervals.values())
    end = min(spans[-1][1] for spans in intervals.values())
    medians = {}
    for side, spans in intervals.items():
        inside = [b - a for a, b in spans if a >= start - 1e-6 and b <= end + 1e-6]
        if len(inside) < 2:
            return None
        medians[side] = (statistics.median(inside), len(inside))
    return {"danlu": medians["danlu"][0], "baseline": medians["baseline"][0],
            "steps": (medians["danlu"][1], medians["baseline"][1]), "overlap_s": end - start,
            "ratio": medians["danlu"][0] / medians["baseline"][0]}


def paired_summary(results: dict) -> dict:
    out: dict = {}
    for pair in results.get("paired", []):
        ratio = paired_ratio(pair, results.get("warmup", WARMUP))
        entry = out.setdefault((pair["kind"], pair["method"]),
                               {"pairs": [], "failed": 0, "rss": {"danlu": [], "baseline": []}})
        if ratio is None:
            entry["failed"] += 1
        else:
            entry["pairs"].append(ratio)
            for side in ("danlu", "baseline"):
                entry["rss"][side].append(pair[side].get("rss_at_last_step_mib"))
    for entry in out.values():
        pairs = entry["pairs"]
        entry["rss_danlu"], entry["rss_baseline"] = (_med(entry["rss"]["danlu"]),
                                                     _med(entry["rss"]["baseline"]))
        if pairs:
            entry["danlu"] = statistics.median(p["danlu"] for p in pairs)
            entry["baseline"] = statistics.median(p["baseline"] for p in pairs)
            entry["ratio"] = statistics.median(p["ratio"] for p in pairs)
            entry["range"] = _range([p["ratio"] for p in pairs])
    return out


def ui_summary(ui: dict | None) -> dict | None:
    if not ui or ui.get("error") or not ui.get("cli_s_per_step") or not ui.get("page_s_per_step"):
        return None
    cli, page = ui["cli_s_per_step"], ui["page_s_per_step"]
    paired = [p / c - 1 for p, c in zip(page, cli)]
    polls = ui.get("poll_s") or []
    return {"cli": statistics.median(cli), "page": statistics.median(page),
            "overhead": statistics.median(page) / statistics.median(cli) - 1,
            "overhead_range": _range(paired), "poll": _med(polls), "polls": len(polls),
            "long_poll": ui.get("long_history_poll_s"), "reload_poll": ui.get("reload_poll_s"),
            "cpu_overhead": (statistics.median(ui["page_cpu_per_step"])
                             / statistics.median(ui["cli_cpu_per_step"]) - 1
                             if ui.get("page_cpu_per_step") and ui.get("cli_cpu_per_step")
                             else None)}


def ui_pair_overhead(pair: dict) -> float | None:
    """Page path over CLI path (mean s/step of each side's runs) of one paired UI run, - 1."""
    cli, page = pair.get("cli") or {}, pair.get("page") or {}
    if cli.get("error") or page.get("error"):
        return None
    a, b = cli.get("s_per_step") or [], page.get("s_per_step") or []
    if not a or not b:
        return None
    return statistics.fmean(b) / statistics.fmean(a) - 1


def ui_paired_summary(results: dict) -> dict | None:
    pairs = results.get("ui_paired") or []
    good = [(pair, ui_pair_overhead(pair)) for pair in pairs]
    good = [(pair, value) for pair, value in good if value is not None]
    if not good:
        return None
    polls = [s for pair, _ in good for s in pair["page"].get("poll_s") or []]
    cpu = [statistics.fmean(pair["page"]["cpu_per_step"]) / statistics.fmean(pair["cli"]["cpu_per_step"]) - 1
           for pair, _ in good
           if pair["page"].get("cpu_per_step") and pair["cli"].get("cpu_per_step")]
    return {"overhead": statistics.median(v for _, v in good),
            "overhead_range": _range([v for _, v in good]), "pairs": len(good),
            "failed": len(pairs) - len(good),
            "cli": statistics.median(statistics.fmean(p["cli"]["s_per_step"]) for p, _ in good),
            "page": statistics.median(statistics.fmean(p["page"]["s_per_step"]) for p, _ in good),
            "cpu_overhead": statistics.median(cpu) if cpu else None,
            "poll": _med(polls), "polls": len(polls),
            "long_poll": _med([p["page"].get("long_history_poll_s") for p, _ in good]),
            "reload_poll": _med([p["page"].get("reload_poll_s") for p, _ in good]),
            "runs": len(good[0][0]["cli"].get("s_per_step") or [])}


def _ui_lines(ui: dict, u: dict, models: dict, paired: bool) -> list[str]:
    """The UI overhead section from `ui_summary` / `ui_paired_summary`."""
    label = models.get(u.get("kind"), {}).get("label", u.get("kind"))
    low, high = ui["overhead_range"] or (ui["overhead"], ui["overhead"])
    ok = ui["overhead"] < UI_TARGET
    verdict = "met" if ok else "**not met**"
    if not paired and low < 0 < high and ui.get("poll") is not None:
        # the A/B difference cannot be told from noise; judge by what a poll costs
        ok = ui["poll"] / 1.0 < UI_TARGET
        verdict = (f"{'met' if ok else '**not met**'} (A/B within noise; by poll cost "
                   f"{100 * ui['poll']:.1f}%)")
    poller = ("the page path is `JobRunner` (worker thread) with a poller thread doing once a "
              "second what the Train tab's timer does (`webui.live.refresh` with the page's "
              "`Watch`: only the loss points it has not seen, the thinned loss series, the status "
              "line, the gallery when previews changed"
              + (", and Gradio's `LinePlot.postprocess`" if u.get("gradio_postprocess") else "")
              + "); the CLI path is `runner(method)(cfg, ConsoleContext)` with tqdm to /dev/null.")
    if paired:
        how = (f"Textual inversion on the {label}, {u.get('steps')} steps per run: a CLI process "
               f"and a page process run at the same time, each pinned to its own CPU with 1 "
               f"thread (the CPUs swap between the {ui['pairs']} pairs), each making "
               f"{ui['runs']} runs after a warm-up run (model loaded once per process); "
               "overhead = mean s/step of the page runs / the CLI runs − 1, median over pairs; "
               + poller)
    else:
        how = (f"Textual inversion on the {label}, {u.get('steps')} steps per run, "
               f"{u.get('rounds')} rounds of CLI path and page path alternating in one process "
               "(model loaded once): " + poller)
    lines = ["### UI overhead", "", how, "",
             "| CLI s/step | page s/step | overhead (range) | target | CPU-s/step overhead | "
             "one poll | one poll, 100,000-step history | first poll of a fresh page (reload), "
             "100,000-step history |",
             "|---:|---:|---:|---|---:|---:|---:|---:|",
             f"| {_s(ui['cli'])} | {_s(ui['page'])} | **{100 * ui['overhead']:+.1f}%** "
             f"({_rng(ui['overhead_range'], lambda v: f'{100 * v:+.1f}%')}) | < 3% {verdict} | "
             + (f"{100 * ui['cpu_overhead']:+.1f}%" if ui.get("cpu_overhead") is not None else "—")
             + f" | {1000 * ui['poll']:.1f} ms ({ui['polls']} polls) | "
             + (f"{1000 * ui['long_poll']:.1f} ms" if ui.get("long_poll") else "—") + " | "
             + (f"{1000 * ui['reload_poll']:.0f} ms" if ui.get("reload_poll") else "—") + " |", ""]
    if ui.get("long_poll"):
        lines += [f"A poll holds the GIL for its duration once a second: {100 * ui['poll']:.1f}% "
                  f"of wall time in these runs and {100 * ui['long_poll']:.1f}% with a "
                  "100,000-point loss history, because the page asks the job only for the points "
                  "it has not seen and keeps a thinned series (at most 400 points per curve); a "
                  "fresh page (a reload, a second browser) gets the whole history once.", ""]
    return lines


# ---------------------------------------------------------------- formatting

def _s(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if value < 1 else f"{value:.{digits - 1}f}"


def _rng(pair, fmt=_s) -> str:
    return f"{fmt(pair[0])}–{fmt(pair[1])}" if pair else "—"


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _mib(value) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _gflop(value) -> str:
    return "—" if not value else f"{value / 1e9:,.1f}"


def _verdict(ok: bool | None, applies: bool = True) -> str:
    if ok is None:
        return "—"
    if not applies:
        return "(target is for SD1.5)" if ok else "(over, target is for SD1.5)"
    return "met" if ok else "**not met**"


def _cell(side: dict) -> str:
    """'median (min–max)' of a side's seconds per step, or why there is none."""
    if side.get("runs"):
        return f"{_s(side.get('s_per_step'))} ({_rng(side.get('s_range'))})"
    return "failed" if side.get("errors") else "not run"


def _method_order(keys):
    order = list(METHOD_LABELS)
    return sorted(keys, key=lambda k: ({"tiny": 0, "sd15": 1}.get(k[0], 2),
                                       order.index(k[1]) if k[1] in order else 99))


def _paired_sides(results: dict) -> list[dict]:
    """Both sides of every paired run as plain runs (for time to first step and RSS)."""
    out = []
    for pair in results.get("paired", []):
        for side in ("danlu", "baseline"):
            if pair.get(side):
                out.append(dict(pair[side], side=side, method=pair["method"], kind=pair["kind"],
                                round=pair["round"], paired=True))
    return out


def render(results: dict) -> str:
    summary = summarize(results)
    # time to first step and RSS also come from the paired runs' sides
    every = summarize({**results, "runs": results.get("runs", []) + _paired_sides(results)})
    paired_only = not any(not r.get("alone") for r in results.get("runs", []))
    models = results.get("models", {})
    matmul = results.get("matmul") or []
    peak = max((m.get("best_gflops") or 0 for m in matmul), default=0) or None
    lines = [results["heading"], ""]
    command = results.get("command", "python3 -m bench")
    steps = results.get("steps", {})
    if paired_only and results.get("paired"):
        lines += [
            f"`{command}` — paired mode only: Danlu and "
            f"{results.get('baseline_label', 'the diffusers example script')} run at the same "
            "time, each pinned to its own CPU with 1 thread (see *Paired runs*); "
            + ", ".join(f"{models.get(k, {}).get('label', k)}: {n} steps per run"
                        for k, n in steps.items())
            + ". Ratios are Danlu / script: below 1 means Danlu is faster or smaller."
            + (f" Took {results['seconds'] / 60:.0f} min." if results.get("seconds") else ""),
            ""]
        if summary:
            lines += ["Runs without a script to pair with (1 thread, pinned):", "",
                      "| model | method | Danlu s/step (range over runs) | peak RSS (MiB) |",
                      "|---|---|---:|---:|"]
            for kind, method in _method_order(summary):
                d = summary[(kind, method)].get("danlu", {})
                lines.append(f"| {models.get(kind, {}).get('label', kind)} | "
                             f"{METHOD_LABELS.get(method, method)} | {_cell(d)} | "
                             f"{_mib(d.get('rss_last_step'))} |")
            lines.append("")
    else:
        lines += _ab_lines(results, summary, models, command, steps)
    lines += _rest_lines(results, summary, every, models, peak, matmul)
    return "\n".join(lines)


def _ab_lines(results, summary, models, command, steps) -> list[str]:
    lines = []
    lines.append(
        f"`{command}` — {results.get('rounds', '?')} rounds, Danlu and "
        f"{results.get('baseline_label', 'the diffusers example script')} alternating (A B, then B A, ...), each run in its own process; "
        + ", ".join(f"{models.get(k, {}).get('label', k)}: {n} steps per run"
                    for k, n in steps.items())
        + f"; seconds per step are the median of the steps after the first {results.get('warmup', WARMUP)} "
        "(the second step is the one whose FLOPs are counted), then the median over runs, with "
        "the range over runs in brackets. Ratios are Danlu / script (below 1: Danlu is faster "
        "or smaller), taken per round (the two runs of a round ran back to back), then the "
        "median over rounds. Other jobs on this 2-CPU machine come and go, so the "
        "fastest step of each side (the least disturbed one) and the CPU seconds per step "
        "(less sensitive to waiting, though OpenMP threads spin while they wait) are shown too; "
        "the FLOP counts below do not depend on the load at all." + (f" Took {results['seconds'] / 60:.0f} min." if results.get("seconds") else ""))
    lines.append("")

    # --- main table
    lines += ["| model | method | Danlu s/step | script s/step | ratio: median of the rounds' "
              "ratios (range) | "
              "target | fastest step Danlu / script (ratio) | CPU-s/step ratio | "
              "peak RSS Danlu / script (MiB) | RSS ratio | target |",
              "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for key in _method_order(summary):
        kind, method = key
        row = summary[key]
        d, b = row.get("danlu", {}), row.get("baseline", {})
        label = METHOD_LABELS.get(method, method)
        model = models.get(kind, {}).get("label", kind)
        if d.get("unavailable"):
            dtext = "not available yet"
        else:
            dtext = _cell(d)
        btext = "no baseline script" if method not in results.get("script_names", SCRIPT_NAMES) \
            else _cell(b)
        ratio = row.get("ratio")
        target = results.get("targets", SPEED_TARGETS).get(method)
        speed_ok = None if ratio is None or target is None else ratio <= target
        rss_ok = None if row.get("rss_ratio") is None else row["rss_ratio"] <= RSS_TARGET
        applies = kind in TARGET_KINDS
        ratio_text = (f"**{_ratio(ratio)}** ({_rng(row.get('ratio_range'), lambda v: f'{v:.2f}')})"
                      if ratio is not None else "—")
        target_text = (f"≤ {target}× {_verdict(speed_ok, applies)}" if target is not None
                       else "—")
        lines.append(
            f"| {model} | {label} | {dtext} | {btext} | {ratio_text} | {target_text} | "
            f"{_s(d.get('best'))} / {_s(b.get('best'))} ({_ratio(row.get('best_ratio'))}) | "
            f"{_ratio(row.get('cpu_ratio'))} | "
            f"{_mib(d.get('rss_last_step'))} / {_mib(b.get('rss_last_step'))} | "
            f"{_ratio(row.get('rss_ratio'))} | "
            f"{'≤ 1.0× ' + _verdict(rss_ok) if rss_ok is not None else '—'} |")
    lines.append("")
    listed = [f"{METHOD_LABELS.get(m, m)} on {k}: "
              + ", ".join(f"{r:.2f}" for r in summary[(k, m)]["round_ratios"])
              for k, m in _method_order(summary) if summary[(k, m)].get("round_ratios")]
    if listed:
        lines += ["Ratio of each round, in order: " + "; ".join(listed) + ".", ""]
    lines.append("Peak RSS is the process's peak (getrusage) when its last training step ended; "
                 "at process exit (after the final save; the LoRA script also reloads the whole "
                 "pipeline for a final inference, Danlu renders a preview in its first TI/HN run) "
                 "it is: " + "; ".join(
                     f"{METHOD_LABELS.get(m, m)} on {k}: {_mib(summary[(k, m)].get('danlu', {}).get('rss_exit'))}"
                     f" / {_mib(summary[(k, m)].get('baseline', {}).get('rss_exit'))} MiB"
                     for k, m in _method_order(summary)) + ".")
    lines.append("")
    return lines


def _rest_lines(results, summary, every, models, peak, matmul) -> list[str]:
    lines = []
    # --- paired runs
    paired = paired_summary(results)
    if paired:
        lines += ["### Paired runs (Danlu and the script at the same time)", "",
                  "Each pair runs both sides at once, each pinned to one CPU with 1 thread "
                  "(`taskset`, OMP_NUM_THREADS=1; the CPUs swap every pair), so a burst of other "
                  "load slows both alike. Only steps after the warm-up that ran while the other "
                  "side was also stepping count. Seconds per step are single-thread figures (stretched by other "
                  "load), not comparable with 2-thread ones; the ratio is what matters.", "",
                  "| model | method | pairs | Danlu s/step | script s/step | ratio (range over "
                  "pairs) | target | peak RSS Danlu / script (MiB) | RSS ratio |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|"]
        for key in _method_order(paired):
            entry = paired[key]
            kind, method = key
            if not entry["pairs"]:
                lines.append(f"| {models.get(kind, {}).get('label', kind)} | "
                             f"{METHOD_LABELS.get(method, method)} | 0 ({entry['failed']} failed) "
                             "| — | — | — | — | — | — |")
                continue
            target = results.get("targets", SPEED_TARGETS).get(method)
            ok = None if target is None else entry["ratio"] <= target
            count = str(len(entry["pairs"])) + (f" (+{entry['failed']} failed)" if entry["failed"] else "")
            lines.append(
                f"| {models.get(kind, {}).get('label', kind)} | {METHOD_LABELS.get(method, method)} | "
                f"{count} | "
                f"{_s(entry['danlu'])} | {_s(entry['baseline'])} | **{_ratio(entry['ratio'])}** "
                f"({_rng(entry['range'], lambda v: f'{v:.2f}')}) | "
                + (f"≤ {target}× {_verdict(ok, kind in TARGET_KINDS)}" if target else "—")
                + f" | {_mib(entry['rss_danlu'])} / {_mib(entry['rss_baseline'])} | "
                + (_ratio(entry["rss_danlu"] / entry["rss_baseline"])
                   if entry["rss_danlu"] and entry["rss_baseline"] else "—") + " |")
        lines.append("")

    # --- time to first step (A/B runs and both sides of paired runs)
    summary = every
    lines += ["### Time to first step", "",
              "| model | method | Danlu, first Train click in a running app | same, diffusers "
              "already imported | same, model already loaded | Danlu CLI from process start | "
              "script from process start | ratio (CLI) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in _method_order(summary):
        kind, method = key
        row = summary[key]
        d, b = row.get("danlu", {}), row.get("baseline", {})
        if not d or d.get("unavailable"):
            continue
        lines.append(f"| {models.get(kind, {}).get('label', kind)} | {METHOD_LABELS.get(method, method)} | "
                     f"{_s(d.get('ttfs_call'))} s | {_s(d.get('ttfs_warm_imports'))}"
                     f"{' s' if d.get('ttfs_warm_imports') else ''} | {_s(d.get('ttfs_cached'))}"
                     f"{' s' if d.get('ttfs_cached') else ''} | {_s(d.get('ttfs_spawn'))} s | "
                     f"{_s(b.get('ttfs_spawn')) + ' s' if b.get('ttfs_spawn') else '—'} | "
                     f"{_ratio(row.get('ttfs_ratio'))} |")
    lines.append("")
    tiny_ti = summary.get(("tiny", "textual_inversion"), {}).get("danlu", {})
    if tiny_ti.get("ttfs_call") is not None:
        call, cached = tiny_ti["ttfs_call"], tiny_ti.get("ttfs_cached")
        load, warm = tiny_ti.get("model_load"), tiny_ti.get("ttfs_warm_imports")
        verdict = "met" if call < TTFS_TARGET_S else "**not met**"
        text = (f"Target: Train click to first step under {TTFS_TARGET_S:.0f} s on the tiny model — "
                f"{verdict} for the first click in a fresh app ({_s(call)} s")
        if load is not None:
            text += f", of which {_s(load)} s is `load_model`"
        text += ")"
        if warm is not None:
            text += (f"; {'met' if warm < TTFS_TARGET_S else '**not met**'} when diffusers' "
                     f"pipeline code is already imported ({_s(warm)} s: the rest of the first click "
                     "is Python imports)")
        if cached is not None:
            text += (f"; {'met' if cached < TTFS_TARGET_S else '**not met**'} once the model is "
                     f"loaded ({_s(cached)} s, e.g. after *Create embedding* or a previous run)")
        lines += [text + ".", ""]
    loaded = [(method, row["danlu"]["ttfs_cached"], row["danlu"].get("ttfs_cached_cpu"))
              for (kind, method), row in ((key, summary[key]) for key in _method_order(summary))
              if kind == "tiny" and row.get("danlu", {}).get("ttfs_cached") is not None]
    if loaded:
        lines += ["Model already loaded (the median of three more Train clicks in the same "
                  "process; in brackets the CPU seconds those clicks took, which other load "
                  "does not stretch), target under 2 s: " + "; ".join(
                      f"{METHOD_LABELS.get(m, m)} {_s(v)} s"
                      + (f" ({_s(c)} CPU-s)" if c is not None else "")
                      + f" ({'met' if v < TTFS_TARGET_S else '**not met**'})"
                      for m, v, c in loaded) + ".", ""]

    # --- FLOPs and fraction of peak (paired runs count none)
    if peak and any(row.get(side, {}).get("flops") for row in summary.values()
                    for side in ("danlu", "baseline")):
        lines += ["### FLOPs per step and fraction of the CPU's matmul peak", "",
                  f"Peak: {peak:.0f} GFLOP/s (best of a 2048² fp32 matmul, "
                  f"{results.get('threads', 2)} threads; median under the run's load "
                  + ", ".join(f"{m['median_gflops']:.0f}" for m in matmul if m.get("median_gflops"))
                  + " GFLOP/s at start/end). FLOPs are counted with "
                  "`torch.utils.flop_counter.FlopCounterMode` (plus the CPU attention kernel, "
                  "which torch's table lacks) on the second step of each run.", "",
                  "| model | method | Danlu GFLOP/step | script GFLOP/step | Danlu % of peak "
                  "(fastest step) | script % of peak (fastest step) | where the script's extra "
                  "FLOPs go |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for key in _method_order(summary):
            kind, method = key
            row = summary[key]
            d, b = row.get("danlu", {}), row.get("baseline", {})

            def frac(side):
                if side and side.get("flops") and side.get("best"):
                    return f"{100 * side['flops'] / side['best'] / (peak * 1e9):.0f}%"
                return "—"
            if not d.get("flops") and not b.get("flops"):
                continue  # paired runs count no FLOPs
            extra = ""
            if b.get("flops_by_module"):
                mods = b["flops_by_module"]
                vae = sum(v for k, v in mods.items() if k in ("Encoder", "AutoencoderKL"))
                if vae:
                    extra = f"VAE encode {vae / 1e9:,.1f} GFLOP (Danlu caches latents)"
            lines.append(f"| {models.get(kind, {}).get('label', kind)} | {METHOD_LABELS.get(method, method)} | "
                         f"{_gflop(d.get('flops'))} | {_gflop(b.get('flops'))} | {frac(d)} | "
                         f"{frac(b)} | {extra} |")
        lines.append("")

    # --- UI overhead
    ui_paired = ui_paired_summary(results)
    ui = ui_summary(results.get("ui"))
    if ui_paired:
        first = next(p for p in results["ui_paired"] if ui_pair_overhead(p) is not None)
        lines += _ui_lines(ui_paired, first["page"], models, paired=True)
    elif ui:
        lines += _ui_lines(ui, results["ui"], models, paired=False)
    elif (results.get("ui") or {}).get("error"):
        lines += ["### UI overhead", "", f"Failed: {results['ui']['error']}", ""]
    elif results.get("ui_paired"):
        errors = [p[s].get("error") for p in results["ui_paired"] for s in ("cli", "page")
                  if p.get(s, {}).get("error")]
        lines += ["### UI overhead", "", f"Failed: {errors[0] if errors else 'no runs'}", ""]

    # --- previews
    previews = [(key, row["danlu"]) for key, row in summary.items()
                if row.get("danlu", {}).get("preview")]
    if previews:
        lines += ["### Preview cost", "",
                  "One preview (20 steps, Euler a, CFG 7, at the training size, through "
                  "`trainers.sampling.render`) rendered by the training loop after the last step "
                  "(every run on the tiny model, the first run on the SD1.5-shaped one):", "",
                  "| model | method | seconds per preview, median (range) | fastest | fastest, in "
                  "training steps (fastest step) |",
                  "|---|---|---:|---:|---:|"]
        ordered = _method_order([key for key, _ in previews])
        for key, d in sorted(previews, key=lambda item: ordered.index(item[0])):
            seconds = statistics.median(d["preview"])
            fastest = min(d["preview"])
            steps_equiv = fastest / d["best"] if d.get("best") else None
            lines.append(f"| {models.get(key[0], {}).get('label', key[0])} | "
                         f"{METHOD_LABELS.get(key[1], key[1])} | {_s(seconds)} "
                         f"({_rng(_range(d['preview']))}) | {_s(fastest)} | "
                         f"{_s(steps_equiv, 2) if steps_equiv else '—'} |")
        lines.append("")

    # --- missing / failed
    problems = []
    for method, why in (results.get("unavailable") or {}).items():
        problems.append(f"- {METHOD_LABELS.get(method, method)}: {why}")
    for key in _method_order(summary):
        for side in ("danlu", "baseline"):
            for error in summary[key].get(side, {}).get("errors", []):
                problems.append(f"- {side} {key[1]} on {key[0]} failed: `{error.splitlines()[0][:300]}`")
    if problems:
        lines += ["### Not measured", ""] + problems + [""]

    # --- notes, settings, machine
    if results.get("notes"):
        lines += ["### Settings and differences that cannot be removed", ""]
        lines += [f"- {note}" for note in results["notes"]]
        lines.append("")
    info = results.get("machine", {})
    versions = results.get("versions", {})
    source = results.get("baseline_source", {})
    lines += ["### Machine, versions, commands", ""]
    if info:
        lines.append(f"Machine: {info.get('nproc', '?')} CPUs ({info.get('cpu', '?')}), "
                     f"{info.get('memory', '?')} RAM, {info.get('os', '?')}; load average at the start "
                     f"{info.get('load_start', '?')}, at the end {info.get('load', '?')} (1/5/15 min; "
                     "other engineers' jobs share the CPU, so single runs vary a lot; the "
                     "alternation and the medians allow for it).")
    if versions:
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    if source:
        lines.append(f"Baseline scripts: {results.get('baseline_name', 'diffusers')} `{source.get('rev', '?')}` "
                     f"({str(source.get('commit', ''))[:12]}), {source.get('note', '')}; read from "
                     f"`{results.get('examples_dir', '$DANLU_DIFFUSERS_EXAMPLES')}`, never vendored.")
    if results.get("standin"):
        lines.append(results["standin"])
    lines.append("")
    for name, text in (results.get("commands") or {}).items():
        lines.append(f"- {name}: `{text}`")
    lines.append("")
    return lines


# ---------------------------------------------------------------- file

def write_section(path: Path, heading: str, text: str, before: str | None = "## Preprocess throughput") -> None:
    """Replace the `heading` section of `path` with `text`; a new one goes before `before`
    (or at the end). Other sections are kept byte for byte."""
    path = Path(path)
    current = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = current.splitlines(keepends=True)
    text = text.rstrip("\n") + "\n"
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    else:
        anchor = next((i for i, line in enumerate(lines) if before and line.strip() == before), None)
        if anchor is None:
            new = current.rstrip("\n") + "\n\n" + text
        else:
            new = "".join(lines[:anchor]).rstrip("\n") + "\n\n" + text + "\n" + "".join(lines[anchor:])
    path.write_text(new, encoding="utf-8")
