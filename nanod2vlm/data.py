"""Data: video decoding, annotation reading, <evi> frame targets, the dataset + collate, and a per-video cache.

Video -> frames at 1 fps (real presentation times kept), short side resized to 224 and center-cropped, CLIP
normalisation (SPEC §1). Annotations follow SPEC §6; the batch format is the one the model and losses consume.
"""
import hashlib
import json
import math
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import av
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# -----------------------------------------------------------------------------
# video


class VideoError(ValueError):
    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def read_video(path, fps=1.0, size=224, max_frames=350):
    """Decode `path` at `fps` -> (frames uint8 (T, 3, size, size), times float (T,) in seconds).

    Frames are chosen by their presentation time (pts * time_base, relative to the stream start), so variable
    frame rates and 29.97 fps come out right: for each target k/fps we keep the first frame whose time is
    >= the target. A frame that is the first for several targets (a gap in a variable-frame-rate video) is kept
    once, so times are strictly increasing real times. More than `max_frames` kept frames are uniformly
    subsampled (times stay the real ones). The whole stream is decoded in order: on a 60 s 30 fps 224p x264 clip
    (keyframe every 8.3 s) that ran ~100 video-s per wall-s vs ~30 seeking to each target; seeking wins only when
    keyframes are closer than 1/fps. A file that breaks off mid-stream (truncated with its index intact) keeps
    its decodable prefix with a warning; nothing decodable (e.g. an mp4 without its moov index) -> VideoError.
    """
    if not os.path.isfile(path):
        raise VideoError(path, "file not found")
    frames, times = [], []
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
                    frames.append(_resize_crop(frame, size))
                    times.append(t)
                    target = (math.floor(t * fps + 1e-6) + 1) / fps  # next target after t
    except av.FFmpegError as e:
        if not frames:
            raise VideoError(path, f"cannot decode: {e.strerror or e} (not a video file, or truncated?)") from None
        warnings.warn(f"{path}: decoding stopped after {times[-1]:.2f}s ({e.strerror or e}); keeping that prefix")
    if not frames:
        raise VideoError(path, "no decodable video frames")
    if duration and times[-1] < duration - 1.0 / fps - 1.0:
        warnings.warn(f"{path}: frames end at {times[-1]:.2f}s of {duration:.2f}s (truncated file?)")
    frames, times = torch.stack(frames), torch.tensor(times)
    if len(times) > max_frames:  # uniform subsample, real times kept
        idx = torch.linspace(0, len(times) - 1, max_frames).round().long()
        frames, times = frames[idx], times[idx]
    return frames, times


def _resize_crop(frame, size):
    """Short side -> size with swscale's bilinear filter (it widens with the scale factor, i.e. antialiased),
    then a center crop to size x size. Returns uint8 (3, size, size)."""
    w, h = frame.width, frame.height
    s = size / min(w, h)
    w2, h2 = max(size, round(w * s)), max(size, round(h * s))
    x = frame.to_ndarray(width=w2, height=h2, format="rgb24", interpolation="BILINEAR")  # (h2, w2, 3)
    top, left = (h2 - size) // 2, (w2 - size) // 2
    return torch.from_numpy(x[top:top + size, left:left + size]).permute(2, 0, 1).contiguous()


def normalize(frames):
    """uint8 (..., 3, H, W) -> float CLIP-normalised pixels (SPEC §1)."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (frames.float() / 255 - mean) / std

# -----------------------------------------------------------------------------
# annotations (SPEC §6)


class AnnotationError(ValueError):
    pass


def read_annotations(path):
    """Read a JSON list or JSON-lines annotation file -> list of records, each time_gt as lists of [s, e] (and
    `src`, if any, as a list of [s, e]). Every record is checked; all malformed records of the file are reported
    together in one AnnotationError (none silently dropped)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    records, errors = [], []  # records: (where, record)
    with open(path, encoding="utf-8") as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":  # a JSON list
            try:
                records = [(f"record {i}", r) for i, r in enumerate(json.load(f))]
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}: not valid JSON: {e}") from None
        else:  # JSON-lines, streamed line by line
            for n, line in enumerate(f, 1):
                if line.strip():
                    where = f"record {len(records) + len(errors)} (line {n})"
                    try:
                        records.append((where, json.loads(line)))
                    except json.JSONDecodeError as e:
                        errors.append(f"{where}: not valid JSON: {e}")
    for where, r in records:
        if isinstance(r, dict):
            _normalize(r)
        if problems := _check_record(r):
            errors.append(f"{where}: " + "; ".join(problems))
    if errors:
        raise AnnotationError(f"{path}: {len(errors)} malformed record(s):\n  " + "\n  ".join(errors))
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
        if key in r and not (isinstance(r[key], list) and all(_is_number_pair(p) and p[0] >= 0 for p in r[key])):
            problems.append(f"'{key}' must be a flat list [s1, e1, s2, e2, ...] of seconds >= 0, got {r[key]!r}")
    n_src = len(r["src"]) if isinstance(r.get("src"), list) else 0
    n_q = str(turns.get("human")).count("<evi>")  # question-side <evi>, one per src interval
    if n_src != n_q:
        problems.append(f"'src' has {n_src} intervals but the human value has {n_q} <evi>")
    gt = r.get("time_gt", {})
    stage1, _, stage2 = turns["gpt"].partition("</evi>")
    for key, text, where in (("evidence_grounding", stage1, "before"), ("interleaved_response", stage2, "after")):
        spans = gt.get(key, []) if isinstance(gt, dict) else None
        ok = isinstance(spans, list) and all(_is_number_pair(s) and 0 <= s[0] <= s[1] for s in spans)
        if not ok:
            problems.append(f"time_gt.{key} must be a list of [s, e] with 0 <= s <= e, got {spans!r}")
        elif len(spans) != text.count("<evi>"):
            problems.append(f"time_gt.{key} has {len(spans)} intervals but the gpt value has "
                            f"{text.count('<evi>')} <evi> {where} </evi>")
    return problems

# -----------------------------------------------------------------------------
# <evi> frame targets


def frame_span(times, interval):
    """Inclusive frame-index range [a, b] of the frames whose times lie in interval [s, e]; if none does, the
    single nearest frame."""
    s, e = interval
    inside = ((times >= s) & (times <= e)).nonzero().flatten()
    if len(inside):
        return inside[0].item(), inside[-1].item()
    j = torch.maximum(s - times, times - e).argmin().item()
    return j, j


def frame_targets(times, interval, alpha=None):
    """Frame target y (T,) of one <evi> (Eq. 3 / Eq. 6): 1 on the interval's frames, 0 elsewhere (paper); with
    `alpha`, the official code's soft target alpha^-d, d = distance in frames to the interval (alpha = 2)."""
    a, b = frame_span(times, interval)
    j = torch.arange(len(times))
    d = (a - j).clamp(min=0) + (j - b).clamp(min=0)
    return (d == 0).float() if alpha is None else float(alpha) ** -d.float()

# -----------------------------------------------------------------------------
# dataset and collate


class VideoDataset(Dataset):
    """One tokenised SFT sample per annotation record (SPEC §6); videos are resolved relative to the file.
    `records` replaces the file's own records (FPO builds its chosen and rejected sides this way)."""

    def __init__(self, ann_path, tok, q_tokenize, cache=None, fps=1.0, size=224, max_frames=350, alpha=None,
                 encode=None, tag="", records=None):
        self.root = Path(ann_path).parent
        self.records = read_annotations(ann_path) if records is None else records
        self.tok, self.q_tokenize, self.cache = tok, q_tokenize, cache or FrameCache()
        self.video = dict(fps=fps, size=size, max_frames=max_frames, encode=encode, tag=tag)
        self.alpha = alpha

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r, tok = self.records[i], self.tok
        x, times = self.cache.get(self.root / r["video"], **self.video)
        frames = x if self.video["encode"] else normalize(x)
        turns = {c["from"]: c["value"] for c in r["conversations"]}
        question, answer = turns["human"], turns["gpt"]
        prompt = tok.encode(tok.chat(question))
        j = prompt.index(tok.image_id)
        prompt = prompt[:j] + [tok.image_id] * len(times) + prompt[j + 1:]  # one placeholder per frame
        response = tok.encode(answer + "<|end|>")  # encoded apart so the prompt is exactly the generation prompt
        ids = torch.tensor(prompt + response)
        labels = torch.full_like(ids, -100)
        labels[len(prompt):] = ids[len(prompt):]
        # the k-th <evi> of each stage refers to the k-th interval (read_annotations checked the counts)
        evi_pos = (labels == tok.evi_id).nonzero().flatten()
        gt = r.get("time_gt", {})
        eg, ir = gt.get("evidence_grounding", []), gt.get("interleaved_response", [])
        spans = eg + ir
        assert len(evi_pos) == len(spans)
        evi_stage = torch.tensor([1] * len(eg) + [2] * len(ir), dtype=torch.long)
        evi_k = torch.tensor([*range(len(eg)), *range(len(ir))], dtype=torch.long)
        question = question.replace("<image>\n", "").replace("<image>", "")
        return dict(ids=ids, labels=labels, frames=frames, times=times, q_ids=torch.tensor(self.q_tokenize(question)),
                    evi_pos=evi_pos, evi_stage=evi_stage, evi_k=evi_k,
                    evi_span=torch.tensor([frame_span(times, s) for s in spans], dtype=torch.long).view(-1, 2),
                    evi_y=torch.stack([frame_targets(times, s, self.alpha) for s in spans]) if spans
                    else torch.zeros(0, len(times)), meta=r)


def ablate(rec, cfg):
    """The paper's ablations as data (Tab. 4, 6). cfg.interleave False: the answer states text timestamps instead
    of <evi> references. cfg.evi_unit "frame": one <evi> per boundary frame (start, end) instead of one per event."""
    gpt, gt = rec["conversations"][1]["value"], rec["time_gt"]
    if not cfg.interleave:
        head, tail = gpt.split("</evi>", 1)
        parts = tail.split("<evi>")
        spans = gt["interleaved_response"]
        gpt = head + "</evi>" + parts[0] + "".join(f"{s:g}s - {e:g}s{p}" for (s, e), p in zip(spans, parts[1:]))
        gt = dict(gt, interleaved_response=[])
    if cfg.evi_unit == "frame":
        gpt = gpt.replace("<evi>", "<evi> <evi>")
        gt = {k: [[x, x] for s, e in v for x in (s, e)] for k, v in gt.items()}
    return dict(rec, time_gt=gt, conversations=[rec["conversations"][0], {"from": "gpt", "value": gpt}])


def collate(samples, pad_id):
    """List of samples -> the batch dict of the contract (right-padded; <evi> entries flattened over the batch)."""
    B = len(samples)
    L = max(len(s["ids"]) for s in samples)
    T = max(len(s["times"]) for s in samples)
    Lq = max(len(s["q_ids"]) for s in samples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    frames = samples[0]["frames"].new_zeros(B, T, *samples[0]["frames"].shape[1:])
    frm_valid = torch.zeros(B, T, dtype=torch.bool)
    times = torch.zeros(B, T)
    q_ids = torch.zeros(B, Lq, dtype=torch.long)
    q_valid = torch.zeros(B, Lq, dtype=torch.bool)
    for b, s in enumerate(samples):
        n, t, q = len(s["ids"]), len(s["times"]), len(s["q_ids"])
        ids[b, :n], labels[b, :n], valid[b, :n] = s["ids"], s["labels"], True
        frames[b, :t], frm_valid[b, :t], times[b, :t] = s["frames"], True, s["times"]
        q_ids[b, :q], q_valid[b, :q] = s["q_ids"], True
    evi_y = [torch.nn.functional.pad(s["evi_y"], (0, T - s["evi_y"].shape[1])) for s in samples]
    return dict(ids=ids, valid=valid, labels=labels, frames=frames, frm_valid=frm_valid, times=times,
                q_ids=q_ids, q_valid=q_valid,
                evi_b=torch.cat([torch.full_like(s["evi_pos"], b) for b, s in enumerate(samples)]),
                evi_pos=torch.cat([s["evi_pos"] for s in samples]),
                evi_stage=torch.cat([s["evi_stage"] for s in samples]),
                evi_k=torch.cat([s["evi_k"] for s in samples]),
                evi_span=torch.cat([s["evi_span"] for s in samples]),
                evi_y=torch.cat(evi_y), meta=[s["meta"] for s in samples])

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
                self.dir.mkdir(parents=True, exist_ok=True)
                tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
                save_file({"x": out[0], "times": out[1]}, tmp)
                os.replace(tmp, file)  # atomic: readers never see a half-written file
        self.mem[key] = out
        self.used += sum(x.nbytes for x in out)
        while self.used > self.mem_bytes and len(self.mem) > 1:
            self.used -= sum(x.nbytes for x in self.mem.popitem(last=False)[1])
        return out
