#!/usr/bin/env python3
"""`lvb compile --cluster`: what Ray costs per job, and what the 11B and 90B compiles take
on N nodes of this machine's size.

What it does:

1. Starts a Ray cluster of two CPU-limited nodes on loopback (ray.cluster_utils.Cluster,
   as tests/test_cluster.py does) and connects to it.
2. Measures, on the node that is not the driver's:
   - an empty task (num_cpus=1 and a memory requirement, like a compile job): the median
     round trip of --repeat sequential tasks, i.e. Ray's scheduling cost per job;
   - lvb's own transfer path (lvb.compile.cluster) for a net of realistic size, an 11B
     decoder layer's ONNX + weights (0.87 GB of random bytes): the driver puts it into the
     object store in pieces, the task writes it into a node-local folder and writes a
     result of that net's INT4 bmodel size, and the driver reads that back piece by piece.
     Cold and alone, stage by stage: upload, pull (Ray moving the pieces to the node),
     the node writing them, fetch; their rates bound what the command's machine can feed.
   - the same net sent while the node's only CPU runs another job, as in a compile (lvb
     keeps one job queued per node): Ray pulls the pieces before the queued task takes the
     CPU, so what the node's CPU spends per job is the gap between the two jobs plus
     writing the pieces to disk. That is the per-job overhead.
3. Projects the compile of the full 11B and 90B on N nodes: the jobs of each model's
   plan (lvb.contract.plan on tests/data/*.config.json), each lasting its kind's measured
   transform + deploy seconds at 11B widths (convert_scale.py's, bench/results/convert_scale.json),
   scaled by the net's weight bytes for the 90B's
   wider text layers, plus the measured overhead for its bytes. List scheduling, longest
   job first, on nodes of this machine's cores and Ray memory resource, each job asking
   for lvb's memory requirement (its kind's measured peak, Kind.policy.peak); then the start-up
   and combine where the command runs (convert_scale.py's, scaled by the bmodel's bytes). The
   critical path (the longest job) bounds it from below.

No timed assertions: it prints figures and a table, records them in bench/results/cluster_scale.json,
and exits 0.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, conversion, gb, machine, record_result, table  # noqa: E402

GiB = 1 << 30
DECODER = {"self_prefill", "self_decode", "cross_prefill", "cross_decode", "cross_kv"}


# ----------------------------------------------------------------------------- the plans


def plan_counts(config: Path, seq: int, chunk: int) -> dict[str, int]:
    from lvb.contract import plan
    from lvb.spec import ModelSpec

    counts: dict[str, int] = {}
    for net in plan(ModelSpec.from_config(json.loads(config.read_text())), seq, chunk):
        counts[net.kind.value] = counts.get(net.kind.value, 0) + 1
    return counts


def matmul_weights(config: Path) -> dict[str, float]:
    """Matmul weights per text net kind (the bulk of each net's bytes), from the config."""
    t = json.loads(config.read_text())["text_config"]
    h, inter, kv = t["hidden_size"], t["intermediate_size"], t["num_key_value_heads"]
    kv_dim = kv * h // t["num_attention_heads"]
    mlp = 3 * h * inter
    return {"self_prefill": 2 * h * h + 2 * h * kv_dim + mlp, "self_decode": 2 * h * h + 2 * h * kv_dim + mlp,
            "cross_prefill": 2 * h * h + mlp, "cross_decode": 2 * h * h + mlp, "cross_kv": 2 * h * kv_dim,
            "embed": t["vocab_size"] * h, "embed_cache": t["vocab_size"] * h, "lm_head": t["vocab_size"] * h}


def per_kind(measured: dict, config: Path, base: Path) -> dict[str, dict]:
    """Seconds and bytes per net kind for the model of `config`: the 11B's measured figures,
    text kinds scaled by their weights against the 11B's (the vision tower is the same)."""
    wide, narrow = matmul_weights(config), matmul_weights(base)
    kinds = {}
    for kind, (transform_s, deploy_s, onnx) in measured.items():
        scale = wide[kind] / narrow[kind] if kind in wide else 1.0
        bits = 4.5 if kind in DECODER else 16  # W4BF16 with a bf16 scale and zero per 64; bf16 elsewhere
        kinds[kind] = {"seconds": (transform_s + deploy_s) * scale, "onnx": onnx * scale, "bmodel": onnx * scale * bits / 32,
                       "scale": scale}
    return kinds


def measured_from_convert_scale() -> tuple[dict, float, str]:
    """Per net kind at 11B widths, from convert_scale.py's recorded run: mean transform s, mean
    deploy s, ONNX + weight bytes; and the start-up and combine of the whole 11B's compile."""
    run = conversion("11b")
    rows: dict[str, list] = {}
    for r in run["per_net"]:
        rows.setdefault(r["kind"], []).append(r)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    serial = run["compile_overhead_s"] + run["combine_full_s"]
    return ({k: (mean(rs, "transform_s"), mean(rs, "deploy_s"), mean(rs, "onnx_bytes")) for k, rs in rows.items()}, serial,
            f"bench/results/convert_scale.json (convert_scale.py, {run['date'][:10]})")


# ----------------------------------------------------------------------------- scheduling


def schedule(jobs: list[tuple[float, int]], nodes: int, cpus: int, memory: float) -> float:
    """Makespan of list scheduling, longest job first: a job starts on the first node with
    a free CPU and enough Ray memory left, as soon as one frees up."""
    queue = sorted(jobs, key=lambda j: -j[0])
    free_cpu, free_mem = [cpus] * nodes, [memory] * nodes
    running: list[tuple[float, int, int]] = []  # (end, node, memory)
    now = 0.0
    while queue or running:
        started = True
        while started and queue:
            started = False
            for i, (seconds, need) in enumerate(queue):
                node = next((n for n in range(nodes) if free_cpu[n] and free_mem[n] >= need), None)
                if node is not None:
                    free_cpu[node] -= 1
                    free_mem[node] -= need
                    heapq.heappush(running, (now + seconds, node, need))
                    queue.pop(i)
                    started = True
                    break
        if not running:
            raise ValueError("a job needs more memory than a node has")
        now, node, need = heapq.heappop(running)
        free_cpu[node] += 1
        free_mem[node] += need
    return now


# ----------------------------------------------------------------------------- measuring


def echo(layout, result_bytes: int, *pieces):
    """On a node: receive the pieces into a scratch folder as a compile job does, write a
    result of the job's bmodel size; returns where it is for the driver to fetch."""
    import ray

    from lvb.compile.cluster import receive

    scratch = Path(tempfile.mkdtemp(prefix="lvb-bench-"))
    began = time.time()
    started = time.perf_counter()
    receive(layout, pieces, scratch)
    received = time.perf_counter() - started
    result = scratch / "result.bin"
    with open(result, "wb") as f:
        for _ in range(0, result_bytes, 1 << 20):
            f.write(os.urandom(min(1 << 20, result_bytes - f.tell())))
    return ray.get_runtime_context().get_node_id(), str(result), received, began


def busy(seconds: float) -> float:
    """A job already running on the node: holds its CPU, returns when it ended."""
    time.sleep(seconds)
    return time.time()


def measure(args) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from lvb.compile.cluster import ClusterSettings, RayExecutor
    from lvb.contract import Kind

    node = {"num_cpus": 1, "object_store_memory": args.object_store_mb << 20, "memory": 4 * GiB}
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    worker = cluster.add_node(**node)
    cluster.wait_for_nodes()
    startup = time.perf_counter() - started
    executor = RayExecutor(ClusterSettings(cluster.address))
    try:
        other = NodeAffinitySchedulingStrategy(worker.node_id, soft=False)
        need = Kind.GREEDY_HEAD.policy.peak.need(0)
        noop = ray.remote(num_cpus=1, memory=need)(lambda: None)
        ray.get(noop.options(scheduling_strategy=other).remote())  # a warm worker, as in a long compile
        empty = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            ray.get(noop.options(scheduling_strategy=other).remote())
            empty.append(time.perf_counter() - t)

        net_bytes, result_bytes = int(args.net_gb * 1e9), int(args.net_gb * 1e9 * 4.5 / 32)
        source = Path(tempfile.mkdtemp(prefix="lvb-bench-")) / "net.onnx.weights"
        with open(source, "wb") as f:
            for _ in range(0, net_bytes, 64 << 20):
                f.write(os.urandom(min(64 << 20, net_bytes - f.tell())))
        remote_echo = ray.remote(num_cpus=1, memory=need)(echo)
        moves, parts = [], []
        for _ in range(args.transfers):
            t = time.perf_counter()
            pieces = executor.upload(source)
            uploaded = time.perf_counter()
            node_id, path, received, _ = ray.get(remote_echo.options(scheduling_strategy=other).remote(
                [(source.name, len(pieces))], result_bytes, *pieces))
            ran = time.perf_counter()
            del pieces
            with open(source.with_suffix(".back"), "wb") as out:
                executor.fetch(node_id, path, result_bytes, out)
            executor.discard(node_id, path)
            moves.append(time.perf_counter() - t)
            parts.append({"upload": uploaded - t, "receive": received, "task": ran - uploaded, "fetch": time.perf_counter() - ran})
        # Pipelined, as in a compile: the net is sent while the node's CPU runs another job; the
        # node's cost is the gap between that job's end and this one's start, and the writing.
        held = ray.remote(num_cpus=1, memory=need)(busy)
        gaps, receives = [], []
        for _ in range(args.transfers):
            before = held.options(scheduling_strategy=other).remote(args.busy)
            pieces = executor.upload(source)
            after = remote_echo.options(scheduling_strategy=other).remote([(source.name, len(pieces))], 0, *pieces)
            ended = ray.get(before)
            node_id, path, received, began = ray.get(after)
            del pieces
            executor.discard(node_id, path)
            gaps.append(began - ended)
            receives.append(received)
        source.unlink()
        source.with_suffix(".back").unlink()
    finally:
        executor.close()
        cluster.shutdown()
    part = lambda name: statistics.median(p[name] for p in parts)  # noqa: E731
    rates = {"upload": net_bytes / part("upload"),
             "pull": net_bytes / max(1e-6, part("task") - part("receive") - statistics.median(empty)),
             "fetch": result_bytes / part("fetch")}
    return {"startup_s": startup, "empty_s": statistics.median(empty), "empty_all": empty, "rates": rates,
            "move_s": statistics.median(moves), "moves": moves, "parts": parts,
            "gap_s": statistics.median(gaps), "gaps": gaps, "receive_s": statistics.median(receives),
            "slot_s": statistics.median(g + r for g, r in zip(gaps, receives)), "net_bytes": net_bytes, "result_bytes": result_bytes,
            "bandwidth": (net_bytes + result_bytes) / statistics.median(moves)}


# ----------------------------------------------------------------------------- report


def project(name: str, config: Path, measured: dict, serial_11b: float, m: dict, nodes_list, cpus: int, node_memory: float,
            seq: int, chunk: int) -> tuple[list, dict]:
    from lvb.contract import Kind

    base = REPO / "tests" / "data" / "llama-3.2-11b-vision.config.json"
    kinds = per_kind(measured, config, base)
    counts = plan_counts(config, seq, chunk)
    jobs, overheads, work = [], [], []
    out = back = 0.0
    for kind, count in counts.items():
        k = kinds[kind]
        # What a node's CPU spends per job beyond the tools: the gap after the previous job and
        # writing the pieces to its disk (measured for an 11B decoder net, scaled by bytes).
        overhead = m["gap_s"] + m["receive_s"] * k["onnx"] / m["net_bytes"]
        need = Kind(kind).policy.peak.need(int(k["onnx"]))
        jobs += [(k["seconds"] + overhead, need)] * count
        out += k["onnx"] * count
        back += k["bmodel"] * count
        overheads += [overhead] * count
        work += [k["seconds"]] * count
    # The command's machine puts every net into its object store, serves it to a node and
    # takes every bmodel back, one after the other at the rates measured here: a bound too.
    r = m["rates"]
    link = out / r["upload"] + out / r["pull"] + back / r["fetch"]
    bmodel = sum(kinds[k]["bmodel"] * c for k, c in counts.items())
    bmodel_11b = sum(per_kind(measured, base, base)[k]["bmodel"] * c for k, c in plan_counts(base, seq, chunk).items())
    serial = serial_11b * bmodel / bmodel_11b
    largest = max(need for _, need in jobs)
    memory = node_memory if largest <= node_memory else None
    rows, per_size = [], []
    star = "" if memory else " *"
    for n in nodes_list:
        scheduled = schedule(jobs, n, cpus, memory or largest)
        per_size.append({"nodes": n, "jobs_s": scheduled, "compile_s": max(scheduled, link) + serial,
                         "shared_dir_s": scheduled + serial})
        rows.append([name, n, f"{scheduled / 60:.1f} min{star}", f"{link / 60:.1f} min",
                     f"**{(max(scheduled, link) + serial) / 60:.1f} min**{star}", f"{(scheduled + serial) / 60:.1f} min{star}"])
    summary = {"jobs": len(jobs), "work_s": sum(work), "median_job_s": statistics.median(work),
               "median_overhead_s": statistics.median(overheads), "longest_job_s": max(s for s, _ in jobs),
               "serial_s": serial, "largest_need": largest, "fits": memory is not None, "bmodel": bmodel,
               "out": out, "back": back, "link_s": link, "projection": per_size}
    return rows, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30, help="empty tasks to time")
    parser.add_argument("--transfers", type=int, default=3, help="round trips of a realistic net to time")
    parser.add_argument("--busy", type=float, default=15.0, help="seconds of the job the node runs while a net travels")
    parser.add_argument("--net-gb", type=float, default=0.87, help="ONNX + weights of the moved net (an 11B decoder layer)")
    parser.add_argument("--object-store-mb", type=int, default=1024, help="object store of each loopback node")
    parser.add_argument("--nodes", default="1,2,5,10,20", help="cluster sizes to project")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    args = parser.parse_args()

    info = machine()
    cpus = info["cores"]
    # Ray's memory resource on an idle node of this size: what is left beside its default
    # object store (30 % of the memory).
    node_memory = 0.7 * info["ram_bytes"]
    measured, serial_11b, source = measured_from_convert_scale()
    m = measure(args)
    print(f"machine: {info['cpu']}, {cpus} cores, {gb(info['ram_bytes'])}; load average now {os.getloadavg()[0]:.1f}")
    print(f"loopback cluster of 2 nodes (1 CPU, {args.object_store_mb} MB object store each) up in {m['startup_s']:.1f} s")
    print(f"empty task (num_cpus=1, memory requirement) on the other node: median {m['empty_s'] * 1e3:.1f} ms "
          f"over {args.repeat} (min {min(m['empty_all']) * 1e3:.1f}, max {max(m['empty_all']) * 1e3:.1f})")
    print(f"a {gb(m['net_bytes'])} net out and its {gb(m['result_bytes'])} INT4 bmodel back through lvb's path: median "
          f"{m['move_s']:.2f} s over {args.transfers} ({', '.join(f'{s:.2f}' for s in m['moves'])}), "
          f"{m['bandwidth'] / 1e9:.2f} GB/s")
    for part in ("upload", "receive", "task", "fetch"):
        print(f"  {part}: median {statistics.median(p[part] for p in m['parts']):.2f} s")
    print("  rates: " + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in m["rates"].items())
          + " (pull: Ray moving the pieces to the node, the task's time less its writing)")
    print(f"pipelined behind a {args.busy:.0f} s job on the node: gap between the two jobs median {m['gap_s'] * 1e3:.0f} ms "
          f"({', '.join(f'{g * 1e3:.0f}' for g in m['gaps'])}), writing the net to the node's disk "
          f"{m['receive_s']:.2f} s: {m['slot_s']:.2f} s of the node's CPU per job")
    print(f"per-kind compile seconds from {source}")
    nodes_list = [int(n) for n in args.nodes.split(",")]
    rows, summaries = [], {}
    for name, config in (("11B", "llama-3.2-11b-vision"), ("90B", "llama-3.2-90b-vision")):
        r, s = project(name, REPO / "tests" / "data" / f"{config}.config.json", measured, serial_11b, m, nodes_list, cpus,
                       node_memory, args.seq, args.chunk)
        rows += r
        summaries[name] = s
    for name, s in summaries.items():
        print(f"\n{name}: {s['jobs']} jobs, {s['work_s'] / 3600:.2f} h of tool time, median job {s['median_job_s']:.1f} s, "
              f"median overhead per job {s['median_overhead_s']:.2f} s ({100 * s['median_overhead_s'] / s['median_job_s']:.1f} % "
              f"of the median job), longest job {s['longest_job_s']:.0f} s (the critical path), combine and start-up "
              f"{s['serial_s']:.0f} s, {gb(s['out'])} of nets out and {gb(s['back'])} of bmodels back through the command's "
              f"machine ({s['link_s'] / 60:.1f} min at the measured rates), largest memory need {gb(s['largest_need'])}"
              + ("" if s["fits"] else f" > {gb(node_memory)} of Ray memory on a node of this size (*: projected on nodes "
                                     f"with {cpus} cores and that much memory)"))
    print(f"\nProjected `lvb compile --quant int4 --check none --cluster` on N nodes of {cpus} cores and {gb(node_memory)} "
          f"of Ray memory:\n")
    print(table(rows, ["model", "nodes", "jobs on the nodes (list scheduling)", "the command's transfers",
                       "compile (the larger + combine)", "with --cluster-shared-dir (+ combine)"]))
    settings = {k: getattr(args, k) for k in ("repeat", "transfers", "busy", "net_gb", "object_store_mb", "nodes", "seq", "chunk")}
    path = record_result("cluster_scale", {"settings": settings, "cpus": cpus, "node_memory": node_memory, "source": source,
                                           "serial_11b_s": serial_11b, "measured": m, "models": summaries})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
