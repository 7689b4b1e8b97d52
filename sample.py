"""Ask a trained D²VLM about a video and see when the answer happens.

    python sample.py video.mp4 "When does the red square appear?"          # the default nano run's checkpoint
    python sample.py video.mp4 "..." --ckpt runs/nano --json --plot out.png
    python sample.py --eval data/world/test.json                              # batched metrics over a file
    python sample.py video.mp4 "..." --ckpt PATH/D2VLM --bert_vocab PATH/bert-base-uncased/vocab.txt  # official
    python sample.py --ckpt runs/full --export DIR      # a run in the official merged layout, for the official scripts
"""
import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from nanod2vlm.checkpoint import CheckpointError, export, load_model
from nanod2vlm.data import AnnotationError, FrameCache, VideoError, normalize, read_annotations, read_video
from nanod2vlm.metrics import SPAN, dense_caption_scores, grounding_recall, multi_span_f1, parse_spans


def chunks(text, evi="<evi>"):
    """The answer part (after </evi>) split at each <evi>: the text that follows each reference."""
    answer = text.split("</evi>", 1)[-1]
    return [c.strip() for c in answer.split(evi)[1:]]


def answer(model, tok, wp, frames, times, question, max_new_tokens=96, temperature=0.0):
    """Ground, then answer. Returns text with every <evi> replaced by its span, plus the raw parts."""
    t0 = time.time()
    ids = tok.encode(tok.chat("<image>\n" + question))
    i = ids.index(tok.image_id)
    ids = ids[:i] + [tok.image_id] * len(frames) + ids[i + 1:]  # one placeholder per frame
    pixels = normalize(frames).to(next(model.parameters()).device)  # train.py evaluates on its training device
    out, evis = model.generate(pixels, times, wp.encode(question), ids, max_new_tokens, temperature)
    raw = tok.decode(out)
    # split at the <evi> ids, not at the text "<evi>": byte-fallback pieces can spell that text too
    cuts = [j for j, i in enumerate(out) if i == tok.evi_id] + [len(out)]
    after = [tok.decode(out[a + 1:b]).replace("<|end|>", "") for a, b in zip(cuts, cuts[1:])]  # text after each <evi>
    frame_level = model.cfg.evi_unit == "frame"  # each <evi> is one boundary frame; events are their pairs
    text = tok.decode(out[:cuts[0]]).replace("<|end|>", "")
    for e, piece in zip(evis, after):
        s, t = e["seconds"]
        text += ("" if text[-1:].isspace() or not text else " ") + (f"{s:.1f}s" if frame_level else f"{s:.1f}s - {t:.1f}s")
        text += piece
    grounded, spans = ([e["seconds"] for e in evis if e["stage"] == k] for k in (1, 2))
    if frame_level:
        grounded, spans = ([(a[0], b[0]) for a, b in zip(x[::2], x[1::2])] for x in (grounded, spans))
    # dense captions: the text after each answer event's <evi> (after the second of a frame-level pair) ...
    captions = [c.strip() for e, c in zip(evis, after) if e["stage"] == 2]
    captions = captions[1::2] if frame_level else captions
    if not model.cfg.interleave:  # ... or, when the answer states its timestamps as text, after each of those
        stated = text.split("</evi>")[-1]
        spans, captions = [tuple(s) for s in parse_spans(stated)], [c.strip() for c in SPAN.split(stated)[3::3]]
    note = "" if tok.evi_end_id in out else " (the model never closed grounding with </evi>)"
    if len(evis) > len(frames):
        note += f" ({len(evis)} <evi> for {len(frames)} frames: a degenerate answer)"
    return dict(text=" ".join(text.split()) + note, raw=raw, grounding=grounded, answer_spans=spans, captions=captions,
                evis=evis, seconds=time.time() - t0, frames=len(frames))


def evaluate(model, tok, wp, ann_path, cache, out_path=None, max_new_tokens=96):
    """Answer every record of an annotation file and score by task (SPEC §7 scorers in nanod2vlm/metrics.py)."""
    cfg, preds = model.cfg, []
    for rec in tqdm(read_annotations(ann_path), desc="eval", dynamic_ncols=True):
        video = os.path.join(os.path.dirname(ann_path), rec["video"])
        frames, times = cache.get(video, cfg.fps, cfg.img_size, cfg.max_frames)
        q = rec["conversations"][0]["value"].replace("<image>", "").strip()
        a = answer(model, tok, wp, frames, times, q, max_new_tokens)
        preds.append(dict(video=rec["video"], task=rec.get("task", "single"), question=q, answer=a["text"].split("</evi>")[-1].strip(),
                          spans=a["answer_spans"], grounding=a["grounding"], captions=a["captions"],
                          gt=rec["time_gt"]["interleaved_response"], gt_captions=chunks(rec["conversations"][1]["value"]),
                          gt_answer=rec["conversations"][1]["value"].split("</evi>")[-1].strip()))
    by = lambda task: [p for p in preds if p["task"] == task]

    def single_span(ps):  # moment retrieval (Charades R@1, mIoU) and E.T. Bench's TVG/EPM F1 of the first span
        return dict(grounding_recall([p["spans"][0] if p["spans"] else None for p in ps], [p["gt"][0] for p in ps]),
                    F1=multi_span_f1([p["spans"][:1] for p in ps], [p["gt"][:1] for p in ps])["F1"])
    m = {}
    if by("single"):
        m["single"] = single_span(by("single"))
    if by("multi"):
        m["multi"] = multi_span_f1([p["spans"] for p in by("multi")], [p["gt"] for p in by("multi")])
    if by("dense"):
        m["dense"] = dense_caption_scores([list(zip(p["spans"], p["captions"])) for p in by("dense")],
                                          [list(zip(p["gt"], p["gt_captions"])) for p in by("dense")])
    if by("qa"):
        qa = by("qa")
        m["qa"] = dict(single_span(qa),
                       accuracy=100 * sum(p["answer"].split(".")[0] == p["gt_answer"].split(".")[0] for p in qa) / len(qa))
    # the paper's Tab. 4-6 columns: grounding avg F1 (here over single, qa, multi), dense captioning F1 and Sim
    gnd = [m[t]["F1"] for t in ("single", "qa", "multi") if t in m]
    avg = {"grounding_F1": sum(gnd) / len(gnd)} if gnd else {}
    if "dense" in m:
        avg.update(dense_F1=m["dense"]["F1"], dense_Sim=m["dense"]["Sim_unigram"])
    m["avg"] = avg
    if out_path:
        with open(out_path, "w") as f:
            json.dump(dict(metrics=m, predictions=preds), f, indent=1)
    return m


def print_metrics(m):
    for task, vals in m.items():
        print(f"{task:>7}: " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in vals.items()))


def plot(path, result, frames, times, gt=None):
    """Per <evi>: sigmoid(sim) over time, the 0.6 × max threshold, the chosen span (and the ground truth), under a
    strip of frame thumbnails."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    evis = result["evis"]
    fig, axes = plt.subplots(1 + len(evis), 1, figsize=(10, 1.4 + 1.6 * len(evis)), squeeze=False,
                             gridspec_kw=dict(height_ratios=[1.2] + [1] * len(evis)))
    step = max(1, len(frames) // 16)
    strip = torch.cat([frames[i] for i in range(0, len(frames), step)], dim=2).permute(1, 2, 0).numpy()
    axes[0, 0].imshow(strip)
    axes[0, 0].set_axis_off()
    title = "".join(c for c in result["text"] if c.isprintable())  # an untrained model may emit control bytes
    axes[0, 0].set_title(title[:160], fontsize=8)
    for i, (ax, e) in enumerate(zip(axes[1:, 0], evis)):
        p = torch.sigmoid(torch.tensor(e["sim"]))
        ax.plot(times, p, lw=1.2, label="sigmoid(sim)")
        ax.axhline(0.6 * p.max().item(), ls="--", c="gray", lw=0.8, label="0.6 × max")
        ax.axvspan(*e["seconds"], color="tab:orange", alpha=0.3, label="predicted")
        k = sum(x["stage"] == e["stage"] for x in evis[:i])  # the k-th <evi> of each stage refers to the k-th event
        if gt and k < len(gt):
            ax.axvspan(*gt[k], fill=False, hatch="//", ec="tab:green", label="ground truth")
        ax.set(ylim=(0, 1.05), xlim=(float(times[0]), float(times[-1])), ylabel=f"<evi> stage {e['stage']}")
        ax.legend(fontsize=6, loc="upper right")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("video", nargs="?")
    ap.add_argument("question", nargs="?")
    ap.add_argument("--ckpt", default="runs/nano", help="a run folder or step folder, an official merged or adapter "
                    "folder; with --eval, a comma-separated list")
    ap.add_argument("--bert_vocab", default="", help="bert-base-uncased's vocab.txt (an official --ckpt)")
    ap.add_argument("--base", default="", help="the merged folder an official adapter --ckpt sits on")
    ap.add_argument("--export", metavar="DIR", help="write --ckpt to DIR in the official merged layout")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--plot", help="write the grounding picture to this PNG")
    ap.add_argument("--gt", help="ground-truth spans for the plot, e.g. '6.3-12.1,21-24.4'")
    ap.add_argument("--eval", metavar="ANNOTATIONS", help="score every record of an annotation file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    try:
        if a.export:
            model, tok, wp, state = load_model(a.ckpt, "cpu", a.bert_vocab, a.base)
            export(model, tok, wp, a.export, state["base"].get("official", ""))
            print(f"wrote {a.ckpt} to {a.export} in the official merged layout")
            return
        if a.eval is None and (not a.video or not a.question or not a.question.strip()):
            ap.error("give a video and a non-empty question, or --eval ANNOTATIONS, or --export DIR")
        if a.eval:  # --ckpt A,B scores several checkpoints on the same file, e.g. SFT and SFT+FPO
            cache = FrameCache()
            for i, ckpt in enumerate(a.ckpt.split(",")):
                model, tok, wp, _ = load_model(ckpt, a.device, a.bert_vocab, a.base)
                out = os.path.splitext(a.eval)[0] + (f".{i}" if "," in a.ckpt else "") + ".predictions.json"
                m = evaluate(model, tok, wp, a.eval, cache, out, a.max_new_tokens)
                print(f"== {ckpt}")
                print_metrics(m)
                print(f"predictions and metrics: {out}")
            return
        model, tok, wp, _ = load_model(a.ckpt, a.device, a.bert_vocab, a.base)
        cfg = model.cfg
        frames, times = read_video(a.video, cfg.fps, cfg.img_size, cfg.max_frames)
        r = answer(model, tok, wp, frames, times, a.question.strip(), a.max_new_tokens, a.temperature)
    except (VideoError, AnnotationError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    if a.plot:
        try:
            gt = [tuple(map(float, s.split("-"))) for s in a.gt.split(",")] if a.gt else None
        except ValueError:
            sys.exit(f"error: --gt {a.gt!r}: give spans in seconds like 6.3-12.1,21-24.4")
        plot(a.plot, r, frames, times, gt)
    if a.json:
        print(json.dumps(r))
    else:
        print("grounding: " + (", ".join(f"{s:.1f}s - {e:.1f}s" for s, e in r["grounding"]) or "(none)"))
        print("answer:    " + r["text"].split("</evi>")[-1].strip())
        print(f"({r['frames']} frames, {r['seconds']:.2f}s)" + (f"; plot: {a.plot}" if a.plot else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
