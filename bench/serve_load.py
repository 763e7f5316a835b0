#!/usr/bin/env python3
"""`lvb serve` under load, on the trained toy over onnxruntime, loopback only.

Setup: the toy (models/toy) exported to bench/out/toy-serve-seq<S> (reused when there),
`lvb serve` started as a subprocess on a free loopback port with an API key, and the
same export opened a second time in this process to call the engine directly.

1. Overhead (one client at a time). For each of --pictures synthetic pictures, in turn:
   the engine directly (Session.reset + Session.ask, greedy, the question of the toy's
   task), then the same request through the server streamed (SSE read with
   http.client), then not streamed. Interleaved, so both see the same machine. Per
   request: the server's extra wall time = (client's total) - (direct ask's total);
   per streamed token: the median gap between streamed chunks at the client minus the
   gap between the paired direct ask's on_text calls, median per request, then over
   requests; and for the not-streamed requests, the client's wall time minus the
   server's own Session.ask time (header x-lvb-engine-ms) of the same request. Wall
   times suffer from anything else the machine runs, so CPU time is taken too, from
   /proc/<pid>/task/*/schedstat (ns resolution, every thread): the server process's
   per request against this process's around the direct call; per streamed token, the
   server's streamed minus not-streamed CPU over the pieces streamed.
2. Load: --clients threads each send --requests requests (every one a different picture,
   half streamed), all at once, with --max-queue waiting places; each request gets
   --timeout seconds and the phase --deadline. Every request must come back answered or
   refused with 429 (none lost), every answer must equal the direct answer for its own
   picture (none mixed up), and /health must say ok with nothing pending afterwards.
   First-token time is taken at the client (send -> first content chunk, streamed
   requests only), p50/p95.

Prints the figures and a Markdown table, and records them in bench/results/serve_load.json; exits 1
when a request is lost, mixed up or
failed, or the server is unhealthy after. No timed assertions.

`--batched`: continuous batching instead. The toy exported twice, as above and with
`--batch 8,4,2,1`; a server on each; 1, 2, 4 and 8 clients, each sending --requests
non-streamed requests one after another (a different picture each, greedy, `ignore_eos` and
`max_tokens` --answer-tokens, so that decoding dominates): aggregate completion tokens/s and
per-request latency (median, p95); every answer must equal the direct engine's for its own
picture. Then 16 clients at once on the batched server: none lost or mixed up. The chip's
figures beside them come from bench/batch_decode.py (bench/results/batch_decode.json).
Writes bench/results/serve_batch.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's lvb, as the server runs it
from common import OUT, RESULTS, machine, record_result, table  # noqa: E402

from lvb.runtime.backends import open_engine  # noqa: E402
from lvb.runtime.pipeline import Checkpoint, Session  # noqa: E402
from lvb.tasks import QUESTION, sample  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "models" / "toy"
KEY = "bench-key"


def data_url(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(image, stream: bool) -> bytes:
    message = {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                           {"type": "image_url", "image_url": {"url": data_url(image)}}]}
    return json.dumps({"model": "toy", "messages": [message], "stream": stream}).encode()


class Outcome:
    def __init__(self):
        self.status = 0
        self.text = ""
        self.started = time.perf_counter()
        self.first = None  # time of the first content chunk
        self.chunks: list[float] = []  # arrival time of every content chunk
        self.ended = None
        self.error = ""
        self.engine_seconds = None  # x-lvb-engine-ms: the server's own Session.ask time
        self.tokens = 0  # completion tokens (not streamed: from usage)


def send(port: int, body: bytes, stream: bool, timeout: float) -> Outcome:
    """One request over a fresh connection; reads the SSE stream line by line."""
    out = Outcome()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        out.started = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", body,
                           {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        response = connection.getresponse()
        out.status = response.status
        if response.status != 200 or not stream:
            data = json.loads(response.read())
            now = time.perf_counter()
            if response.status == 200:
                out.text = data["choices"][0]["message"]["content"]
                out.first = now
                out.engine_seconds = float(response.getheader("x-lvb-engine-ms")) / 1000
                out.tokens = data["usage"]["completion_tokens"]
            else:
                out.error = data["error"]["message"]
        else:
            pieces = []
            for line in response:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if content:
                    now = time.perf_counter()
                    out.first = out.first or now
                    out.chunks.append(now)
                    pieces.append(content)
            out.text = "".join(pieces)
    except Exception as e:  # reported as a lost request
        out.error = f"{type(e).__name__}: {e}"
    finally:
        out.ended = time.perf_counter()
        connection.close()
    return out


def direct(session: Session, image) -> tuple[str, float, list[float]]:
    """(answer, total seconds, on_text times) of the engine called directly, as the server would."""
    times: list[float] = []
    started = time.perf_counter()
    session.reset()
    reply = session.ask(QUESTION, image=image, on_text=lambda piece: times.append(time.perf_counter()))
    return reply.text, time.perf_counter() - started, [t - started for t in times]


def cpu_seconds(pid: int) -> float:
    """CPU time of every live thread of a process, in ns resolution (schedstat), as seconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total / 1e9


def thread_cpu(pid: int, tid: int) -> float:
    """CPU seconds of one thread (schedstat: ns resolution; waiting for a core does not count)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9


def engine_thread_id(log: Path) -> int:
    """The server logs its engine thread's id when it starts."""
    import re

    found = re.search(r"engine thread (\d+) ready", log.read_text())
    if not found:
        raise LookupError(f"{log} does not name the engine thread")
    return int(found.group(1))


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, port: int, max_queue: int, log_path: Path) -> subprocess.Popen:
    """`lvb serve` on the toy's export in `work`, answering /health (or SystemExit)."""
    lvb = Path(sys.executable).with_name("lvb")
    command = [str(lvb), "serve", "--model", str(TOY), "--onnx", str(work), "--port", str(port),
               "--max-queue", str(max_queue)]
    log = open(log_path, "w")
    env = dict(os.environ, LVB_API_KEY=KEY, PYTHONPATH=str(ROOT / "src"))
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"error: the server did not start; see {log_path}")
        time.sleep(0.2)


def toy_export(seq: int, chunk: int, batch: tuple[int, ...] = (1,)) -> Path:
    suffix = f"-batch{'-'.join(map(str, sorted(batch)))}" if batch != (1,) else ""
    work = OUT / f"toy-serve-seq{seq}-chunk{chunk}{suffix}"
    if not (work / "export" / "manifest.json").is_file():
        from lvb.export.exporter import export

        print(f"exporting the toy to {work}", flush=True)
        export(TOY, work, seq=seq, chunks=chunk, batch=batch)
    return work


def batched_load(args) -> int:
    from lvb.runtime.sampling import SamplingConfig

    single, batched = toy_export(args.seq, args.chunk), toy_export(args.seq, args.chunk, (8, 4, 2, 1))
    checkpoint = Checkpoint.load(TOY)
    ends = tuple(sorted(checkpoint.tokenizer.stop_ids))
    greedy = SamplingConfig(suppress_ids=ends)  # ignore_eos, as the requests ask
    clients_list = (1, 2, 4, 8)
    pool = sample(max(clients_list) * args.requests + 16 * args.requests, seed=700)
    with open_engine("onnxruntime", onnx_work=single) as engine:
        session = Session(checkpoint, engine)
        expected = []
        for image, _ in pool:
            session.reset()
            expected.append(session.ask(QUESTION, image=image, sampling=greedy, max_new_tokens=args.answer_tokens).text)

    def body(i: int, stream: bool = False) -> bytes:
        message = {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                               {"type": "image_url", "image_url": {"url": data_url(pool[i][0])}}]}
        return json.dumps({"model": "toy", "messages": [message], "stream": stream, "temperature": 0,
                           "max_tokens": args.answer_tokens, "ignore_eos": True}).encode()

    def run_clients(port: int, clients: int, first: int, stream=lambda i: False) -> tuple[dict[int, Outcome], float]:
        outcomes: dict[int, Outcome] = {}

        def client(c: int) -> None:
            for r in range(args.requests):
                i = first + c * args.requests + r
                outcomes[i] = send(port, body(i, stream(i)), stream(i), args.timeout)

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return outcomes, time.perf_counter() - started

    results: dict = {"settings": {"seq": args.seq, "chunk": args.chunk, "requests_per_client": args.requests,
                                  "answer_tokens": args.answer_tokens, "max_queue": args.max_queue}, "runs": []}
    problems = []
    for label, work in (("one at a time", single), ("batched (--batch 8,4,2,1)", batched)):
        port = free_port()
        server = start_server(work, port, args.max_queue, OUT / "serve_load.server.log")
        try:
            send(port, body(0), False, args.timeout)  # warm up
            for clients in clients_list:
                outcomes, wall = run_clients(port, clients, 0)
                answered = [i for i, o in outcomes.items() if o.status == 200]
                mixed = [i for i in answered if outcomes[i].text != expected[i]]
                tokens = sum(outcomes[i].tokens for i in answered)
                latency = [outcomes[i].ended - outcomes[i].started for i in answered]
                run = {"server": label, "clients": clients, "requests": len(outcomes), "answered": len(answered),
                       "mixed": len(mixed), "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
                       "latency_p50_s": percentile(latency, 0.5), "latency_p95_s": percentile(latency, 0.95)}
                results["runs"].append(run)
                print(f"{label}, {clients} clients: {run['tokens_per_s']:.1f} tokens/s, latency p50 "
                      f"{run['latency_p50_s']:.2f} s, {len(mixed)} mixed", flush=True)
                if mixed or len(answered) != len(outcomes):
                    problems.append(f"{label}, {clients} clients: {len(outcomes) - len(answered)} not answered, "
                                    f"{len(mixed)} mixed up")
            if work == batched:
                first = max(clients_list) * args.requests
                outcomes, wall = run_clients(port, 16, first, stream=lambda i: i % 2 == 0)
                answered = [i for i, o in outcomes.items() if o.status == 200]
                refused = [i for i, o in outcomes.items() if o.status == 429]
                lost = 16 * args.requests - len(answered) - len(refused)
                mixed = [i for i in answered if outcomes[i].text != expected[i]]
                results["sixteen_clients"] = {"requests": 16 * args.requests, "answered": len(answered),
                                              "refused_429": len(refused), "lost": lost, "mixed": len(mixed),
                                              "wall_s": wall}
                print(f"16 clients: {len(answered)} answered, {len(refused)} refused (429), {lost} lost, "
                      f"{len(mixed)} mixed up", flush=True)
                if lost or mixed:
                    problems.append(f"16 clients: {lost} lost, {len(mixed)} mixed up")
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
                stall = [line for line in connection.getresponse().read().decode().splitlines()
                         if line.startswith("lvb_decode_stall_seconds_sum") or line.startswith("lvb_decode_stall_seconds_count")]
                values = {line.split()[0]: float(line.split()[1]) for line in stall}
                count = values.get("lvb_decode_stall_seconds_count", 0)
                results["stall_mean_s"] = values.get("lvb_decode_stall_seconds_sum", 0) / count if count else 0.0
        finally:
            server.terminate()
            server.wait(timeout=30)
    chip = RESULTS / "batch_decode.json"
    if chip.is_file():
        steps = json.loads(chip.read_text())["steps"]
        results["chip"] = [{k: s[k] for k in ("B", "rows", "step_ms", "aggregate_tokens_per_s",
                                               "per_conversation_tokens_per_s")} for s in steps]
    record_result("serve_batch", results)
    rows = [[r["server"], r["clients"], f"{r['tokens_per_s']:.1f}", f"{r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f}",
             f"{r['answered']}/{r['requests']}", r["mixed"]] for r in results["runs"]]
    print(table(rows, ["server (onnxruntime, toy)", "clients", "tokens/s", "latency p50 / p95 s", "answered", "mixed up"]))
    print(f"wrote {RESULTS / 'serve_batch.json'}")
    for problem in problems:
        print(f"error: {problem}")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--pictures", type=int, default=24, help="requests of the overhead phase")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds for the load phase")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--batched", action="store_true", help="continuous batching: clients 1, 2, 4, 8, then 16")
    parser.add_argument("--answer-tokens", type=int, default=32, help="--batched: tokens per answer")
    args = parser.parse_args()
    if args.batched:
        return batched_load(args)

    work = toy_export(args.seq, args.chunk)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {os.getloadavg()[0]:.1f}", flush=True)

    port = free_port()
    log_path = OUT / "serve_load.server.log"
    server = start_server(work, port, args.max_queue, log_path)
    try:
        checkpoint = Checkpoint.load(TOY)
        with open_engine("onnxruntime", onnx_work=work) as engine:
            session = Session(checkpoint, engine)
            # Warm both up (onnxruntime's first runs allocate).
            warm = sample(2, seed=1)
            for image, _ in warm:
                direct(session, image)
                send(port, request_body(image, True), True, args.timeout)

            # -- 1. overhead, one request at a time ----------------------------------
            engine_thread = engine_thread_id(log_path)
            me = threading.get_native_id()
            # Per thread: the server's event loop (uvicorn runs it in the main thread: HTTP, JSON,
            # SSE, sockets, all of it server overhead), its engine thread (Session.ask plus the
            # worker's bookkeeping) against this thread's direct Session.ask.
            loop_cpu = {True: 0.0, False: 0.0}
            engine_cpu = {"direct": 0.0, True: 0.0, False: 0.0}
            per_request = {True: [], False: []}
            same_request = []  # client's wall time minus the server's own engine time, one request
            cpu = {"direct": 0.0, True: 0.0, False: 0.0}  # CPU seconds of the engine alone, of the server
            token_gap_server, token_gap_direct, direct_first, tokens = [], [], [], 0
            for image, _ in sample(args.pictures, seed=300):
                before, mine = cpu_seconds(os.getpid()), thread_cpu(os.getpid(), me)
                answer, seconds, times = direct(session, image)
                cpu["direct"] += cpu_seconds(os.getpid()) - before
                engine_cpu["direct"] += thread_cpu(os.getpid(), me) - mine
                direct_first.append(times[0])
                token_gap_direct += gaps(times)
                tokens += len(times)  # pieces streamed: one chunk each
                for stream in (True, False):
                    body = request_body(image, stream)
                    before = cpu_seconds(server.pid)
                    loop, engine_thread_before = thread_cpu(server.pid, server.pid), thread_cpu(server.pid, engine_thread)
                    out = send(port, body, stream, args.timeout)
                    time.sleep(0.05)  # the worker's bookkeeping after the answer
                    cpu[stream] += cpu_seconds(server.pid) - before
                    loop_cpu[stream] += thread_cpu(server.pid, server.pid) - loop
                    engine_cpu[stream] += thread_cpu(server.pid, engine_thread) - engine_thread_before
                    if out.status != 200 or out.text != answer:
                        print(f"error: overhead phase: {out.status} {out.error or out.text!r}, expected {answer!r}")
                        return 1
                    per_request[stream].append((out.ended - out.started) - seconds)
                    if stream:
                        token_gap_server.append(statistics.median(gaps(out.chunks)) - statistics.median(gaps(times)))
                    else:
                        same_request.append((out.ended - out.started) - out.engine_seconds)

            # The server parses a request, decodes and preprocesses its picture in a pool thread: the same work here.
            from lvb.serve.api import Limits, parse_chat_request
            from lvb.serve.worker import served_model

            bodies = [request_body(image, True) for image, _ in sample(args.pictures, seed=300)]
            model = served_model(session, "toy")
            mine = thread_cpu(os.getpid(), me)
            for body in bodies:
                parse_chat_request(body, Limits(), model)
            parse_cpu = (thread_cpu(os.getpid(), me) - mine) / len(bodies)

            # -- 2. load ----------------------------------------------------------------
            total = args.clients * args.requests
            pool = sample(total, seed=500)
            expected = [direct(session, image)[0] for image, _ in pool]
        labels_right = sum(e == label for e, (_, label) in zip(expected, pool))
        outcomes: dict[int, Outcome] = {}
        bodies = [request_body(image, i % 2 == 0) for i, (image, _) in enumerate(pool)]
        phase_end = time.monotonic() + args.deadline

        def client(c: int) -> None:
            for r in range(args.requests):
                i = c * args.requests + r
                if time.monotonic() > phase_end:
                    return
                outcomes[i] = send(port, bodies[i], i % 2 == 0, args.timeout)

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        for _ in range(50):  # the worker finishes its bookkeeping just after the last answer
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/health")
            health = json.loads(connection.getresponse().read())
            if not health["pending"]:
                break
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=30)

    answered = [i for i, o in outcomes.items() if o.status == 200]
    refused = [i for i, o in outcomes.items() if o.status == 429]
    lost = total - len(answered) - len(refused)
    mixed = [i for i in answered if outcomes[i].text != expected[i]]
    first_tokens = [outcomes[i].first - outcomes[i].started for i in answered if i % 2 == 0]
    ms = lambda s: f"{s * 1000:.2f} ms"  # noqa: E731
    rows = [
        ["requests (clients x each)", f"{total} ({args.clients} x {args.requests}), max queue {args.max_queue}"],
        ["answered / refused 429 / lost", f"{len(answered)} / {len(refused)} / {lost}"],
        ["answers equal to the direct engine's for their own picture", f"{len(answered) - len(mixed)} / {len(answered)}"
         f" (the toy names {labels_right}/{total} pictures right)"],
        ["health after", f"{health['status']}, pending {health['pending']}"],
        ["load phase wall time, throughput", f"{wall:.1f} s, {len(answered) / wall:.1f} answers/s"],
        ["first token under load, p50 / p95 (streamed)",
         f"{ms(percentile(first_tokens, 0.5))} / {ms(percentile(first_tokens, 0.95))}" if first_tokens else "-"],
        ["first token alone, direct engine (median)", ms(statistics.median(direct_first))],
        ["server overhead per request, wall, streamed / not (median)",
         f"{ms(statistics.median(per_request[True]))} / {ms(statistics.median(per_request[False]))}"],
        ["server overhead per request, CPU, streamed / not (mean)",
         f"{ms((cpu[True] - cpu['direct']) / args.pictures)} / {ms((cpu[False] - cpu['direct']) / args.pictures)}"],
        ["server overhead per request, wall, not streamed: client's time - server's engine time (median)",
         ms(statistics.median(same_request))],
        ["server overhead per streamed token, wall (chunk gap - on_text gap of the paired direct call, median)",
         ms(statistics.median(token_gap_server))],
        ["token gap of the direct call (median)", ms(statistics.median(token_gap_direct))],
        ["server overhead per streamed token, CPU ((streamed - not) / pieces)",
         ms((cpu[True] - cpu[False]) / tokens)],
        ["server overhead per request, CPU of the event loop thread, streamed / not (mean)",
         f"{ms(loop_cpu[True] / args.pictures)} / {ms(loop_cpu[False] / args.pictures)}"],
        ["server overhead per request, CPU of the engine thread beyond a direct ask, streamed / not (mean)",
         f"{ms((engine_cpu[True] - engine_cpu['direct']) / args.pictures)} / "
         f"{ms((engine_cpu[False] - engine_cpu['direct']) / args.pictures)}"],
        ["server overhead per request, CPU of parsing the request and decoding its picture (mean)", ms(parse_cpu)],
        ["server overhead per streamed token, CPU of both threads ((streamed - not) / pieces)",
         ms((loop_cpu[True] + engine_cpu[True] - loop_cpu[False] - engine_cpu[False]) / tokens)],
        ["engine alone per request, CPU (mean); pieces per answer",
         f"{ms(cpu['direct'] / args.pictures)}; {tokens / args.pictures:.1f}"],
    ]
    print(table(rows, ["figure", "value"]))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    record_result("serve_load", {"settings": {"clients": args.clients, "requests": args.requests, "max_queue": args.max_queue,
                                              "pictures": args.pictures, "seq": args.seq},
                                 "load_average_after": os.getloadavg()[0], "rows": rows})
    problems = []
    if lost:
        problems.append(f"{lost} request(s) lost: " + "; ".join(outcomes[i].error or str(outcomes[i].status)
                                                                 for i in range(total) if i in outcomes and i not in answered
                                                                 and i not in refused)[:500])
    if mixed:
        problems.append(f"{len(mixed)} answer(s) not their picture's: {[(outcomes[i].text, expected[i]) for i in mixed[:5]]}")
    if health["status"] != "ok" or health["pending"]:
        problems.append(f"unhealthy after: {health}")
    for problem in problems:
        print(f"error: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
