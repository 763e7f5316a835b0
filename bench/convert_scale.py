#!/usr/bin/env python3
"""Conversion at Llama-3.2-11B-Vision widths (or the 90B's, `--model 90b`): time and peak RAM
of `lvb export` and `lvb compile`, and what they extrapolate to for the full model.

What it does:

1. Writes a synthetic bfloat16 checkpoint with the real 11B widths (text hidden 4096,
   32 heads / 8 KV heads, intermediate 14336, vocab 128256; vision hidden 1280, 16 heads,
   intermediate 5120, 560-px tiles of 14-px patches, 4 tiles, projector 7680 -> 4096) but
   only --layers text layers (one of them cross-attention) and a short vision tower
   (--vision-layers local + --global-layers global). The model is never built in memory:
   names and shapes come from transformers' model on the meta device, tensors are drawn
   and written one shard (one layer) at a time (bench/common.py).
2. Runs `lvb export --seq S` and `lvb compile --quant int4 --seq S --check none --jobs J`,
   each as a subprocess. A sampler thread reads the whole process tree every 0.2 s
   (psutil): the sum of RSS (and, every 5th sample, the sum of PSS, which counts pages
   shared by the tool server's forked children once), and which net is being worked on
   (export: the exporter's `.NET.tmp-PID` folder; compile: the working directory of the
   tpu-mlir tool, `compile/NET/mlir-*` = model_transform, `compile/NET/<key>` = model_deploy).
3. Reads per-net seconds from export/manifest.json ("seconds") and the compile manifest
   (compile/<bmodel>.json, "seconds" = the net's transform and deploy; the transform's share
   comes from the sampler), prints a table per net, and extrapolates to the full model. lvb makes one
   net per layer (text and vision alike), so every net of the real 11B has the shape of
   a net measured here: the full model's time is, per net kind, the measured mean times
   the number of nets of that kind in the 11B's plan (lvb.contract.plan on the published
   config), and its peak RAM is the worst measured net's.

A run of the default stack that compiled (not --export-only, not --tiny) is recorded in
bench/results/convert_scale.json, an entry per model: the per-net figures, the extrapolation
and the settings. memory_plan.py, speculative.py and cluster_scale.py read it (common.conversion).

Everything is cached under --out: the checkpoint is reused when complete, lvb's own
caches make a rerun of export/compile resume where it stopped, and measured stages are
kept in OUT/results.json (use --remeasure STAGE to measure a stage again from scratch).
A guard kills the stage (this script's own child, by pid) when the machine's available
memory falls below --min-available, to protect other work on a shared machine.

No timed assertions: it prints figures and exits 0 (non-zero only if lvb fails).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, LVB, OUT, REPO, check_loads, checkpoint_complete, gb, geometry_of, geometry_tiny, machine, table  # noqa: E402
from common import latest_compile, record_result, run_paths, save_json, write_streaming_checkpoint  # noqa: E402

# ----------------------------------------------------------------------------- sampling


def available_memory() -> int:
    return psutil.virtual_memory().available


class TreeSampler(threading.Thread):
    """Samples a process tree's memory and which net it works on, every `interval` s."""

    def __init__(self, pid: int, work: Path, interval: float = 0.2, min_available: int = 0, csv_path: Path | None = None,
                 max_rss: int = 0):
        super().__init__(daemon=True)
        self.pid, self.work, self.interval, self.min_available = pid, work.resolve(), interval, min_available
        self.max_rss = max_rss  # stop the stage when its tree holds more (0: no limit)
        self.stop = threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.peak_rss_label = ""
        self.min_seen_available = available_memory()
        self.labels: dict[str, dict] = {}
        self.killed_for_memory = False
        self.samples = 0
        self.started = time.perf_counter()
        self._previous = 0.0
        self._held: list[tuple[float, int, int]] = []  # samples not yet known to belong to a net
        self._csv = open(csv_path, "w", newline="") if csv_path else None
        self._writer = csv.writer(self._csv) if self._csv else None
        if self._writer:
            self._writer.writerow(["t", "rss_sum", "pss_sum", "processes", "label", "mem_available"])

    def _label(self, procs) -> str:
        export_dir = self.work / "export"
        compile_dir = self.work / "compile"
        for p in procs:
            try:
                cwd = Path(p.cwd())
                name = p.name()
            except (psutil.Error, OSError):
                continue
            if name.startswith("model_tool"):
                return "combine"
            try:
                rel = cwd.relative_to(compile_dir)
            except ValueError:
                continue
            parts = rel.parts
            if len(parts) >= 2:
                # the transform runs in a scratch folder named after mlir-<key> (".mlir-<key>.tmp-…")
                phase = "transform" if parts[1].lstrip(".").startswith("mlir-") else "deploy"
                return f"{phase}:{parts[0]}"
        try:
            for entry in os.scandir(export_dir):
                if entry.name.startswith(".") and ".tmp-" in entry.name:
                    return "export:" + entry.name[1:].split(".tmp-")[0]
        except OSError:
            pass
        return "other"

    def _charge(self, label: str, now: float, rss: int, pss: int) -> None:
        """Book a sample. Between two nets the exporter builds the next net's module from the
        checkpoint and runs PyTorch on it before that net's scratch folder exists, so an
        unlabelled sample is held and booked to the export net whose folder appears next."""
        if label == "other":
            self._held.append((now, rss, pss))
            return
        owner = label if label.startswith("export:") else "other"
        for sample in self._held:
            self._book(owner, *sample)
        self._held = []
        self._book(label, now, rss, pss)

    def _book(self, label: str, now: float, rss: int, pss: int) -> None:
        entry = self.labels.setdefault(label, {"first": now, "last": now, "samples": 0, "peak_rss": 0, "peak_pss": 0,
                                               "busy": 0.0})
        entry["busy"] += now - self._previous  # time since the previous sample, charged to what runs now
        self._previous = now
        entry["last"] = now
        entry["samples"] += 1
        entry["peak_rss"] = max(entry["peak_rss"], rss)
        entry["peak_pss"] = max(entry["peak_pss"], pss)
        if rss >= self.peak_rss:
            self.peak_rss_label = label

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            rss = pss = 0
            with_pss = self.samples % 5 == 0
            for p in procs:
                try:
                    if with_pss:
                        info = p.memory_full_info()
                        rss += info.rss
                        pss += info.pss
                    else:
                        rss += p.memory_info().rss
                except psutil.Error:
                    pass
            label = self._label(procs)
            now = time.perf_counter() - self.started
            avail = available_memory()
            self.min_seen_available = min(self.min_seen_available, avail)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self._charge(label, now, rss, pss)
            if self._writer:
                self._writer.writerow([f"{now:.2f}", rss, pss if with_pss else "", len(procs), label, avail])
            self.samples += 1
            low = self.min_available and avail < self.min_available
            over = self.max_rss and rss > self.max_rss
            if (low or over) and not self.killed_for_memory:
                self.killed_for_memory = True
                why = (f"available memory {gb(avail)} < {gb(self.min_available)}" if low
                       else f"the stage holds {gb(rss)} > {gb(self.max_rss)}")
                print(f"\n!! {why}: stopping the stage (pid {self.pid})", flush=True)
                kill_tree(procs)
            self.stop.wait(self.interval)
        for sample in self._held:  # after the last net
            self._book("other", *sample)
        if self._csv:
            self._csv.close()


def kill_tree(procs) -> None:
    for p in procs[::-1]:  # this stage's own processes, by pid, children first
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def run_measured(name: str, argv: list[str], work: Path, out: Path, min_available: int, cwd: Path = REPO,
                 max_rss: int = 0, max_seconds: float = 0) -> dict:
    """Run one lvb stage in its own process group, sampling its tree; returns the measurement.
    The stage is stopped when the machine runs low, or past max_rss bytes or max_seconds (0: no limit)."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    print(f"\n$ {' '.join(map(str, argv))}\n  (log: {log}; memory samples: {logs / (name + '.csv')})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
                                   env=dict(os.environ, COLUMNS="120"))
        sampler = TreeSampler(process.pid, work, min_available=min_available, csv_path=logs / f"{name}.csv", max_rss=max_rss)
        sampler.start()
        last_report = started
        timed_out = False
        while process.poll() is None:
            time.sleep(1)
            if max_seconds and time.perf_counter() - started > max_seconds and not timed_out:
                timed_out = True
                print(f"\n!! {name} runs past {max_seconds:.0f} s: stopping it (pid {process.pid})", flush=True)
                try:
                    kill_tree([psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)])
                except psutil.Error:
                    pass
            if time.perf_counter() - last_report > 60:
                last_report = time.perf_counter()
                current = max(sampler.labels.items(), key=lambda kv: kv[1]["last"], default=("", {}))[0]
                print(f"  {name}: {last_report - started:6.0f} s, peak RSS so far {gb(sampler.peak_rss)}, now: {current}",
                      flush=True)
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    result = {
        "argv": [str(a) for a in argv],
        "exit_code": process.returncode,
        "wall_seconds": round(wall, 1),
        "peak_rss_sum": sampler.peak_rss,
        "peak_rss_during": sampler.peak_rss_label,
        "peak_pss_sum": sampler.peak_pss,
        "min_mem_available": sampler.min_seen_available,
        "killed_for_memory": sampler.killed_for_memory,
        "timed_out": timed_out,
        "samples": sampler.samples,
        "labels": {k: {**v, "seconds": round(v["busy"], 1)} for k, v in sampler.labels.items()},
    }
    status = "ok" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
    print(f"  {name}: {status} in {wall:.0f} s, peak RSS of the tree {gb(sampler.peak_rss)} "
          f"(during {sampler.peak_rss_label}), peak PSS {gb(sampler.peak_pss)}", flush=True)
    if process.returncode != 0:
        print("  last lines of the log:\n    " + "\n    ".join(log.read_text(errors="replace").splitlines()[-15:]))
    return result


# ----------------------------------------------------------------------------- analysis

STAGES = ("export_peak_rss", "transform_peak_rss", "deploy_peak_rss")
# Kinds whose weights the combined bmodel holds once per layer (block_i and block_cache_i
# share theirs, embed and embed_cache share the table, so only one of each pair counts).
WEIGHT_KINDS = ("vision_layer", "vision_global", "cross_kv", "self_prefill", "cross_prefill")


# Published bf16 checkpoint sizes (11B: 10.6 B parameters, 90B: 88.8 B), and each issue's RAM goal.
FULL_CHECKPOINT_BYTES = {"11b": 21.3e9, "90b": 177.6e9}
RAM_TARGET = {"11b": 16e9, "90b": 20e9}


def full_counts(model: str, seq: int, chunk: int) -> dict[str, int]:
    """Nets of each kind in the real model's plan, from its published config."""
    from lvb.contract import plan
    from lvb.spec import ModelSpec

    counts: dict[str, int] = {}
    for net in plan(ModelSpec.from_config(json.loads(CONFIGS[model].read_text())), seq, chunk):
        counts[net.kind.value] = counts.get(net.kind.value, 0) + 1
    return counts


def onnx_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != "check.npz")


def analyse(results: dict, work: Path, args) -> dict:
    """Per-net figures, and the full 11B: every net of the 11B has the shape of a measured
    net of its kind, so its time is (mean seconds of the kind) x (nets of the kind in the
    11B) and its peak RAM is the measured peak of the kind."""
    nets = json.loads((work / "export" / "manifest.json").read_text())["nets"]
    compile_manifest = latest_compile(work, quant="int4")
    export_labels = results.get("export", {}).get("labels", {})
    compile_labels = results.get("compile_int4", {}).get("labels", {})

    per_net = []
    for name, entry in nets.items():
        c = compile_manifest.get("nets", {}).get(name, {})
        folder = work / "export" / name
        transform_s = compile_labels.get(f"transform:{name}", {}).get("seconds", 0.0)
        per_net.append({
            "net": name,
            "kind": entry["kind"],
            "onnx_bytes": onnx_bytes(folder) if folder.is_dir() else 0,
            "export_s": entry.get("seconds", 0.0),
            "export_peak_rss": export_labels.get(f"export:{name}", {}).get("peak_rss", 0),
            "transform_s": transform_s,
            "transform_peak_rss": compile_labels.get(f"transform:{name}", {}).get("peak_rss", 0),
            # the manifest's seconds are the net's whole build: its transform (unless cached) and deploy
            "deploy_s": max(0.0, c.get("seconds", 0.0) - transform_s),
            "deploy_peak_rss": compile_labels.get(f"deploy:{name}", {}).get("peak_rss", 0),
            "options": c.get("options", []),
            "bmodel_bytes": (work / c["bmodel"]).stat().st_size if c.get("bmodel") and (work / c["bmodel"]).is_file() else 0,
        })
    kinds: dict[str, list[dict]] = {}
    for row in per_net:
        kinds.setdefault(row["kind"], []).append(row)
    counts = full_counts(args.model, args.seq, args.chunk)

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    by_kind = {}
    for kind, rows in kinds.items():
        n_full = counts.get(kind, 0)
        by_kind[kind] = {
            "measured_nets": len(rows),
            "full_nets": n_full,
            "export_s": mean(rows, "export_s") * n_full,
            "compile_s": (mean(rows, "transform_s") + mean(rows, "deploy_s")) * n_full,
            **{stage: max(r[stage] for r in rows) for stage in STAGES},
        }
    missing = sorted(set(counts) - set(kinds))
    export = results.get("export", {})
    compiled = results.get("compile_int4", {})
    combine_s = compile_labels.get("combine", {}).get("seconds", 0.0)
    # Outside the nets: process start and imports (constant), the exporter's content digest
    # of every tensor (grows with the checkpoint's bytes), the combine (grows with the bmodel).
    digest_rate_ = results.get("digest_bytes_per_s") or 1e9
    digest_s = results.get("checkpoint", {}).get("bytes", 0) / digest_rate_
    digest_full_s = args.full_checkpoint_bytes / digest_rate_
    export_overhead = max(0.0, export.get("wall_seconds", 0.0) - sum(r["export_s"] for r in per_net) - digest_s)
    compile_overhead = max(0.0, compiled.get("wall_seconds", 0.0)
                           - sum(r["transform_s"] + r["deploy_s"] for r in per_net) - combine_s)
    combined = work / compile_manifest["bmodel"] if compile_manifest.get("bmodel") else None
    bmodel_measured = combined.stat().st_size if combined and combined.is_file() else sum(r["bmodel_bytes"] for r in per_net)
    bmodel_full = bmodel_measured + sum((by_kind[k]["full_nets"] - by_kind[k]["measured_nets"]) * mean(kinds[k], "bmodel_bytes")
                                        for k in WEIGHT_KINDS if k in kinds)
    combine_full_s = combine_s * (bmodel_full / bmodel_measured if bmodel_measured else 1.0)
    return {
        "per_net": per_net,
        "by_kind": by_kind,
        "missing_kinds": missing,
        "export_overhead_s": export_overhead,
        "compile_overhead_s": compile_overhead,
        "digest_s": digest_s,
        "digest_full_s": digest_full_s,
        "combine_s": combine_s,
        "combine_full_s": combine_full_s,
        "bmodel_bytes": bmodel_measured,
        "bmodel_full_bytes": bmodel_full,
        "full_export_s": sum(e["export_s"] for e in by_kind.values()) + export_overhead + digest_full_s,
        "full_compile_s": sum(e["compile_s"] for e in by_kind.values()) + compile_overhead + combine_full_s,
        "full_peak": {stage: max(e[stage] for e in by_kind.values()) for stage in STAGES},
        "bmodel": compile_manifest.get("bmodel"),
    }


def digest_rate(checkpoint: Path) -> float:
    """Bytes per second of lvb's weight digest (blake2b over mapped safetensors) on this machine."""
    from lvb.export.weights import _File

    files = sorted(checkpoint.glob("model-*.safetensors"), key=lambda p: p.stat().st_size)
    target = files[len(files) // 2]  # a mid-sized shard: one text layer at 11B widths
    started = time.perf_counter()
    _File(target).digests()
    return target.stat().st_size / max(1e-6, time.perf_counter() - started)


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def report(results: dict, analysis: dict, geometry, args) -> None:
    m = results["machine"]
    print("\n" + "=" * 100)
    print(f"machine: {m['cpu']}, {m['cores']} cores, {gb(m['ram_bytes'])} RAM")
    ck = results.get("checkpoint", {})
    print(f"checkpoint: {geometry.name}: {geometry.text_layers} text layers (cross at {list(geometry.cross_layers)}), "
          f"vision {geometry.vision_layers}+{geometry.global_layers} layers, {ck.get('parameters', 0) / 1e9:.2f} B parameters, "
          f"{gb(ck.get('bytes', 0))} bf16 in {ck.get('shards', '?')} shards")
    rows = []
    for stage, label in (("checkpoint", "write checkpoint (bench/common.py)"),
                         ("export", f"lvb export --seq {args.seq} --chunk {args.chunk}"),
                         ("compile_int4", f"lvb compile --quant int4 --seq {args.seq} --check none --jobs {args.jobs}")):
        r = results.get(stage)
        if not r:
            continue
        if r.get("killed_for_memory"):
            label += " -- STOPPED by the memory guard"
        elif r.get("exit_code") not in (0, None):
            label += f" -- FAILED (exit {r['exit_code']})"
        rows.append([label, hms(r.get("wall_seconds", r.get("seconds", 0))), gb(r.get("peak_rss_sum", 0)),
                     gb(r.get("peak_pss_sum", 0)) if r.get("peak_pss_sum") else "-", r.get("peak_rss_during", "-")])
    print("\nMeasured (this checkpoint):")
    print(table(rows, ["stage", "wall", "peak RSS (tree)", "peak PSS (tree)", "peak during"]))

    rows = [[r["net"], r["kind"], gb(r["onnx_bytes"]), f"{r['export_s']:.1f}", gb(r["export_peak_rss"]),
             f"{r['transform_s']:.1f}", gb(r["transform_peak_rss"]), f"{r['deploy_s']:.1f}", gb(r["deploy_peak_rss"]),
             " ".join(r["options"]) or "-"] for r in analysis["per_net"]]
    print("\nPer net (export s from export/manifest.json; deploy s: the compile manifest's less the transform; transform s and peaks from sampling):")
    print(table(rows, ["net", "kind", "onnx", "export s", "export peak", "transform s", "transform peak", "deploy s",
                       "deploy peak", "deploy options"]))

    rows = [[kind, e["measured_nets"], e["full_nets"], hms(e["export_s"]), hms(e["compile_s"]), gb(e["export_peak_rss"]),
             gb(e["transform_peak_rss"]), gb(e["deploy_peak_rss"])] for kind, e in analysis["by_kind"].items()]
    rows.append(["start-up and imports (constant)", "", "", hms(analysis["export_overhead_s"]), hms(analysis["compile_overhead_s"]),
                 "", "", ""])
    rows.append(["export: digest of every tensor (x checkpoint bytes); compile: combine (x bmodel bytes)", "", "",
                 f"{hms(analysis['digest_s'])} -> {hms(analysis['digest_full_s'])}",
                 f"{hms(analysis['combine_s'])} -> {hms(analysis['combine_full_s'])}", "", "", ""])
    peak = analysis["full_peak"]
    rows.append([f"TOTAL full {args.model.upper()}", "", "", hms(analysis["full_export_s"]), hms(analysis["full_compile_s"]),
                 gb(peak["export_peak_rss"]), gb(peak["transform_peak_rss"]), gb(peak["deploy_peak_rss"])])
    print(f"\nExtrapolated to the full {args.model.upper()} (its plan from {CONFIGS[args.model].name}; every net has the shape of a measured net of "
          f"its kind), jobs={args.jobs}:")
    print(table(rows, ["net kind", "measured nets", f"nets in {args.model.upper()}", "export", "compile (transform+deploy)", "export peak",
                       "transform peak", "deploy peak"]))
    if analysis["missing_kinds"]:
        print(f"  not measured here (so not in the totals): {', '.join(analysis['missing_kinds'])}")
    total = analysis["full_export_s"] + analysis["full_compile_s"]
    worst = max(peak.values())
    print(f"  => whole {args.model.upper()} conversion (export + int4 compile, no simulator check): about {hms(total)} on this machine, "
          f"peak RAM {gb(worst)} ({'within' if worst < RAM_TARGET[args.model] else 'OVER'} the {gb(RAM_TARGET[args.model])} target; "
          "Sophgo's guide asks for 40-64 GB for the 11B)")
    print(f"  bmodel: {gb(analysis['bmodel_bytes'])} combined here; the {args.model.upper()}'s int4 bmodel: about {gb(analysis['bmodel_full_bytes'])}")


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="11b", help="whose widths (tests/data/llama-3.2-*-vision.config.json)")
    parser.add_argument("--layers", type=int, default=3, help="text layers (one cross-attention layer among them)")
    parser.add_argument("--vision-layers", type=int, default=2, help="local vision layers")
    parser.add_argument("--global-layers", type=int, default=1, help="global vision layers")
    parser.add_argument("--seq", type=int, default=512, help="compiled sequence (KV-cache slots)")
    parser.add_argument("--chunk", type=int, default=128, help="prefill chunk")
    parser.add_argument("--max-tiles", type=int, default=None, help="tiles per picture (default: the model's; fewer shortens the vision sequence)")
    parser.add_argument("--tile", type=int, default=None, help="pixels per tile (default: the model's; fewer shortens the vision sequence)")
    parser.add_argument("--jobs", type=int, default=1, help="lvb compile --jobs (1: one heavy tool at a time)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the checkpoint, the work dir and the results")
    parser.add_argument("--tiny", action="store_true", help="a small geometry of the same structure (tries the script in a minute)")
    parser.add_argument("--remeasure", action="append", default=[], choices=["checkpoint", "export", "compile_int4"],
                        help="measure this stage again from scratch (deletes its cached output)")
    parser.add_argument("--export-only", action="store_true",
                        help="stop after the export (the compile's ~10 GB peak wants a machine of its own)")
    parser.add_argument("--min-available", type=float, default=1.5,
                        help="GB of MemAvailable below which a stage is stopped (protects a shared machine)")
    parser.add_argument("--full-checkpoint-bytes", type=float, default=None,
                        help="bytes of the real checkpoint (bf16; default: the published size), to scale fixed per-byte costs")
    args = parser.parse_args()
    args.full_checkpoint_bytes = args.full_checkpoint_bytes or FULL_CHECKPOINT_BYTES[args.model]

    geometry = (geometry_tiny(args.layers, args.vision_layers, args.global_layers) if args.tiny
                else geometry_of(args.model, args.layers, args.vision_layers, args.global_layers, max_tiles=args.max_tiles, tile=args.tile))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint, work, results_path = run_paths(out, geometry, args.seq, args.chunk, "results")
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["machine"] = machine()
    min_available = int(args.min_available * 1e9)

    def save():
        save_json(results_path, results)

    def measure(stage: str, argv: list, resumed: bool) -> int:
        """Run and record one lvb stage; its exit code (a failed stage is measured again next run)."""
        results[stage] = run_measured(stage, argv, work, out, min_available) | {"resumed": resumed}
        save()
        return results[stage]["exit_code"]

    # 1. checkpoint
    if "checkpoint" in args.remeasure:
        shutil.rmtree(checkpoint, ignore_errors=True)
        results.pop("checkpoint", None)
    if not checkpoint_complete(checkpoint) or "checkpoint" not in results:
        print(f"writing {checkpoint} ...", flush=True)
        before = psutil.Process().memory_info().rss
        import resource

        wrote = write_streaming_checkpoint(checkpoint, geometry)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results["checkpoint"] = {**wrote, "peak_rss_sum": peak, "rss_before": before}
        print(f"  wrote {gb(wrote['bytes'])} in {wrote['shards']} shards in {wrote['seconds']} s, peak RSS {gb(peak)}")
    else:
        print(f"reusing {checkpoint}")
    if "digest_bytes_per_s" not in results:
        results["digest_bytes_per_s"] = digest_rate(checkpoint)
    loaded = check_loads(checkpoint)
    results["checkpoint"]["parameters"] = loaded["parameters"]
    results["geometry"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(geometry).items()}
    save()

    # 2. export
    if "export" in args.remeasure:
        shutil.rmtree(work / "export", ignore_errors=True)
        results.pop("export", None)
    if "export" not in results or results["export"].get("exit_code") != 0:
        code = measure("export", [LVB, "export", "--model", checkpoint, "--out", work, "--seq", str(args.seq), "--chunk",
                                  str(args.chunk)], resumed=(work / "export" / "manifest.json").is_file())
        if code != 0:
            return code or 1
    else:
        print(f"export: measured before ({results['export']['wall_seconds']} s); --remeasure export to redo")

    # 3. compile int4, exactly as lvb does it
    if args.export_only:
        results.pop("compile_int4", None)  # a compile of an earlier export would not describe this one
    compile_cmd = [LVB, "compile", "--work", work, "--quant", "int4", "--seq", str(args.seq), "--check", "none", "--jobs", str(args.jobs)]
    if "compile_int4" in args.remeasure:
        shutil.rmtree(work / "compile", ignore_errors=True)
        results.pop("compile_int4", None)
    if args.export_only:
        print("lvb compile: not run (--export-only)")
    elif "compile_int4" not in results or results["compile_int4"].get("exit_code") != 0:
        code = measure("compile_int4", compile_cmd, resumed=any((work / "compile").glob("*/*/result.json")))
        if code != 0:
            return code or 1
    else:
        print(f"lvb compile: measured before ({results['compile_int4']['wall_seconds']} s); --remeasure compile_int4 to redo")

    analysis = analyse(results, work, args)
    results["analysis"] = analysis
    results["work"] = str(work)
    results["checkpoint_dir"] = str(checkpoint)
    save()
    report(results, analysis, geometry, args)
    # One recorded run per model: the default stack's (a smaller or larger one is for a question of its own).
    shape = ("layers", "vision_layers", "global_layers", "seq", "chunk", "max_tiles", "tile")
    if args.tiny or any(getattr(args, k) != parser.get_default(k) for k in shape):
        print("not recorded in bench/results: only the default stack of each model is")
    elif "compile_int4" in results:
        stages = {stage: {k: results[stage].get(k) for k in ("wall_seconds", "peak_rss_sum", "peak_pss_sum", "peak_rss_during",
                                                             "resumed", "seconds")}
                  for stage in ("checkpoint", "export", "compile_int4")}
        path = record_result("convert_scale", {
            "settings": {"model": args.model, "layers": args.layers, "vision_layers": args.vision_layers,
                         "global_layers": args.global_layers, "seq": args.seq, "chunk": args.chunk, "jobs": args.jobs,
                         "max_tiles": args.max_tiles, "tile": args.tile},
            "work": work.name, "parameters": results["checkpoint"]["parameters"], "checkpoint_bytes": results["checkpoint"]["bytes"],
            "digest_bytes_per_s": results["digest_bytes_per_s"], "stages": stages,
            **{k: v for k, v in analysis.items() if k != "bmodel"}}, label=args.model)
        print(f"recorded: {path}")
    if any(results[s].get("resumed") for s in ("export", "compile_int4") if s in results):
        print("\nnote: a stage resumed an interrupted run, so its wall time covers only the remainder; "
              "per-net figures come from the manifests and are complete.")
    print(f"\nresults: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
