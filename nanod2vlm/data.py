"""Data: video decoding, annotation reading, <evi> frame targets, the dataset + collate, and a per-video cache.

Video -> frames at 1 fps (real presentation times kept), short side resized to 224 and center-cropped, CLIP
normalisation, as released. Annotations: App. B's time_gt records (and the released tgt/src form); the batch format is
the one the model and losses consume (collate).
"""
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import Dataset

from nanod2vlm.checkpoint import CheckpointError, write_atomic

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# -----------------------------------------------------------------------------
# bad inputs: one line for the user, not a traceback


class InputError(ValueError):
    """A bad input (a file, an option): the message names it and the fix."""


def cli(main):
    """A script's main(argv) that ends a bad input (InputError: bad videos, annotations, options; CheckpointError) or
    a file that cannot be read or written (OSError: a read-only folder, a full disk) in one line `error: ...` and exit
    status 1 (argparse's usage errors: 2), instead of a traceback."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except (InputError, CheckpointError) as e:
            sys.exit(f"error: {e}")
        except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
            sys.exit(f"error: {e} (what was written before is intact)")  # e.g. a read-only folder, a full disk
    return run


def writable(path, option):
    """Fail now, before the long work, if `path` (a file or folder to write, maybe not there yet) cannot be written:
    its nearest existing folder must take a new file."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise InputError(f"{option} {path}: cannot write in {folder} ({e.strerror}); choose another folder") from None

# -----------------------------------------------------------------------------
# video


class VideoError(InputError):
    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def read_video(path, fps=1.0, size=224, max_frames=350):
    """Decode `path` at `fps` -> (frames uint8 (T, 3, size, size), times float (T,) in seconds).

    Frames are chosen by their presentation time (pts * time_base, relative to the stream start), so variable
    frame rates and 29.97 fps come out right: for each target k/fps we keep the first frame whose time is
    >= the target. A frame that is the first for several targets (a gap in a variable-frame-rate video) is kept
    once, so times are strictly increasing real times. More than `max_frames` kept frames are uniformly
    subsampled (times stay the real ones); a long video is thinned while it decodes, every other kept frame dropped
    whenever more than 2 * max_frames are held (105 MB at 224 px), so it never holds all its 1-fps frames. The
    display matrix's rotation (a phone's portrait video) is applied: frames are upright, as players show them.
    The whole stream is decoded in order: on a 60 s 30 fps 224p x264 clip (keyframe every 8.3 s) that ran ~100
    video-s per wall-s vs ~30 seeking to each target; seeking wins only when keyframes are closer than 1/fps. A file
    that breaks off mid-stream (truncated with its index intact) keeps its decodable prefix with a warning; nothing
    decodable (e.g. an mp4 without its moov index) -> VideoError.
    """
    if not os.path.isfile(path):
        raise VideoError(path, "a folder, not a video file" if os.path.isdir(path) else "file not found")
    frames, times, stride, k = [], [], 1, 0  # k: the 1-fps target's number, every stride-th one kept
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(path, "no video stream (audio-only file?)")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            duration = container.duration / 1e6 if container.duration else None  # seconds, if the file says
            target = 0.0
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * frame.time_base) - t0
                if t >= target - 1e-6:
                    if k % stride == 0:
                        frames.append(_resize_crop(frame, size))
                        times.append(t)
                    if len(frames) > 2 * max_frames:  # thin out: the kept ones are every (2 * stride)-th
                        frames, times, stride = frames[::2], times[::2], 2 * stride
                    k, last = k + 1, t
                    target = (math.floor(t * fps + 1e-6) + 1) / fps  # next target after t
    except av.FFmpegError as e:
        if not frames:
            raise VideoError(path, f"cannot decode: {e.strerror or e} (not a video file, or truncated?)") from None
        warnings.warn(f"{path}: decoding stopped after {last:.2f}s ({e.strerror or e}); keeping that prefix")
    if not frames:
        raise VideoError(path, "no decodable video frames")
    if duration and last < duration - 1.0 / fps - 1.0:
        warnings.warn(f"{path}: frames end at {last:.2f}s of {duration:.2f}s (truncated file?)")
    idx = torch.linspace(0, len(times) - 1, min(len(times), max_frames)).round().long()  # uniform, real times kept
    return torch.stack([frames[i] for i in idx]), torch.tensor(times)[idx]


def _resize_crop(frame, size):
    """Short side -> size with swscale's bilinear filter (it widens with the scale factor, i.e. antialiased),
    then a center crop to size x size, turned by the display matrix's rotation (frame.rotation, degrees
    counterclockwise). Returns uint8 (3, size, size)."""
    w, h = frame.width, frame.height
    s = size / min(w, h)
    w2, h2 = max(size, round(w * s)), max(size, round(h * s))
    x = frame.to_ndarray(width=w2, height=h2, format="rgb24", interpolation="BILINEAR")  # (h2, w2, 3)
    top, left = (h2 - size) // 2, (w2 - size) // 2
    x = np.rot90(x[top:top + size, left:left + size], round(frame.rotation / 90))  # the crop is centred: turn it
    return torch.from_numpy(x.copy()).permute(2, 0, 1).contiguous()


def normalize(frames):
    """uint8 (..., 3, H, W) -> float CLIP-normalised pixels."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (frames.float() / 255 - mean) / std

# -----------------------------------------------------------------------------
# annotations (App. B)


class AnnotationError(InputError):
    pass


def read_annotations(path, videos=None):
    """Read a JSON list or JSON-lines annotation file -> list of records, each time_gt as lists of [s, e] (and
    `src`, if any, as a list of [s, e]). Every record is checked (with `videos`, a folder: its video is there too);
    all malformed records of the file are reported together in one AnnotationError (none silently dropped)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: " + ("a folder, not an annotation file" if path.is_dir() else
                                            "annotation file not found"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        whole = json.loads(text)  # JSON lines fail here, after their first record
    except json.JSONDecodeError as e:
        whole = e
    records, errors = [], []  # records: (where, record)
    if isinstance(whole, list):
        records = [(f"record {i}", r) for i, r in enumerate(whole)]
    elif text.lstrip().startswith("["):
        raise AnnotationError(f"{path}: not valid JSON: {whole}")
    elif isinstance(whole, dict) and len(lines) > 1:  # e.g. {"annotations": [...]} over several lines
        raise AnnotationError(f"{path}: one JSON object; give a JSON list of records or JSON lines (one per line)")
    else:  # JSON lines
        for n, line in lines:
            where = f"record {len(records) + len(errors)} (line {n})"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                errors.append(f"{where}: not valid JSON: {e}")
    if not records and not errors:
        raise AnnotationError(f"{path}: no records (an empty file or list)")
    return check_records(path, records, videos, errors)


def check_records(path, records, videos=None, errors=()):
    """(where, record) pairs of `path` -> the records, normalised and checked (with `videos`, a folder: each record's
    video is there too); every malformed one (and the `errors` found before) reported in one AnnotationError."""
    errors = list(errors)
    for where, r in records:
        if isinstance(r, dict):
            _normalize(r)
        problems = _check_record(r)
        if not problems and videos is not None and not os.path.isfile(os.path.join(videos, r["video"])):
            problems.append(f"video {os.path.join(videos, r['video'])} not found")
        if problems:
            errors.append(f"{where}: " + "; ".join(problems))
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise AnnotationError(f"{path}: {len(errors)} malformed record(s):\n  " + "\n  ".join(errors[:10]) + more)
    return [r for _, r in records]


def _normalize(r):
    """The paper's App. B writes time_gt, one interval also flat ([s, e]). The released training data (ET-Instruct)
    writes `tgt` and `src` as flat [s1, e1, s2, e2, ...] seconds: pair k of `tgt` belongs to the k-th <evi> of both
    stages (time_gt), pair m of `src` to the m-th <evi> of the question. A reversed pair is flipped, as there."""
    if isinstance(r.get("time_gt"), dict):
        r["time_gt"] = {k: [v] if _is_number_pair(v) else v for k, v in r["time_gt"].items()}
    for key in ("tgt", "src"):
        flat = r.get(key)
        if isinstance(flat, list) and len(flat) % 2 == 0 and all(isinstance(v, (int, float)) for v in flat):
            r[key] = [sorted(flat[i:i + 2]) for i in range(0, len(flat), 2)]
    if "tgt" in r and "time_gt" not in r:
        r["time_gt"] = dict(evidence_grounding=r["tgt"], interleaved_response=list(r["tgt"]))


def _is_number_pair(x):
    return isinstance(x, list) and len(x) == 2 and all(isinstance(v, (int, float)) for v in x)


def _check_record(r):
    """-> list of problems with one record (empty if it is well formed)."""
    if not isinstance(r, dict):
        return ["not a JSON object"]
    problems = []
    if not isinstance(r.get("video"), str):
        problems.append("'video' must be a string path")
    d = r.get("duration")
    if not isinstance(d, (int, float)) or isinstance(d, bool) or not d > 0:
        problems.append(f"'duration' must be a number > 0, got {d!r}")
        d = math.inf  # intervals are then checked without it
    in_video = lambda p: _is_number_pair(p) and 0 <= p[0] <= p[1] <= d + 1  # noqa: E731 (1 s: rounded times)
    conv = r.get("conversations")
    turns = {c.get("from"): c.get("value") for c in conv if isinstance(c, dict)} if isinstance(conv, list) else {}
    if not isinstance(turns.get("human"), str) or turns["human"].count("<image>") != 1:
        problems.append("'conversations' needs a human turn whose value contains <image> once")
    if not isinstance(turns.get("gpt"), str):
        problems.append("'conversations' needs a gpt turn with a string value")
        return problems
    if "<image>" in turns["gpt"]:
        problems.append("the gpt value contains <image> (a frame placeholder; only the human turn may have it)")
    for key in ("tgt", "src"):  # _normalize made them lists of pairs where it could
        if key in r and not (isinstance(r[key], list) and all(in_video(p) for p in r[key])):
            problems.append(f"'{key}' must be a flat list [s1, e1, s2, e2, ...] of seconds in [0, duration], got "
                            f"{r[key]!r}")
    n_src = len(r["src"]) if isinstance(r.get("src"), list) else 0
    n_q = str(turns.get("human")).count("<evi>")  # question-side <evi>, one per src interval
    if n_src != n_q:
        problems.append(f"'src' has {n_src} intervals but the human value has {n_q} <evi>")
    gt = r.get("time_gt", {})
    stage1, _, stage2 = turns["gpt"].partition("</evi>")
    for key, text, where in (("evidence_grounding", stage1, "before"), ("interleaved_response", stage2, "after")):
        spans = gt.get(key, []) if isinstance(gt, dict) else None
        if not (isinstance(spans, list) and all(in_video(s) for s in spans)):
            problems.append(f"time_gt.{key} must be a list of [s, e] with 0 <= s <= e <= duration, got {spans!r}")
        elif len(spans) != text.count("<evi>"):
            problems.append(f"time_gt.{key} has {len(spans)} intervals but the gpt value has "
                            f"{text.count('<evi>')} <evi> {where} </evi>")
    return problems

# -----------------------------------------------------------------------------
# <evi> frame targets


def frame_pos(times, v, fps=1.0):
    """Second v on the frame axis: v * fps as released, which treats second k / fps as frame k (also on a 29.97 fps
    video, whose kept frames sit at 1.001 s steps); when read_video thinned a long video, by its frames' real times."""
    if float(times[-1]) * fps < len(times):  # every 1 / fps frame was kept
        return v * fps
    return float(np.interp(v, times.double().numpy(), np.arange(len(times))))


def frame_span(times, interval, fps=1.0):
    """Inclusive frame-index range [a, b] of interval [s, e] in seconds: each end's frame_pos rounded (Python round,
    half to even), clamped and ordered, as released."""
    a, b = (min(max(round(frame_pos(times, v, fps)), 0), len(times) - 1) for v in interval)
    return min(a, b), max(a, b)


def frame_targets(times, interval, alpha=None, exact=False, fps=1.0):
    """Frame target y (T,) of one <evi> (Eq. 3 / Eq. 6): 1 on the interval's frames, 0 elsewhere (paper); with
    `alpha`, the released code's soft target alpha^-d, d = distance in frames to the interval (alpha = 2). exact: d
    from the interval's unrounded ends (the released FPO targets are not rounded to frames)."""
    j = torch.arange(len(times), dtype=torch.float64)
    if exact:
        a, b = sorted(frame_pos(times, v, fps) for v in interval)
    else:
        a, b = frame_span(times, interval, fps)
    d = (a - j).clamp(min=0) + (j - b).clamp(min=0)
    return (d == 0).float() if alpha is None else (float(alpha) ** -d).float()

# -----------------------------------------------------------------------------
# dataset and collate


class VideoDataset(Dataset):
    """One tokenised SFT sample per annotation record; videos are resolved relative to the file. `records` replaces
    the file's own records. exact: soft targets from unrounded interval ends (FPO's)."""

    def __init__(self, ann_path, tok, q_tokenize, cache=None, fps=1.0, size=224, max_frames=350, alpha=None,
                 encode=None, tag="", records=None, exact=False):
        self.root = Path(ann_path).parent
        self.records = read_annotations(ann_path) if records is None else records
        self.tok, self.q_tokenize, self.cache = tok, q_tokenize, cache or FrameCache()
        self.video = dict(fps=fps, size=size, max_frames=max_frames, encode=encode, tag=tag)
        self.alpha, self.exact = alpha, exact

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r, tok = self.records[i], self.tok
        x, times = self.cache.get(self.root / r["video"], **self.video)
        turns = {c["from"]: c["value"] for c in r["conversations"]}
        prompt = tok.encode(tok.chat(turns["human"]))
        j = prompt.index(tok.image_id)
        prompt = torch.tensor(prompt[:j] + [tok.image_id] * len(times) + prompt[j + 1:])  # one placeholder per frame
        src_pos = (prompt == tok.evi_id).nonzero().flatten()  # question-side <evi> (they follow the video)
        src = r.get("src", [])
        question = turns["human"].replace("<image>\n", "").replace("<image>", "")
        return dict(ids=prompt, frames=x if self.video["encode"] else normalize(x), times=times,
                    q_ids=torch.tensor(self.q_tokenize(question)), src_pos=src_pos[:len(src)],
                    src_span=self.frames_of(times, src),
                    responses=[self.response(turns["gpt"], r.get("time_gt", {}), times)], meta=r)

    def response(self, answer, gt, times):
        """The response's ids (<|end|> included) and its <evi>: the k-th of each stage refers to the k-th interval."""
        resp = torch.tensor(self.tok.encode(answer + "<|end|>"))  # apart from the prompt: the generation prompt
        eg, ir = gt.get("evidence_grounding", []), gt.get("interleaved_response", [])
        spans = eg + ir
        evi_pos = (resp == self.tok.evi_id).nonzero().flatten()
        assert len(evi_pos) == len(spans)  # read_annotations checked the counts
        y = [frame_targets(times, s, self.alpha, self.exact, self.video["fps"]) for s in spans]
        return dict(resp=resp, evi_pos=evi_pos, evi_stage=torch.tensor([1] * len(eg) + [2] * len(ir)),
                    evi_k=torch.tensor([*range(len(eg)), *range(len(ir))], dtype=torch.long),
                    evi_span=self.frames_of(times, spans), evi_y=torch.stack(y) if y else torch.zeros(0, len(times)))

    def frames_of(self, times, intervals):
        """Intervals in seconds -> inclusive frame spans (N, 2)."""
        spans = [frame_span(times, iv, self.video["fps"]) for iv in intervals]
        return torch.tensor(spans, dtype=torch.long).view(-1, 2)


def ablate(rec, cfg):
    """The paper's ablations as data (Tab. 4, 6). cfg.interleave False: the answer states text timestamps instead
    of <evi> references. cfg.evi_unit "frame": one <evi> per boundary frame (start, end) instead of one per event."""
    gpt, gt = rec["conversations"][1]["value"], rec["time_gt"]
    if not cfg.interleave:
        head, tail = gpt.split("</evi>", 1)
        parts = tail.split("<evi>")
        spans = gt["interleaved_response"]
        gpt = head + "</evi>" + parts[0] + "".join(f"{s:g} - {e:g}{p}" for (s, e), p in zip(spans, parts[1:]))
        gt = dict(gt, interleaved_response=[])
    if cfg.evi_unit == "frame":
        gpt = gpt.replace("<evi>", "<evi> <evi>")
        gt = {k: [[x, x] for s, e in v for x in (s, e)] for k, v in gt.items()}
    return dict(rec, time_gt=gt, conversations=[rec["conversations"][0], {"from": "gpt", "value": gpt}])


def collate(samples, pad_id):
    """Samples -> the batch the model and the losses read (right-padded). A sample has one prompt and one response
    (SFT) or two (FPO: chosen, rejected); responses are ordered by their index in the sample, then by sample.
      prompts:    ids, valid (B, P); frames (B, T, 3, S, S) or ViT features (B, T, P', W); frm_valid, times (B, T);
                  q_ids, q_valid (B, Lq), the question for the compressor; src_b, src_pos, src_span (M,), (M,),
                  (M, 2): each question-side <evi>'s sample, position and frame span
      responses:  resp, resp_valid, labels (N, R) (-100 on padding); resp_b (N,), the prompt row of each
      <evi>:      evi_b (K,), its response row; evi_pos (K,), its position in the response; evi_stage (1 or 2),
                  evi_k (k-th of its stage), evi_span (K, 2) inclusive frames, evi_y (K, T) frame targets"""
    B = len(samples)
    T = max(len(s["times"]) for s in samples)
    pad = lambda xs, v=0: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True, padding_value=v)  # noqa: E731
    n_resp = len(samples[0]["responses"])
    resps = [(b, s["responses"][k]) for k in range(n_resp) for b, s in enumerate(samples)]
    valid = pad([torch.ones(len(s["ids"]), dtype=torch.bool) for s in samples], False)
    frames = samples[0]["frames"].new_zeros(B, T, *samples[0]["frames"].shape[1:])
    for b, s in enumerate(samples):
        frames[b, :len(s["times"])] = s["frames"]
    resp = pad([x["resp"] for _, x in resps], pad_id)
    resp_valid = pad([torch.ones(len(x["resp"]), dtype=torch.bool) for _, x in resps], False)
    cat = lambda key, xs: torch.cat([x[key] for x in xs])  # noqa: E731
    return dict(ids=pad([s["ids"] for s in samples], pad_id), valid=valid, frames=frames,
                frm_valid=pad([torch.ones(len(s["times"]), dtype=torch.bool) for s in samples], False),
                times=pad([s["times"] for s in samples]), q_ids=pad([s["q_ids"] for s in samples]),
                q_valid=pad([torch.ones(len(s["q_ids"]), dtype=torch.bool) for s in samples], False),
                src_b=torch.cat([torch.full_like(s["src_pos"], b) for b, s in enumerate(samples)]),
                src_pos=cat("src_pos", samples), src_span=cat("src_span", samples).view(-1, 2),
                resp=resp, resp_valid=resp_valid, labels=resp.masked_fill(~resp_valid, -100),
                resp_b=torch.tensor([b for b, _ in resps]),
                evi_b=torch.cat([torch.full_like(x["evi_pos"], n) for n, (_, x) in enumerate(resps)]),
                evi_pos=cat("evi_pos", [x for _, x in resps]), evi_stage=cat("evi_stage", [x for _, x in resps]),
                evi_k=cat("evi_k", [x for _, x in resps]), evi_span=cat("evi_span", [x for _, x in resps]).view(-1, 2),
                evi_y=torch.cat([F.pad(x["evi_y"], (0, T - x["evi_y"].shape[1])) for _, x in resps]),
                meta=[s["meta"] for s in samples])

# -----------------------------------------------------------------------------
# per-video cache


class FrameCache:
    """Decoded frames (uint8) or encoded features of each video, keyed by the sha1 of the file's bytes and the
    preprocessing settings, in `dir` as safetensors (optional) and in memory up to `mem_gb`, least recently used
    out first (the nano world fits whole; one full-scale video is 53 MB of frames, 250 MB of ViT-G features).
    `encode` (normalised frames -> features, e.g. the frozen vision tower) must come with a `tag` naming it:
    the tag is part of the key, so change it when the extractor changes."""

    def __init__(self, dir=None, mem_gb=2.0):
        self.dir = Path(dir) if dir else None
        self.mem, self.mem_bytes, self.used, self.sha1 = OrderedDict(), mem_gb * 2**30, 0, {}

    def get(self, path, fps=1.0, size=224, max_frames=350, encode=None, tag=""):
        path = Path(path)
        if encode is not None and not tag:
            raise ValueError("FrameCache.get: give a `tag` naming the feature extractor along with `encode`")
        if not path.is_file():
            raise VideoError(path, "file not found")
        st = path.stat()  # hash each file once per process (it is re-hashed if it changes on disk)
        sig = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if sig not in self.sha1:
            with open(path, "rb") as f:
                self.sha1[sig] = hashlib.file_digest(f, "sha1").hexdigest()
        key = f"{self.sha1[sig]}_fps{float(fps)}_s{size}_m{max_frames}" + (f"_{tag}" if encode is not None else "")
        if key in self.mem:
            self.mem.move_to_end(key)
            return self.mem[key]
        file = self.dir / f"{key}.safetensors" if self.dir else None
        if file and file.exists():
            d = load_file(file)
            out = d["x"], d["times"]
        else:
            frames, times = read_video(path, fps, size, max_frames)
            if encode is not None:
                with torch.no_grad():
                    frames = encode(normalize(frames)).contiguous()
            out = frames, times
            if file:
                write_atomic(file, {"x": out[0], "times": out[1]})  # readers never see a half-written file
        self.mem[key] = out
        self.used += sum(x.nbytes for x in out)
        while self.used > self.mem_bytes and len(self.mem) > 1:
            self.used -= sum(x.nbytes for x in self.mem.popitem(last=False)[1])
        return out
