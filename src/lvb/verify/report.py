"""report.json and a self-contained report.html (inline SVG, no scripts, no network)."""

from __future__ import annotations

import html
from pathlib import Path

from lvb.verify.checks import Report
from lvb.workdir import REPORT_FILE, write_atomic, write_json

# report.json's layout; a cached report of another version is not reused.
REPORT_VERSION = 1

_WIDTH, _BAR, _GAP = 760, 14, 4


def _chart(report: Report) -> str:
    """One row per net: PyTorch-vs-onnxruntime and onnxruntime-vs-bmodel cosine, on a
    log-like axis (1 - cosine) so that 0.9999 and 0.99 look different."""
    import math

    def x(cosine):
        if cosine is None:
            return 0
        gap = max(1e-8, 1.0 - cosine)
        return (_WIDTH - 220) * max(0.0, min(1.0, (-math.log10(gap)) / 8))

    rows = []
    for i, part in enumerate(report.parts):
        y = 30 + i * (2 * _BAR + _GAP)
        colour = "#c0392b" if part.misses else "#2c3e50"
        rows.append(f'<text x="0" y="{y + _BAR}" font-size="11" fill="{colour}">{html.escape(part.net)}</text>')
        rows.append(f'<rect x="200" y="{y}" width="{x(part.torch_vs_onnx):.1f}" height="{_BAR - 2}" fill="#3498db"/>')
        if part.onnx_vs_bmodel is not None:
            rows.append(f'<rect x="200" y="{y + _BAR}" width="{x(part.onnx_vs_bmodel):.1f}" height="{_BAR - 2}" fill="#e67e22"/>')
    height = 40 + len(report.parts) * (2 * _BAR + _GAP)
    ticks = "".join(
        f'<line x1="{200 + (_WIDTH - 220) * k / 8:.1f}" y1="20" x2="{200 + (_WIDTH - 220) * k / 8:.1f}" y2="{height}" stroke="#ddd"/>'
        f'<text x="{200 + (_WIDTH - 220) * k / 8:.1f}" y="14" font-size="9" text-anchor="middle">1-1e-{k}</text>'
        for k in range(0, 9, 2)
    )
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" font-family="sans-serif">'
            f"{ticks}{''.join(rows)}</svg>")


def write_reports(report: Report, directory: Path, extra: dict | None = None) -> dict:
    """report.html, then report.json (the report and `extra`, e.g. its cache key); returns report.json's content."""
    directory.mkdir(parents=True, exist_ok=True)
    data = report.to_json() | (extra or {})
    part_rows = "".join(
        f"<tr{' class=miss' if p.misses else ''}><td>{html.escape(p.net)}</td><td>{p.kind}</td><td>{'' if p.layer is None else p.layer}</td>"
        f"<td>{p.quant or ''}</td><td>{html.escape(p.compile_check or '')}</td><td>{p.torch_vs_onnx:.6f}</td>"
        f"<td>{'' if p.onnx_vs_bmodel is None else f'{p.onnx_vs_bmodel:.6f}'}</td>"
        f"<td>{'' if p.bmodel_vs_fp32 is None else f'{p.bmodel_vs_fp32:.6f}'}</td>"
        f"<td>{'' if p.bmodel_vs_interpreter is None else f'{p.bmodel_vs_interpreter:.6f}'}</td></tr>"
        for p in report.parts
    )
    answer_rows = "".join(
        f"<tr><td>{html.escape(a.name)}</td><td>{'-' if a.agreement is None else f'{a.agreement:.2f}'}</td><td>{html.escape(a.text)}</td></tr>" for a in report.answers
    )
    task = ""
    if report.task:
        t = report.task
        task = f"<h2>Task accuracy</h2><p>{t['correct']} of {t['pictures']} pictures answered exactly ({t['accuracy']:.1%}; needs {t['min_accuracy']:.0%}).</p>"
    misses = "".join(f"<li>{html.escape(m)}</li>" for m in report.misses) or "<li>none</li>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lvb verify: {html.escape(report.model)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#2c3e50}}table{{border-collapse:collapse}}
td,th{{padding:2px 8px;border-bottom:1px solid #eee;text-align:left;font-size:13px}}.miss{{color:#c0392b}}</style></head><body>
<h1>lvb verify: {html.escape(report.model)}</h1>
<p>backend <b>{report.backend}</b>{f", bmodel <b>{html.escape(report.bmodel)}</b>" if report.bmodel else ""}.
Result: <b>{"all thresholds met" if report.ok else f"{len(report.misses)} threshold(s) missed"}</b>.</p>
<h2>Misses</h2><ul>{misses}</ul>
<h2>Similarity per part and layer</h2>
<p><span style="color:#3498db">■</span> PyTorch vs onnxruntime &nbsp; <span style="color:#e67e22">■</span> onnxruntime vs bmodel (same weight quantization); longer is closer (axis: 1 - cosine).</p>
{_chart(report)}
<table><tr><th>net</th><th>kind</th><th>layer</th><th>quant</th><th>compile check</th><th>PyTorch vs ORT</th><th>ORT vs bmodel</th><th>bmodel vs fp32</th><th>bmodel vs tpu-mlir</th></tr>{part_rows}</table>
<h2>Answers against transformers' generate</h2>
<p>Token agreement {'' if report.agreement is None else f'{report.agreement:.2f}'} (needs {report.min_agreement}).</p>
<table><tr><th>prompt</th><th>agreement</th><th>answer</th></tr>{answer_rows}</table>
{task}
</body></html>"""
    html_path = directory / "report.html"
    write_atomic(html_path, page)
    write_json(directory / REPORT_FILE, data)  # last: a report.json names a finished verify
    return data
