"""Ask a trained D²VLM about a video and see when the answer happens.

    python sample.py video.mp4 "When does the red square appear?"          # the default nano run's checkpoint
    python sample.py video.mp4 "..." --ckpt runs/nano --json --plot out.png
    python sample.py --eval data/world/test.json                              # the world's held-out metrics
    python sample.py --eval ETBench/evi --videos ETBench/videos --sentsim all-MiniLM-L6-v2 --released   # Table 1
    torchrun --nproc_per_node=4 sample.py --eval ...                          # records split over 4 processes
    python sample.py video.mp4 "..." --ckpt PATH/D2VLM --bert_vocab PATH/bert-base-uncased/vocab.txt  # official
    python sample.py --ckpt runs/full --export DIR      # a run in the official merged layout, for the official scripts
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

from nanod2vlm.checkpoint import export, load_model
from nanod2vlm.data import FrameCache, read_video
from nanod2vlm.files import cli, writable, write_atomic
from nanod2vlm.eval import SentSim, answer, evaluate, predictions_path, print_metrics


def plot(path, result, frames, times, gt=None, threshold=0.6):
    """Per <evi>: sigmoid(sim) over time, the threshold × max line, the chosen span (and the ground truth), under a
    strip of frame thumbnails."""
    from matplotlib.figure import Figure  # not pyplot: no window and no global figure, whatever the backend
    evis = result["evis"]
    fig = Figure(figsize=(10, 1.4 + 1.6 * len(evis)))
    axes = fig.subplots(1 + len(evis), 1, squeeze=False, gridspec_kw=dict(height_ratios=[1.2] + [1] * len(evis)))[:, 0]
    # the top panel: about 16 thumbnails side by side, under the answer (an untrained one may hold control bytes)
    axes[0].imshow(torch.cat(list(frames[::max(1, len(frames) // 16)]), dim=2).permute(1, 2, 0).numpy())
    axes[0].set_axis_off()
    axes[0].set_title("".join(c for c in result["text"] if c.isprintable())[:160], fontsize=8)
    for i, (ax, e) in enumerate(zip(axes[1:], evis)):
        p = torch.sigmoid(torch.tensor(e["sim"]))
        ax.plot(times, p, lw=1.2, label="sigmoid(sim)")
        ax.axhline(threshold * p.max().item(), ls="--", c="gray", lw=0.8, label=f"{threshold:g} × max")
        ax.axvspan(*e["seconds"], color="tab:orange", alpha=0.3, label="predicted")
        k = sum(x["stage"] == e["stage"] for x in evis[:i])  # the k-th <evi> of each stage refers to the k-th event
        if gt and k < len(gt):
            ax.axvspan(*gt[k], fill=False, hatch="//", ec="tab:green", label="ground truth")
        ax.set(ylim=(0, 1.05), xlim=(float(times[0]), float(times[-1])), ylabel=f"<evi> stage {e['stage']}")
        ax.legend(fontsize=6, loc="upper right")
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


@cli
def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("video", nargs="?")
    ap.add_argument("question", nargs="?")
    ap.add_argument("--ckpt", default="runs/nano", help="a run folder or step folder, an official merged or adapter "
                    "folder; with --eval, a comma-separated list")
    ap.add_argument("--bert_vocab", default="", help="bert-base-uncased's vocab.txt (an official --ckpt)")
    ap.add_argument("--base", default="", help="the merged folder an official adapter --ckpt sits on")
    ap.add_argument("--export", metavar="DIR", help="write --ckpt to DIR in the official merged layout")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--max-new-tokens", type=int, default=2048, help="the model stops at <|end|> before")
    ap.add_argument("--released", dest="temperature", action="store_const", const=0.2,
                    help="decode as released: --temperature 0.2 (seeded here), with the default 2048 new tokens")
    ap.add_argument("--evi_threshold", type=float, help="an <evi>'s salient frames have sigmoid(sim) >= this x max "
                    "(default: the checkpoint's; released 0.6; the paper's supplementary Tab. 3 compares 0.4-0.8)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--plot", help="write the grounding picture to this PNG")
    ap.add_argument("--gt", help="ground-truth spans for the plot, e.g. '6.3-12.1,21-24.4'")
    ap.add_argument("--eval", metavar="FILE_OR_DIR", help="answer and score every record of a world, E.T. Bench, "
                    "Charades-STA or YouCook2 (TimeIT) annotation file, or of a folder of E.T. Bench files")
    ap.add_argument("--videos", metavar="DIR", help="with --eval: the folder the records' videos are in")
    ap.add_argument("--sentsim", metavar="MINILM_DIR", help="with --eval: all-MiniLM-L6-v2 (safetensors) for Sim")
    ap.add_argument("--out", metavar="PRED.jsonl", help="with --eval: the predictions (default: in the checkpoint)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--jobs", type=int, help="with --eval on the CPU: processes answering, one thread each (default: "
                    "torch's thread count, one per core unless OMP_NUM_THREADS says)")
    a = ap.parse_args(argv)
    if not a.temperature >= 0:  # nor NaN; as every check here, before the long work
        ap.error(f"--temperature {a.temperature}: give a number >= 0 (0: greedy)")
    if a.evi_threshold is not None and not 0 < a.evi_threshold <= 1:
        ap.error(f"--evi_threshold {a.evi_threshold}: give a number in (0, 1]")
    if a.jobs is not None and a.jobs < 1:
        ap.error(f"--jobs {a.jobs}: give at least 1")
    if a.max_new_tokens < 4:
        ap.error(f"--max-new-tokens {a.max_new_tokens}: give at least 4 (<evi>, </evi>, a word, <|end|>)")
    try:
        torch.empty(0, device=a.device)
    except (RuntimeError, AssertionError) as e:  # e.g. "Torch not compiled with CUDA enabled"
        ap.error(f"--device {a.device}: not usable here ({str(e).splitlines()[0]}); try --device cpu")
    try:
        gt = [(float(s), float(e)) for s, e in (x.split("-") for x in a.gt.split(","))] if a.gt else None
    except ValueError:
        ap.error(f"--gt {a.gt!r}: give spans in seconds like 6.3-12.1,21-24.4")
    for option in ("plot", "out", "export"):
        if getattr(a, option):
            writable(getattr(a, option), f"--{option}")
    if a.export:
        model, tok, wp, state = load_model(a.ckpt, "cpu", a.bert_vocab, a.base)
        export(model, tok, wp, a.export, state["base"].get("official", ""))
        print(f"wrote {a.ckpt} to {a.export} in the official merged layout")
        return

    def load(ckpt):  # the model, tokenizers; --evi_threshold in place of the checkpoint's own
        model, tok, wp, _ = load_model(ckpt, a.device, a.bert_vocab, a.base)
        model.cfg.evi_threshold = a.evi_threshold or model.cfg.evi_threshold
        return model, tok, wp

    if a.eval is None and (not a.video or not a.question or not a.question.strip()):
        ap.error("give a video and a non-empty question, or --eval ANNOTATIONS, or --export DIR")
    if a.eval:  # --ckpt A,B scores several checkpoints on the same file, e.g. SFT and SFT+FPO
        if a.out and "," in a.ckpt:
            ap.error("--out names the predictions of one checkpoint; without it each goes into its checkpoint")
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if world > 1:  # torchrun: each process answers its share of the records (gloo: barriers only)
            dist.init_process_group("gloo")
            a.device = f"cuda:{os.environ['LOCAL_RANK']}" if a.device == "cuda" else a.device
        sentsim = SentSim(a.sentsim).to(a.device) if a.sentsim else None
        cache = FrameCache()
        for ckpt in a.ckpt.split(","):
            model, tok, wp = load(ckpt)
            out = a.out or predictions_path(ckpt, a.eval, a.temperature, a.evi_threshold)
            writable(out, "--out")  # the default is in the checkpoint's folder, which may be read-only
            m = evaluate(model, tok, wp, a.eval, cache, out, a.videos, a.max_new_tokens, a.temperature, sentsim,
                         rank, world, a.jobs)
            if rank == 0:
                print(f"== {ckpt}")
                print_metrics(m)
                write_atomic(os.path.splitext(out)[0] + ".metrics.json", json.dumps(m, indent=1))
                print(f"predictions: {out}")
        if world > 1:
            dist.destroy_process_group()
        return
    model, tok, wp = load(a.ckpt)
    frames, times = read_video(a.video, model.cfg.fps, model.cfg.img_size, model.cfg.max_frames)
    r = answer(model, tok, wp, frames, times, a.question.strip(), a.max_new_tokens, a.temperature)
    if a.plot:
        plot(a.plot, r, frames, times, gt, model.cfg.evi_threshold)
    if a.json:
        print(json.dumps(r))
    else:
        print("grounding: " + (", ".join(f"{s:.1f}s - {e:.1f}s" for s, e in r["grounding"]) or "(none)"))
        print("answer:    " + r["text"].split("</evi>")[-1].strip())
        print(f"({r['frames']} frames, {r['seconds']:.2f}s)" + (f"; plot: {a.plot}" if a.plot else ""))


if __name__ == "__main__":
    main()
