"""Evaluation: answer as the released D²VLM inference does, and score a whole benchmark with nanod2vlm/scorers.py.

Files read by `evaluate`: the synthetic world's records (`conversations`), E.T. Bench's (`task, source, idx, video,
q, src, tgt, o, p, g`; a file or a folder of them), and TimeIT's Charades-STA and YouCook2 files (`annotations`).
Every one becomes an E.T. Bench record; its prediction is that record plus `a`, the answer as the released code
renders it, appended to a JSON-lines file as it comes, so that a killed run continues where it stopped.
"""
import glob
import json
import os
import re
import time

import torch.distributed as dist
from tqdm import tqdm

from nanod2vlm.checkpoint import latest
from nanod2vlm.data import AnnotationError, InputError, normalize, read_annotations
from nanod2vlm.scorers import SCORERS, charades_scores, etbench_scores, youcook2_scores

PENALIZED = {"rar", "eca", "rvq"}  # the referring tasks decode with repetition penalty 1.2, the others with none
WORLD_TASK = {"single": "tvg", "multi": "tal", "dense": "dvc", "qa": "gvq"}  # the world's tasks are these
CHARADES_Q = ("You are given a video about indoor activities. Watch the video carefully and find a visual event "
              "described by the sentence: '{}'. The format of your response should be: 'The event happens in "
              "<start time> - <end time>'.")
YOUCOOK2_Q = ("You are given a video about 'making fattoush'. Watch the video carefully and densly describe all the "
              "cooking steps. For each step, you need to determine the start and ends times and provide a concise "
              "description. The format of your response should be: '<start time> - <end time>, <description>'.")
# (both as the released conversion scripts write them, "densly" and "ends times" included)
SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*s?\s*(?:-|–|to)\s*(\d+(?:\.\d+)?)(?:\s*s(?:econds)?\b)?")  # "1 - 4.5", "6.3s - 12.1s"


def chunks(text, evi="<evi>"):
    """The answer part (after </evi>) split at each <evi>: the text that follows each reference."""
    answer = text.split("</evi>", 1)[-1]
    return [c.strip() for c in answer.split(evi)[1:]]


def answer(model, tok, wp, frames, times, question, max_new_tokens=2048, temperature=0.0, src=(),
           repetition_penalty=1.0):
    """Ground, then answer: the prompt `<image>\\n{question}` in the chat template, `src` the [s, e] of each
    question-side <evi>. Returns `raw`, the answer as the released code renders it (each <evi> -> "{s} - {e} " in
    whole seconds, </evi> kept: what the scorers read), `text`, that with notes for people, the grounding and
    answer spans in seconds, the captions and each <evi>'s details."""
    t0 = time.time()
    ids = tok.prompt(question, ("<evi>",) if src else ())  # the question's <evi> are src's, or text
    i = ids.index(tok.image_id)
    ids = ids[:i] + [tok.image_id] * len(frames) + ids[i + 1:]  # one placeholder per frame
    room = model.cfg.max_pos - len(ids)
    if room < 1:
        raise InputError(f"the prompt takes {len(ids)} positions, the model has {model.cfg.max_pos}: ask a shorter "
                         "question, or about a shorter video")
    pixels = normalize(frames).to(next(model.parameters()).device)  # train.py evaluates on its training device
    out, evis = model.generate(pixels, times, wp.encode(question), ids, min(max_new_tokens, room), temperature,
                               src=src, repetition_penalty=repetition_penalty)
    out = out[:-1] if out[-1:] == [tok.end_id] else out
    # split at the <evi> ids, not at the text "<evi>": byte-fallback pieces can spell that text too
    cuts = [j for j, x in enumerate(out) if x == tok.evi_id]
    pieces = [tok.decode(out[a + 1:b]) for a, b in zip([-1] + cuts, cuts + [len(out)])]
    frame_level = model.cfg.evi_unit == "frame"  # each <evi> is one boundary frame; events are their pairs
    k = [sum(x["stage"] == e["stage"] for x in evis[:j]) for j, e in enumerate(evis)]  # index within its stage
    raw = pieces[0]
    for e, j, piece in zip(evis, k, pieces[1:]):
        # the released code prints frame indices, at its uncapped 1 fps the whole seconds: so do the frames' times,
        # which stay seconds when max_frames thins a long video out
        s, t = (round(v) for v in e["seconds"])
        raw += (f"{s} - " if j % 2 == 0 else f"{t} ") if frame_level else f"{s} - {t} "
        raw += piece
    raw = raw.strip()
    grounded, spans = ([e["seconds"] for e in evis if e["stage"] == s] for s in (1, 2))
    if frame_level:
        grounded, spans = ([(a[0], b[0]) for a, b in zip(x[::2], x[1::2])] for x in (grounded, spans))
    # dense captions: the text after each answer event's <evi> (after the second of a frame-level pair) ...
    captions = [c.strip() for e, c in zip(evis, pieces[1:]) if e["stage"] == 2]
    captions = captions[1::2] if frame_level else captions
    if not model.cfg.interleave:  # ... or, when the answer states its timestamps as text, after each of those
        stated = raw.split("</evi>")[-1]
        spans = [(float(a), float(b)) for a, b in SPAN.findall(stated)]
        captions = [c.strip() for c in SPAN.split(stated)[3::3]]
    note = "" if tok.evi_end_id in out else " (the model never closed grounding)"
    if max(k, default=0) >= len(frames):  # a stage with more <evi> than frames (1 frame: one in each is fine)
        note += f" ({len(evis)} <evi> for {len(frames)} frames: a degenerate answer)"
    return dict(raw=raw, text=raw + note, grounding=grounded, answer_spans=spans, captions=captions, evis=evis,
                seconds=time.time() - t0, frames=len(frames))


def read_benchmark(path, videos=None):
    """An annotation file (or a folder of E.T. Bench files) -> (kind, records as E.T. Bench has them, video root)."""
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.json"))) if os.path.isdir(path) else [path]
    data = [r for f in files for r in _json(f)]
    if not data:
        raise AnnotationError(f"{path}: no records to evaluate")
    first = data[0]
    if "conversations" in first:  # the synthetic world: its tasks are TVG, TAL, DVC and a free-answer GVQ
        return "world", [_world(r, i) for i, r in enumerate(read_annotations(path))], videos or os.path.dirname(path)
    kind = "youcook2" if "segments" in first else "charades" if "timestamp" in first else "etbench"
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
    turns = {c["from"]: c["value"] for c in r["conversations"]}
    task, spans = WORLD_TASK.get(r.get("task", "single")), r["time_gt"]["interleaved_response"]
    if task is None:
        raise AnnotationError(f"record {i}: task {r['task']!r} is none of {', '.join(WORLD_TASK)}")
    return dict(task=task, source="world", idx=i, video=r["video"], q=turns["human"].replace("<image>", "").strip(),
                tgt=spans if task in ("tal", "dvc") else spans[0], g=chunks(turns["gpt"]),
                answer=turns["gpt"].split("</evi>")[-1].strip())


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
    parts = lambda: sorted(glob.glob(glob.escape(out) + ".rank*"))  # noqa: E731
    by_key = {key(r): r for r in recs}
    if len(by_key) < len(recs):
        raise AnnotationError(f"{path}: records share a (task, source, idx): give each its own idx")
    done = {key(p): p for f in [out] + parts() for p in _lines(f)}
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
        for task in dict.fromkeys(r["task"] for r in todo):  # one progress bar per task
            for r in tqdm([r for r in todo if r["task"] == task], desc=task, dynamic_ncols=True, position=rank):
                frames, times = cache.get(os.path.join(root, r["video"]), cfg.fps, cfg.img_size, cfg.max_frames)
                a = answer(model, tok, wp, frames, times, r["q"], max_new_tokens, temperature, _src(r.get("src") or []),
                           1.2 if task in PENALIZED else 1.0)
                f.write(json.dumps(dict(r, a=a["raw"])) + "\n")
                f.flush()
    if world > 1:
        dist.barrier()
    if rank > 0:
        return None
    got = {key(p): p for f in [out] + parts() for p in _lines(f)}
    preds = [got[k] for k in by_key]
    with open(out + ".tmp", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in preds)
    os.replace(out + ".tmp", out)  # one file, in the records' order
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
    # world qa answers in free text: right when its first sentence is the world's; GVQ's recall, over the rightly
    # answered only, is then TEM's with the other answers blanked (their parse failures counted unblanked)
    qa = [dict(p, task="tem", tgt=[p["tgt"]]) for p in preds if p["task"] == "gvq"]
    right = [p["a"].split("</evi>")[-1].strip().split(".")[0] == p["answer"].split(".")[0] for p in qa]
    blanked = [dict(p, a=p["a"] if ok else "") for p, ok in zip(qa, right)]
    tasks = etbench_scores([p for p in preds if p["task"] != "gvq"] + blanked, "new", sentsim)["tasks"]
    single = [p for p in preds if p["task"] == "tvg"]
    m = {name: pct(tasks[t]) for name, t in (("single", "tvg"), ("multi", "tal"), ("dense", "dvc")) if t in tasks}
    if single:  # with moment retrieval's R@1 and mIoU (Charades-STA's), over all and over parsed answers
        m["single"].update(charades_scores([p["a"] for p in single], [p["tgt"] for p in single]))
    if qa:
        m["qa"] = dict(Acc=100 * sum(right) / len(qa), Rec=100 * tasks["tem"]["Rec"], n=len(qa),
                       failures=etbench_scores(qa)["tasks"]["tem"]["failures"])
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
