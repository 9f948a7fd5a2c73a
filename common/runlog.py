"""Run logging in layers: a progress bar, metrics.jsonl, summary.json, PNG plots, samples.

    log = RunLog("runs/gog/rl")
    for step in log.bar(range(n), desc="rl"):
        log.log({"reward": r, "kl": kl}, step=step)
    log.plot(["reward", "kl"]); log.summary({"final_reward": r})

No account, no server: everything is a file under the stage's folder.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from typing import Iterable

from tqdm.auto import tqdm


def _jsonable(v):
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)


def read_jsonl(path: str, torn_ok: bool = False) -> list[dict]:
    """Rows of a JSON-lines file. torn_ok: a last line cut mid-write (a killed run) is dropped
    with a one-line warning instead of failing."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if torn_ok and i == len(lines) - 1:
                print(f"[runlog] warning: {path}: the last line is incomplete (a run killed while "
                      f"writing it); it is dropped.")
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg}).") from e
    return rows


class RunLog:
    def __init__(self, out_dir: str, resume: bool = False):
        self.dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        if not resume and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)
        self.history: list[dict] = (read_jsonl(self.metrics_path, torn_ok=True)
                                    if resume and os.path.exists(self.metrics_path) else [])
        self._bar = None

    def drop_from(self, step: int) -> None:
        """Forget rows logged at `step` or later (a resumed run logs them again)."""
        self.history = [r for r in self.history if r["step"] < step]
        with open(self.metrics_path, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.history)

    def bar(self, it: Iterable, **kw):
        self._bar = tqdm(it, dynamic_ncols=True, **kw)
        return self._bar

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.history.append(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self._bar is not None:
            show = {k: f"{v:.3g}" for k, v in row.items()
                    if k != "step" and isinstance(v, (int, float))}
            self._bar.set_postfix(dict(list(show.items())[:5]), refresh=False)

    def summary(self, obj: dict, name: str = "summary.json") -> str:
        path = os.path.join(self.dir, name)
        write_json(path, obj)
        return path

    def samples(self, rows: list[dict], name: str = "samples.jsonl") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
        return path

    def plot(self, keys: list[str], name: str = "curves.png",
             title: str | None = None) -> str | None:
        """One panel per metric against step (raw and a 10-step moving average)."""
        keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in self.history)]
        if not keys:
            return None
        return plot_curves(self.history, keys, os.path.join(self.dir, name), title)


def plot_curves(history: list[dict], keys: list[str], path: str, title: str | None = None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in history if isinstance(r.get(k), (int, float))]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, alpha=0.35, lw=1)
        w = min(10, len(ys))
        avg = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1])
               for i in range(len(ys))]
        ax.plot(xs, avg, lw=2)
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



def plot_runs(histories: dict[str, list[dict]], keys: list[str], path: str,
              title: str | None = None) -> str:
    """Several runs' metrics.jsonl histories on shared axes: one panel per metric against step,
    one line per run (raw, thin; a 10-step moving average, thick, in the same colour)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for i, (name, history) in enumerate(histories.items()):
            pts = [(r["step"], r[k]) for r in history if isinstance(r.get(k), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            avg = [sum(ys[max(0, j - 9): j + 1]) / len(ys[max(0, j - 9): j + 1])
                   for j in range(len(ys))]
            ax.plot(xs, ys, color=f"C{i}", alpha=0.3, lw=1)
            ax.plot(xs, avg, color=f"C{i}", lw=2, label=name)
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

def markdown_table(table: dict[str, dict], corner: str = "") -> str:
    """{row: {column: number or None}} -> a Markdown table, numbers to one decimal, None as "-"."""
    cols = list(next(iter(table.values())))
    rows = [f"| {name} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in row.values())
            + " |" for name, row in table.items()]
    return "\n".join([f"| {corner} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
                      *rows])


def bar_plot(groups: dict[str, dict[str, float]], path: str, title: str = "",
             ylabel: str = "") -> str:
    """Grouped bars: {series: {x_label: value}} -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = sorted({x for s in groups.values() for x in s})
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(labels) * max(1, len(groups)) ** 0.5), 3.2))
    width = 0.8 / max(1, len(groups))
    for i, (name, vals) in enumerate(groups.items()):
        ax.bar([j + i * width for j in range(len(labels))], [vals.get(x, 0.0) for x in labels],
               width=width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(groups) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# a browsable trajectory page
# ---------------------------------------------------------------------------------------------
def _img_tag(image, max_side: int = 320) -> str:
    im = image.copy()
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    return (f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" '
            f'title="{image.width}x{image.height}">')


def trajectory_html(items: list[dict], path: str, title: str = "trajectories") -> str:
    """One self-contained HTML page: per rollout, its turns, tool calls, observations,
    images (crops included) and reward terms.

    items: [{"title": str, "images": [PIL], "trajectory": [turn, ...], "rewards": {name: value}}]
    where a turn is {"role": "assistant", "text": str} or {"role": "tool", "name", "args",
    "observation": str, "image": PIL | None}.
    """
    css = ("body{font-family:sans-serif;max-width:1100px;margin:auto}.r{border:1px solid #ccc;"
           "margin:12px 0;padding:8px}.a{background:#eef6ff;white-space:pre-wrap;padding:4px}"
           ".t{background:#f6f6f0;white-space:pre-wrap;padding:4px}.w{color:#555;font-size:90%}"
           "img{border:1px solid #999;margin:2px;vertical-align:top}")
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{css}</style></head><body><h2>{html.escape(title)}</h2>"]
    for k, it in enumerate(items):
        rew = ", ".join(f"{n}={v:.3g}" if isinstance(v, (int, float)) else f"{n}={v}"
                        for n, v in it.get("rewards", {}).items())
        parts.append(f"<div class='r'><b>#{k} {html.escape(str(it.get('title', '')))}</b>"
                     f"<div class='w'>{html.escape(rew)}</div>")
        parts += [_img_tag(im) for im in it.get("images", [])[:2]]
        for turn in it.get("trajectory", []):
            if turn.get("role") == "assistant":
                parts.append(f"<div class='a'>{html.escape(str(turn.get('text', '')))}</div>")
            else:
                call = (f"{turn.get('name')}"
                        f"({json.dumps(turn.get('args', {}), ensure_ascii=False, default=str)})")
                parts.append(f"<div class='t'><b>{html.escape(call)}</b>\n"
                             f"{html.escape(str(turn.get('observation', ''))[:2000])}</div>")
                if turn.get("image") is not None:
                    parts.append(_img_tag(turn["image"]))
        parts.append("</div>")
    parts.append("</body></html>")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
