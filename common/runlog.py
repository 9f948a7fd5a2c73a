"""Run logging in layers: a progress bar, metrics.jsonl, summary.json, PNG plots, samples.

    log = RunLog("runs/gog/rl")
    for step in log.bar(range(n), desc="rl"):
        log.log({"reward": r, "kl": kl}, step=step)
    log.plot(["reward", "kl"]); log.summary({"final_reward": r})

No account, no server: everything is a file under the stage's folder.

Under torchrun (common/distributed.py) every rank calls these functions at the same points and
rank 0 alone writes; the others keep their metrics in memory, show no progress bar, and wait in
`write_json` / `summary` / `samples` until rank 0 has written (a file another rank may read next).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import textwrap
from typing import Iterable

from tqdm.auto import tqdm

from common import distributed as dist


def _jsonable(v):
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: str, obj) -> None:
    if dist.is_main():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
    dist.barrier()


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
        self.dir, self.main = out_dir, dist.is_main()   # other ranks: in memory only
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.history: list[dict] = []
        if self.main:
            os.makedirs(out_dir, exist_ok=True)
            if not resume and os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)
            if resume and os.path.exists(self.metrics_path):
                self.history = read_jsonl(self.metrics_path, torn_ok=True)
        self._bar = None

    def drop_from(self, step: int) -> None:
        """Forget rows logged at `step` or later (a resumed run logs them again)."""
        self.history = [r for r in self.history if r["step"] < step]
        if not self.main:
            return
        with open(self.metrics_path, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.history)

    def bar(self, it: Iterable, **kw):
        self._bar = tqdm(it, dynamic_ncols=True, **{"disable": not self.main, **kw})
        return self._bar

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self._bar is not None:
            show = {k: f"{v:.3g}" for k, v in row.items()
                    if k != "step" and isinstance(v, (int, float))}
            self._bar.set_postfix(dict(list(show.items())[:5]), refresh=False)

    def summary(self, obj: dict, name: str = "summary.json") -> str:
        path = os.path.join(self.dir, name)
        write_json(path, obj)   # rank 0 writes, every rank waits
        return path

    def samples(self, rows: list[dict], name: str = "samples.jsonl") -> str:
        path = os.path.join(self.dir, name)
        if self.main:
            with open(path, "w") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
        dist.barrier()
        return path

    def plot(self, keys: list[str], name: str = "curves.png",
             title: str | None = None) -> str | None:
        """One panel per metric against step (each step, and a moving average when long enough)."""
        keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in self.history)]
        if not keys or not self.main:
            return None
        return plot_curves(self.history, keys, os.path.join(self.dir, name), title)


# metrics drawn as they are, never smoothed: a schedule is exact, its average would be wrong
UNSMOOTHED = ("lr", "learning_rate")
SMOOTH_MIN = 5   # points before a moving average is worth drawing


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def wrap_title(text: str, fig_width_in: float, fontsize: float = 10) -> str:
    """`text` wrapped to the figure's width (a title wider than its figure is cut at both ends)."""
    width = max(20, int(fig_width_in * 72 / (0.6 * fontsize)))   # ~0.6 em per character
    return "\n".join(textwrap.wrap(text, width)) if text else text


def plot_curves(history: list[dict], keys: list[str], path: str, title: str | None = None) -> str:
    """One panel per key: the value at each step (points, joined), and, from SMOOTH_MIN points
    on, its trailing mean over up to 10 steps (not for UNSMOOTHED keys such as the lr)."""
    if not dist.is_main():
        return path
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in history if isinstance(r.get(k), (int, float))]
        xs, ys = zip(*pts)
        smooth = len(ys) >= SMOOTH_MIN and k not in UNSMOOTHED
        ax.plot(xs, ys, marker="o" if len(ys) <= 30 else None, ms=3, lw=1,
                alpha=0.4 if smooth else 1.0, label="each step")
        if smooth:
            w = min(10, len(ys))
            avg = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1])
                   for i in range(len(ys))]
            ax.plot(xs, avg, lw=2, label=f"trailing mean (up to {w} steps)")
            ax.legend(fontsize=7)
        if len(xs) == 1:   # one step: the point, centred, with its value
            ax.set_xlim(xs[0] - 1, xs[0] + 1)
            ax.annotate(f"{ys[0]:.4g}", (xs[0], ys[0]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(k, fontsize=8)
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
    if not dist.is_main():
        return path
    plt = _pyplot()
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
        ax.set_ylabel(k)
        ax.legend(fontsize=8)
    fig.suptitle(title or "runs compared", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(table: dict[str, dict], corner: str = "", fmt: str = "{:.1f}",
                   scale: float = 1.0) -> str:
    """{row: {column: number or None}} -> a Markdown table, numbers as fmt of value * scale (one
    decimal by default), None as "-"."""
    cols = list(next(iter(table.values())))
    rows = [f"| {name} | " + " | ".join("-" if v is None else fmt.format(v * scale)
                                         for v in row.values())
            + " |" for name, row in table.items()]
    return "\n".join([f"| {corner} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
                      *rows])


def bar_plot(groups: dict[str, dict[str, float | None]], path: str, title: str = "",
             ylabel: str = "", xlabel: str = "", why_empty: str = "no data",
             ymax: float | None = None) -> str:
    """Grouped bars: {series: {x_label: value or None}} -> PNG. Each bar carries its value (a
    bar of 0 is otherwise invisible), None is written "n/a"; a plot without any value says
    `why_empty` in its middle. ymax: the scale's top (1 for rates, 100 for %), else the data's."""
    if not dist.is_main():
        return path
    plt = _pyplot()
    groups = {name: vals for name, vals in groups.items() if vals}   # an empty series: no swatch
    labels = sorted({x for s in groups.values() for x in s})
    width_in = max(4.5, 1.1 * len(labels) * max(1, len(groups)) ** 0.5)
    fig, ax = plt.subplots(figsize=(width_in, 3.4))
    width = 0.8 / max(1, len(groups))
    values = []
    for i, (name, vals) in enumerate(groups.items()):
        ys = [vals.get(x) for x in labels]
        values += [v for v in ys if v is not None]
        bars = ax.bar([j + i * width for j in range(len(labels))],
                      [0.0 if v is None else v for v in ys], width=width, label=name)
        if len(labels) * len(groups) <= 40:
            ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.3g}" for v in ys],
                         fontsize=7, padding=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    top = max([ymax or 0.0, *values])
    ax.set_ylim(min([0.0, *values]) * 1.15, top * (1.08 if ymax else 1.15) if top > 0 else 1.0)
    if not values:
        ax.text(0.5, 0.5, f"nothing to draw: {why_empty}", ha="center", va="center",
                transform=ax.transAxes, wrap=True)
    ax.set_ylabel(ylabel or "value")
    ax.set_xlabel(xlabel)
    ax.set_title(wrap_title(title, width_in), fontsize=10)
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


def _visible(text: str) -> str:
    """A reply as a person can read it: whitespace only, or runs of blank lines (a random model's
    output), said in words instead of drawn as an empty box."""
    if not text.strip():
        return f"(only whitespace: {len(text)} characters)"
    return re.sub(r"\n\s*\n(\s*\n)+", lambda m: f"\n[{m.group().count(chr(10)) - 1} blank lines]\n",
                  text)


def trajectory_html(items: list[dict], path: str, title: str = "trajectories") -> str:
    """One self-contained HTML page: per rollout, its turns, tool calls, observations,
    images (crops included) and reward terms.

    items: [{"title": str, "images": [PIL], "prompt": str (the first user turn, optional),
             "trajectory": [turn, ...], "rewards": {name: value}}]
    where a turn is {"role": "assistant", "text": str} or {"role": "tool", "name", "args",
    "observation": str, "image": PIL | None}.
    """
    css = ("body{font-family:sans-serif;max-width:1100px;margin:auto}.r{border:1px solid #ccc;"
           "margin:12px 0;padding:8px}.a{background:#eef6ff;white-space:pre-wrap;padding:4px}"
           ".t{background:#f6f6f0;white-space:pre-wrap;padding:4px}"
           ".u{background:#fff4dd;white-space:pre-wrap;padding:4px}.w{color:#555;font-size:90%}"
           "img{border:1px solid #999;margin:2px;vertical-align:top}")
    if not dist.is_main():
        return path
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{css}</style></head><body><h2>{html.escape(title)}</h2>"]
    for k, it in enumerate(items):
        rew = ", ".join(f"{n}={v:.3g}" if isinstance(v, (int, float)) else f"{n}={v}"
                        for n, v in it.get("rewards", {}).items())
        parts.append(f"<div class='r'><b>#{k} {html.escape(str(it.get('title', '')))}</b>"
                     f"<div class='w'>{html.escape(rew)}</div>")
        parts += [_img_tag(im) for im in it.get("images", [])[:2]]
        if it.get("prompt"):
            parts.append(f"<div class='u'><b>user:</b>\n{html.escape(str(it['prompt']))}</div>")
        for turn in it.get("trajectory", []):
            if turn.get("role") == "assistant":
                head = "assistant" + (" (cut by its token budget)" if turn.get("cut") else "")
                parts.append(f"<div class='a'><b>{head}:</b>\n"
                             f"{html.escape(_visible(str(turn.get('text', ''))))}</div>")
            else:   # a tool call shows its arguments; a user turn (no arguments) just "user:"
                args = turn.get("args") or {}
                call = (f"{turn.get('name')}({json.dumps(args, ensure_ascii=False, default=str)})"
                        if args else f"{turn.get('name')}:")
                kind = "u" if turn.get("name") == "user" else "t"
                parts.append(f"<div class='{kind}'><b>{html.escape(call)}</b>\n"
                             f"{html.escape(str(turn.get('observation', ''))[:2000])}</div>")
                if turn.get("image") is not None:
                    parts.append(_img_tag(turn["image"]))
        parts.append("</div>")
    parts.append("</body></html>")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
