"""Evaluation: answer as the released D²VLM inference does, and score a whole benchmark with nanod2vlm/scorers.py.

Files read by `evaluate`: the synthetic world's records (`conversations`), E.T. Bench's (`task, source, idx, video,
q, src, tgt, o, p, g`; a file or a folder of them), and TimeIT's Charades-STA and YouCook2 files (`annotations`).
Every one becomes an E.T. Bench record; its prediction is that record plus `a`, the answer as the released code
renders it, appended to a JSON-lines file as it comes, so that a killed run continues where it stopped.
"""
import glob
import json
import os
import time

import torch.distributed as dist
from tqdm import tqdm

from nanod2vlm.checkpoint import latest, write_atomic
from nanod2vlm.data import AnnotationError, normalize, read_annotations
from nanod2vlm.scorers import PAIR, SCORERS, _ious, _recall, charades_scores, etbench_scores, parse_tvg, youcook2_scores

PENALIZED = {"rar", "eca", "rvq"}  # the referring tasks decode with repetition penalty 1.2, the others with none
WORLD_TASK = {"single": "tvg", "multi": "tal", "dense": "dvc", "qa": "gvq"}  # the world's tasks are these
CHARADES_Q = ("You are given a video about indoor activities. Watch the video carefully and find a visual event "
              "described by the sentence: '{}'. The format of your response should be: 'The event happens in "
              "<start time> - <end time>'.")
YOUCOOK2_Q = ("You are given a video about 'making fattoush'. Watch the video carefully and densly describe all the "
              "cooking steps. For each step, you need to determine the start and ends times and provide a concise "
              "description. The format of your response should be: '<start time> - <end time>, <description>'.")
# (both as the released conversion scripts write them, "densly" and "ends times" included)


def answer(model, tok, wp, frames, times, question, max_new_tokens=2048, temperature=0.0, src=(),
           repetition_penalty=1.0):
    """Ground, then answer: the prompt `<image>\\n{question}` in the chat template, `src` the [s, e] of each
    question-side <evi>. Returns `raw`, the answer as the released code renders it (each <evi> -> "{s} - {e} " in
    whole seconds, </evi> kept: what the scorers read), `text`, that with notes for people, the grounding and
    answer spans in seconds, the captions and each <evi>'s details."""
    t0 = time.time()
    ids = tok.encode(tok.chat("<image>\n" + question))
    i = ids.index(tok.image_id)
    ids = ids[:i] + [tok.image_id] * len(frames) + ids[i + 1:]  # one placeholder per frame
    room = model.cfg.max_pos - len(ids)
    if room < 1:
        raise ValueError(f"the prompt takes {len(ids)} positions, the model has {model.cfg.max_pos}")
    pixels = normalize(frames).to(next(model.parameters()).device)  # train.py evaluates on its training device
    out, evis = model.generate(pixels, times, wp.encode(question), ids, min(max_new_tokens, room), temperature,
                               src=src, repetition_penalty=repetition_penalty)
    out = out[:-1] if out[-1:] == [tok.end_id] else out
    # split at the <evi> ids, not at the text "<evi>": byte-fallback pieces can spell that text too
    cuts = [j for j, x in enumerate(out) if x == tok.evi_id]
    pieces = [tok.decode(out[a + 1:b]) for a, b in zip([-1] + cuts, cuts + [len(out)])]
    n = 2 if model.cfg.evi_unit == "frame" else 1  # frame-level <evi> (Tab. 6): a start and an end frame per event
    raw = pieces[0]
    for j, (e, piece) in enumerate(zip(evis, pieces[1:])):
        k = sum(x["stage"] == e["stage"] for x in evis[:j])  # its index within its stage
        # the released code prints frame indices, at its uncapped 1 fps the whole seconds: so do the frames' times,
        # which stay seconds when max_frames thins a long video out
        s, t = (round(v) for v in e["seconds"])
        raw += (f"{s} - {t} " if n == 1 else f"{s} - " if k % 2 == 0 else f"{t} ") + piece
    raw = raw.strip()
    grounded, spans = ([(x[i][0], x[i + n - 1][1]) for i in range(0, len(x) - n + 1, n)]
                       for x in ([e["seconds"] for e in evis if e["stage"] == s] for s in (1, 2)))
    # dense captions: the text after each answer event's (last) <evi> ...
    captions = [c.strip() for e, c in zip(evis, pieces[1:]) if e["stage"] == 2][n - 1::n]
    if not model.cfg.interleave:  # ... or, when the answer states its timestamps as text (Tab. 4), after each of those
        stated = raw.split("</evi>")[-1]
        spans = [tuple(x) for x in parse_tvg(stated, answer=False)]
        captions = [c.strip() for c in PAIR.split(stated)[3::3]]
    note = "" if tok.evi_end_id in out else " (the model never closed grounding)"
    if len(evis) > len(frames):
        note += f" ({len(evis)} <evi> for {len(frames)} frames: a degenerate answer)"
    return dict(raw=raw, text=raw + note, grounding=grounded, answer_spans=spans, captions=captions, evis=evis,
                seconds=time.time() - t0, frames=len(frames))


def read_benchmark(path, videos=None):
    """An annotation file (or a folder of E.T. Bench files) -> (kind, records as E.T. Bench has them, video root)."""
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.json"))) if os.path.isdir(path) else [path]
    data = [r for f in files for r in _json(f)]
    if not data:
        raise AnnotationError(f"{path}: no records to evaluate")
    if "conversations" in data[0]:  # the synthetic world: its tasks are TVG, TAL, DVC and a free-answer GVQ
        return "world", [_world(r, i) for i, r in enumerate(read_annotations(path))], videos or os.path.dirname(path)
    kind = "youcook2" if "segments" in data[0] else "charades" if "timestamp" in data[0] else "etbench"
    if videos is None:
        raise AnnotationError(f"{path}: {kind} records name videos relative to a folder: give it with --videos DIR")
    try:
        if kind == "youcook2":
            recs = [dict(task="dvc", source="youcook2", idx=i, video=a["image_id"], q=YOUCOOK2_Q, tgt=a["segments"],
                         g=a["pure_cap"].split(". ")) for i, a in enumerate(data)]
        elif kind == "charades":
            recs = [dict(task="tvg", source="charades_sta", idx=i, video=a["image_id"], tgt=a["timestamp"],
                         q=CHARADES_Q.format(a["caption"].strip("."))) for i, a in enumerate(data)]
        else:
            recs = [dict(r, idx=r.get("idx", i), video=r["video"], task=r["task"], q=r["q"]) for i, r in enumerate(data)]
            if any("<vid>" in r["q"] for r in recs):
                raise AnnotationError(f"{path}: <vid> in q (E.T. Bench's vid style): D²VLM reads one <evi> per src interval")
            if unknown := {r["task"] for r in recs} - set(SCORERS):
                raise AnnotationError(f"{path}: tasks {sorted(unknown)} are none of E.T. Bench's {list(SCORERS)}")
    except (KeyError, TypeError, AttributeError) as e:
        raise AnnotationError(f"{path}: not world, E.T. Bench or TimeIT (Charades-STA, YouCook2) records: a record "
                              f"lacks or mistypes {e}") from None
    return kind, recs, videos


def _json(path):
    """A JSON annotation file -> its records (TimeIT keeps them under "annotations")."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise AnnotationError(f"{path}: annotation file not found ({e.strerror})") from None
    except ValueError as e:  # also a file that is not UTF-8
        raise AnnotationError(f"{path}: not a JSON annotation file ({e})") from None
    data = data["annotations"] if isinstance(data, dict) and "annotations" in data else data
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise AnnotationError(f'{path}: expected a list of records, or TimeIT\'s {{"annotations": [records]}}')
    return data


def _world(r, i):
    """A world record -> its E.T. Bench record; `g`, a dense answer's captions (the text after each answer <evi>),
    and `answer`, the answer stage's text (a qa answer is right when its first sentence is this one's)."""
    turns = {c["from"]: c["value"] for c in r["conversations"]}
    task, spans = WORLD_TASK.get(r.get("task", "single")), r["time_gt"]["interleaved_response"]
    if task is None:
        raise AnnotationError(f"record {i}: task {r['task']!r} is none of {', '.join(WORLD_TASK)}")
    said = turns["gpt"].split("</evi>")[-1]
    return dict(task=task, source="world", idx=i, video=r["video"], q=turns["human"].replace("<image>", "").strip(),
                tgt=spans if task in ("tal", "dvc") else spans[0], g=[c.strip() for c in said.split("<evi>")[1:]],
                answer=said.strip())


def _src(src):
    """E.T. Bench's flat `src` -> [s, e] per question-side <evi>: values pair up two at a time; one is one frame."""
    return [src * 2] if len(src) == 1 else [src[i:i + 2] for i in range(0, len(src) - 1, 2)]


def _lines(path):
    """The predictions in a JSON-lines file; a last line cut short by a kill is cut off the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb+") as f:
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
    return [json.loads(line) for line in data[:data.rfind(b"\n") + 1].decode().splitlines()]


def predictions_path(ckpt, ann_path, temperature=0.0):
    """Default --out: in the checkpoint's step folder (a new checkpoint there starts afresh), by file and decoding."""
    name = os.path.splitext(os.path.basename(os.path.normpath(ann_path)))[0]
    return os.path.join(latest(ckpt), "eval", name + (f"-t{temperature:g}" if temperature else "") + ".jsonl")


def evaluate(model, tok, wp, path, cache, out, videos=None, max_new_tokens=2048, temperature=0.0, sentsim=None,
             rank=0, world=1):
    """Answer this rank's share (records[rank::world]) of the records not yet in `out`, appending each prediction
    to `out` (or to `out`.rankN, merged by rank 0), then score -> metrics (rank 0; None on the others)."""
    cfg = model.cfg
    kind, recs, root = read_benchmark(path, videos)
    key = lambda r: (r["task"], r["source"], r["idx"])  # noqa: E731
    by_key = {key(r): r for r in recs}
    if len(by_key) < len(recs):
        raise AnnotationError(f"{path}: records share a (task, source, idx): give each its own idx")
    parts = lambda: sorted(glob.glob(glob.escape(out) + ".rank*"))  # noqa: E731
    answered = lambda: {key(p): p for f in [out] + parts() for p in _lines(f)}  # noqa: E731
    done = answered()
    if any({f: v for f, v in p.items() if f != "a"} != by_key.get(k) for k, p in done.items()):
        raise AnnotationError(f"{out}: holds predictions of other records than {path}'s; give another --out")
    if world > 1:
        dist.barrier()  # every rank has read what is done before any of them writes
    todo = [r for r in recs if key(r) not in done][rank::world]
    if done and rank == 0:
        print(f"{out}: {len(done)} of {len(recs)} records answered before; continuing")
    mine = out if world == 1 else f"{out}.rank{rank}"
    os.makedirs(os.path.dirname(os.path.abspath(mine)), exist_ok=True)
    with open(mine, "a") as f:
        for r in tqdm(todo, desc=os.path.basename(path), dynamic_ncols=True, position=rank):
            frames, times = cache.get(os.path.join(root, r["video"]), cfg.fps, cfg.img_size, cfg.max_frames)
            a = answer(model, tok, wp, frames, times, r["q"], max_new_tokens, temperature, _src(r.get("src") or []),
                       1.2 if r["task"] in PENALIZED else 1.0)
            f.write(json.dumps(dict(r, a=a["raw"])) + "\n")
            f.flush()
    if world > 1:
        dist.barrier()
    if rank > 0:
        return None
    got = answered()
    preds = [got[k] for k in by_key]
    write_atomic(out, "".join(json.dumps(p) + "\n" for p in preds))  # one file, in the records' order
    for p in parts():
        os.remove(p)
    return score(kind, preds, sentsim)


def score(kind, preds, sentsim=None):
    """Predictions -> metrics, by the scorers of the benchmark (the world's tasks as their E.T. Bench kin)."""
    pct = lambda d: {k: 100 * v if isinstance(v, float) else v for k, v in d.items()}  # noqa: E731
    if kind == "charades":
        return {"Charades-STA": charades_scores([p["a"] for p in preds], [p["tgt"] for p in preds])}
    if kind == "youcook2":
        return {"YouCook2": youcook2_scores({p["video"]: p["a"] for p in preds},
                                            {p["video"]: list(zip(p["tgt"], p["g"])) for p in preds})}
    if kind == "etbench":
        r = {v: etbench_scores(preds, v, sentsim) for v in ("new", "original")}
        missing = ", ".join(r["new"]["missing"]) or "none"
        return {"Table 1, new (D²VLM's scorer)": dict(r["new"]["table"], missing=missing),
                "Table 1, original (E.T. Bench's)": dict(r["original"]["table"], missing=missing),
                **{t: {v: pct(r[v]["tasks"][t]) for v in r} for t in r["new"]["tasks"]}}
    tasks = etbench_scores([p for p in preds if p["task"] != "gvq"], "new", sentsim)["tasks"]
    m = {name: pct(tasks[t]) for name, t in WORLD_TASK.items() if t in tasks}
    single = [p for p in preds if p["task"] == "tvg"]
    if single:  # with moment retrieval's R@1 and mIoU (Charades-STA's), over all and over parsed answers
        m["single"].update(charades_scores([p["a"] for p in single], [p["tgt"] for p in single]))
    # qa answers in free text: right when the first sentence is the world's; Rec is GVQ's, over the right ones
    qa = [p for p in preds if p["task"] == "gvq"]
    if qa:
        right = [p["a"].split("</evi>")[-1].strip().split(".")[0] == p["answer"].split(".")[0] for p in qa]
        ious, fails = _ious(qa, "new", right=right)
        m["qa"] = dict(Acc=100 * sum(right) / len(qa), Rec=100 * _recall(ious), n=len(qa), failures=fails)
    gnd = [m[t]["F1"] for t in ("single", "multi") if t in m]  # E.T. Bench's grounding tasks
    m["avg"] = {"F1(gnd)": sum(gnd) / len(gnd) if gnd else None, "F1(cap)": m.get("dense", {}).get("F1"),
                "Sim(cap)": m.get("dense", {}).get("Sim"), "Rec(com)": m.get("qa", {}).get("Rec")}
    return m


def _fmt(k, v):
    if isinstance(v, dict):
        return "(" + "  ".join(f"{a}={_fmt(a, b)}" for a, b in v.items()) + ")"
    if v is None:
        return "not computed" + (" (needs Java)" if k in ("METEOR", "SODA_c") else " (--sentsim)" if "Sim" in k else "")
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_metrics(m):
    """One line per part (E.T. Bench: the Table 1 columns by each scorer, then each task by each); None is said
    to be not computed."""
    for name, vals in m.items():
        print(f"{name:>12}: " + "  ".join(f"{k}={_fmt(k, v)}" for k, v in vals.items()))
