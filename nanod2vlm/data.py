"""Data: video decoding, annotation reading, <evi> frame targets, the dataset + collate, and a per-video cache.

Video -> frames at 1 fps (real presentation times kept), short side resized to 224 and center-cropped, CLIP
normalisation, as released. Annotations: App. B's time_gt records (and the released tgt/src form); the batch format is
the one the model and losses consume (collate).
"""
import hashlib
import math
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import av
from av.video.reformatter import VideoReformatter
import numpy as np
import torch
from safetensors.torch import load_file

from nanod2vlm.files import InputError, read_json, write_atomic

# -----------------------------------------------------------------------------
# video


def read_video(path, fps=1.0, size=224, max_frames=350):
    """Decode `path` at `fps` -> (frames uint8 (T, 3, size, size), times float (T,) in seconds).

    Frames are chosen by their presentation time (pts * time_base, relative to the stream start), so variable
    frame rates and 29.97 fps come out right: for each target k/fps we keep the first frame whose time is
    >= the target. A frame that is the first for several targets (a gap in a variable-frame-rate video) is kept
    once, so times are strictly increasing real times. More than `max_frames` kept frames are uniformly
    subsampled (times stay the real ones); a long video is thinned while it decodes, every other kept frame dropped
    whenever more than 2 * max_frames are held (105 MB at 224 px), so it never holds all its 1-fps frames. The
    display matrix's rotation (a phone's portrait video) is applied: frames are upright, as players show them.
    The whole stream is decoded in order: seeking to each target wins only when keyframes are closer than 1/fps
    (README, speed). A file that breaks off mid-stream (truncated with its index intact) keeps its decodable prefix
    with a warning; nothing decodable (e.g. an mp4 without its moov index) -> InputError.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: " + ("a folder, not a video file" if os.path.isdir(path) else "file not found"))
    frames = []
    times = []
    stride = 1  # every stride-th 1-fps target is kept
    k = 0  # the 1-fps target's number
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: no video stream (audio-only file?)")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            duration = container.duration / 1e6 if container.duration else None  # seconds, if the file says
            target = 0.0
            scaler = VideoReformatter()
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * frame.time_base) - t0
                if t >= target - 1e-6:
                    if k % stride == 0:
                        frames.append(_resize_crop(frame, size, scaler))
                        times.append(t)
                    if len(frames) > 2 * max_frames:  # thin out: the kept ones are every (2 * stride)-th
                        frames, times, stride = frames[::2], times[::2], 2 * stride
                    k, last = k + 1, t
                    target = (math.floor(t * fps + 1e-6) + 1) / fps  # next target after t
    except av.FFmpegError as e:
        if not frames:
            raise InputError(f"{path}: cannot decode: {e.strerror or e} (not a video file, or truncated?)") from None
        warnings.warn(f"{path}: decoding stopped after {last:.2f}s ({e.strerror or e}); keeping that prefix")
    if not frames:
        raise InputError(f"{path}: no decodable video frames")
    if duration and last < duration - 1.0 / fps - 1.0:
        warnings.warn(f"{path}: frames end at {last:.2f}s of {duration:.2f}s (truncated file?)")
    idx = torch.linspace(0, len(times) - 1, min(len(times), max_frames)).round().long()  # uniform, real times kept
    return torch.stack([frames[i] for i in idx]), torch.tensor(times)[idx]


def _resize_crop(frame, size, scaler):
    """Short side -> size with swscale's bilinear filter (it widens with the scale factor, i.e. antialiased),
    then a center crop to size x size, turned by the display matrix's rotation (frame.rotation, degrees
    counterclockwise). One `scaler` serves a whole video: swscale's context is then made once, not per frame.
    Returns uint8 (3, size, size)."""
    w, h = frame.width, frame.height
    s = size / min(w, h)
    w2, h2 = max(size, round(w * s)), max(size, round(h * s))
    x = scaler.reformat(frame, w2, h2, "rgb24", interpolation="BILINEAR").to_ndarray()  # (h2, w2, 3)
    top, left = (h2 - size) // 2, (w2 - size) // 2
    x = np.rot90(x[top:top + size, left:left + size], round(frame.rotation / 90))  # the crop is centred: turn it
    return torch.from_numpy(x.copy()).permute(2, 0, 1).contiguous()


def normalize(frames):
    """uint8 (..., 3, H, W) -> float pixels normalised by CLIP's per-channel mean and std (RGB)."""
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    return (frames.float() / 255 - mean) / std

# -----------------------------------------------------------------------------
# annotations (App. B)


def read_annotations(path, videos=None):
    """Read a JSON list of annotation records -> the records, each time_gt as lists of [s, e] (and `src`, if any, as
    a list of [s, e]). Every record is checked (with `videos`, a folder: its video is there too); all malformed
    records of the file are reported together in one InputError (none silently dropped)."""
    records = read_json(path)
    if not isinstance(records, list):
        raise InputError(f"{path}: not a JSON list; give a list of records")
    if not records:
        raise InputError(f"{path}: no records (an empty list)")
    return check_records(path, [(f"record {i}", r) for i, r in enumerate(records)], videos)


def read_pairs(path):
    """synth.py's preference pairs -> (chosen records, rejected records): pair i's two responses to one video and
    question, each side checked as annotation records are."""
    pairs = read_json(path, "pairs file")
    side = lambda p, s: dict(video=p["video"], duration=p["duration"], task=p.get("task"), time_gt=p[s]["time_gt"],
                             conversations=[dict(value=p["question"], **{"from": "human"}),
                                            dict(value=p[s]["value"], **{"from": "gpt"})])
    try:
        sides = {s: [side(p, s) for p in pairs] for s in ("chosen", "rejected")}
    except (KeyError, TypeError) as e:
        raise InputError(f"{path}: not a synth.py pairs file ({type(e).__name__}: {e}); write one with "
                         "`python synth.py TRAIN.json PAIRS.json`") from None
    return [check_records(path, [(f"pair {i} {s}", r) for i, r in enumerate(recs)]) for s, recs in sides.items()]


def check_records(path, records, videos=None):
    """(where, record) pairs of `path` -> the records, normalised and checked (with `videos`, a folder: each record's
    video is there too); every malformed one reported in one InputError."""
    errors = []
    for where, r in records:
        problems = _check_record(r)
        if not problems and videos is not None and not os.path.isfile(os.path.join(videos, r["video"])):
            problems.append(f"video {os.path.join(videos, r['video'])} not found")
        if problems:
            errors.append(f"{where}: " + "; ".join(problems))
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise InputError(f"{path}: {len(errors)} malformed record(s):\n  " + "\n  ".join(errors[:10]) + more)
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
    """-> list of problems with one record (empty if it is well formed), _normalize'd first."""
    if not isinstance(r, dict):
        return ["not a JSON object"]
    _normalize(r)
    problems = []
    if not isinstance(r.get("video"), str):
        problems.append("'video' must be a string path")
    d = r.get("duration")
    if not isinstance(d, (int, float)) or isinstance(d, bool) or not d > 0:
        problems.append(f"'duration' must be a number > 0, got {d!r}")
        d = math.inf  # intervals are then checked without it
    in_video = lambda p: _is_number_pair(p) and 0 <= p[0] <= p[1] <= d + 1  # noqa: E731 (1 s: rounded times)
    conv = r.get("conversations")
    turn = {c.get("from"): c.get("value") for c in conv if isinstance(c, dict)} if isinstance(conv, list) else {}
    if not isinstance(turn.get("human"), str) or turn["human"].count("<image>") != 1:
        problems.append("'conversations' needs a human turn whose value contains <image> once")
    if not isinstance(turn.get("gpt"), str):
        return problems + ["'conversations' needs a gpt turn with a string value"]
    if "<image>" in turn["gpt"]:
        problems.append("the gpt value contains <image> (a frame placeholder; only the human turn may have it)")
    for key in ("tgt", "src"):  # _normalize made them lists of pairs where it could
        if key in r and not (isinstance(r[key], list) and all(in_video(p) for p in r[key])):
            problems.append(f"'{key}' must be a flat list [s1, e1, s2, e2, ...] of seconds in [0, duration], got "
                            f"{r[key]!r}")
    n_src = len(r["src"]) if isinstance(r.get("src"), list) else 0
    n_q = str(turn.get("human")).count("<evi>")  # question-side <evi>, one per src interval
    if n_src != n_q:
        problems.append(f"'src' has {n_src} intervals but the human value has {n_q} <evi>")
    gt = r.get("time_gt", {})
    stage1, _, stage2 = turn["gpt"].partition("</evi>")
    for key, text, where in (("evidence_grounding", stage1, "before"), ("interleaved_response", stage2, "after")):
        spans = gt.get(key, []) if isinstance(gt, dict) else None
        if not (isinstance(spans, list) and all(in_video(s) for s in spans)):
            problems.append(f"time_gt.{key} must be a list of [s, e] with 0 <= s <= e <= duration, got {spans!r}")
        elif len(spans) != text.count("<evi>"):
            problems.append(f"time_gt.{key} has {len(spans)} intervals but the gpt value has "
                            f"{text.count('<evi>')} <evi> {where} </evi>")
    return problems


def turns(rec):
    """A checked record's conversation as {speaker: value}: "human" the question (with <image>), "gpt" the answer."""
    return {c["from"]: c["value"] for c in rec["conversations"]}

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
    return tuple(sorted(min(max(round(frame_pos(times, v, fps)), 0), len(times) - 1) for v in interval))


def frame_spans(times, intervals, fps=1.0):
    """Intervals [[s, e], ...] in seconds -> their frame_span, (N, 2)."""
    return torch.tensor([frame_span(times, iv, fps) for iv in intervals], dtype=torch.long).view(-1, 2)


def frame_targets(times, interval, alpha=None, exact=False, fps=1.0):
    """Frame target y (T,) of one <evi> (the y of Eq. (3) and Eq. (6)): 1 on the interval's frames, 0 elsewhere
    (paper); with `alpha`, the released code's soft target alpha^-d, d = distance in frames to the interval (alpha =
    2). exact: d from the interval's unrounded ends (the released FPO targets are not rounded to frames)."""
    j = torch.arange(len(times), dtype=torch.float64)
    a, b = sorted(frame_pos(times, v, fps) for v in interval) if exact else frame_span(times, interval, fps)
    d = (a - j).clamp(min=0) + (j - b).clamp(min=0)
    return (d == 0).float() if alpha is None else (float(alpha) ** -d).float()

# -----------------------------------------------------------------------------
# dataset and collate


class VideoDataset:
    """One tokenised sample per annotation record: its prompt and its response (SFT), or with `rejected` (FPO, the
    other side of read_pairs) a second response, the rejected one, to the same video and question. Videos are
    resolved relative to the file; `records` replaces the file's own. exact: soft targets from unrounded interval
    ends (FPO's)."""

    def __init__(self, ann_path, tok, q_tokenize, cache=None, fps=1.0, size=224, max_frames=350, alpha=None,
                 encode=None, tag="", records=None, rejected=None, exact=False):
        self.root = Path(ann_path).parent
        self.records = read_annotations(ann_path) if records is None else records
        self.tok = tok
        self.q_tokenize = q_tokenize
        self.cache = cache or FrameCache()
        self.video = dict(fps=fps, size=size, max_frames=max_frames, encode=encode, tag=tag)
        self.rejected = rejected
        self.target = dict(alpha=alpha, exact=exact)  # frame_targets' soft target settings
        self.text = {}  # record i -> its tokens and frame targets, made on first use (its frames stay in the cache)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        x, times = self.cache.get(self.root / r["video"], **self.video)
        if i not in self.text:
            question = turns(r)["human"].replace("<image>\n", "").replace("<image>", "")
            prompt = torch.tensor(self.tok.prompt(question, ("<evi>",), len(times)))  # as eval.answer's: <evi> = src
            answers = [r] if self.rejected is None else [r, self.rejected[i]]
            self.text[i] = dict(ids=prompt, q_ids=torch.tensor(self.q_tokenize(question)),
                                src_pos=(prompt == self.tok.evi_id).nonzero().flatten(),  # question-side <evi>
                                src_span=frame_spans(times, r.get("src", []), self.video["fps"]),
                                responses=[self.response(a, times) for a in answers])
        return dict(self.text[i], frames=x if self.video["encode"] else normalize(x), times=times)

    def response(self, r, times):
        """Record r's response apart from the prompt (the generation prompt), <|end|> included, and its <evi>: the
        k-th <evi> of each stage refers to the k-th interval of that stage (read_annotations checked the counts)."""
        fps = self.video["fps"]
        resp = torch.tensor(self.tok.encode(turns(r)["gpt"] + "<|end|>"))
        eg, ir = (r.get("time_gt", {}).get(key, []) for key in ("evidence_grounding", "interleaved_response"))
        y = [frame_targets(times, span, fps=fps, **self.target) for span in eg + ir]
        return dict(resp=resp, evi_pos=(resp == self.tok.evi_id).nonzero().flatten(),
                    evi_stage=torch.tensor([1] * len(eg) + [2] * len(ir)),
                    evi_k=torch.tensor([*range(len(eg)), *range(len(ir))], dtype=torch.long),
                    evi_span=frame_spans(times, eg + ir, fps),
                    evi_y=torch.stack(y) if y else torch.zeros(0, len(times)))


def ablate(rec, cfg):
    """The paper's ablations as data (Tab. 4, 6). cfg.interleave False: the answer states text timestamps instead
    of <evi> references. cfg.evi_unit "frame": one <evi> per boundary frame (start, end) instead of one per event."""
    gpt = turns(rec)["gpt"]
    gt = rec["time_gt"]
    if not cfg.interleave:
        head, tail = gpt.split("</evi>", 1)
        parts = tail.split("<evi>")
        spans = gt["interleaved_response"]
        gpt = head + "</evi>" + parts[0] + "".join(f"{s:g} - {e:g}{p}" for (s, e), p in zip(spans, parts[1:]))
        gt = dict(gt, interleaved_response=[])
    if cfg.evi_unit == "frame":
        gpt = gpt.replace("<evi>", "<evi> <evi>")
        gt = {k: [[x, x] for s, e in v for x in (s, e)] for k, v in gt.items()}
    conversations = [dict(c, value=gpt) if c["from"] == "gpt" else c for c in rec["conversations"]]
    return dict(rec, time_gt=gt, conversations=conversations)


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
    rs = [s["responses"][k] for k in range(len(samples[0]["responses"])) for s in samples]  # response n: sample n % B
    S = {key: [s[key] for s in samples] for key in ("ids", "frames", "times", "q_ids", "src_pos", "src_span")}
    R = {key: [r[key] for r in rs] for key in ("resp", "evi_pos", "evi_stage", "evi_k", "evi_span", "evi_y")}
    resp = pad(R["resp"], pad_id)
    resp_valid = valid(R["resp"])
    return dict(ids=pad(S["ids"], pad_id), valid=valid(S["ids"]), frames=pad(S["frames"]), frm_valid=valid(S["times"]),
                times=pad(S["times"]), q_ids=pad(S["q_ids"]), q_valid=valid(S["q_ids"]),
                src_b=owner(S["src_pos"]), src_pos=torch.cat(S["src_pos"]), src_span=torch.cat(S["src_span"]),
                resp=resp, resp_valid=resp_valid, labels=resp.masked_fill(~resp_valid, -100),
                resp_b=torch.arange(len(rs)) % B, evi_b=owner(R["evi_pos"]), evi_pos=torch.cat(R["evi_pos"]),
                evi_stage=torch.cat(R["evi_stage"]), evi_k=torch.cat(R["evi_k"]), evi_span=torch.cat(R["evi_span"]),
                evi_y=torch.cat([torch.nn.functional.pad(y, (0, T - y.shape[1])) for y in R["evi_y"]]))


def pad(xs, value=0):
    """Tensors (L_i, ...) -> one (len(xs), max L_i, ...), each right-padded with `value`."""
    return torch.nn.utils.rnn.pad_sequence(xs, batch_first=True, padding_value=value)


def valid(xs):
    """Tensors of lengths L_i -> (len(xs), max L_i) bool, True on each one's real positions (pad's)."""
    return torch.arange(max(len(x) for x in xs))[None] < torch.tensor([len(x) for x in xs])[:, None]


def owner(xs):
    """Tensors xs -> for each element of torch.cat(xs), the index of the tensor it came from."""
    return torch.repeat_interleave(torch.tensor([len(x) for x in xs]))


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

    @torch.no_grad()
    def get(self, path, fps=1.0, size=224, max_frames=350, encode=None, tag=""):
        assert encode is None or tag, "FrameCache.get: give a `tag` naming the feature extractor along with `encode`"
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: file not found")
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
        else:
            x, times = read_video(path, fps, size, max_frames)
            if encode is not None:
                x = encode(normalize(x)).contiguous()
            d = {"x": x, "times": times}
            if file:
                write_atomic(file, d)  # readers never see a half-written file
        out = self.mem[key] = d["x"], d["times"]
        self.used += sum(x.nbytes for x in out)
        while self.used > self.mem_bytes and len(self.mem) > 1:
            self.used -= sum(x.nbytes for x in self.mem.popitem(last=False)[1])
        return out
