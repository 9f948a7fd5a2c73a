# Run: pytest tests/assignments/test_gog.py -q     (seconds; docs/assignments/gog.md)
"""Grader of the Glance-or-Gaze assignment: the reward and its format check, the crop from the
frame the model saw to the original image, the Level split. Values worked out by hand."""
import pytest
from PIL import Image

from common.tools import crop
from gog import format_ok, gog_reward, split_levels


def said(text):
    return {"role": "assistant", "text": text}


def tool(name, text):
    return {"role": "tool", "name": name, "args": {}, "observation": text, "image": None}


SEARCH = said("<reason>which year?</reason>\n<text_search>Kalo founded</text_search>")
FOUND = tool("text_search", "Doc 1(Title: kalo) Kalo was founded in 1901.")
CROP = said('<reason>look closer</reason>\n<tool_call>{"name": "crop", "arguments": '
            '{"bbox_2d": [0, 0, 40, 40]}}</tool_call>')
ANSWER = said("<reason>found it</reason>\n<answer>1901</answer>")


# ---------------------------------------------------------------------------------- format_ok
@pytest.mark.parametrize("trajectory, ok", [
    ([SEARCH, FOUND, ANSWER], True),                        # tool, then an answer
    ([CROP, tool("crop", "Cropped."), SEARCH, FOUND, ANSWER], True),
    ([ANSWER], True),                                       # answering at a glance is fine
    ([SEARCH, FOUND], False),                               # never answered
    ([said("It is 1901."), ANSWER], False),                 # a turn with no action
    ([said("<text_search>Kalo founded"), tool("error", "Error"), ANSWER], False),  # unclosed
    ([SEARCH, FOUND, said("<answer></answer>")], False),    # an empty answer
    ([ANSWER, said("<answer>1901</answer>")], False),       # an answer before the last turn
    ([], False),                                            # nothing said
])
def test_format_ok_on_hand_written_trajectories(trajectory, ok):
    assert format_ok(trajectory) is ok


# --------------------------------------------------------------------------------- gog_reward
@pytest.mark.parametrize("trajectory, answer, lam, acc, want", [
    ([SEARCH, FOUND, ANSWER], "1901", 0.1, None, (1.0, 1.0, 1.0)),
    ([SEARCH, FOUND, said("<answer>1899</answer>")], "1899", 0.1, None, (0.1, 0.0, 1.0)),
    ([said("<text_search>x"), tool("error", "E"), ANSWER], "1901", 0.1, None, (0.9, 1.0, 0.0)),
    ([SEARCH, FOUND, ANSWER], "1901", 0.3, None, (1.0, 1.0, 1.0)),
    ([SEARCH, FOUND, said("<answer>1899</answer>")], "1899", 0.3, None, (0.3, 0.0, 1.0)),
    # a judge's verdict replaces the rule match: 0.7 * 0.5 + 0.3 * 1
    ([SEARCH, FOUND, ANSWER], "1901", 0.3, 0.5, (0.65, 0.5, 1.0)),
    # an answer longer than max_answer_words (10) scores r_acc = 0 even with the gold inside
    ([said("<answer>x</answer>")], " ".join(str(y) for y in range(1895, 1907)), 0.1, None,
     (0.1, 0.0, 1.0)),
])
def test_gog_reward_terms(trajectory, answer, lam, acc, want):
    got = gog_reward(trajectory, answer, ["1901"], lam=lam, max_answer_words=10, acc=acc)
    assert (got["reward"], got["acc"], got["format"]) == pytest.approx(want)


# --------------------------------------------------------------------------------------- crop
def picture(w, h):
    """Every pixel distinct, so a crop's bytes say where it came from."""
    img = Image.new("RGB", (w, h))
    img.putdata([(x % 256, y % 256, (x // 256) * 16 + y // 256) for y in range(h)
                 for x in range(w)])
    return img


def test_crop_maps_the_seen_frame_to_the_original():
    img = picture(200, 100)
    # the model saw 100 x 50: every coordinate doubles
    out, msg = crop(img, [10, 10, 50, 30], seen_size=(100, 50))
    assert out.size == (80, 40) and out.tobytes() == img.crop((20, 20, 100, 60)).tobytes()
    assert msg == "Cropped region [20, 20, 100, 60] of the original 200x100 image."


def test_crop_rounds_outwards():
    img = picture(150, 150)
    # seen 100 x 100 -> x 1.5: 10.2 -> 15.3 (floor 15), 50.5 -> 75.75 (ceil 76)
    out, msg = crop(img, [10.2, 10, 50.5, 50], seen_size=(100, 100))
    assert "[15, 15, 76, 75]" in msg and out.size == (61, 60)


def test_crop_clamps_to_the_image():
    img = picture(100, 100)
    out, msg = crop(img, [-10, -10, 30, 30])               # no seen_size: original pixels
    assert "[0, 0, 30, 30]" in msg and out.tobytes() == img.crop((0, 0, 30, 30)).tobytes()


def test_crop_grows_small_boxes_to_28_pixels():
    img = picture(100, 100)
    _, msg = crop(img, [50, 50, 60, 60])                   # centre 55: (50+60-28)//2 = 41
    assert "[41, 41, 69, 69]" in msg
    out, msg = crop(img, [95, 95, 100, 100])               # near the edge: shifted inside
    assert "[72, 72, 100, 100]" in msg and out.size == (28, 28)
    out, msg = crop(picture(20, 20), [0, 0, 20, 20])        # smaller than 28: upscaled
    assert out.size == (28, 28) and "[0, 0, 20, 20]" in msg


@pytest.mark.parametrize("bbox", [[1, 2, 3], "0 0 5 5", [5, 5, 1, 9], [0, 0, float("nan"), 5],
                                  [True, 0, 5, 5], [150, 150, 160, 160]])
def test_crop_bad_boxes_are_error_observations(bbox):
    out, msg = crop(picture(100, 100), bbox)
    assert out is None and msg.startswith("Error:")


# ------------------------------------------------------------------------------- split_levels
RATES = {"a": 0.0, "b": 0.2, "c": 0.25, "d": 0.3, "e": 0.5, "f": 0.75, "g": 0.8, "h": 1.0}


def test_split_levels_thresholds():
    l1, l2, expanded = split_levels(RATES, level2_max=0.25, level1_max=0.75)
    assert l2 == ["a", "b", "c"] and l1 == ["d", "e", "f"]           # p <= .25; .25 < p <= .75
    assert expanded == {"level2": {"added": 0, "pass_rates": []},
                        "level1": {"added": 0, "pass_rates": []}}


def test_split_levels_tops_up_from_the_lowest_pass_rates():
    # min_size 4: Level 2 takes the next lowest p (d, 0.3: Level 1's hardest, never a question
    # the SFT model always solves while harder ones exist); Level 1 then takes what neither
    # level holds, nearest 0.5 first (g 0.8, h 1.0); the levels stay disjoint
    l1, l2, expanded = split_levels(RATES, 0.25, 0.75, min_size=4)
    assert l2 == ["a", "b", "c", "d"] and l1 == ["e", "f", "g", "h"]
    assert expanded == {"level2": {"added": 1, "pass_rates": [0.3]},
                        "level1": {"added": 2, "pass_rates": [0.8, 1.0]}}
    rates = {"x": 0.0, "y": 0.9, "z": 1.0, "w": 0.95}
    l1, l2, expanded = split_levels(rates, 0.25, 0.75, min_size=2)
    assert l2 == ["x", "y"] and l1 == ["w", "z"]            # 0.95 is nearer 0.5 than 1.0
    assert expanded["level1"] == {"added": 2, "pass_rates": [0.95, 1.0]}
