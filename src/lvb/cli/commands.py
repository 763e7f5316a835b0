"""The `lvb` command: thin Typer wrappers over plain functions, one per stage.

Heavy imports (torch, transformers, onnx) happen inside the commands, so
`lvb --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import lvb
from lvb.cli.chat import CHAT_HELP, chat_loop
from lvb.cli.options import (ChatOptions, History, ModelOption, ModelOptions, OneLineErrors, RevisionOption, ToolchainOption,
                             at_least, chunk_list, in_range, user_text, with_options)
from lvb.cli.output import (byte_progress, console, errors, fail, print_environments, print_memory_plan, print_nets,
                            print_preflight, print_stats, print_verify_report,
                            print_turn_times, problem, progress_bar, say, show, size_text)
from lvb.compile.tpumlir import DEFAULT_GROUP_SIZE
from lvb.contract import DEFAULT_CHUNKS, DEFAULT_SEQ, Backend, CheckMode, Chip, Quant
from lvb.devicetime import DEFAULT_LAUNCH_US
from lvb.errors import LvbError
from lvb.workdir import lock_work

app = typer.Typer(
    name="lvb",
    help="Llama-3.2-Vision (mllama) to the Sophgo BM1684X: export, compile, verify, chat.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
)


def _version(value: bool) -> None:
    if value:
        console.print(f"lvb {lvb.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command()
def doctor(
    toolchain: ToolchainOption = None,
    device: Annotated[Optional[int], typer.Option("--device", help="Check the card with this device id instead: SDK, "
                      "driver, memory, and micro-nets run on it against the simulator.")] = None,
    bmodel: Annotated[Optional[Path], typer.Option("--bmodel", help="With --device: also say whether this bmodel's "
                      "memory plan fits the device's free memory.")] = None,
) -> None:
    """Show the environments and the toolchain lvb uses, and prove the toolchain works end to end."""
    from lvb.doctor import run_doctor

    if device is not None:
        from lvb.doctor import run_device_doctor

        with console.status("asking the SDK") as status:
            try:
                checks = run_device_doctor(device, str(toolchain) if toolchain else None, bmodel, status=status.update)
            except LvbError as e:
                raise fail(e) from None
        for check in checks:
            if check.ok:
                say(console, "✓", "bold green", check.line)
        failed = next((c for c in checks if not c.ok), None)
        if failed is not None:
            raise fail(failed.line if failed.line.startswith(failed.name) else f"{failed.name}: {failed.line}")
        return

    with console.status("checking environments") as status:
        report = run_doctor(str(toolchain) if toolchain else None, status=status.update)
    print_environments(report)
    if report.toolchain:
        show(console, f"toolchain: {report.toolchain.bin_dir} (found via {report.toolchain.source})")
    for problem in report.problems:
        say(errors, "✗", "bold red", problem)
    if not report.ok:
        raise typer.Exit(code=1)
    console.print(
        f"[bold green]✓ lvb doctor: toolchain works[/] (tpu-mlir {report.toolchain.tpu_mlir_version}: "
        f"W4BF16 bm1684x on the simulator matches onnxruntime, cosine {report.cosine:.6f})"
    )



@app.command()
def export(
    model: Annotated[str, typer.Option("--model", help="Checkpoint folder (config.json, safetensors, tokenizer) or Hugging Face repo id.")],
    out: Annotated[Path, typer.Option("--out", readable=False, help="Work directory; the nets go to OUT/export.")],
    revision: RevisionOption = None,
    seq: Annotated[int, typer.Option(help="Sequence length the KV cache holds (prompt + answer, all turns).", callback=at_least(1))] = DEFAULT_SEQ,
    chunk: Annotated[str, typer.Option(
        help=f"Tokens per prefill call, 1 to --seq (default: {','.join(map(str, DEFAULT_CHUNKS))}, capped at --seq); a list "
             "such as 16,32,64,128 gives the prefill nets one stage per size, and a turn is prefilled with the smallest "
             "that holds it.", callback=chunk_list, show_default=False)] = "",
    batch: Annotated[str, typer.Option(
        help="Conversations one decode step serves (continuous batching in `lvb serve`): a list such as 1,2,4 gives "
             "the decode nets one stage per size, sharing the weights; `lvb compile` builds what the export holds.",
        callback=chunk_list)] = "1",
    draft_tokens: Annotated[int, typer.Option(
        "--draft-tokens", help="Build for speculative decoding (`--draft` in run, chat, serve) with this many proposals "
                               "a check: a prefill chunk of k + 1 tokens, and LM and greedy heads that score its rows in "
                               "one launch (0: none).", callback=at_least(0))] = 0,
) -> None:
    """Export every part to ONNX (opset 17), one layer at a time, each checked against PyTorch."""
    from lvb.hub import resolve_model
    from lvb.runtime.pipeline import Checkpoint

    try:
        source = resolve_model(model, revision, weights=True)
        # The small files as the runtime will read them (a processor config that disagrees with
        # config.json, damaged JSON) fail now, not after an hour of export.
        Checkpoint.load(source.directory)
    except (LvbError, OSError) as e:
        raise fail(problem(e, out))
    from lvb.export.exporter import export as run_export  # torch: only once the checkpoint is there
    chunks = [int(c) for c in chunk.split(",")] if chunk else None  # None: the default sizes, capped at --seq

    with progress_bar() as progress:
        task = progress.add_task("exporting", total=None, detail="")

        def report(net: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, detail=net)

        try:
            manifest = run_export(source.directory, out, seq=seq, chunks=chunks, progress=report, source=source.to_json(),
                                  notify=lambda message: say(progress.console, "note:", "yellow", message),
                                  batch=[int(b) for b in batch.split(",")], draft_tokens=draft_tokens)
        except (LvbError, OSError) as e:
            raise fail(problem(e, out))
    nets = manifest["nets"]
    worst = min(nets.values(), key=lambda n: n["check"]["cosine"])
    say(console, "✓", "bold green", f"{len(nets)} nets in {out / 'export'}; worst onnxruntime-vs-PyTorch cosine "
        f"{worst['check']['cosine']:.6f} ({worst['name']})")


@app.command(name="compile")
def compile_(
    work: Annotated[Path, typer.Option("--work", readable=False, help="Work directory of `lvb export`.")],
    quant: Annotated[Quant, typer.Option(help="Decoder blocks: int4 (W4BF16), int8 (W8BF16) or bf16.")] = Quant.INT4,
    seq: Annotated[Optional[int], typer.Option(help="Must match the export (default: the export's).", callback=at_least(1))] = None,
    batch: Annotated[Optional[str], typer.Option(
        help="Decode batch sizes, e.g. 1,2,4: must match the export, which makes the decode nets' stages (default: the "
             "export's).", callback=chunk_list)] = None,
    group_size: Annotated[int, typer.Option(help="INT4/INT8 weights share one scale per this many inputs.", callback=at_least(1))] = DEFAULT_GROUP_SIZE,
    chip: Annotated[Chip, typer.Option(help="Target chip.")] = Chip.BM1684X,
    jobs: Annotated[Optional[int], typer.Option(help="Parallel compile jobs (default: from cores and free memory).", callback=at_least(1))] = None,
    vision_quant: Annotated[Quant, typer.Option(
        help="Vision tower: bf16, int8 or int4 (weights only), or w8a8 (INT8 weights and activations, calibrated on "
             "--calibration-images; the attention core stays bf16).")] = Quant.BF16,
    calibration_images: Annotated[Optional[Path], typer.Option(
        readable=False, help="A folder of pictures like the ones the model will see (.jpg, .png, ...) to calibrate "
                             "--vision-quant w8a8 on (default: scikit-image's eight photographs).")] = None,
    calibration_tuning: Annotated[bool, typer.Option(
        "--calibration-tuning/--no-calibration-tuning",
        help="--vision-quant w8a8: tune the calibration's thresholds (tpu-mlir's default). Without, a large tower "
             "calibrates in about half the host memory; the checks still judge the result.")] = True,
    embed_quant: Annotated[Quant, typer.Option(help="Embedding: bf16, int8 or int4.")] = Quant.BF16,
    head_quant: Annotated[Quant, typer.Option(help="LM head: bf16, int8 or int4.")] = Quant.BF16,
    check: Annotated[CheckMode, typer.Option(
        help="Which nets run on the simulator against onnxruntime: all; the first of each kind (its siblings take "
             "its options; `lvb verify` checks every net); none.")] = CheckMode.ALL,
    toolchain: ToolchainOption = None,
    cluster: Annotated[Optional[str], typer.Option(
        envvar="LVB_CLUSTER", show_envvar=True,
        help="Run the per-net jobs on a Ray cluster: auto, ray://HOST:PORT or HOST:PORT (README: Compiling on a cluster).",
    )] = None,
    cluster_shared_dir: Annotated[Optional[Path], typer.Option(
        readable=False, help="A folder every cluster node mounts at the same path, holding --work: nodes read and write the cache there "
             "instead of through Ray's object store.",
    )] = None,
) -> None:
    """Compile every exported net with tpu-mlir, check it on the simulator, combine into one bmodel."""
    from lvb.compile.compiler import CompileSettings, NetFailed

    settings = CompileSettings(quant=quant, group_size=group_size, chip=chip, vision_quant=vision_quant,
                               embed_quant=embed_quant, head_quant=head_quant, check=check,
                               calibration_images=str(calibration_images.resolve()) if calibration_images else None,
                               calibration_tuning=calibration_tuning)
    if cluster_shared_dir is not None and not cluster:
        raise fail("--cluster-shared-dir needs --cluster (or LVB_CLUSTER)")
    try:
        with lock_work(work, "lvb compile"):
            manifest = _compile(work, settings, toolchain, seq, jobs, cluster, cluster_shared_dir,
                                [int(b) for b in batch.split(",")] if batch else None)
    except NetFailed as e:
        if e.log_tail:
            show(errors, e.log_tail)
        raise fail(str(e))
    except (LvbError, OSError) as e:
        raise fail(problem(e, work))
    retried = [f"{name} {' '.join(r['options'])}" for name, r in manifest["nets"].items() if r["options"]]
    say(console, "✓", "bold green", work / manifest["bmodel"])
    if retried:
        show(console, f"  compiled with safer options: {', '.join(retried)}")
    kept = [f"{name} {tensor} as {dtype}" for name, r in manifest["nets"].items() for tensor, dtype in r["dtype_exceptions"].items()]
    if kept:
        show(console, f"  kept by tpu-mlir in another dtype than lvb asked (the runtime converts them): {', '.join(kept)}")


def _compile(work, settings, toolchain, seq, jobs, cluster, cluster_shared_dir, batch=None) -> dict:
    from lvb.compile.compiler import Compiler
    from lvb.toolchain import find_toolchain

    compiler = Compiler(work, settings, find_toolchain(toolchain), seq=seq, batch=batch)
    with progress_bar() as progress:
        task = progress.add_task("compiling", total=len(compiler.jobs), detail="")
        compiler.notify = lambda message: say(progress.console, "note:", "yellow", message)

        def report(done: int, total: int, running: list[str]) -> None:
            progress.update(task, completed=done, detail=", ".join(running))

        if cluster:
            from lvb.compile.cluster import ClusterSettings

            progress.update(task, detail=f"connecting to the Ray cluster at {cluster}")
            manifest = compiler.run(progress=report, cluster=ClusterSettings(cluster, cluster_shared_dir))
        else:
            manifest = compiler.run(jobs=jobs, progress=report)
    return manifest


@app.command()
def inspect(
    bmodel: Annotated[Path, typer.Argument(readable=False, help="A bmodel made by `lvb compile`.")],
    toolchain: ToolchainOption = None,
    device: Annotated[Optional[int], typer.Option(help="Also check the plan against this device's free memory "
                                                       "(sophon.sail; a device id, 0 or more); exit 1 when it does not fit.",
                                                  callback=at_least(0))] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Checkpoint folder whose config prices a turn (default: the one the bmodel was exported from).")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Tokens of the first turn the device-time model prices.", callback=at_least(1))] = 17,
    launch_us: Annotated[float, typer.Option(help="Host cost per net launch on the card, in µs: an assumption, shown apart from the estimate.")] = DEFAULT_LAUNCH_US,
) -> None:
    """List a bmodel's nets, their tensors, weights and estimated time on the chip (tpu-mlir's cost
    model), a turn's time, the bytes one decode step reads, and the device memory lvb's runtime needs."""
    from lvb.bmodel import inspect_bmodel
    from lvb.devicetime import NoEstimates, compile_record, from_manifest
    from lvb.toolchain import find_toolchain

    try:
        info = inspect_bmodel(bmodel, find_toolchain(toolchain))
    except (LvbError, OSError) as e:
        raise fail(problem(e))
    try:
        record = compile_record(bmodel)
    except NoEstimates as e:
        record, no_estimates = None, str(e)
    estimates = from_manifest(record) if record else None
    print_nets(bmodel, info, estimates)
    if record is None:
        show(console, f"no device-time estimates: {no_estimates}")
    else:
        print_turn_times(record, estimates, model, prompt_tokens, launch_us)
    print_memory_plan(info)
    if device is not None:
        print_preflight(bmodel, device, toolchain)


@app.command()
def pack(
    work: Annotated[Path, typer.Argument(readable=False, help="Work directory of `lvb export` and `lvb compile`.")],
    out: Annotated[Path, typer.Option("--out", readable=False, help="Folder to write the package to (an older package there is replaced).")],
    quant: Annotated[Optional[Quant], typer.Option(help="Which compiled bmodel: int4, int8 or bf16 (default: the newest).")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Add the ONNX nets, for the onnxruntime backend on a machine without a card.")] = False,
    tar: Annotated[bool, typer.Option("--tar", help="Also write OUT.tar.gz.")] = False,
    model: Annotated[Optional[str], typer.Option("--model", help="Checkpoint folder or repo id for the small files (default: the one WORK was exported from).")] = None,
    revision: RevisionOption = None,
) -> None:
    """Write what a board needs to answer: the combined bmodel and the checkpoint's small files (never the weights), with a checked manifest."""
    from lvb.hub import resolve_model
    from lvb.package import pack as run_pack
    from lvb.package import tar_path

    try:
        checkpoint = resolve_model(model, revision).directory if model is not None else None
        with byte_progress() as progress:
            task = progress.add_task("packing", total=None, detail="")
            package = run_pack(work, out, quant=quant, checkpoint=checkpoint, onnx=onnx, tar=tar,
                               progress=lambda name, done, total: progress.update(task, completed=done, total=total, detail=name))
    except (LvbError, OSError) as e:
        raise fail(problem(e, out))
    size = sum(entry["size"] for entry in package.manifest["files"].values())
    what = package.manifest["bmodel"] or "ONNX nets only"
    say(console, "✓", "bold green", f"{out}: {what}, {len(package.manifest['files'])} files, {size_text(size)}")
    if tar:
        show(console, str(tar_path(out)))



@app.command()
@with_options(ChatOptions)
def run(
    prompt: Annotated[str, typer.Option("--prompt", help="The question.")],
    options: ChatOptions,
    image: Annotated[Optional[Path], typer.Option("--image", readable=False, help="A picture to ask about.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print first-token latency, prompt tokens and tokens/s to stderr.")] = False,
) -> None:
    """Answer one question (about one picture) and print the answer on stdout."""
    try:
        session = options.open_session()
        with session:
            sampling = options.sampling(session.checkpoint)
            reply = session.ask(user_text(prompt, "--prompt"), image=image, sampling=sampling, max_new_tokens=options.max_new_tokens,
                                on_text=lambda piece: print(piece, end="", flush=True))
            print()
    except (LvbError, OSError) as e:
        raise fail(problem(e))
    for notice in reply.notices:
        say(errors, "note:", "yellow", notice)
    if stats:
        print_stats(reply)



@app.command()
@with_options(ChatOptions)
def chat(
    options: ChatOptions,
    image: Annotated[Optional[Path], typer.Option("--image", readable=False, help="A picture for the first message.")] = None,
    truncate_history: Annotated[bool, typer.Option(help="Drop the oldest exchanges when the chat outgrows the sequence.")] = False,
) -> None:
    """Multi-turn chat; a new picture can come with any message. Errors are reported and the chat goes on."""
    try:
        session = options.open_session(truncate_history)
        sampling = options.sampling(session.checkpoint)
    except (LvbError, OSError) as e:
        raise fail(problem(e))
    show(console, f"{session.engine.backend} · seq {session.seq} · {CHAT_HELP}", style="dim")
    chat_loop(session, sampling, image, options.max_new_tokens)

@app.command()
@with_options(ModelOptions)
def serve(
    options: ModelOptions,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback exposes the model to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port, 1 to 65535.", callback=in_range(1, 65535))] = 8000,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for the engine, 0 or more; beyond them the answer is 429.",
                                           callback=at_least(0))] = 16,
    api_key: Annotated[Optional[str], typer.Option(envvar="LVB_API_KEY", show_envvar=True,
                                                   help="Require `Authorization: Bearer KEY` on every endpoint but /health and the page.")] = None,
    history: Annotated[History, typer.Option(help="A chat longer than the sequence: refuse it (400), or truncate it, dropping "
                                                  "the oldest exchanges as `lvb chat --truncate-history` does.")] = History.REFUSE,
    allow_origin: Annotated[Optional[list[str]], typer.Option(help="A web origin (https://host:port) whose pages may call "
                                                                   "the API (CORS); repeat for more, * for any.")] = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions) with a chat page at /."""
    try:
        import uvicorn

        from lvb.serve.app import check_api_key, create_app
        from lvb.serve.worker import Worker
    except ImportError as e:
        raise fail(f"lvb serve needs the serve extra ({e.name} is missing): pip install 'lvb[serve]'")
    try:
        check_api_key(api_key)
        session = options.open_session(truncate_history=history is History.TRUNCATE)
    except (LvbError, OSError) as e:
        raise fail(problem(e))
    import logging

    # Before the worker's thread starts: its first line (its thread id) is logged as it starts.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with session:  # closes the model's engine and the draft's
        try:
            worker = Worker(session, max_queue=max_queue)  # refuses a draft with a batched model
        except LvbError as e:
            raise fail(problem(e))
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            say(errors, "note:", "yellow", f"listening on {host} without --api-key: anyone who reaches it can use the model")
        name = session.checkpoint.directory.name
        draft = (f" · draft {options.draft.resolve().name}, {session.draft_tokens} tokens a check"
                 if session.draft is not None else "")
        show(console, f"{session.engine.backend} · seq {session.seq} · model {name}{draft} · http://{host}:{port}/",
             style="dim")
        try:
            uvicorn.run(create_app(worker, name, api_key=api_key, allow_origins=tuple(allow_origin or ())), host=host,
                        port=port, log_level="info")
        finally:
            worker.close()


@app.command()
def verify(
    model: ModelOption,
    work: Annotated[Path, typer.Option("--work", readable=False, help="Work directory of `lvb export` and `lvb compile`.")],
    quant: Annotated[Quant, typer.Option(help="Which compiled bmodel to check: int4, int8 or bf16.")] = Quant.INT4,
    backend: Annotated[Backend, typer.Option(help="cmodel (simulator), sail (device) or onnxruntime (the ONNX nets only).")] = Backend.CMODEL,
    pictures: Annotated[int, typer.Option(help="Fresh pictures for the task accuracy, when the checkpoint has a task (1 or more).")] = 100,
    revision: RevisionOption = None,
    toolchain: ToolchainOption = None,
) -> None:
    """Check every hop (PyTorch, onnxruntime, bmodel) per net and whole answers; write report.json and report.html."""
    from lvb.hub import resolve_model
    from lvb.toolchain import find_toolchain
    from lvb.verify import check_options
    from lvb.verify import verify as run_verify

    try:
        check_options(quant, backend, pictures)  # before the model, which may be downloaded
        model_dir = resolve_model(model, revision, weights=True).directory
        with progress_bar() as progress:
            task = progress.add_task("verifying", total=None, detail="")
            data = run_verify(model_dir, work, quant=quant, backend=backend, pictures=pictures,
                              toolchain=find_toolchain(toolchain) if backend is Backend.CMODEL else None,
                              progress=lambda what, i, t: progress.update(task, completed=i, total=t, detail=what))
    except (LvbError, OSError) as e:
        raise fail(problem(e, work))
    print_verify_report(data)
    if data["misses"]:
        for miss in data["misses"]:
            say(errors, "✗", "bold red", miss)
        raise typer.Exit(code=1)
    console.print("[bold green]✓ lvb verify: every threshold met[/]")

