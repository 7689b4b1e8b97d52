"""The built-in synthetic video world: tiny procedural videos a nano video LLM can learn to ground.

Each video (64x64 px, 8 fps, 10-60 s, dark noisy background) shows 1-4 objects, one per quadrant slot. An
object is one of 5 shapes in one of 5 colours; within a video the colours are distinct AND the shapes are
distinct, so "the red shape", "the circle" and "the red circle" each name one object. Every object is
visible during one interval; at most one object "flashes" (its fill turns near-white, 1-3 times) and at most
one (never a circle) "spins". All event boundaries are multiples of 0.5 s. Questions follow the paper's four
task families (Appendix B, Fig. 1): single, multi, dense and qa, with a fixed answer grammar.

Splits (compositional): 10 of the 25 colour-shape pairs are held out of training, colour i with shape (i + 2) % 5
for the test split and with shape (i + 4) % 5 for the validation split (recipes are chosen on val, reported on
test), so every colour and every shape is still seen in training. Train videos contain no held-out pair; every
test (val) video contains one of its split's pairs and none of the other's, and its single and qa questions are
about such an object. Training single-event questions name each object by its shape, its colour or both; test
and val ones by the held-out pair.

ensure_world(out_dir) writes videos/{split}_{i:04d}.mp4, train.json, test.json, val.json (App. B records plus
"task"), events.json (video -> list of {"kind", "colour", "shape", "slot", "interval"}) and world.json.
"""
import json
import multiprocessing
import os

import av
import numpy as np
from tqdm import tqdm

VERSION = 3
FPS, SIZE, R = 8, 64, 8  # frame rate, canvas size, object radius (objects are ~16 px)
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235),
           "yellow": (230, 210, 40), "purple": (170, 60, 210)}
SHAPES = ["square", "circle", "triangle", "cross", "diamond"]
# 10 of the 25 colour-shape pairs never occur in training: colour i with shape i + 2 (test) or i + 4 (val), mod 5
HELD_OUT = {split: {(c, SHAPES[(i + k) % 5]) for i, c in enumerate(COLOURS)} for split, k in (("test", 2), ("val", 4))}
SPLITS = ("train", "test", "val")
WHITE = (245, 245, 245)
SLOTS = [(16, 16), (48, 16), (16, 48), (48, 48)]  # quadrant centres (x, y)
TEMPLATES = {
    "single": ["When does the {o} appear?", "When is the {o} visible?", "Find the {o} in the video."],
    "multi": ["Locate every time the {o} flashes.", "When does the {o} flash?", "Find all flashes of the {o}."],
    "dense": ["Describe the events in the video.", "List what happens in the video.",
              "Give a timeline of the video."],
    "colour": ["What colour is the shape that {v}?", "Which colour is the object that {v}?"],
    "shape": ["Which shape {v}?", "What shape {v} in the video?"],
}


def ensure_world(out_dir, n_train=300, n_test=60, seed=0, durations=(10, 60), progress=True):
    """Sample and render the world into out_dir, unless it already holds a complete render with these settings;
    returns the paths of its json files."""
    if not 4 <= durations[0] <= durations[1]:
        raise ValueError(f"ensure_world: durations={durations} must be (lo, hi) with 4 <= lo <= hi seconds "
                         "(every object is visible for at least 4 s)")
    paths = {k: os.path.join(out_dir, f"{k}.json") for k in SPLITS + ("events", "world")}
    settings = {"version": VERSION, "n_train": n_train, "n_test": n_test, "seed": seed, "durations": list(durations)}
    try:
        with open(paths["world"]) as f:
            if json.load(f) == settings:
                return paths
    except (OSError, ValueError):
        pass  # no complete render yet
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    events, jobs = {}, []
    for split, n in zip(SPLITS, (n_train, n_test, n_test)):  # the validation split is as large as the test split
        records = []
        for i in range(n):
            rng = np.random.default_rng([seed, SPLITS.index(split), i])  # per video: order-independent
            video = f"videos/{split}_{i:04d}.mp4"
            D, objs = sample_video(rng, split, durations)
            events[video] = [dict(kind=k, colour=o["colour"], shape=o["shape"], slot=o["slot"], interval=iv)
                             for o in objs for k, ivs in (("appear", [o["interval"]]), ("flash", o["flashes"]),
                                                          ("spin", o["spins"])) for iv in ivs]
            records += make_records(rng, video, D, objs, split)
            jobs.append((os.path.join(out_dir, video), D, objs, int(rng.integers(2**31))))
        _dump(records, out_dir, f"{split}.json")
    with multiprocessing.Pool(os.cpu_count()) as pool:  # each video is encoded on one thread: one per core
        list(tqdm(pool.imap_unordered(render_video, jobs), total=len(jobs), desc="rendering", disable=not progress))
    _dump(events, out_dir, "events.json")
    _dump(settings, out_dir, "world.json")  # last: marks a complete render
    return paths


def _dump(obj, out_dir, name):
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(obj, f, indent=1)

# -----------------------------------------------------------------------------
# sampling: objects, their events, and the question/answer records


def _place(rng, lo, hi, lengths, gap):
    """Start times of disjoint intervals of the given lengths inside [lo, hi], >= gap apart (0.5 s grid)."""
    slack = int(2 * (hi - lo - sum(lengths) - gap * (len(lengths) - 1)))
    cuts = np.sort(rng.integers(0, slack + 1, len(lengths))) / 2
    return [lo + c + sum(lengths[:k]) + gap * k for k, c in enumerate(cuts)]


def sample_video(rng, split, durations):
    """Duration and objects of one video, each object with its visible interval, flashes and spins."""
    D = int(rng.integers(2 * durations[0], 2 * durations[1] + 1)) / 2
    n = int(rng.integers(1, 5))
    others = set().union(*(pairs for s, pairs in HELD_OUT.items() if s != split))
    while True:  # distinct colours and shapes; none held out for another split, one of its own (test, val)
        pairs = list(zip(rng.permutation(list(COLOURS))[:n].tolist(), rng.permutation(SHAPES)[:n].tolist()))
        if not others & set(pairs) and (split == "train" or HELD_OUT[split] & set(pairs)):
            break
    objs = []
    for (colour, shape), slot in zip(pairs, rng.permutation(4)[:n].tolist()):
        L = rng.integers(max(8, int(np.ceil(0.2 * D))), int(2 * D) + 1) / 2  # >= 4 s and >= 10% of D
        s = float(_place(rng, 0, D, [L], 0)[0])
        xy0 = np.array(SLOTS[slot]) + rng.uniform(-3, 3, 2)
        xy1 = xy0 + rng.uniform(-2, 2, 2)  # slow drift over the whole video, stays inside the slot
        objs.append(dict(colour=colour, shape=shape, slot=slot, interval=[s, s + L], flashes=[], spins=[],
                         xy=[xy0.tolist(), xy1.tolist()]))
    # test, val: only held-out objects flash or spin, so the qa question is about one of them
    cands = [o for o in objs if split == "train" or (o["colour"], o["shape"]) in HELD_OUT[split]]
    if cands and rng.random() < 0.8:
        o = cands[rng.integers(len(cands))]
        s, e = o["interval"]
        k = min(int(rng.integers(1, 4)), int((e - s + 2) // 4))  # k flashes of >= 2 s need 4k - 2 s
        while True:
            lengths = (rng.integers(4, 9, k) / 2).tolist()  # 2-4 s each
            if sum(lengths) + 2 * (k - 1) <= e - s:
                break
        o["flashes"] = [[a, a + L] for a, L in zip(_place(rng, s, e, lengths, 2), lengths)]
    cands = [o for o in cands if o["shape"] != "circle"]  # a spinning circle looks still
    if cands and rng.random() < 0.6:
        o = cands[rng.integers(len(cands))]
        s, e = o["interval"]
        L = rng.integers(6, int(2 * min(e - s, 12)) + 1) / 2  # 3-12 s
        a = float(_place(rng, s, e, [L], 0)[0])
        o["spins"] = [[a, a + L]]
    return float(D), objs


def make_records(rng, video, D, objs, split):
    """One annotation record per applicable task family (App. B plus "task")."""
    pick = lambda xs: xs[rng.integers(len(xs))]
    name = lambda o: f"{o['colour']} {o['shape']}"
    evis = lambda k: ", ".join(["<evi>"] * (k - 1)) + " and <evi>" if k > 1 else "<evi>"

    def record(task, question, answer, intervals):
        return {"video": video, "duration": D, "task": task,
                "time_gt": {"evidence_grounding": intervals, "interleaved_response": intervals},
                "conversations": [{"from": "human", "value": "<image>\n" + question},
                                  {"from": "gpt", "value": "<evi> " * len(intervals) + "</evi> " + answer}]}

    # train: every object, named by its shape, its colour or both, so each attribute alone learns to ground;
    # test, val: one held-out object, by its never-seen colour-shape pair
    held = [(o, name(o)) for o in objs if (o["colour"], o["shape"]) in HELD_OUT.get(split, ())]
    singles = [pick(held)] if held else [(o, pick([o["shape"], f"{o['colour']} shape", name(o)])) for o in objs]
    out = [record("single", pick(TEMPLATES["single"]).format(o=ref), f"The {ref} appears in <evi>.", [o["interval"]])
           for o, ref in singles]
    for o in objs:
        if o["flashes"]:
            ref = pick([o["shape"], f"{o['colour']} shape", name(o)])
            out.append(record("multi", pick(TEMPLATES["multi"]).format(o=ref),
                              f"The {ref} flashes in {evis(len(o['flashes']))}.", o["flashes"]))
    objs_t = sorted(objs, key=lambda o: o["interval"])
    out.append(record("dense", pick(TEMPLATES["dense"]), " ".join(f"<evi> A {name(o)} appears." for o in objs_t),
                      [o["interval"] for o in objs_t]))
    qa = [(o, "flashes", o["flashes"][0]) for o in objs if o["flashes"]]
    qa += [(o, "spins", o["spins"][0]) for o in objs if o["spins"]]
    if qa:
        o, verb, iv = qa[rng.integers(len(qa))]
        if rng.random() < 0.5:
            q, a = pick(TEMPLATES["colour"]).format(v=verb), f"It is {o['colour']}."
        else:
            q, a = pick(TEMPLATES["shape"]).format(v=verb), f"It is the {o['shape']}."
        out.append(record("qa", q, a + " The relevant event happens in <evi>.", [iv]))
    return out

# -----------------------------------------------------------------------------
# rendering


def shape_mask(shape, u, v):
    """Pixels inside a shape of radius R centred at the origin of (u, v) (y points down)."""
    au, av_ = np.abs(u), np.abs(v)
    if shape == "square":
        return np.maximum(au, av_) <= 0.8 * R
    if shape == "circle":
        return u * u + v * v <= R * R
    if shape == "triangle":  # apex up
        return (v <= 0.6 * R) & (au <= 0.55 * (v + R))
    if shape == "cross":
        return (np.minimum(au, av_) <= 0.3 * R) & (np.maximum(au, av_) <= R)
    return au / 0.65 + av_ <= R  # diamond: taller than wide, so a rotated square never looks like one


def render_video(job):
    """Draw every frame with numpy and encode it as an H.264 mp4 (near-lossless CRF keeps the colours)."""
    path, D, objs, seed = job
    rng = np.random.default_rng(seed)
    bg = np.repeat(30 + rng.integers(-4, 5, (SIZE, SIZE, 1)), 3, axis=2).astype(np.uint8)  # fixed faint noise
    y, x = np.mgrid[:SIZE, :SIZE] + 0.5
    inside = lambda t, ivs: any(s <= t < e for s, e in ivs)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        # one thread: a deterministic bit stream; ultrafast: encoding would otherwise dominate the render time
        stream.options = {"crf": "10", "preset": "ultrafast", "threads": "1"}
        for k in range(int(D * FPS)):
            t, img = k / FPS, bg.copy()
            for o in objs:
                if not inside(t, [o["interval"]]):
                    continue
                (x0, y0), (x1, y1) = o["xy"]
                dx, dy = x - (x0 + (x1 - x0) * t / D), y - (y0 + (y1 - y0) * t / D)
                # spin: 15-75 deg mod 60, skipping near-axis-aligned angles so each sampled frame looks turned
                a = np.radians(15 + (100 * (t - o["spins"][0][0])) % 60) if inside(t, o["spins"]) else 0.0
                m = shape_mask(o["shape"], np.cos(a) * dx + np.sin(a) * dy, np.cos(a) * dy - np.sin(a) * dx)
                img[m] = COLOURS[o["colour"]]
                if inside(t, o["flashes"]):  # the fill turns white, a 1 px outline keeps the colour
                    fill = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
                    img[fill] = WHITE
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
