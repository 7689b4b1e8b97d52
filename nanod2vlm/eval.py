"""Evaluation: answer as the released D²VLM inference does, run a whole benchmark, and score it by the paper's
scorers, written from their definitions: E.T. Bench (Table 1), Charades-STA (Table 2), YouCook2 (Table 3).

Files read by `evaluate`: the synthetic world's records (`conversations`), E.T. Bench's (`task, source, idx, video,
q, src, tgt, o, p, g`; a file or a folder of them), and TimeIT's Charades-STA and YouCook2 files (`annotations`).
Every one becomes an E.T. Bench record; its prediction is that record plus `a`, the answer as the released code
renders it, appended to a JSON-lines file as it comes, so that a killed run continues where it stopped.

The scorers are written from the protocol description, not from any benchmark's code; every rule, quirk included,
follows what the official scorers compute (the `>` / `>=` choices, any-match instead of one-to-one pairing, float32
IoU ties, the denominators). E.T. Bench is scored in two versions: `original`, E.T. Bench's own scorer (the
leaderboard), and `new`, D²VLM's modified scorer, which made the paper's Table 1 (answers split on `</evi>`,
any-span TVG/EPM, midpoint VHD, a letter that is final, and its bugs: the EVS map that unions answer and evidence
spans, the TAL sum that resets). Not computed: METEOR and SODA_c (they need Java and METEOR's jar), reported as
None. Approximation: Stanford's PTB tokenizer (Java) is replaced by `ptb_tokenize`.
"""
import argparse
import glob
import json
import math
import multiprocessing
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from functools import partial
from multiprocessing.pool import ThreadPool

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from nanod2vlm.checkpoint import latest, load_safetensors_into
from nanod2vlm.data import frame_span, normalize, read_annotations, turns
from nanod2vlm.files import InputError, cli, read_json, write_atomic
from nanod2vlm.model import Config, QFormerLayer
from nanod2vlm.tokenizer import WordPiece
from nanod2vlm.world import ensure_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py is here
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
    ids = tok.prompt(question, ("<evi>",) if src else (), len(frames))  # the question's <evi> are src's, or text
    room = model.cfg.max_pos - len(ids)
    if room < 1:
        raise InputError(f"the prompt takes {len(ids)} positions, the model has {model.cfg.max_pos}: ask a shorter "
                         "question, or about a shorter video")
    pixels = normalize(frames).to(next(model.parameters()).device)  # train.py evaluates on its training device
    src = [frame_span(times, iv, model.cfg.fps) for iv in src]  # the frames of each question-side interval
    out, evis = model.generate(pixels, times, wp.encode(question), ids, min(max_new_tokens, room), temperature,
                               src=src, repetition_penalty=repetition_penalty)
    out = out[:-1] if out[-1:] == [tok.end_id] else out
    # split at the <evi> ids, not at the text "<evi>": byte-fallback pieces can spell that text too
    cuts = [j for j, x in enumerate(out) if x == tok.evi_id]
    pieces = [tok.decode(out[a + 1:b]) for a, b in zip([-1] + cuts, cuts + [len(out)])]
    n = 2 if model.cfg.evi_unit == "frame" else 1  # frame-level <evi> (Tab. 6): a start and an end frame per event
    stages = [[e["seconds"] for e in evis if e["stage"] == s] for s in (1, 2)]  # stage 1 ends at </evi>
    # the released code prints frame indices, at its uncapped 1 fps the whole seconds: so do the frames' times,
    # which stay seconds when max_frames thins a long video out; a frame-level pair prints "s - " then "e "
    said = [f"{round(s)} - {round(e)} " if n == 1 else [f"{round(s)} - ", f"{round(e)} "][k % 2]
            for x in stages for k, (s, e) in enumerate(x)]
    raw = "".join(a + b for a, b in zip([""] + said, pieces)).strip()
    grounded, spans = ([(x[i][0], x[i + n - 1][1]) for i in range(0, len(x) - n + 1, n)] for x in stages)
    # dense captions: the text after each answer event's (last) <evi> ...
    captions = [c.strip() for c in pieces[1 + len(stages[0]):1 + len(evis)]][n - 1::n]
    if not model.cfg.interleave:  # ... or, when the answer states its timestamps as text (Tab. 4), after each of those
        stated = raw.split("</evi>")[-1]
        spans = [tuple(x) for x in parse_tvg(stated, answer=False)]
        captions = [c.strip() for c in PAIR.split(stated)[3::3]]
    note = "" if tok.evi_end_id in out else " (the model never closed grounding)"
    if max(map(len, stages)) > len(frames):  # a stage with more <evi> than frames
        note += f" ({len(evis)} <evi> for {len(frames)} frames: a degenerate answer)"
    return dict(raw=raw, text=raw + note, grounding=grounded, answer_spans=spans, captions=captions, evis=evis,
                seconds=time.time() - t0, frames=len(frames))


def read_benchmark(path, videos=None):
    """An annotation file (or a folder of E.T. Bench files) -> (kind, records as E.T. Bench has them, video root)."""
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.json"))) if os.path.isdir(path) else [path]
    data = [r for f in files for r in _json(f)]
    if not data:
        raise InputError(f"{path}: no records to evaluate")
    if "conversations" in data[0]:  # the synthetic world: its tasks are TVG, TAL, DVC and a free-answer GVQ
        return "world", [_world(r, i) for i, r in enumerate(read_annotations(path))], videos or os.path.dirname(path)
    kind = "youcook2" if "segments" in data[0] else "charades" if "timestamp" in data[0] else "etbench"
    if videos is None:
        raise InputError(f"{path}: {kind} records name videos relative to a folder: give it with --videos DIR")
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
                raise InputError(f"{path}: <vid> in q (E.T. Bench's vid style): give one <evi> per src interval")
            if unknown := {r["task"] for r in recs} - set(SCORERS):
                raise InputError(f"{path}: tasks {sorted(unknown)} are none of E.T. Bench's {list(SCORERS)}")
    except (KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: not world, E.T. Bench or TimeIT (Charades-STA, YouCook2) records: a record "
                         f"lacks or mistypes {e}") from None
    return kind, recs, videos


def _json(path):
    """A JSON annotation file -> its records (TimeIT keeps them under "annotations")."""
    data = read_json(path)
    data = data["annotations"] if isinstance(data, dict) and "annotations" in data else data
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f'{path}: expected a list of records, or TimeIT\'s {{"annotations": [records]}}')
    return data


def _world(r, i):
    """A world record -> its E.T. Bench record; `g`, a dense answer's captions (the text after each answer <evi>),
    and `answer`, the answer stage's text (a qa answer is right when its first sentence is this one's)."""
    chat = turns(r)
    said = chat["gpt"].split("</evi>")[-1]
    task, spans = WORLD_TASK.get(r.get("task", "single")), r["time_gt"]["interleaved_response"]
    if task is None:
        raise InputError(f"record {i}: task {r['task']!r} is none of {', '.join(WORLD_TASK)}")
    return dict(task=task, source="world", idx=i, video=r["video"],
                q=chat["human"].replace("<image>", "").strip(), tgt=spans if task in ("tal", "dvc") else spans[0],
                g=[c.strip() for c in said.split("<evi>")[1:]], answer=said.strip())


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


def predictions_path(ckpt, ann_path, temperature=0.0, evi_threshold=None):
    """Default --out: in the checkpoint's step folder (a new checkpoint there starts afresh), by file and decoding."""
    name = os.path.splitext(os.path.basename(os.path.normpath(ann_path)))[0]
    name += (f"-t{temperature:g}" if temperature else "") + (f"-thr{evi_threshold:g}" if evi_threshold else "")
    return os.path.join(latest(ckpt), "eval", name + ".jsonl")


def evaluate(model, tok, wp, path, cache, out, videos=None, max_new_tokens=2048, temperature=0.0, sentsim=None,
             rank=0, world=1, jobs=None):
    """Answer this rank's share (records[rank::world]) of the records not yet in `out`, appending each prediction
    to `out` (or to `out`.rankN, merged by rank 0), then score -> metrics (rank 0; None on the others). One
    process with the model on the CPU: `jobs` forked processes answer (default: torch's thread count), one thread
    each, writing `out`.rankN."""
    cfg = model.cfg
    kind, recs, root = read_benchmark(path, videos)
    key = lambda r: (r["task"], r["source"], r["idx"])  # noqa: E731
    by_key = {key(r): r for r in recs}
    if len(by_key) < len(recs):
        raise InputError(f"{path}: records share a (task, source, idx): give each its own idx")
    parts = lambda: sorted(glob.glob(glob.escape(out) + ".rank*"))  # noqa: E731
    answered = lambda: {key(p): p for f in [out] + parts() for p in _lines(f)}  # noqa: E731
    done = answered()
    if any({f: v for f, v in p.items() if f != "a"} != by_key.get(k) for k, p in done.items()):
        raise InputError(f"{out}: holds predictions of other records than {path}'s; give another --out")
    if world > 1:
        dist.barrier()  # every rank has read what is done before any of them writes
    todo = [r for r in recs if key(r) not in done][rank::world]
    if done and rank == 0:
        print(f"{out}: {len(done)} of {len(recs)} records answered before; continuing")

    def answer_all(share, file, position):  # appends each prediction to file as it comes
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
        with open(file, "a", buffering=1) as f:  # line-buffered: each prediction is on disk when written
            total, seen = Counter(r["task"] for r in share), Counter()
            for r in (bar := tqdm(share, desc=os.path.basename(path), dynamic_ncols=True, position=position)):
                seen[r["task"]] += 1
                bar.set_postfix_str(f"{r['task']} {seen[r['task']]}/{total[r['task']]}")  # progress in each task
                frames, times = cache.get(os.path.join(root, r["video"]), cfg.fps, cfg.img_size, cfg.max_frames)
                a = answer(model, tok, wp, frames, times, r["q"], max_new_tokens, temperature,
                           _src(r.get("src") or []), 1.2 if r["task"] in PENALIZED else 1.0)
                f.write(json.dumps(dict(r, a=a["raw"])) + "\n")

    def child(_, j):  # forked process j of jobs (through cli: a bad input ends it in one line)
        torch.set_num_threads(1)
        try:
            answer_all(todo[j::jobs], f"{out}.rank{j}", j)
        except KeyboardInterrupt:  # Ctrl-C reaches every process: the parent alone reports it
            sys.exit(130)

    # decoding one token at a time is mostly per-op overhead, which a second thread does not share but a second
    # process does (the children share the parent's memory until they write; README: speed)
    on_cpu = next(model.parameters()).device.type == "cpu"  # a CUDA context does not survive a fork
    jobs = min(jobs or torch.get_num_threads(), len(todo)) if world == 1 and on_cpu else 1
    if jobs > 1:
        procs = [multiprocessing.get_context("fork").Process(target=cli(partial(child, j=j))) for j in range(jobs)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise InputError(f"{path}: an evaluation process failed (its error is above); run again to continue")
    else:
        answer_all(todo, out if world == 1 else f"{out}.rank{rank}", rank)
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
        # and R@1 at IoU 0.5 per object asked about (on a held-out split: per held-out pair), named as the right
        # answer names it ("The purple cross appears in <evi>.")
        by = {}
        for p in single:
            by.setdefault(p["answer"].split(" appears")[0].removeprefix("The "), []).append(p)
        m["single"]["R@1 by object"] = {
            o: {"R@0.5": charades_scores([p["a"] for p in ps], [p["tgt"] for p in ps])["all"]["R@0.5"], "n": len(ps)}
            for o, ps in sorted(by.items())}
    # qa answers in free text: right when the first sentence is the world's; Rec is GVQ's, over the right ones
    qa = [p for p in preds if p["task"] == "gvq"]
    if qa:
        right = [p["a"].split("</evi>")[-1].strip().split(".")[0] == p["answer"].split(".")[0] for p in qa]
        rec, fails = _tvg(qa, "new", sentsim, "Rec", right)
        m["qa"] = dict(Acc=100 * sum(right) / len(qa), Rec=100 * rec["Rec"], n=len(qa), failures=fails)
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


# ---------------------------------------------------------------------------------------------------------
# The scorers

THR = (0.1, 0.3, 0.5, 0.7)  # E.T. Bench's IoU thresholds
NUM = r"\d+\.*\d*"
PAIR = re.compile(rf"({NUM})\s*-\s*({NUM})")
KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end", "happen")


# ---------------------------------------------------------------------------------------------------------
# Answer parsers

def split_answer(a, kind, version):
    """D²VLM's split of an answer on `</evi>` -> (evidence part, answer part); (None, None) when the delimiter is
    required and missing (a parse failure). kind "span": lowercased, the last piece (TVG, EPM, TAL, EVS, VHD, TEM,
    GVQ's recall; VHD splits the raw text, which differs only for an upper-case `</EVI>`); "dvc": the second piece;
    "letter": the last piece, the whole text without delimiter. The original scorer parses the whole answer."""
    if version == "original":
        return a, a
    parts = (a.lower() if kind == "span" else a).split("</evi>")
    if len(parts) == 1 and kind != "letter":
        return None, None
    return parts[0], parts[1] if kind == "dvc" else parts[-1]


def _floats(pairs):
    try:  # trailing periods are stripped ("5." -> 5)
        return [[float(s.rstrip(".")), float(e.rstrip("."))] for s, e in pairs]
    except ValueError:  # "1..2": the official scorers raise; here it is a parse failure
        return None


def parse_tvg(text, answer=True):
    """P-TVG: the spans of an answer, [] for a parse failure. "s - e" anywhere (periods do not split sentences),
    else "s to e", else the first number (then the first h:mm:ss) of each sentence that names a start/end, paired.
    Answer spans are ordered ascending; evidence spans (answer=False) are kept as written."""
    t = (text or "").lower()
    spans = _floats(PAIR.findall(t) or re.findall(rf"({NUM})\s+to\s+({NUM})", t))
    if spans is None:
        return []
    cands = [s for s in re.split(r"[!?\n]", t) if any(k in s for k in KEYWORDS)]
    for rx, sec in ((r"\b(?:\d+\.\d+|\d+)\b", float), (r"\b\d{1,2}:\d{2}:\d{2}\b", _hms)):  # a number, an h:mm:ss
        times = [sec(m.group()) for s in cands if (m := re.search(rx, s))]
        spans = spans or [times[i:i + 2] for i in range(0, len(times) - 1, 2)]  # only while nothing is found
    return [sorted(x) for x in spans] if answer else spans


def _hms(x):
    return sum(int(v) * 60 ** k for k, v in enumerate(x.split(":")[::-1]))


def parse_dvc(text, whole=None, version="new"):
    """P-DVC: [([s, e], caption), ...] of a dense-captioning answer, [] for a parse failure. Captions are the
    text between the "s - e" spans (pieces over 5 characters), paired with the spans by position. Fallbacks:
    "start time: s ... end time: e" with "description:" or "*" captions; then one event from the first line (or
    sentence) of `whole` (the new scorer's whole raw answer) with a time. The official third form, "start time s,
    end time e", always ends in a failure (an assertion trips) and is not written."""
    t = (text or "").lower()
    if version == "new":
        t = re.sub(r"\.{2,}", " ", t)
    if found := list(PAIR.finditer(t)):
        caps = t
        for m in found:  # every occurrence of each matched string
            caps = caps.replace(m.group(), "\n")
        caps = [c.strip().strip(", ") for c in caps.replace("seconds", "").split("\n") if len(c) > 5]
        return [(sorted(s), c) for s, c in zip(_floats(m.groups() for m in found) or [], caps)]
    starts, ends = re.findall(rf"start time:\s*({NUM})", t), re.findall(rf"end time:\s*({NUM})", t)
    caps = re.findall(r"description:\s*(.+)", t) or re.findall(r"^\s*\*\s*(.+)", t, re.M)
    if (spans := _floats(zip(starts, ends))) and caps:
        return [(sorted(s), c.strip()) for s, c in zip(spans, caps)]
    t = (text if whole is None else whole).lower()  # last: one event, from the first piece (line, else sentence)
    for piece in [p for p in (t.split("\n") if "\n" in t else t.split(".")) if len(p) > 7]:
        if m := PAIR.search(piece):
            span = (_floats([m.groups()]) or [None])[0]
        else:
            times = [_hms(x) for x in re.findall(r"\d+:\d{2}", piece)]
            times = times or [float(x) for x in re.findall(r"\d+(?:\.\d+)?", piece)]
            if not times:
                continue
            t0 = times[0]  # one time: a 40 s window around it, or from it near the start
            span = times[:2] if len(times) > 1 else [t0 - 20, t0 + 20] if t0 > 20 else [t0, t0 + 40]
        return [(sorted(span), piece.split("seconds")[-1].strip())] if span else []
    return []


def parse_letter(answer, n_options):
    """The letter parser: (option index or None, cleaned answer). "A man runs" reads as A (a letter followed by
    ".", ",", " " or ")"); an empty cleaned answer is a failure. Lowercases all (GVQ lowercases only its prefix
    test; the same result, since the similarity model is uncased)."""
    t = answer.lower().removeprefix("best option:").lstrip().lstrip("(").lstrip()
    letter = t[:1] if len(t) == 1 or t[1:2] in (".", ",", " ", ")") else ""
    i = "abcde"[:n_options].find(letter) if letter else -1
    return (i if i >= 0 else None), t


def ptb_tokenize(text):
    """Approximates Stanford's PTBTokenizer (Java) as the caption metrics use it: lowercase, split words from
    punctuation ("don't" -> do n't, "man's" -> man 's; hyphenated words and decimals stay whole), drop the
    punctuation tokens the official code drops (quotes, brackets ( ) { }, . ? ! , : ; - -- ...)."""
    tokens = re.findall(r"[a-z0-9]+(?=n't)|n't|'[a-z]+|[a-z0-9]+(?:[-.,:/][a-z0-9]+)*|\.\.\.|--|\S", text.lower())
    return [w for w in tokens if w not in PTB_DROP]


PTB_DROP = {"'", "''", "`", "``", '"', "(", ")", "{", "}", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


# ---------------------------------------------------------------------------------------------------------
# SentSim: all-MiniLM-L6-v2 (BERT encoder, masked mean pooling, L2 norm), reusing the Q-Former's BERT layers

class SentSim(nn.Module):
    """Sentence similarity with all-MiniLM-L6-v2 from a folder (config.json, model.safetensors in HF BertModel
    names, optionally prefixed, vocab.txt). A Q-Former layer without cross-attention and without queries is a
    plain post-LN BERT layer; its unused query FFN stays unloaded. Texts are truncated on the right to 256 word
    pieces, [CLS]/[SEP] included (sentence-transformers' max_seq_length)."""

    def __init__(self, path, max_len=256):
        super().__init__()
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: no config.json (give the folder of all-MiniLM-L6-v2 in HF format)")
        c = json.load(open(os.path.join(path, "config.json")))
        W = c["hidden_size"]
        cfg = Config(qf_width=W, qf_heads=c["num_attention_heads"], qf_mlp=c["intermediate_size"])
        self.embeddings = nn.ModuleDict(dict(word_embeddings=nn.Embedding(c["vocab_size"], W),
                                             position_embeddings=nn.Embedding(c["max_position_embeddings"], W),
                                             token_type_embeddings=nn.Embedding(c.get("type_vocab_size", 2), W),
                                             LayerNorm=nn.LayerNorm(W, eps=c.get("layer_norm_eps", 1e-12))))
        layers = [QFormerLayer(cfg, cross=False) for _ in range(c["num_hidden_layers"])]
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(layers)))
        load_safetensors_into(self, path, rename=_bert_key, missing_ok=("_query",))
        self.tok = WordPiece(os.path.join(path, "vocab.txt"))
        self.max_len = max_len

    @torch.no_grad()
    def forward(self, texts):
        """texts -> (N, W) L2-normalised embeddings."""
        e = self.embeddings  # token type is always 0
        ids = [torch.tensor(self.ids(t)) for t in texts]
        tok = nn.utils.rnn.pad_sequence(ids, True, self.tok.pad_id).to(e.word_embeddings.weight.device)  # (N, L)
        valid = tok != self.tok.pad_id  # basic_tokenize splits "[PAD]" in a text: only padding is [PAD]
        pos = torch.arange(tok.shape[1], device=tok.device)
        x = e.LayerNorm(e.word_embeddings(tok) + e.position_embeddings(pos) + e.token_type_embeddings.weight[0])
        for layer in self.encoder.layer:
            x = layer(x, 0, valid[:, None, None, :], None)
        pooled = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)  # masked mean pooling
        return pooled / pooled.norm(dim=-1, keepdim=True)  # L2-normalised

    def ids(self, text):
        x = self.tok.encode(text, max_len=10 ** 9)
        return x[:self.max_len - 1] + x[-1:]  # right truncation: the start and [SEP] are kept

    def cosine(self, a, b):
        """Cosine similarity of a[i] and b[i], each text encoded once, 64 texts at a time."""
        uniq = list(dict.fromkeys(a + b))
        emb = dict(zip(uniq, torch.cat([self(uniq[i:i + 64]) for i in range(0, len(uniq), 64)])))
        return [float(emb[x] @ emb[y]) for x, y in zip(a, b)]


def _bert_key(key):
    """HF BertModel key, any prefix ("bert.", "0.auto_model.") -> our key; the pooler and position ids are dropped."""
    m = re.search(r"(embeddings|encoder)\..*", key)
    return m.group().replace(".self.", ".attention.") if m and not key.endswith("position_ids") else None


# ---------------------------------------------------------------------------------------------------------
# E.T. Bench: per-task metrics of one (task, source) group

def _iou(a, b):
    """nncore's temporal IoU in float32: spans (N, 2) x (M, 2) -> (N, M); two zero-length spans give NaN."""
    a, b = (torch.tensor(x, dtype=torch.float32).view(-1, 2) for x in (a, b))
    inter = (torch.minimum(a[:, None, 1], b[None, :, 1]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    return inter / ((a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None] - inter)


def _f1(p, r):
    return 2 * p * r / (p + r) if p + r else 0.0


def _spans_of(recs, version):
    return [parse_tvg(split_answer(r["a"], "span", version)[1]) for r in recs]


def _tvg(recs, version, sentsim, metric="F1", right=None):
    """TVG, EPM ("F1"): the first span (original) or the best span (new) against the GT span. TEM ("Rec"): the
    first span against the best GT span; GVQ's and the world's Rec, over the rightly answered only (IoU 0 for the
    others). A hit at IoU >= t, the float32 IoU as a Python float against the Python threshold: 7/10 misses 0.7;
    the mean over THR of hits / N (failures are misses)."""
    spans = _spans_of(recs, version)
    best = version == "new" and metric == "F1"
    ious = [_iou(s if best else s[:1], r["tgt"]).max().item() if s and ok else 0.0
            for r, s, ok in zip(recs, spans, right or [True] * len(recs))]
    recall = sum(sum(x >= t for x in ious) for t in THR) / (len(THR) * len(ious))
    return {metric: recall, "mIoU": sum(ious) / len(ious)}, sum(not s for s in spans)


def _tal(recs, version, sentsim):
    """Per sample and threshold, any-match P and R (in float32, so 7/10 hits 0.7), F1 summed over samples."""
    spans = _spans_of(recs, version)
    total = torch.zeros(len(THR))
    for r, s in zip(recs, spans):
        iou = _iou(r["tgt"], s) if s else torch.zeros(1, 1)  # (GT, predictions); a failure passes no threshold
        for k, t in enumerate(THR):
            if iou.max() < t:  # NaN (two zero-length spans) passes this test
                continue
            rec, prc = (iou.amax(1) >= t).float().mean(), (iou.amax(0) >= t).float().mean()
            # D²VLM's bug: P = R = 0 resets the sum so far (the original adds 0/0 = NaN)
            total[k] = 0 if version == "new" and rec == prc == 0 else total[k] + 2 * prc * rec / (prc + rec)
    return {"F1": (total / len(recs)).mean().item()}, sum(not s for s in spans)


def _bins(spans):
    m = torch.zeros(1000, dtype=torch.bool)  # 1-s bins, [round(s), round(e)): a reversed span marks nothing
    for s, e in spans:
        if e != math.inf:  # new drops an infinite end ("999...9" overflows), the original raises
            m[max(0, round(s)):round(e)] = True
    return m


def _evs(recs, version, sentsim):
    """Per-second F1, averaged over parsed samples only. New: the evidence spans land in the answer's map."""
    f1s = []
    for r in recs:
        ev, ans = split_answer(r["a"], "span", version)
        if spans := parse_tvg(ans):
            pred = _bins(spans + (parse_tvg(ev, answer=False) if version == "new" else []))
            gt = _bins(r["tgt"])
            tp = (pred & gt).sum().item()  # of the seconds marked in pred (TP + FP) and in gt (TP + FN)
            f1s.append(_f1(tp / pred.sum().item(), tp / gt.sum().item()) if tp else 0.0)
    return {"F1": sum(f1s) / len(f1s) if f1s else 0.0}, len(recs) - len(f1s)


def _flat(tgt):
    return [tgt] if not isinstance(tgt[0], (list, tuple)) else [s for x in tgt for s in _flat(x)]


def _vhd(recs, version, sentsim):
    """A hit when the predicted time lies in any annotator's span: the first number (original), the midpoint of
    the first answer span (new)."""
    if version == "original":
        xs = [float(m.group()) if (m := re.search(r"[-+]?\d+(?:\.\d+)?", r["a"])) else None for r in recs]
    else:
        xs = [sum(s[0]) / 2 if s else None for s in _spans_of(recs, version)]
    hits = sum(x is not None and any(s <= x <= e for s, e in _flat(r["tgt"])) for r, x in zip(recs, xs))
    return {"F1": hits / len(recs)}, xs.count(None)


def _choices(recs, version, sentsim, gvq=False):
    """RAR, ECA, RVQ: Acc of letter + similarity answers; the original is lenient (a first "(x)" anywhere, the
    letter and the similarity each may score), a valid letter is final in the new. GVQ: a valid letter is final in
    both; options counted per sample; Rec, the recall of the first span over the rightly answered only
    (denominator: all samples). no_sim: answers left to the similarity while no SentSim is given (misses)."""
    lenient = version == "original" and not gvq
    hits, fails, no_sim = [], 0, 0
    for r in recs:
        a = split_answer(r["a"], "letter", version)[1]
        i, t = parse_letter(a, len(r["o"] if gvq else recs[0]["o"]))
        # the original also takes the first "(x)" anywhere; new's search is dead (it takes "(x)" as the letter)
        hit = i == r["p"] or lenient and re.findall(r"\(([a-z])\)", a.lower())[:1] == ["abcde"[r["p"]]]
        fails += not t
        if t and not hit and (i is None or lenient):
            no_sim += sentsim is None
            if sentsim is not None:
                opts = [f"({chr(65 + k)}) " + (f"{x[0]} - {x[1]}" if isinstance(x, list) else str(x))
                        for k, x in enumerate(r["o"])]  # a span option reads "s - e"
                cos = sentsim.cosine([t] * len(opts), opts)
                hit = max(range(len(opts)), key=cos.__getitem__) == r["p"]  # the first maximum wins
        hits.append(hit)
    m = {"Acc": sum(hits) / len(recs), "no_sim": no_sim}
    if gvq:
        m["Rec"] = _tvg(recs, version, sentsim, "Rec", hits)[0]["Rec"]  # TEM's recall over the right answers
    return m, fails


def _iou_dvc(a, b):
    """The captioning scorers' IoU: endpoints ordered, union capped by the two lengths, + 1e-8."""
    (s1, e1), (s2, e2) = sorted(a), sorted(b)
    inter = max(0, min(e1, e2) - max(s1, s2))
    return inter / (min(max(e1, e2) - min(s1, s2), e1 - s1 + e2 - s2) + 1e-8)


def _match(pred, gt, t, rng):
    """Predicted against GT ([s, e], caption) events at threshold t -> (P, R, caption pairs). P and R: any-match,
    at a strict IoU > t. Pairs: (predicted caption, GT caption) for every GT with IoU >= t, in prediction order; an
    unmatched prediction is paired with a random string of 10-20 lowercase letters (unseeded in the official code,
    seeded here)."""
    iou = [[_iou_dvc(p, g) for g, _ in gt] for p, _ in pred]
    pairs = []
    for (_, cap), row in zip(pred, iou):
        noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(10, 20)))
        pairs += [(cap, g) for x, (_, g) in zip(row, gt) if x >= t] or [(cap, noise)]
    P = sum(any(x > t for x in row) for row in iou) / max(len(pred), 1)
    R = sum(any(x > t for x in col) for col in zip(*iou)) / len(gt) if iou else 0.0
    return P, R, pairs


def _events(a, version="new"):
    """P-DVC of an answer's part; new: piece 1 after `</evi>` (none: a failure), the whole answer for the last
    fallback."""
    part = split_answer(a, "dvc", version)[1]
    return parse_dvc(part, a, version) if part is not None else []


def _dvc(recs, version, sentsim):
    """DVC, SLC: F1 of the dataset-level P and R (failures count as P = R = 0); SentSim over parsed videos."""
    parsed = [(r, events) for r in recs if (events := _events(r["a"], version))]
    # by video: one video's samples overwrite each other; at most 1000 events each
    videos = {r["video"]: (events[:1000], list(zip(r["tgt"], r["g"]))) for r, events in parsed}
    scale = len(parsed) / len(recs)  # failures count as P = R = 0
    rng = random.Random(0)
    f1, sims = [], []
    for t in THR:
        matched = [_match(pred, gt, t, rng) for pred, gt in videos.values()]
        P, R = (scale * sum(x[k] for x in matched) / max(len(matched), 1) for k in (0, 1))
        f1.append(_f1(P, R))
        if sentsim is not None and matched:
            pairs = [[(_clean(h), _clean(g)) for h, g in x[2]] for x in matched]
            cos = iter(sentsim.cosine([h for p in pairs for h, _ in p], [g for p in pairs for _, g in p]))
            sims.append(sum(sum(next(cos) for _ in p) / len(p) for p in pairs) / len(pairs))
    sim = sum(sims) / len(THR) if sentsim is not None else None
    return {"F1": sum(f1) / len(THR), "Sim": sim}, len(recs) - len(parsed)


def _clean(caption):
    """Non-ASCII characters to spaces, then PTB tokens joined by spaces (SentSim's input)."""
    return " ".join(ptb_tokenize("".join(c if ord(c) < 128 else " " for c in caption)))


SCORERS = dict(rar=_choices, eca=_choices, rvq=_choices, tvg=_tvg, epm=_tvg, tal=_tal, evs=_evs, vhd=_vhd,
               dvc=_dvc, slc=_dvc, tem=partial(_tvg, metric="Rec"), gvq=partial(_choices, gvq=True))
COLUMNS = {"RAR": ("rar", "Acc"), "EVC": ("eca", "Acc"), "RVQ": ("rvq", "Acc"), "TVG": ("tvg", "F1"),
           "EPM": ("epm", "F1"), "TAL": ("tal", "F1"), "EVS": ("evs", "F1"), "VHD": ("vhd", "F1"),
           "DVC F1": ("dvc", "F1"), "DVC Sim": ("dvc", "Sim"), "SLC F1": ("slc", "F1"), "SLC Sim": ("slc", "Sim"),
           "TEM Rec": ("tem", "Rec"), "GVQ Rec": ("gvq", "Rec")}
TABLE = {"Acc(ref)": ("RAR", "EVC", "RVQ"), "F1(gnd)": ("TVG", "EPM", "TAL", "EVS", "VHD"),
         "F1(cap)": ("DVC F1", "SLC F1"), "Sim(cap)": ("DVC Sim", "SLC Sim"), "Rec(com)": ("TEM Rec", "GVQ Rec")}
COUNTS = ("n", "failures", "no_sim")  # summed over sources; the metrics are averaged


def etbench_scores(records, version="new", sentsim=None):
    """E.T. Bench scores of answered records (dicts with task, source, video, tgt, o, p, g and the answer a).

    Each metric is computed per (task, source), rounded to 5 decimals, averaged over sources (unweighted, rounded);
    columns are 100 x task value rounded to 1 decimal, and the merged Table 1 columns the mean of their tasks
    (None when one is missing: listed in "missing"). Counts per task: n, failures (parse failures) and no_sim
    (answers whose letter needed the similarity fallback while no SentSim was given: scored as misses).
    Sim is None without SentSim."""
    groups = {}
    for r in records:
        if r["task"] not in SCORERS:
            raise ValueError(f"record {r.get('idx')}: unknown E.T. Bench task {r['task']!r} (not in {list(SCORERS)})")
        groups.setdefault(r["task"], {}).setdefault(r["source"], []).append(r)
    tasks = {}
    for task, sources in groups.items():
        rows = []
        for recs in sources.values():
            metrics, fails = SCORERS[task](recs, version, sentsim)
            rows.append(dict(metrics, n=len(recs), failures=fails))
        tasks[task] = {k: sum(x[k] for x in rows) if k in COUNTS else _mean5([x[k] for x in rows]) for k in rows[0]}
    value = {col: tasks.get(t, {}).get(m) for col, (t, m) in COLUMNS.items()}
    return {"tasks": tasks, "table": {name: _pct([value[c] for c in cols]) for name, cols in TABLE.items()},
            "columns": {c: _pct([v]) for c, v in value.items()}, "missing": [t for t in SCORERS if t not in tasks]}


def _mean5(xs):
    return None if None in xs else round(sum(round(x, 5) for x in xs) / len(xs), 5)


def _pct(xs):
    return None if None in xs else round(100 * sum(xs) / len(xs), 1)


# ---------------------------------------------------------------------------------------------------------
# Charades-STA and YouCook2 (D²VLM's conversion, then TimeChat's scorers)

def charades_scores(preds, gts):
    """R@1 at IoU 0.3/0.5/0.7 (percent, IoU >= t) and mIoU (a fraction) of answers against [s, e] ground truths.
    Prediction: the first answer span, else the first evidence span (as written). "parsed" divides by the parsed
    answers (D²VLM's script, Table 2), "all" by every record (an unparsable answer is a miss)."""
    ious = []
    for a, (gs, ge) in zip(preds, gts, strict=True):
        parts = a.split("</evi>")
        if spans := parse_tvg(parts[-1]) or parse_tvg(parts[0], answer=False):
            s, e = spans[0]
            hull = max(ge, e) - min(gs, s)  # = the union when the spans overlap
            ious.append(max(min(ge, e) - max(gs, s), 0) / hull if hull else 0.0)
    out = {"n": len(preds), "failures": len(preds) - len(ious)}
    for name, num in (("parsed", len(ious)), ("all", len(preds))):
        out[name] = {f"R@{t}": 100 * sum(x >= t for x in ious) / max(num, 1) for t in (0.3, 0.5, 0.7)}
        out[name]["mIoU"] = sum(ious) / max(num, 1)
    return out


def youcook2_scores(preds, gts, seed=0):
    """YouCook2 dense captioning: preds {video: answer}, gts {video: [([s, e], caption), ...]}. Per GT video:
    F1 of the threshold-mean P and R (IoU > t, t in 0.3/0.5/0.7/0.9) and CIDEr-D per threshold over that video's
    caption pairs; means over videos x 100. A video without a prediction scores 0. METEOR, SODA_c: None (Java)."""
    f1, cider, fails = [], [], 0
    rng = random.Random(seed)
    for video, gt in gts.items():
        events = _events(preds.get(video, ""))
        fails += video in preds and not events
        matched = [_match(events, gt, t, rng) for t in (0.3, 0.5, 0.7, 0.9)]
        p, r = (sum(x[k] for x in matched) / 4 for k in (0, 1))
        f1.append(_f1(p, r))
        scores = [cider_d([(ptb_tokenize(h), ptb_tokenize(g)) for h, g in x[2]]) for x in matched] if events else []
        cider.append(sum(sum(s) / len(s) for s in scores) / 4 if scores else 0.0)
    mean = lambda xs: round(100 * sum(xs) / max(len(xs), 1), 1)
    return {"F1": mean(f1), "CIDEr": mean(cider), "METEOR": None, "SODA_c": None, "n": len(gts), "failures": fails,
            "missing": sum(v not in preds for v in gts)}


def cider_d(pairs, n=4, sigma=6.0):
    """CIDEr-D (coco-caption's Cider) of (hypothesis tokens, reference tokens) pairs, one reference per pair, the
    document frequencies and log(#pairs) from these pairs' references -> one score per pair. Per n-gram order:
    tf-idf vectors, the hypothesis clipped at the reference, cosine; a Gaussian penalty on the length difference
    (lengths counted in bigrams); the mean over orders x 10. A single pair scores 0 (every idf is log 1 - log 1)."""
    grams = lambda w: [Counter(tuple(w[i:i + k]) for i in range(len(w) - k + 1)) for k in range(1, n + 1)]
    hyp, ref = [grams(h) for h, _ in pairs], [grams(r) for _, r in pairs]
    df = Counter(g for r in ref for c in r for g in c)
    log_n = math.log(len(pairs))
    tfidf = lambda c: {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in c.items()}

    def cosine(ch, cr):  # of one n-gram order's tf-idf vectors, the hypothesis clipped at the reference
        vh, vr = tfidf(ch), tfidf(cr)
        dot = sum(min(w, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, w in vh.items())
        norms = math.sqrt(sum(w * w for w in vh.values())) * math.sqrt(sum(w * w for w in vr.values()))
        return dot / norms if norms else dot
    # the Gaussian penalty on the length difference, lengths counted in bigrams (h[1], r[1])
    penalty = [math.exp(-(sum(h[1].values()) - sum(r[1].values())) ** 2 / (2 * sigma ** 2)) for h, r in zip(hyp, ref)]
    return [10 * sum(map(cosine, h, r)) / n * p for h, r, p in zip(hyp, ref, penalty)]


# ---------------------------------------------------------------------------------------------------------
# The nano table: Tab. 4-6 in miniature, rows x seeds of train.py runs on the synthetic world

ROWS = {  # row -> (its name in the table, its train.py flags); an FPO row starts from the same seed's "sft" run
    "sft": ("D²VLM (SFT)", []),
    "text": ("text timestamps, no interleaved `<evi>` (Tab. 4)", ["--interleave=false"]),
    "nocons": ("no consistency loss (Tab. 4)", ["--w_cons=0"]),
    "fpo": ("SFT + FPO as released (Tab. 5)", ["--stage=fpo"]),
    "fpo-beta1": ("SFT + FPO, Eq. (4) as printed: beta 1 (Tab. 5)", ["--stage=fpo", "--beta=1"]),
    "frame": ("frame-level `<evi>`, matching (Tab. 6)", ["--evi_unit=frame"]),
    "nocapture": ("no visual semantic capture (Tab. 6)", ["--evi_capture=false"]),
}
CELLS = {"R@1 IoU 0.5": lambda m: m["single"]["all"]["R@0.5"], "F1(gnd)": lambda m: m["avg"]["F1(gnd)"],
         "TVG F1": lambda m: m["single"]["F1"], "TAL F1": lambda m: m["multi"]["F1"],
         "DVC F1": lambda m: m["dense"]["F1"], "QA Acc": lambda m: m["qa"]["Acc"]}  # of a world's metrics


def table(rows, seeds, out, jobs, data, flags, world=None):
    """Train every row x seed with train.py (one thread each, `jobs` at a time; a finished run is kept, a killed one
    resumes), scored on the world's val and test splits -> {out}/table.md (mean ± sd over seeds) and table.png.
    world: ensure_world's sizes (n_train, n_test) where the world is rendered."""
    if not os.path.exists(os.path.join(data, "train.json")):  # once, before the runs, which would all render it
        ensure_world(data, **(world or {}))
    val, test = (os.path.join(data, f"{s}.json") for s in ("val", "test"))
    fpo = [r for r in rows if "--stage=fpo" in ROWS[r][1]]  # their train.py runs write the world's FPO pairs

    def train(job):
        row, seed = job
        run = os.path.join(out, f"{row}-s{seed}")
        if os.path.exists(os.path.join(run, "metrics.json")):
            return
        init = [f"--init={out}/sft-s{seed}"] if row in fpo else []
        resume = ["--resume"] if os.path.exists(os.path.join(run, "latest")) else []
        with open(run + ".log", "a") as log:
            done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--data={data}", f"--out={run}",
                                   f"--seed={seed}", f"--eval_json={val},{test}", *ROWS[row][1], *init, *resume, *flags],
                                  stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if done.returncode:
            raise InputError(f"train.py failed for {run}: see {run}.log")
    os.makedirs(out, exist_ok=True)
    sft = [r for r in rows if r not in fpo] + (["sft"] if fpo and "sft" not in rows else [])
    with tqdm(total=(len(sft) + len(fpo)) * seeds, desc="table runs") as bar, ThreadPool(jobs) as pool:
        for phase in (sft, fpo):  # the SFT runs first: an FPO run starts from one
            for _ in pool.imap_unordered(train, [(r, s) for r in phase for s in range(seeds)]):
                bar.update()
    metrics = {(r, s): json.load(open(os.path.join(out, f"{r}-s{s}", "metrics.json")))
               for r in rows for s in range(seeds)}
    stats = {split: {r: {c: _mean_sd([cell(metrics[r, s][split]) for s in range(seeds)]) for c, cell in CELLS.items()}
                     for r in rows} for split in ("test", "val")}
    md = []
    for split in ("test", "val"):
        md += [f"\n{split} split, mean ± sd over {seeds} seeds\n", "| row | " + " | ".join(CELLS) + " |",
               "|---|" + "---:|" * len(CELLS)]
        md += [f"| {ROWS[r][0]} | " + " | ".join(f"{m:.1f} ± {sd:.1f}" for m, sd in stats[split][r].values()) + " |"
               for r in rows]
    write_atomic(os.path.join(out, "table.md"), "\n".join(md) + "\n")
    _bars(stats["test"], seeds, os.path.join(out, "table.png"))
    print("\n".join(md) + f"\n\nwritten: {out}/table.md, {out}/table.png")


def _mean_sd(xs):
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _bars(stats, seeds, path):
    """The test split's cells as grouped bars, one colour per row, the seed sd as error bars."""
    from matplotlib.figure import Figure  # not pyplot, as sample.py draws: no window and no global figure
    fig = Figure(figsize=(12, 4.5))
    ax = fig.subplots()
    w = 0.8 / len(stats)
    for i, (row, cells) in enumerate(stats.items()):
        mean, sd = zip(*cells.values())
        ax.bar([j + i * w for j in range(len(CELLS))], mean, w, yerr=sd, capsize=2, label=ROWS[row][0])
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(CELLS))], list(CELLS))
    ax.set(ylabel=f"held-out test split, mean ± sd ({seeds} seeds)", ylim=(0, 105))
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@cli
def main(argv):
    ap = argparse.ArgumentParser(description="The nano table (Tab. 4-6 in miniature): rows x seeds of train.py runs, "
                                 "mean ± sd per cell. Other options (e.g. --steps=400) go to every train.py run.")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="runs at a time, one thread each")
    ap.add_argument("--out", default="runs/table")
    ap.add_argument("--data", default="data/world")
    ap.add_argument("--world_train", type=int, help="train.py's: the world's size, where it is rendered")
    ap.add_argument("--world_test", type=int)
    a, flags = ap.parse_known_args(argv)
    world = {f"n_{k}": v for k in ("train", "test") if (v := getattr(a, f"world_{k}")) is not None}
    flags += [f"--world_{k[2:]}={v}" for k, v in world.items()]  # the runs record the size too
    rows = a.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        ap.error(f"--rows: unknown {', '.join(unknown)} (choose from {', '.join(ROWS)})")
    if min(a.seeds, a.jobs, *world.values()) < 1:
        ap.error("--seeds, --jobs, --world_train and --world_test: give numbers >= 1")
    table(rows, a.seeds, a.out, a.jobs, a.data, flags, world)


if __name__ == "__main__":
    main()
