"""`lvb verify`: numerics at every hop, then whole answers, with a report."""

from __future__ import annotations

from pathlib import Path

import lvb
from lvb.check import MIN_AGREEMENT
from lvb.contract import Backend, Quant
from lvb.verify.checks import Report, VerifyError, check_answers, check_parts, read_task, task_accuracy
from lvb.verify.report import REPORT_VERSION, write_reports
from lvb.workdir import WorkDir, WorkDirError, cache_key, check_writable, lock_work, matches_record, read_manifest


def find_compiled(work: Path, quant: str) -> dict:
    """The newest compile of `quant` in the work directory."""
    compiled = WorkDir(work).newest_compile(quant)
    if compiled is None:
        raise VerifyError(f"{work} holds no {quant} bmodel; run `lvb compile --work {work} --quant {quant}` first")
    return compiled


def check_options(quant: str, backend: str, pictures: int) -> tuple[Quant, Backend, int]:
    """verify's options, refused in one line when bad; the CLI asks before it resolves the model
    (which may download it)."""
    if pictures < 1:
        raise VerifyError(f"--pictures {pictures} is out of range: it must be 1 or more")
    return Quant.of_weights(quant, "--quant"), Backend.of(backend, "--backend"), pictures


def verify(model_dir: Path, work: Path, quant: str = "int4", backend: str = "cmodel", pictures: int = 100,
           toolchain=None, progress=None) -> dict:
    """Run every check; returns report.json's content (from cache when nothing changed)."""
    quant, backend, pictures = check_options(quant, backend, pictures)
    with lock_work(work, "lvb verify"):
        return _verify(model_dir, work, quant, backend, pictures, toolchain, progress)


def _verify(model_dir: Path, work: Path, quant: Quant, backend: Backend, pictures: int, toolchain, progress) -> dict:
    from lvb.runtime.backends import open_engine
    from lvb.runtime.pipeline import Checkpoint, Session

    model_dir, work = Path(model_dir), Path(work)
    directory = WorkDir(work)
    try:
        export = directory.require_export(str(model_dir))
    except WorkDirError as e:
        raise VerifyError(str(e)) from None
    compiled = find_compiled(work, quant) if backend != "onnxruntime" else None
    bmodel = directory.bmodel(compiled["bmodel"]) if compiled else None
    if bmodel is not None and (problem := matches_record(bmodel, compiled.get("file"))):
        raise VerifyError(f"{problem}; run `lvb compile --work {work} --quant {quant}` again to rebuild it")
    out = directory.verify_dir(bmodel)
    checkpoint = Checkpoint.load(model_dir)
    task = read_task(model_dir)
    # The files' digests, just checked against the disk: a report is reused only for these very files.
    digests = lambda files: {name: record["sha256"] for name, record in files.items()}  # noqa: E731
    key = cache_key(lvb.__version__, backend, pictures, [[n["key"], digests(n["files"])] for n in export["nets"].values()],
                    compiled and [compiled["key"], compiled["file"]["sha256"]],
                    (model_dir / "config.json").read_text(), task)
    data = read_manifest(directory.report(bmodel), REPORT_VERSION)
    if data.get("key") == key:
        return data | {"cached": True}

    check_writable(out)  # a read-only work directory fails now, not when the report is written
    engine = open_engine(backend, bmodel=bmodel, onnx_work=work, toolchain=toolchain)
    report = Report(model=model_dir.name, backend=backend, bmodel=bmodel.name if bmodel else None,
                    quant=compiled["settings"]["quant"] if compiled else None)
    with engine:
        report.parts = check_parts(model_dir, work, engine, compiled,
                                   progress=lambda n, i, t: progress and progress(f"parts: {n}", i, t))
        session = Session(checkpoint, engine)
        question = task["question"] if task else "What is in the picture?"
        if progress:
            progress("answers against transformers", 0, 1)
        report.answers = check_answers(model_dir, session, question)
        if task:
            report.task = task_accuracy(session, task, pictures,
                                        progress=lambda i, t: progress and progress("task accuracy", i, t))
    report.min_agreement = MIN_AGREEMENT["onnxruntime" if backend == "onnxruntime" else quant]
    measured = [a.agreement for a in report.answers if a.agreement is not None]
    if not measured:
        raise VerifyError(f"no test prompt fits the {session.seq}-token sequence; export and compile with a larger --seq")
    report.agreement = sum(measured) / len(measured)
    report.misses = [m for p in report.parts for m in p.misses]
    report.misses += [f"answer {a.name!r} was not checked: {a.text}" for a in report.answers if a.agreement is None]
    if report.agreement < report.min_agreement:
        report.misses.append(f"token agreement with transformers {report.agreement:.2f} < {report.min_agreement}")
    if report.task and report.task["accuracy"] < report.task["min_accuracy"]:
        report.misses.append(f"task accuracy {report.task['accuracy']:.1%} < {report.task['min_accuracy']:.0%}")
    data = write_reports(report, out, {"version": REPORT_VERSION, "key": key, "directory": str(out)})
    return data | {"cached": False}
