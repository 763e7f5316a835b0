"""Helpers shared by the bench scripts: the 11B-width geometry, a streaming
checkpoint writer, a config-only checkpoint folder, and machine facts.

The checkpoint writer never holds the model: it builds MllamaForConditionalGeneration
on the meta device (names and shapes only), then draws each group of tensors
(one text layer, the embedding, the head, the vision tower) in bfloat16 and
writes it as its own safetensors shard, plus model.safetensors.index.json last.
Peak memory is about twice the largest group (the embedding table), whatever the layer
count.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
# The lvb beside the interpreter running the bench (its PYTHONPATH picks the source), so a
# worktree without a venv of its own runs its own code.
LVB = Path(sys.executable).with_name("lvb")

# The reference port's measured figures, which every comparison in bench/ is against.
REFERENCE_FIRST_TOKEN_S = 5.723
REFERENCE_TOKENS_PER_S = 7.506
REFERENCE_SOURCE = ("https://github.com/sophgo/sophon-demo/blob/253d84c6f47d1899adf8cf6e569b3ed23aa0edfa/sample/"
                    "Llama3_2_Vision/README.md (SE7-32, llama3.2-11b-vision_int4_512seq.bmodel, \"what's in the room?\")")
REFERENCE_SEQ = 512
# The seed's benchmark turn in the Llama 3.2 Vision chat template: <|begin_of_text|>
# <|start_header_id|> user <|end_header_id|> "\n\n" <|image|> what 's in the room ? <|eot_id|>
# <|start_header_id|> assistant <|end_header_id|> "\n\n" (no system block when a picture is sent).
PROMPT_TOKENS = 17
RESULTS = BENCH / "results"  # committed: what the README's performance tables are read from

# The published configs whose widths the bench uses (the weights are synthetic).
CONFIGS = {name: REPO / "tests" / "data" / f"llama-3.2-{name}-vision.config.json" for name in ("11b", "90b")}


def full_model(model: str = "11b") -> dict:
    """A published model's layer structure, read from its config (CONFIGS)."""
    config = json.loads(CONFIGS[model].read_text())
    text, vision = config["text_config"], config["vision_config"]
    return {"text_layers": text["num_hidden_layers"], "cross_layers": tuple(text["cross_attention_layers"]),
            "vision_layers": vision["num_hidden_layers"], "global_layers": vision["num_global_layers"],
            "intermediate_indices": tuple(vision["intermediate_layers_indices"])}


def model_of(hidden_size: int) -> str:
    """Which published model (a key of CONFIGS) has this text width: whose full plan a bench
    checkpoint at its widths stands for."""
    for model, path in CONFIGS.items():
        if json.loads(path.read_text())["text_config"]["hidden_size"] == hidden_size:
            return model
    raise SystemExit(f"no published config in tests/data has text hidden size {hidden_size}")


def cross_layers_for(layers: int) -> tuple[int, ...]:
    """Where the cross-attention layers go in a short text stack: the 11B's pattern when it
    fits, else the middle layer."""
    pattern = tuple(i for i in full_model("11b")["cross_layers"] if i < layers)
    return pattern or (layers // 2,)


def geometry_of(model: str, layers: int = 3, vision_layers: int = 2, global_layers: int = 1,
                cross: tuple[int, ...] | None = None, max_tiles: int | None = None, tile: int | None = None):
    """A published model's widths (CONFIGS) with a short stack. Five intermediate vision
    indices, as the 11B and 90B have, so the projector has its real width (indices repeat when
    the local stack is shorter than the real one; transformers stacks them as listed).
    `max_tiles` below the model's keeps every width and shortens the vision and
    cross-attention sequences (1608 vision tokens a tile), for work the simulator cannot do
    at the real tile count. `tile` (pixels, a multiple of the patch) below the model's does the
    same inside a tile: 224 px is 257 vision tokens against 560 px's 1601, every width kept."""
    from lvb.testing.checkpoints import Geometry

    config = json.loads(CONFIGS[model].read_text())
    text, vision = config["text_config"], config["vision_config"]
    real_indices = vision["intermediate_layers_indices"]
    indices = tuple(min(vision_layers - 1, i * vision_layers // vision["num_hidden_layers"]) for i in real_indices)
    pattern = tuple(i for i in text["cross_attention_layers"] if i < layers)
    tiles = max_tiles or vision["max_num_tiles"]
    pixels = tile or vision["image_size"]
    if pixels % vision["patch_size"]:
        raise SystemExit(f"--tile {pixels}: not a multiple of the {vision['patch_size']}-px patch")
    return Geometry(
        name=f"{model}-widths-L{layers}-V{vision_layers}+{global_layers}"
             + (f"-T{tiles}" if tiles != vision["max_num_tiles"] else "")
             + (f"-P{pixels}" if pixels != vision["image_size"] else ""),
        description=f"Llama-3.2-{model.upper()}-Vision widths, short stacks, synthetic bfloat16 weights",
        text_layers=layers,
        cross_layers=cross if cross is not None else pattern or (layers // 2,),
        hidden=text["hidden_size"],
        intermediate=text["intermediate_size"],
        heads=text["num_attention_heads"],
        kv_heads=text["num_key_value_heads"],
        tile=pixels,
        patch=vision["patch_size"],
        max_tiles=tiles,
        vision_layers=vision_layers,
        global_layers=global_layers,
        intermediate_indices=indices,
        vision_hidden=vision["hidden_size"],
        vision_heads=vision["attention_heads"],
        vision_intermediate=vision["intermediate_size"],
        rope=text["rope_scaling"]["rope_type"],
        vocab_size=text["vocab_size"],
        init_std=text["initializer_range"],  # 0.25 (the tests' fixtures) at width 4096 overflows activations
        gate=0.8,
    )


def run_paths(out: Path, geometry, seq: int, chunk: int, results: str) -> tuple[Path, Path, Path]:
    """Where a bench run keeps its checkpoint, its lvb work dir and its results file: the
    scripts that share a checkpoint and an export (convert_scale.py, real_widths.py) agree."""
    return (out / f"ckpt-{geometry.name}", out / f"work-{geometry.name}-seq{seq}-chunk{chunk}",
            out / f"{results}-{geometry.name}-seq{seq}-chunk{chunk}.json")


def save_json(path: Path, data: dict) -> None:
    """Written whole or not at all: a run killed mid-write keeps the previous results."""
    from lvb.workdir import write_atomic

    write_atomic(path, json.dumps(data, indent=1, default=str))


def stamp() -> dict:
    """Where and when figures were measured: the commit, the time (UTC), the machine, its load."""
    import subprocess
    from datetime import datetime, timezone

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"commit": commit, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "load_average": list(os.getloadavg())}


def record_result(name: str, figures: dict, label: str | None = None) -> Path:
    """bench/results/<name>.json (committed; tests/test_bench_results.py holds the READMEs' tables
    to it): `figures` with their stamp(), under `label` when the file keeps several builds."""
    path = RESULTS / f"{name}.json"
    entry = figures | stamp()
    if label is not None:
        entry = (json.loads(path.read_text()) if path.is_file() else {}) | {label: entry}
    RESULTS.mkdir(exist_ok=True)
    save_json(path, entry)
    return path


def recorded(name: str, script: str) -> dict:
    """bench/results/<name>.json, or an error naming the script that writes it."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"error: {path.relative_to(REPO)} is missing; run `{script}` first (bench/README.md, Rerun order)")
    return json.loads(path.read_text())


def conversion(model: str = "11b") -> dict:
    """convert_scale.py's recorded run at `model`'s widths: per-net figures and the extrapolation."""
    script = "bench/convert_scale.py" + ("" if model == "11b" else f" --model {model}")
    entry = recorded("convert_scale", script).get(model)
    if entry is None:
        raise SystemExit(f"error: bench/results/convert_scale.json holds no {model} run; run `{script}` first")
    return entry


def bmodel_11b_int4_bytes() -> float:
    """The 11B INT4 combined bmodel's weights and instructions, extrapolated by convert_scale.py from
    per-net bmodels at real widths: what the memory plan counts on the device."""
    return conversion("11b")["bmodel_full_bytes"]


def geometry_11b(layers: int = 3, vision_layers: int = 2, global_layers: int = 1, cross: tuple[int, ...] | None = None,
                 max_tiles: int | None = None, tile: int | None = None):
    return geometry_of("11b", layers, vision_layers, global_layers, cross, max_tiles, tile)


def geometry_tiny(layers: int = 3, vision_layers: int = 2, global_layers: int = 1):
    """A small geometry with the same structure, to try the scripts in a minute."""
    from lvb.testing.checkpoints import Geometry

    return Geometry(
        name=f"tiny-L{layers}", text_layers=layers, cross_layers=cross_layers_for(layers), hidden=128, intermediate=256,
        heads=4, kv_heads=2, tile=56, patch=14, max_tiles=4, vision_layers=vision_layers, global_layers=global_layers,
        intermediate_indices=(0, vision_layers - 1), vision_hidden=64, vision_heads=4, vision_intermediate=128,
        init_std=0.02,
    )


def _group(name: str) -> str:
    """Which shard a tensor goes to: one per text layer, the embedding, the head, the vision side."""
    if name.startswith("language_model.model.layers."):
        return f"layer-{int(name.split('.')[3]):03d}"
    if name.startswith("language_model.model.embed_tokens."):
        return "embed"
    if name.startswith(("language_model.model.norm.", "language_model.lm_head.")):
        return "head"
    return "vision"


def _init(name: str, shape, std: float, gate: float, generator):
    import torch

    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate"):
        return torch.full(shape, gate, dtype=torch.bfloat16)
    if leaf == "bias":
        return torch.zeros(shape, dtype=torch.bfloat16)
    if "norm" in name and leaf == "weight":  # RMSNorm / LayerNorm scales, q_norm / k_norm
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=generator)


def checkpoint_complete(directory: Path) -> bool:
    index = directory / "model.safetensors.index.json"
    if not index.is_file() or not (directory / "config.json").is_file() or not (directory / "tokenizer.json").is_file():
        return False
    files = set(json.loads(index.read_text())["weight_map"].values())
    return all((directory / f).is_file() for f in files)


def write_streaming_checkpoint(directory: Path, geometry, seed: int = 0) -> dict:
    """Write a loadable mllama checkpoint group by group; returns what it wrote."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, MllamaForConditionalGeneration

    from lvb.export.weights import canonical
    from lvb.testing.checkpoints import mllama_config, save_processor

    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = mllama_config(geometry)
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    shapes = {canonical(k): tuple(v.shape) for k, v in model.state_dict().items()}
    del model
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(_group(name), []).append(name)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for group in sorted(groups):
        file = f"model-{group}.safetensors"
        tensors = {n: _init(n, shapes[n], geometry.init_std, geometry.gate, generator) for n in sorted(groups[group])}
        tmp = directory / (file + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / file)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: file for n in tensors})
        del tensors
    config.save_pretrained(directory)
    text = config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                     do_sample=False).save_pretrained(directory)
    save_processor(directory, geometry)
    index = directory / "model.safetensors.index.json"  # last: its presence means "complete"
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    os.replace(tmp, index)
    return {"seconds": round(time.perf_counter() - started, 1), "bytes": total, "tensors": len(weight_map),
            "shards": len(groups)}


def check_loads(directory: Path) -> dict:
    """What lvb reads: the spec and every tensor's name and shape, against transformers' model."""
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    from lvb.export.weights import CheckpointWeights, canonical
    from lvb.spec import ModelSpec

    spec = ModelSpec.from_dir(directory)
    weights = CheckpointWeights(directory)
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(MllamaConfig.from_pretrained(directory))
    expected = {canonical(k): list(v.shape) for k, v in model.state_dict().items()}
    got = {n: weights.shape(n) for n in weights.location}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
        raise SystemExit(f"{directory}: checkpoint does not match the config: missing {missing[:5]}, extra {extra[:5]}, "
                         f"wrong shape {wrong[:5]}")
    return {"spec": spec, "parameters": sum(int(torch.Size(s).numel()) for s in expected.values())}


def write_config_only(directory: Path, geometry) -> Path:
    """config.json, tokenizer, chat template and processor config: what lvb's runtime reads, no weights."""
    from transformers import GenerationConfig

    from lvb.testing.checkpoints import mllama_config, save_processor

    if (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = mllama_config(geometry)
    config.save_pretrained(directory)
    text = config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                     do_sample=True, temperature=0.6, top_p=0.9).save_pretrained(directory)
    save_processor(directory, geometry)
    return directory


def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": ram, "python": platform.python_version(),
            "kernel": platform.release()}


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def table(rows: list[list], header: list[str]) -> str:
    """A plain fixed-width table (also valid Markdown)."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def compile_first_of_kinds(work: Path, kinds, quant: str, head_quant: str) -> dict[str, dict]:
    """The first net of each of `kinds` in an export, each with all its stages, compiled unchecked
    through `Compiler.compile_net` (cached where `lvb compile` looks): {net: its result, kind and
    first input's shape at each stage}.
    One net stands for its siblings: layers of a kind have the same shapes."""
    from lvb.compile.compiler import CheckMode, CompileSettings, Compiler
    from lvb.toolchain import find_toolchain

    compiler = Compiler(work, CompileSettings(quant=quant, head_quant=head_quant, check=CheckMode.NONE), find_toolchain(None))
    wanted = {}
    for job in compiler.jobs:
        if job.kind in kinds and job.kind not in wanted:
            wanted[job.kind] = job
    results = {}
    for kind, job in wanted.items():
        started = time.perf_counter()
        print(f"compiling {job.name} ({kind.value}, {len(job.net.stages)} stages) ...", flush=True)
        results[job.name] = compiler.compile_net(job.name) | {
            "kind": kind.value, "first_input": [list(s.inputs[0].shape) for s in job.net.stages]}
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    return results


def first_of_kinds_record(results: dict[str, dict]) -> dict[str, dict]:
    """What a results file keeps of compile_first_of_kinds' nets: each one's kind, deploy options and
    compile seconds, and per stage (largest first) its first input's shape and its estimate."""
    return {name: {key: r[key] for key in ("kind", "options", "seconds", "first_input", "device")} for name, r in results.items()}


def compiles(work: Path, **settings) -> list[dict]:
    """The work dir's compile manifests of lvb's version whose settings have these values (e.g.
    quant="int4", check="kinds"), each with its "path", the newest bmodel last."""
    from lvb.workdir import COMPILE_VERSION, WorkDir, read_manifest

    folder = WorkDir(work)
    found = [m | {"path": str(p)} for p in folder.compile_manifests() if (m := read_manifest(p, COMPILE_VERSION))
             and all(m["settings"].get(k) == v for k, v in settings.items())]
    made = lambda m: (folder.root / m["bmodel"]).stat().st_mtime if (folder.root / m["bmodel"]).is_file() else 0.0
    return sorted(found, key=made)


def latest_compile(work: Path, **settings) -> dict:
    """The newest of compiles(work, **settings), or {} when there is none."""
    found = compiles(work, **settings)
    return found[-1] if found else {}


def newest_compile(work: Path, quant: str | None, head_quant: str | None = None) -> dict:
    """The work dir's newest compile manifest at `quant` and `head_quant` (None: any), or an error
    naming the command that makes one."""
    wanted = {k: v for k, v in (("quant", quant), ("head_quant", head_quant)) if v is not None}
    if not (found := latest_compile(work, **wanted)):
        raise SystemExit(f"{work} holds no such compile (--quant {quant}, --head-quant {head_quant}); run lvb compile --check none first")
    return found


def plan_estimates(nets, by_kind: dict[str, list[dict]]):
    """Every net of a plan priced as the compiled net of its kind was ({kind: its recorded
    stages' estimates}, as first_of_kinds_record or device_time.json keep them): one net stands
    for its siblings. Nets of a kind not in `by_kind` are left out, for price() to name."""
    from lvb.devicetime import Estimate, NetEstimates

    stages = {kind: tuple(Estimate.from_json(s) for s in rows) for kind, rows in by_kind.items()}
    return NetEstimates({n.name: stages[n.kind.value] for n in nets if n.kind.value in stages}, ())


def lvb_export(checkpoint: Path, work: Path, *args: str) -> None:
    """`lvb export` in a subprocess (its own cache skips what is already exported)."""
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    argv = [sys.executable, "-m", "lvb.cli", "export", "--model", str(checkpoint), "--out", str(work), *args]
    print("exporting:", " ".join(argv[3:]), flush=True)
    subprocess.run(argv, check=True, env=env)
