"""The synthetic world: decoded pixels match the events, the split rule holds, renders are deterministic."""
import json
import os

import av
import numpy as np
import pytest

from nanod2vlm.world import COLOURS, HELD_OUT, SLOTS, WHITE, ensure_world

KW = dict(n_train=6, n_test=3, durations=(8, 14), progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    ensure_world(out, seed=0, **KW)
    load = lambda name: json.load(open(os.path.join(out, name)))
    return out, load("train.json"), load("test.json") + load("val.json"), load("events.json")


def decode(path):
    with av.open(path) as container:
        return [(frame.time, frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]


def count(img, slot, rgb, tol=40):
    """Pixels of the object's quadrant slot within tol of a colour."""
    x, y = SLOTS[slot]
    patch = img[y - 16:y + 16, x - 16:x + 16].astype(int)
    return int((np.abs(patch - np.array(rgb)).max(-1) <= tol).sum())


@pytest.mark.parametrize("fps", [1, 2])
def test_decoded_frames_match_events(world, fps):
    out, train, test, events = world
    durations = {r["video"]: r["duration"] for r in train + test}
    checked = 0
    for video, evs in events.items():
        frames, D = decode(os.path.join(out, video)), durations[video]
        assert len(frames) == D * 8 and frames[0][0] == 0
        for ev in (e for e in evs if e["kind"] == "appear"):
            flashes = [f["interval"] for f in evs if f["kind"] == "flash" and f["shape"] == ev["shape"]]
            s, e = ev["interval"]
            for k in range(int(D * fps)):
                t = k / fps
                img = next(img for time, img in frames if time >= t - 1e-6)  # the frame at or after t
                n_col, n_white = count(img, ev["slot"], COLOURS[ev["colour"]]), count(img, ev["slot"], WHITE)
                if t < s or t > e:
                    assert n_col == 0 and n_white == 0, (video, ev, t)
                elif s < t < e and not any(a <= t <= b for a, b in flashes):
                    assert n_col >= 30 and n_white == 0, (video, ev, t, n_col, n_white)
                elif s < t < e and any(a < t < b for a, b in flashes):
                    assert n_white >= 25, (video, ev, t, n_white)  # the fill turned near-white
                    checked += 1
    assert checked > 0  # some flash frames were seen


def test_split_rule(world):
    """Train holds no held-out pair; a test (val) video holds one of its split's pairs and none of the other's, and
    its single and qa questions are about such an object."""
    out, train, held, events = world
    pairs = lambda video: {(e["colour"], e["shape"]) for e in events[video]}
    assert not HELD_OUT["test"] & HELD_OUT["val"] and len(HELD_OUT["test"] | HELD_OUT["val"]) == 10
    assert all(not pairs(r["video"]) & (HELD_OUT["test"] | HELD_OUT["val"]) for r in train)
    assert {r["video"].split("/")[1][:3] for r in held} == {"tes", "val"}
    for r in held:
        own, other = (HELD_OUT[s] for s in (("test", "val") if "/test_" in r["video"] else ("val", "test")))
        assert pairs(r["video"]) & own and not pairs(r["video"]) & other
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if r["task"] == "single":
            assert any(f"the {c} {s} " in q for c, s in own), q
        if r["task"] == "qa":  # the object that flashes/spins is held out, the answer names it
            kind = "flash" if "flashes" in q else "spin"
            ev = next(e for e in events[r["video"]] if e["kind"] == kind)
            assert (ev["colour"], ev["shape"]) in own
            assert f"It is {ev['colour']}." in a or f"It is the {ev['shape']}." in a, (q, a)
            assert r["time_gt"]["evidence_grounding"] == [ev["interval"]]


def test_annotations_valid(world):
    out, train, test, events = world
    tasks = [r["task"] for r in train + test]
    assert {"single", "multi", "dense", "qa"} <= set(tasks)
    for r in train + test:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        eg, ir = r["time_gt"]["evidence_grounding"], r["time_gt"]["interleaved_response"]
        pre, post = a.split("</evi>")
        assert q.startswith("<image>\n") and eg == ir
        assert pre.count("<evi>") == len(eg) and post.count("<evi>") == len(ir) >= 1
        assert all(0 <= s < e <= r["duration"] and s * 2 == int(s * 2) and e * 2 == int(e * 2) for s, e in eg)
        assert eg == sorted(eg)
        kinds = {"single": "appear", "dense": "appear", "multi": "flash", "qa": None}[r["task"]]
        if kinds:  # time_gt is exactly the right events of events.json
            ivs = sorted(e["interval"] for e in events[r["video"]] if e["kind"] == kinds)
            assert set(map(tuple, eg)) <= set(map(tuple, ivs))
            if r["task"] != "single":
                assert eg == ivs


def test_deterministic_and_ensure(world, tmp_path):
    out, train, test, events = world
    same, other = str(tmp_path / "same"), str(tmp_path / "other")
    ensure_world(same, seed=0, **KW)
    ensure_world(other, seed=1, **KW)
    text = lambda d, f: open(os.path.join(d, f)).read()
    pixels = lambda d: np.stack([img for time, img in decode(os.path.join(d, "videos/train_0000.mp4"))[:40]])
    for f in ("train.json", "test.json", "val.json", "events.json"):
        assert text(same, f) == text(out, f) and text(other, f) != text(out, f)
    assert np.array_equal(pixels(same), pixels(out)) and not np.array_equal(pixels(other), pixels(out))
    marker = os.path.join(same, "world.json")
    mtime = os.stat(marker).st_mtime_ns
    ensure_world(same, seed=0, **KW)  # already rendered with these settings: nothing is rewritten
    assert os.stat(marker).st_mtime_ns == mtime
    ensure_world(same, seed=2, **KW)  # other settings: rendered again
    assert json.loads(text(same, "world.json"))["seed"] == 2
