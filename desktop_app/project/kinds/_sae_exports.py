"""Export writers of the SAE workflow kinds: training curves as CSV, feature dashboards as JSON and as one
self-contained HTML page (no scripts, no external files). numpy + the standard library only."""
from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from desktop_app.project.atomic import atomic_write

CURVES = ("loss", "l0", "explained_variance", "dead_fraction", "mse", "aux_loss", "lr")


def curves_csv_text(result) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    names = [c for c in CURVES if c in result.extras]
    w.writerow(["step", *names])
    steps = result.labels.get("step", [str(i) for i in range(len(result.values))])
    for i, step in enumerate(steps):
        w.writerow([step, *(repr(float(np.asarray(result.extras[c])[i])) for c in names)])
    return out.getvalue()


def write_curves_csv(result, path: Path) -> Path:
    text = curves_csv_text(result).encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(text), what="CSV file")


def dashboards_of(result) -> list[dict]:
    raw = result.extras.get("dashboards_json")
    return json.loads(str(np.asarray(raw).item())) if raw is not None else []


def dashboards_json_text(result) -> str:
    doc = {"name": result.name, "kind": result.kind, "params": result.params, "dashboards": dashboards_of(result)}
    return json.dumps(doc, indent=1, ensure_ascii=False, default=str) + "\n"


def write_dashboards_json(result, path: Path) -> Path:
    text = dashboards_json_text(result).encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(text), what="JSON file")


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
section{border-top:1px solid #ccc;padding:.6em 0}h2{font-size:1.1em;margin:.2em 0}
.ctx{font-family:monospace;white-space:pre-wrap;margin:.15em 0}.tok{padding:0 1px;border-radius:2px}
.max{outline:1px solid #c33}.muted{color:#777}table{border-collapse:collapse}td{padding:0 .6em 0 0}
svg{display:block;margin:.3em 0}"""


def _histogram_svg(counts: list[int]) -> str:
    if not counts or max(counts) == 0:
        return ""
    top, w, h = max(counts), 3 * len(counts), 40
    bars = "".join(f'<rect x="{3 * i}" y="{h - h * c / top:.1f}" width="2.5" height="{h * c / top:.1f}"/>'
                   for i, c in enumerate(counts) if c)
    return f'<svg width="{w}" height="{h}" fill="#4a7ab0" role="img" aria-label="activation histogram">{bars}</svg>'


def _context_html(ctx: dict) -> str:
    peak = max([float(a) for a in ctx.get("activations", [])] + [1e-12])
    parts = []
    for i, (tok, act) in enumerate(zip(ctx["tokens"], ctx.get("activations", []))):
        alpha = max(0.0, float(act)) / peak
        cls = "tok max" if i == ctx.get("max_index") else "tok"
        parts.append(f'<span class="{cls}" style="background:rgba(230,120,30,{alpha:.2f})" '
                     f'title="{float(act):.4g}">{html.escape(str(tok))}</span>')
    return f'<div class="ctx">{"".join(parts)} <span class="muted">({float(ctx["activation"]):.4g})</span></div>'


def dashboards_html_text(result) -> str:
    p = result.params
    head = (f"<h1>{html.escape(result.name)}: feature dashboards</h1><p class=muted>SAE {html.escape(str(p.get('sae')))}"
            f" at {html.escape(str(p.get('hook')))}, corpus {html.escape(str(p.get('corpus')))}, "
            f"{int(p.get('n_tokens', 0))} tokens</p>")
    sections = []
    for d in dashboards_of(result):
        tokens = lambda pairs: ", ".join(f"{html.escape(str(t))} ({float(v):+.3g})" for t, v in pairs)  # noqa: E731
        contexts = "".join(_context_html(c) for c in d.get("top_contexts", [])) or "<p class=muted>never active</p>"
        sections.append(
            f"<section id=\"f{int(d['feature'])}\"><h2>Feature {int(d['feature'])}</h2>"
            f"<table><tr><td>density</td><td>{float(d['density']):.4g}</td></tr>"
            f"<tr><td>max activation</td><td>{float(d['max_activation']):.4g}</td></tr>"
            f"<tr><td>promotes</td><td>{tokens(d.get('promoted', []))}</td></tr>"
            f"<tr><td>suppresses</td><td>{tokens(d.get('suppressed', []))}</td></tr></table>"
            f"{_histogram_svg(d.get('histogram_counts', []))}{contexts}</section>")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(result.name)}</title>"
            f"<style>{_STYLE}</style></head><body>{head}{''.join(sections)}</body></html>\n")


def write_dashboards_html(result, path: Path) -> Path:
    text = dashboards_html_text(result).encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(text), what="HTML file")


def edit_json_text(result) -> str:
    """An sae_edit result as JSON: per position the top tokens with before / after probabilities and the KL."""
    ex = result.extras
    ids, toks = np.asarray(ex["top_token_ids"]), np.asarray(ex["top_tokens"])
    before, after, kl = np.asarray(ex["probs_before"]), np.asarray(ex["probs_after"]), np.asarray(ex["kl"])
    positions = [{"position": label, "kl": float(kl[i]),
                  "top": [{"token_id": int(ids[i, r]), "token": str(toks[i, r]), "before": float(before[i, r]),
                           "after": float(after[i, r])} for r in range(ids.shape[1])]}
                 for i, label in enumerate(result.labels["position"])]
    cont = [str(c) for c in np.asarray(ex.get("continuation", ["", ""])).tolist()]
    doc = {"name": result.name, "kind": result.kind, "params": result.params, "positions": positions,
           "continuation_before": cont[0], "continuation_after": cont[-1]}
    return json.dumps(doc, indent=1, ensure_ascii=False, default=str) + "\n"


def write_edit_json(result, path: Path) -> Path:
    text = edit_json_text(result).encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(text), what="JSON file")
