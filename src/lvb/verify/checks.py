"""The checks `lvb verify` runs: every hop of every net, then whole answers.

Per net (lvb.check, the same check and thresholds as export and compile):
PyTorch (transformers' layers, streamed from the checkpoint) against
onnxruntime, and onnxruntime (with the bmodel's weight quantization) against
the bmodel on the chosen backend, on the inputs the export checked it with.
End to end: greedy answers of the runtime against transformers' generate over
fixed prompts and pictures, and task accuracy when the checkpoint declares a
task (the toy does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lvb.errors import LvbError

NEW_TOKENS = 16


class VerifyError(LvbError):
    pass


@dataclass
class PartResult:
    net: str
    kind: str
    layer: int | None
    quant: str | None
    torch_vs_onnx: float
    onnx_vs_bmodel: float | None = None
    bmodel_vs_fp32: float | None = None
    # A w8a8 net the compile checked: the bmodel against tpu-mlir's interpreter's outputs it kept.
    bmodel_vs_interpreter: float | None = None
    max_abs_err: float | None = None
    # What `lvb compile` did with it: "checked", "as <net>" (--check kinds trusted it on a
    # sibling's check), "unchecked" (--check none); None on onnxruntime.
    compile_check: str | None = None
    misses: list[str] = field(default_factory=list)


@dataclass
class AnswerResult:
    name: str
    reference: list[int]
    got: list[int]
    agreement: float | None  # None: the prompt did not fit the compiled sequence (a miss)
    text: str


@dataclass
class Report:
    model: str
    backend: str
    bmodel: str | None
    quant: str | None
    parts: list[PartResult] = field(default_factory=list)
    answers: list[AnswerResult] = field(default_factory=list)
    agreement: float | None = None
    min_agreement: float | None = None
    task: dict | None = None
    misses: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.misses

    def to_json(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def check_parts(model_dir: Path, work: Path, engine, compiled: dict | None, progress=None) -> list[PartResult]:
    """Both hops of every exported net, on the inputs the export checked it with."""
    import gc

    from lvb.check import load_check, onnx_vs_bmodel, run_once, run_torch, torch_vs_onnx
    from lvb.contract import NetSpec
    from lvb.export.exporter import eager_config
    from lvb.export.parts import PARTS
    from lvb.export.weights import CheckpointWeights
    from lvb.patches import patched
    from lvb.spec import ModelSpec
    from lvb.workdir import WorkDir

    directory = WorkDir(work)
    export = directory.read_export()["nets"]
    spec = ModelSpec.from_dir(model_dir)
    config = eager_config(model_dir)
    weights = CheckpointWeights(model_dir)
    results = []
    with patched():
        for index, (name, entry) in enumerate(export.items()):
            if progress:
                progress(name, index, len(export))
            net = NetSpec.from_json(entry)
            feeds, _ = load_check(directory.check_file(name))
            module = PARTS[net.kind].module(net, spec, config, weights)
            expected = run_torch(module, net, feeds)
            del module
            gc.collect()
            onnx_path = directory.onnx(entry)
            fp32 = run_once(onnx_path, feeds)
            hop1, miss = torch_vs_onnx(net, expected, fp32)
            result = PartResult(name, net.kind.value, net.layer, None, hop1["cosine"])
            result.misses += [miss] if miss else []
            if compiled is not None:
                quant = compiled["nets"][name]["quant"]
                got = engine.run(name, feeds)
                hop2, miss = onnx_vs_bmodel(net, onnx_path, feeds, fp32, got, quant, compiled["settings"]["group_size"])
                result.quant = quant
                result.compile_check = compile_check(compiled["nets"][name])
                result.onnx_vs_bmodel = hop2["cosine"]
                result.max_abs_err = hop2["max_abs_err"]
                result.bmodel_vs_fp32 = hop2["cosine_fp32"]
                result.misses += [miss] if miss else []
                result.misses += _against_interpreter(result, directory, compiled["nets"][name], net, got)
            results.append(result)
    return results


def _against_interpreter(result: PartResult, directory, compiled_net: dict, net, got: list) -> list[str]:
    """A w8a8 net's outputs on this backend against what tpu-mlir's interpreter gave the compile
    on the same inputs (kept beside the bmodel for each net the compile checked): the misses."""
    from lvb.check import INTERPRETED, against_interpreter, load_interpreted, min_cosine, shortfalls
    from lvb.numerics import lowest
    from lvb.workdir import matches_record

    record = compiled_net.get("interpreted")
    if record is None:
        return []
    path = (directory.root / compiled_net["bmodel"]).parent / INTERPRETED
    if (problem := matches_record(path, record)) is not None:
        return [f"{net.name}: {problem}; run `lvb compile` again to remake it"]
    cosines = against_interpreter(net, load_interpreted(path, net), got)
    result.bmodel_vs_interpreter = lowest(cosines.values())
    missed = shortfalls(cosines, {name: min_cosine(net.kind, compiled_net["quant"], name) for name in cosines})
    return [f"{net.name}: bmodel vs tpu-mlir's interpreter ({compiled_net['quant']}) {'; '.join(missed)}"] if missed else []


def compile_check(net: dict) -> str:
    """How the compile vouched for one net of its manifest."""
    if net.get("checked_by"):
        return f"as {net['checked_by']}"
    return "checked" if net.get("check") else "unchecked"


def _pictures():
    """A real photograph and a synthetic picture, the same every run."""
    from PIL import Image

    import skimage.data
    from lvb.tasks import draw

    photo = Image.open(Path(skimage.data.__file__).parent / "astronaut.png").convert("RGB")
    synthetic, _ = draw(np.random.default_rng(7))
    return {"photo": photo, "synthetic": synthetic}


def conversations(question: str, text_only: bool = False):
    if text_only:  # a Llama text model: the same chats without their pictures
        return {"text only": [("Hello, how are you today?", None)],
                "two turns": [(question, None), ("Tell me more.", None)]}
    pictures = _pictures()
    return {
        "photo": [(question, pictures["photo"])],
        "synthetic": [(question, pictures["synthetic"])],
        "text only": [("Hello, how are you today?", None)],
        "two turns": [(question, pictures["synthetic"]), ("Tell me more.", None)],
    }


class TransformersChat:
    """transformers itself on a whole conversation, as a user would run it: the fp32
    reference for whole answers."""

    def __init__(self, model_dir: Path, quant: str | None = None, group_size: int = 64):
        """`quant` int4/int8: the decoder layers' weights quantized as such a bmodel's are."""
        import torch
        from transformers import AutoProcessor, AutoTokenizer, LlamaForCausalLM, MllamaForConditionalGeneration

        from lvb.check import BITS, quantize_like_the_bmodel
        from lvb.spec import ModelSpec

        if ModelSpec.from_dir(model_dir).text_only:  # a Llama text checkpoint: its tokenizer is its processor
            self.processor = AutoTokenizer.from_pretrained(model_dir)
            self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            layers = self.model.model.layers
        else:
            self.processor = AutoProcessor.from_pretrained(model_dir)
            self.model = MllamaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
            layers = self.model.model.language_model.layers
        if quant in BITS:
            quantize_like_the_bmodel(layers, quant, group_size)

    def inputs(self, messages: list[dict], images: list, **template):
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template)
        if images:
            return self.processor(text=prompt, images=images, return_tensors="pt", add_special_tokens=False)
        return self.processor(text=prompt, return_tensors="pt", add_special_tokens=False)

    def generate(self, messages: list[dict], images: list, max_new_tokens: int, date_string: str | None = None,
                 **generation) -> list[int]:
        """The greedy answer's token ids; `date_string` pins the template's date, `generation`
        goes to generate (a repetition penalty, say)."""
        import torch

        inputs = self.inputs(messages, images, **({"date_string": date_string} if date_string else {}))
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generation)
        return out[0, inputs["input_ids"].shape[1]:].tolist()


def check_answers(model_dir: Path, session, question: str) -> list[AnswerResult]:
    """Greedy answers of the runtime against transformers' generate, turn by turn."""
    from lvb.runtime.pipeline import ChatError

    reference = TransformersChat(model_dir)
    results = []
    for name, turns in conversations(question, session.spec.text_only).items():
        session.reset()
        messages, images = [], []
        for index, (text, image) in enumerate(turns):
            label = name if len(turns) == 1 else f"{name}, turn {index + 1}"
            try:
                reply = session.ask(text, image=image, max_new_tokens=NEW_TOKENS)
            except ChatError as e:  # a short --seq: a miss of its own, not a numerical one
                results.append(AnswerResult(label, [], [], None, str(e)))
                break
            messages.append({"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]})
            images += [image] if image else []
            expected = reference.generate(messages, images, NEW_TOKENS)
            same = 0
            while same < min(len(expected), len(reply.tokens)) and expected[same] == reply.tokens[same]:
                same += 1
            results.append(AnswerResult(label, expected, reply.tokens, same / max(1, len(expected)), reply.text))
            messages.append({"role": "assistant", "content": [{"type": "text", "text": reply.text}]})
    del reference
    return results


def read_task(model_dir: Path) -> dict | None:
    """A checkpoint that knows a task says so in lvb-task.json (the toy does)."""
    from lvb.files import FileError, read_json

    path = Path(model_dir) / "lvb-task.json"
    if not path.exists():
        return None
    fix = "fix it or delete it (it only adds the task accuracy to `lvb verify`)"
    try:
        task = read_json(path, fix)
    except FileError as e:
        raise VerifyError(str(e)) from None
    if not isinstance(task, dict) or task.get("kind") != "shapes" or not isinstance(task.get("question"), str):
        raise VerifyError(f"{path} must be an object with \"kind\": \"shapes\" and a \"question\" string; {fix}")
    for name, kind in (("max_new_tokens", int), ("min_accuracy", (int, float))):
        if name in task and (isinstance(task[name], bool) or not isinstance(task[name], kind)):
            raise VerifyError(f"{path}: {name} must be a number, got {task[name]!r}; {fix}")
    return task


def task_accuracy(session, task: dict, pictures: int, seed: int = 20261125, progress=None) -> dict:
    """Exact-answer accuracy on freshly drawn pictures (lvb.tasks)."""
    from lvb.tasks import sample

    if task.get("kind") != "shapes":
        raise VerifyError(f"lvb-task.json names the task {task.get('kind')!r}; lvb knows 'shapes'")
    correct, wrong = 0, []
    for index, (image, answer) in enumerate(sample(pictures, seed)):
        if progress:
            progress(index, pictures)
        session.reset()
        got = session.ask(task["question"], image=image, max_new_tokens=task.get("max_new_tokens", 8)).text.strip()
        if got == answer:
            correct += 1
        elif len(wrong) < 10:
            wrong.append({"expected": answer, "got": got})
    return {"pictures": pictures, "correct": correct, "accuracy": correct / pictures,
            "min_accuracy": task.get("min_accuracy", 0.95), "examples_wrong": wrong}
