"""`lvb export`: every net of the contract to ONNX, one layer's weights at a time,
each checked against PyTorch on the spot.

What it writes under the work directory's export/ is described in lvb.workdir.
A net folder appears (by rename) only after its check passed, and the
manifest names it only after that, so an interrupted export never leaves a
net that a later run would trust. A net whose weights, settings and tool
versions are unchanged is not exported again.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import math
import mmap
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

import lvb
from lvb.check import run_once, run_torch, save_check, torch_vs_onnx
from lvb.contract import DEFAULT_BATCH, DEFAULT_CHUNKS, DEFAULT_SEQ, NetSpec, batch_sizes, chunk_sizes, plan
from lvb.errors import LvbError
from lvb.export.weights import CheckpointWeights
from lvb.spec import ModelSpec
from lvb.workdir import (EXPORT_VERSION, WorkDir, lock_work, cache_key, damaged_files, record_file, remove_stale_scratch,
                         scratch, write_json)

OPSET = 17  # tpu-mlir rejects the opset-18 graphs of the dynamo exporter
# How lvb rewrites the traced graph; part of every net's cache key.
# 2: no Identity of a weight, small ops on constants alone evaluated (_prepare_for_tpu_mlir).
GRAPH_FORM = 2


class ExportError(LvbError, RuntimeError):
    """An export that cannot go on; the message names the net or setting."""


@dataclass(frozen=True)
class ExportSettings:
    seq: int
    chunks: tuple[int, ...]  # prefill chunk sizes, largest first
    batch: tuple[int, ...] = DEFAULT_BATCH  # decode batch sizes (rows), largest first
    verify: int = 0  # rows of a speculative check the heads score at once (0: none)

    def to_json(self) -> dict:
        # A single-conversation export's manifest stays as it was before batches and checks existed.
        batch = {"batch": list(self.batch)} if self.batch != DEFAULT_BATCH else {}
        verify = {"verify": self.verify} if self.verify else {}
        return {"seq": self.seq, "chunks": list(self.chunks), "opset": OPSET} | batch | verify


def exporter_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("torch", "transformers", "onnx", "onnxruntime")} | {
        "lvb": lvb.__version__
    }


def net_key(net: NetSpec, versions: dict, weights_digest: str) -> str:
    """What an exported net depends on: its shapes (so seq and chunk only where they matter),
    the tools, its part's graph revision, the patches (and how they split attention) and its
    weights' content."""
    from lvb import patches
    from lvb.export.parts import PARTS

    return cache_key(net.to_json(), OPSET, GRAPH_FORM, versions, PARTS[net.kind].revision, weights_digest,
                     [p.attribute for p in patches.PATCHES], patches.scores_bytes_per_group())


_PLAIN = (int, float, str, bool, type(None), list, tuple, dict)


def _plain(value):
    """A read value as the manifest keeps it (JSON), so that it compares equal after a reload."""
    import json

    return json.loads(json.dumps(value, default=str))


@contextmanager
def recording_reads(roots: dict[str, object]) -> Iterator[dict[str, object]]:
    """Every plain value (number, string, list, dict) read from the objects under `roots` (a
    transformers config and its sub-configs, the ModelSpec and its parts) while the block runs,
    by dotted path from its root: what a part's module, its checks and its trace depended on.

    A net's cache entry keeps these and the export compares them with the checkpoint's current
    values before it reuses the net, so every config value a part reads is in its key without
    a list kept by hand: rope_theta, rope scaling, rms_norm_eps, the vision norm_eps..."""
    from transformers import PreTrainedConfig

    paths: dict[int, str] = {}
    classes: set[type] = {PreTrainedConfig}

    def walk(obj, path):
        if id(obj) in paths:
            return
        paths[id(obj)] = path
        classes.add(type(obj))
        children = ([(f.name, getattr(obj, f.name)) for f in fields(obj)] if is_dataclass(obj)
                    else [(k, v) for k, v in vars(obj).items() if isinstance(v, PreTrainedConfig)])
        for name, child in children:
            if isinstance(child, PreTrainedConfig) or is_dataclass(child):
                walk(child, f"{path}.{name}")

    for name, root in roots.items():
        walk(root, name)
    reads: dict[str, object] = {}
    originals = {cls: cls.__dict__.get("__getattribute__") for cls in classes}

    def recorder(cls):
        inner = cls.__dict__.get("__getattribute__") or object.__getattribute__

        def __getattribute__(self, key):
            value = inner(self, key)
            path = paths.get(id(self))
            if path is not None and not key.startswith("_") and isinstance(value, _PLAIN):
                reads[f"{path}.{key}"] = _plain(value)
            return value
        return __getattribute__

    try:
        for cls in classes:
            if cls is PreTrainedConfig or originals[cls] is None and not issubclass(cls, PreTrainedConfig):
                cls.__getattribute__ = recorder(cls)
        yield reads
    finally:
        for cls, original in originals.items():
            if original is None:
                if "__getattribute__" in cls.__dict__:
                    delattr(cls, "__getattribute__")
            else:
                cls.__getattribute__ = original


def read_again(roots: dict[str, object], reads: dict[str, object]) -> str | None:
    """None when every value of `reads` is still what the objects under `roots` hold; else the
    first that changed, as "config.text_config.rope_theta 500000.0 -> 10000.0"."""
    for path, value in reads.items():
        name, *steps = path.split(".")
        obj = roots.get(name)
        try:
            for step in steps:
                obj = getattr(obj, step)
        except AttributeError:
            return f"{path} is gone"
        now = _plain(obj) if isinstance(obj, _PLAIN) else repr(obj)
        if now != value:
            return f"{path} {value!r} -> {now!r}"
    return None


def minimum_sequence(model_dir: Path, text_only: bool = False) -> int:
    """Tokens of the shortest useful chat: an image (unless the model is text-only) and a
    one-word question, plus one to answer."""
    from lvb.text import ChatTemplate, Tokenizer

    messages = [{"role": "user", "content": [*([] if text_only else [{"type": "image"}]), {"type": "text", "text": "Hi"}]}]
    return len(Tokenizer.from_dir(model_dir).encode_chat(ChatTemplate.from_dir(model_dir), messages)) + 1


def dynamic_axes(net: NetSpec) -> dict[str, dict[int, str]]:
    """The axes that differ between a net's stages (the prefill chunk, and the mask's
    cache-plus-chunk width): symbolic in the ONNX graph, so that one graph serves every stage."""
    axes: dict[str, dict[int, str]] = {}
    for stage in net.smaller:
        for prefix, ours, theirs in (("", net.inputs, stage.inputs), ("out_", net.outputs, stage.outputs)):
            for a, b in zip(ours, theirs):
                for axis, (x, y) in enumerate(zip(a.shape, b.shape)):
                    if x != y:
                        axes.setdefault(prefix + a.name, {})[axis] = f"{a.name}_{axis}"
    return axes


def _export_onnx(module, net: NetSpec, inputs: dict[str, np.ndarray], path: Path) -> None:
    import torch

    args = tuple(torch.from_numpy(inputs[t.name]) for t in net.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about shapes that are constant here by design
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[t.name for t in net.inputs],
            output_names=[f"out_{t.name}" for t in net.outputs],
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
            dynamic_axes=dynamic_axes(net) or None,
        )


@dataclass(frozen=True)
class StandIn:
    """A vocabulary-sized weight traced as a few rows. The TorchScript exporter copies every
    weight several times while it builds and serializes the graph (pytorch/pytorch#61263),
    2 GB per copy for an 11B embedding, so the real tensor goes straight from the
    checkpoint into the net's external data afterwards."""

    tensor: str  # checkpoint name
    shape: tuple[int, int]  # the real [rows, columns]
    rows: int  # the stand-in's rows, a count no dimension of the net has


def _swap_in_stand_ins(module, parameters: dict[str, str], nets: list[NetSpec]) -> list[StandIn]:
    """Replace each named parameter of `module` by a stand-in of a few rows."""
    import torch

    taken = {d for net in nets for t in (*net.inputs, *net.outputs) for d in t.shape}
    stand_ins = []
    for parameter, tensor in parameters.items():
        owner_name, _, attribute = parameter.rpartition(".")
        owner = module.get_submodule(owner_name)
        real = getattr(owner, attribute)
        taken |= set(real.shape)
        rows = next(n for n in itertools.count(3) if n not in taken)
        taken.add(rows)
        setattr(owner, attribute, torch.nn.Parameter(torch.linspace(-1, 1, rows * real.shape[1]).reshape(rows, -1), requires_grad=False))
        stand_ins.append(StandIn(tensor, tuple(real.shape), rows))
        if real.untyped_storage().resizable():
            real.untyped_storage().resize_(0)
    if stand_ins:  # most parts have none, and nothing was freed
        _release_heap()
    return stand_ins


def _move_weights_out(path: Path, stand_ins: Sequence[StandIn] = (), weights: CheckpointWeights | None = None,
                      threshold: int = 1024) -> None:
    """Put every initializer of `threshold` bytes or more into `<net>.weights` beside the
    graph, each at a page-aligned offset, so that onnxruntime maps them from the file
    instead of copying them (at 11B widths an embedding is 2 GB, and a copy doubled the
    exporter's peak). tpu-mlir and onnx.load read external data as well. A stand-in's
    place is filled from the checkpoint, transposed where the exporter folded a transpose."""
    import onnx

    model = onnx.load(str(path))  # also reads any external files torch wrote for a net > 2 GB
    _prepare_for_tpu_mlir(model)
    weights_file = path.with_suffix(".weights")
    found = set()
    with open(weights_file, "wb") as out:
        for tensor in model.graph.initializer:
            dims = tuple(tensor.dims)
            stand_in = next((s for s in stand_ins if dims in ((s.rows, s.shape[1]), (s.shape[1], s.rows))), None)
            if stand_in is None and len(tensor.raw_data) < threshold:
                continue
            offset = -out.tell() % mmap.ALLOCATIONGRANULARITY + out.tell()
            out.seek(offset)
            if stand_in is None:
                length = out.write(tensor.raw_data)
            else:
                transposed = dims[0] != stand_in.rows
                length = weights.write_float32(stand_in.tensor, out, transpose=transposed)
                tensor.ClearField("dims")
                tensor.dims.extend(stand_in.shape[::-1] if transposed else stand_in.shape)
                found.add(stand_in)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", weights_file.name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    if missing := [s.tensor for s in stand_ins if s not in found]:
        raise ExportError(f"{path.stem}: the traced graph has no plain initializer for {', '.join(missing)}; "
                          "the part's stand_ins do not match how the exporter wrote it")
    if stand_ins:  # the outputs were traced with the stand-ins' row counts
        real_rows = {s.rows: s.shape[0] for s in stand_ins}
        for output in model.graph.output:
            for dim in output.type.tensor_type.shape.dim:
                dim.dim_value = real_rows.get(dim.dim_value, dim.dim_value)
        model.graph.ClearField("value_info")  # shapes inferred from the stand-ins; optional in ONNX
    onnx.save(model, str(path))
    for leftover in path.parent.iterdir():  # torch's own external files, now copied into <net>.weights
        if leftover not in (path, weights_file):
            leftover.unlink()


# The most bytes of constant inputs _prepare_for_tpu_mlir evaluates an op on: gates, shapes.
FOLD_BYTES = 1 << 16


def _tensor_bytes(tensor) -> int:
    """An initializer's size, without copying its data."""
    from onnx import helper

    return math.prod(tensor.dims) * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def _constant_bytes(node) -> int:
    """A Constant node's size, read from its attribute (a tensor, or a few scalars)."""
    return sum(_tensor_bytes(a.t) if a.HasField("t") else 8 * max(1, len(a.ints) + len(a.floats) + len(a.strings))
               for a in node.attribute)


def _prepare_for_tpu_mlir(model) -> None:
    """Rewrite the traced graph so that tpu-mlir's converter reads it without its ONNX
    simplifier, which holds several times a net's weight bytes and was what set the whole
    conversion's peak RAM (bench/README.md, transform_memory.py and convert_scale.py).

    The converter takes an initializer only as a weight operand. The TorchScript exporter
    leaves two other uses, which the simplifier used to fold: an Identity that feeds a weight
    equal to another (it stores equal weights once: norms of ones, zero biases and gates of a
    fresh model, tied ones), and small ops on constants alone (tanh of a gate, a Pad's pads
    computed from shapes), which are evaluated here."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    kept = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
        weight_inputs = [x for x in node.input if x in initializers]
        if node.op_type == "Identity" and weight_inputs and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
            continue
        inputs = [x for x in node.input if x]
        if (inputs and all(x in initializers or x in constants for x in inputs) and not set(node.output) & outputs
                and sum(_tensor_bytes(initializers[x]) if x in initializers else _constant_bytes(constants[x])
                        for x in inputs) <= FOLD_BYTES):
            feeds = {x: numpy_helper.to_array(initializers[x]) if x in initializers
                     else ReferenceEvaluator(constants[x]).run(None, {})[0] for x in inputs}
            for name, value in zip(node.output, ReferenceEvaluator(node).run(None, feeds)):
                initializers[name] = numpy_helper.from_array(np.asarray(value), name)
                graph.initializer.append(initializers[name])
            continue
        kept.append(node)
    used = {x for n in kept for x in n.input} | outputs
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(kept)


def _free_weights(module) -> None:
    """Release a traced module's weights now. torch.onnx.export keeps a reference to large
    weight tensors after it returns (pytorch/pytorch#130115), so dropping the module is not
    enough: empty their storages."""
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        if storage.resizable():  # not one that safetensors maps from the file
            storage.resize_(0)
    _release_heap()


def _release_heap() -> None:
    """Collect, then hand freed heap back to the OS, which glibc would otherwise keep:
    the exporter's footprint would creep up net by net."""
    import ctypes
    import ctypes.util

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except AttributeError:  # not glibc
            pass


def eager_config(model_dir: Path):
    """The checkpoint's config with eager attention, as every part is built for export and its checks."""
    from transformers import MllamaConfig

    config = text_only_config(model_dir) if ModelSpec.from_dir(model_dir).text_only else MllamaConfig.from_pretrained(model_dir)
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "eager"  # one plain graph; sdpa does not export to opset 17 cleanly
    return config


def text_only_config(model_dir: Path):
    """A Llama text checkpoint's config as an mllama one without cross-attention layers: a
    LlamaDecoderLayer is an MllamaSelfAttentionDecoderLayer (same weights, same arithmetic, same
    rotary embedding), so the text parts and patches serve both. The vision config is
    transformers' default and never read (a text model has no vision nets)."""
    from transformers import LlamaConfig, MllamaConfig

    llama = LlamaConfig.from_pretrained(model_dir)
    text = {key: getattr(llama, key) for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "rope_parameters", "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
        "tie_word_embeddings")}
    return MllamaConfig(text_config=text | {"cross_attention_layers": []}, tie_word_embeddings=llama.tie_word_embeddings)


def check_weights(config, weights: CheckpointWeights) -> None:
    """Every tensor the config implies is in the checkpoint, at the shape it implies, in a
    dtype lvb reads: a config and weights of two different models (another width, another
    vocabulary) or F8/F64 weights are refused before any work, not at the net that first
    loads one (after the whole vision tower, at the 11B). The expected names and shapes are
    transformers' own model, built on the meta device (no memory)."""
    import torch
    from transformers import MllamaForConditionalGeneration

    from lvb.export.weights import READABLE_DTYPES, canonical

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = {canonical(k): list(v.shape) for k, v in MllamaForConditionalGeneration(config).state_dict().items()}
        if not config.text_config.cross_attention_layers:  # a Llama text checkpoint: no vision tower
            expected = {k: v for k, v in expected.items() if k.startswith("language_model.")}
            # mllama's table has 8 rows past the LM vocabulary for the image token; Llama's has not.
            expected["language_model.model.embed_tokens.weight"] = list(expected["language_model.lm_head.weight"])
    except Exception as e:  # transformers' own refusal of the config, said in one line
        raise ExportError(f"config.json describes a model transformers cannot build ({type(e).__name__}: "
                          f"{' '.join(str(e).split())}); fix config.json or download the checkpoint again") from None
    tied = getattr(config.text_config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
    where = weights.model_dir
    for name, shape in expected.items():
        if name not in weights.location or name in weights.aliased and not tied:
            if tied and name.startswith("language_model.lm_head."):
                continue
            raise ExportError(f"{where}: the checkpoint has no {name}, which config.json implies; config.json and "
                              "the weights are of different models (or the download is incomplete)")
        meta = weights.meta(name)
        if list(meta["shape"]) != shape:
            raise ExportError(f"{where}: {name} is {meta['shape']} in the checkpoint, but config.json implies {shape}; "
                              "config.json and the weights are of different models")
        if meta["dtype"] not in READABLE_DTYPES:
            raise ExportError(f"{where}: {name} is {meta['dtype']}; lvb reads {', '.join(READABLE_DTYPES)} weights: "
                              "convert the checkpoint (e.g. save it with transformers in bfloat16)")


class Exporter:
    def __init__(self, model_dir: Path, work: Path, settings: ExportSettings, source: dict | None = None,
                 notify: Callable[[str], None] | None = None):
        self.model_dir, self.work, self.settings = Path(model_dir), Path(work), settings
        self.notify = notify or (lambda message: None)  # a cached file that is damaged, and rebuilt
        self.source = source or {}
        self.spec = ModelSpec.from_dir(self.model_dir)
        needed = minimum_sequence(self.model_dir, self.spec.text_only)
        if settings.seq < needed:
            raise ExportError(
                f"--seq {settings.seq} is too short: {'a' if self.spec.text_only else 'an image and a'} one-word question already take "
                f"{needed - 1} tokens, plus one to answer; use --seq {needed} or more ({DEFAULT_SEQ} is typical)"
            )
        limit = self.spec.text.max_position_embeddings
        if settings.seq > limit:
            raise ExportError(f"--seq {settings.seq} is beyond what the model was trained for: config.json's "
                              f"text_config.max_position_embeddings is {limit}; use --seq {limit} or less")
        try:
            chunk_sizes(settings.chunks, settings.seq)
        except ValueError:
            raise ExportError(f"--chunk {','.join(map(str, settings.chunks))}: every chunk size must be between 1 and "
                              f"--seq {settings.seq}") from None
        self.dir = WorkDir(self.work)
        self.out = self.dir.export
        blocking = next((p for p in (self.work, self.out) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ExportError(f"--out {self.work}: {blocking} is a file, not a folder; pass a new or existing folder")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExportError(f"--out {self.work}: cannot create {self.out} ({e.strerror}); pass a writable folder") from None
        remove_stale_scratch(self.out)  # an interrupted run's; never trusted
        self.manifest = self.dir.read_export()
        if not self.manifest and self.dir.export_manifest.is_file():
            self.notify(f"{self.dir.export_manifest} is damaged or from another lvb version; exporting every net again")
        self.weights = CheckpointWeights(self.model_dir, self.manifest.get("weight_digests", {}))
        self.config = eager_config(self.model_dir)
        check_weights(self.config, self.weights)  # before any work: config and weights of one model
        self.versions = exporter_versions()
        self.nets = plan(self.spec, settings.seq, settings.chunks, settings.batch, settings.verify)
        self.manifest.update(
            version=EXPORT_VERSION,
            model={"dir": str(self.model_dir.resolve()), "name": self.model_dir.resolve().name} | self.source,
            settings=settings.to_json(),
            versions=self.versions,
            weight_digests=self.weights.digest_cache,
        )
        previous = self.manifest.get("nets", {})
        self.manifest["nets"] = {name: entry for name, entry in previous.items() if name in {n.name for n in self.nets}}

    def _save_manifest(self) -> None:
        write_json(self.dir.export_manifest, self.manifest)

    def _is_current(self, net: NetSpec, key: str, roots: dict[str, object]) -> bool:
        """The net was exported with this key, every config value its part read then is the
        same now, and its files are the ones recorded then."""
        entry = self.manifest["nets"].get(net.name)
        if not entry or entry.get("key") != key or not isinstance(entry.get("reads"), dict):
            return False
        changed = read_again(roots, entry["reads"])
        if changed:
            self.notify(f"{net.name} read config.json's {changed.removeprefix('config.')}; exporting {net.name} again")
            return False
        damaged = damaged_files(self.dir.net_dir(net.name), entry.get("files"))
        if damaged:
            self.notify(f"{damaged[0]}; exporting {net.name} again")
        return not damaged

    def run(self, progress: Callable[[str, int, int], None] | None = None) -> dict:
        from lvb.export.parts import PARTS
        from lvb.patches import patched

        keys = {
            net.name: net_key(
                net, self.versions,
                cache_key([self.weights.digest(p) for p in PARTS[net.kind].weight_prefixes(net, self.spec)]),
            )
            for net in self.nets
        }
        config = self.config
        roots = {"config": config, "spec": self.spec}
        todo = [net for net in self.nets if not self._is_current(net, keys[net.name], roots)]
        for net in todo:  # forget stale entries first: the manifest never names a net being replaced
            self.manifest["nets"].pop(net.name, None)
        # Readers refuse an export that is not complete, naming it unfinished rather than foreign.
        self.manifest["complete"] = not todo
        self._save_manifest()
        done = len(self.nets) - len(todo)
        # The nets of one part that share a module (a layer's prefill and decode, the two
        # embeddings) are built from the streamed weights once.
        groups: dict[tuple, list[NetSpec]] = {}
        for net in todo:
            part = PARTS[net.kind]
            groups.setdefault((part.__class__, net.layer, None if part.shared_module else net.kind), []).append(net)
        with patched():
            for nets in groups.values():
                started = time.perf_counter()
                part = PARTS[nets[0].kind]
                with recording_reads(roots) as reads:  # what the module, its checks and its trace read
                    module = part.module(nets[0], self.spec, config, self.weights)
                    references = []
                    for net in nets:
                        if progress:
                            progress(net.name, done, len(self.nets))
                        references.append(self._reference(net, module, part))
                    stand_ins = _swap_in_stand_ins(module, part.stand_ins, nets)
                    traced = [(net, stages, self._export(net, module, inputs, stand_ins)) for net, inputs, stages in references]
                # The weights go before the check: at 11B widths an embedding table is 2 GB.
                _free_weights(module)
                del module
                seconds = (time.perf_counter() - started) / len(nets)
                for net, stages, tmp in traced:
                    self._check_and_keep(net, tmp, stages, stand_ins, keys[net.name], seconds, reads)
                    done += 1
        if todo:
            self.manifest["complete"] = True
            self._save_manifest()
        if progress:
            progress("", done, len(self.nets))
        return self.manifest

    def _reference(self, net: NetSpec, module, part) -> tuple:
        """Each stage's check inputs and PyTorch's outputs on them, with the real weights;
        the largest stage's inputs also trace the graph."""
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(net.name.encode()).digest()[:4], "little"))
        stages = []
        for stage in net.stages:
            inputs = part.dummy_inputs(stage, self.spec, rng)
            stages.append((inputs, run_torch(module, stage, inputs)))
        return net, stages[0][0], stages

    def _export(self, net: NetSpec, module, inputs: dict[str, np.ndarray], stand_ins: list[StandIn]) -> Path:
        """The ONNX file in a scratch folder."""
        tmp = scratch(self.dir.net_dir(net.name))
        if stand_ins:  # ids must index a stand-in's few rows; the graph does not depend on their values
            inputs = {name: np.zeros_like(v) if v.dtype.kind in "iu" else v for name, v in inputs.items()}
        _export_onnx(module, net, inputs, tmp / f"{net.name}.onnx")
        _release_heap()
        return tmp

    def _check_and_keep(self, net: NetSpec, tmp: Path, stages: list[tuple[dict, list]], stand_ins: list[StandIn],
                        key: str, seconds: float, reads: dict[str, object]) -> None:
        """onnxruntime against PyTorch at every stage; only a net that passes is moved into place and named."""
        started = time.perf_counter()
        _move_weights_out(tmp / f"{net.name}.onnx", stand_ins, self.weights)
        checks = []
        for index, (stage, (inputs, expected)) in enumerate(zip(net.stages, stages)):
            got = run_once(tmp / f"{net.name}.onnx", inputs)
            check, miss = torch_vs_onnx(stage, expected, got)
            if miss:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ExportError(miss)
            save_check(tmp / self.dir.check_file(net.name, index).name, inputs, got)
            checks.append(check)
        check = min(checks, key=lambda c: c["cosine"])
        final = self.dir.net_dir(net.name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.manifest["nets"][net.name] = net.to_json() | {
            "file": self.dir.onnx_entry(net.name),
            "files": {path.name: record_file(path) for path in sorted(final.iterdir())},
            "key": key,
            "reads": dict(sorted(reads.items())),
            "check": check,
            "seconds": round(time.perf_counter() - started + seconds, 3),
        }
        self._save_manifest()


def export(model_dir: Path, work: Path, seq: int, chunks: int | Sequence[int] | None = None, progress=None,
           source: dict | None = None, notify: Callable[[str], None] | None = None,
           batch: int | Sequence[int] = DEFAULT_BATCH, draft_tokens: int = 0) -> dict:
    """`chunks`: the prefill chunk sizes (one or several); by default DEFAULT_CHUNKS, capped at seq;
    an explicit size outside 1..seq is refused. `draft_tokens` k > 0 builds for speculative
    decoding with k proposals a check: a prefill chunk of k + 1 tokens, and heads that score
    those k + 1 rows in one launch. `source` adds to the manifest's model entry: a Hub
    checkpoint's name (which names the bmodel; its snapshot folder is named by the commit), repo id
    and commit. `notify` hears of each cached file found damaged (and rebuilt)."""
    chunks = (chunks,) if isinstance(chunks, int) else tuple(chunks or (min(seq, c) for c in DEFAULT_CHUNKS))
    try:
        rows = batch_sizes(batch)
    except ValueError:
        raise ExportError(f"--batch {batch}: every batch size must be a whole number of 1 or more, e.g. --batch 1,2,4") from None
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or not 0 <= draft_tokens < seq:
        raise ExportError(f"--draft-tokens {draft_tokens}: give 0 (no draft) or the tokens a draft proposes a check, "
                          f"1 to {seq - 1} (below --seq)")
    if draft_tokens:
        chunks = (*chunks, draft_tokens + 1)
    settings = ExportSettings(seq=seq, chunks=tuple(sorted(set(chunks), reverse=True)), batch=rows,
                              verify=draft_tokens + 1 if draft_tokens else 0)
    work = Path(work)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # a file there, or no permission: the Exporter names the problem
    if not work.is_dir():
        return Exporter(model_dir, work, settings, source=source, notify=notify).run(progress)
    # One export (or compile, verify) of a work directory at a time: two at once leave a tree
    # that each believes in.
    with lock_work(work, "lvb export"):
        return Exporter(model_dir, work, settings, source=source, notify=notify).run(progress)
