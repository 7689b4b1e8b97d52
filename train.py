"""Train D²VLM: `python train.py` (SFT on the synthetic world, nano model, CPU) or `python train.py --stage fpo`.

A recipe in order: config, data, model, optimizer, loop, checkpoint, evaluation. Every field of `Train` and of
the model's `Config` can be overridden as `--name=value`. Multi-process: `torchrun --nproc_per_node=N train.py`.
"""
import hashlib
import inspect
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanod2vlm.data import FrameCache, VideoDataset, ablate, collate, read_annotations, read_pairs, turns
from nanod2vlm.files import InputError, cli, writable, write_atomic
from nanod2vlm.loss import fpo_step_loss, sft_loss
from nanod2vlm.checkpoint import (TOKEN_IDS, CheckpointError, _config, build_d2vlm, latest, load_model,
                                  load_optimizer, save_checkpoint)
from nanod2vlm.model import CONFIGS, Config, cast_frozen, mark_trainable
from nanod2vlm.tokenizer import Tokenizer, WordPiece
from nanod2vlm.eval import evaluate, predictions_path, print_metrics


@dataclass
class Train:
    stage: str = "sft"             # sft | fpo
    config: str = "nano"           # nano | full
    data: str = "data/world"       # folder with train.json / test.json; the synthetic world is rendered if missing
    world_train: int = 300         # synthetic world size (videos) when it is rendered
    world_test: int = 60
    train_json: str = ""           # default: {data}/train.json (sft) or {data}/fpo_pairs.json (fpo)
    eval_json: str = ""            # comma-separated files to evaluate at the end (default {data}/test.json), or none
    out: str = "runs/nano"
    init: str = ""                 # start from this checkpoint: a run of ours (fpo: the SFT run) or an official merged
                                   # folder (full: E.T. Chat stage-2, as the released SFT starts)
    hf_llm: str = ""               # full: a Hugging Face Phi-3 folder (weights, tokenizer.model)
    bert_vocab: str = ""           # full: bert-base-uncased's vocab.txt, for the Q-Former's question text
    eva: str = ""                  # full: EVA-CLIP ViT-G weights (timm safetensors)
    resume: bool = False           # continue {out}/latest: weights, optimizer, step
    steps: int = 800
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    lora_lr: float = 5e-5
    warmup: float = 0.03
    weight_decay: float = 0.0
    beta2: float = 0.95            # AdamW's second moment decay (beta1 0.9)
    w_gnd: float = 10.0            # the released weight (Eq. 2 as printed: 1)
    w_cons: float = 1.0            # released: 10; 0 = the "no consistency loss" ablation
    soft_alpha: float = 0.0        # 0: hard 1/0 frame targets (paper); 2: the released soft targets alpha^-d
    min_duration: float = 0.0      # SFT records outside [min_duration, max_duration] seconds are dropped
    max_duration: float = math.inf
    max_words: int = 0             # SFT records whose first answer has more words (split on " ") are dropped; 0: none
    beta: float = 0.1              # FPO (released; Eq. (4) as printed: 1)
    ckpt_every: int = 200
    bucket: int = 8                # batches of similar video durations, sorted within runs of 8 batches (0: off)
    vit_cache: bool = True         # the frozen ViT encodes each video once, its features cached in {data}/cache
    compile: bool = False
    seed: int = 0


# --stage=fpo defaults: the released objective (loss.fpo_step_loss: SFT terms 10/10 on the chosen response, beta 0.1,
# soft targets, no reference model); steps, lr and batch are the nano run's (FULL's replace them at full scale).
FPO = dict(init="runs/nano", out="runs/nano-fpo", steps=200, lr=1e-4, batch_size=8, w_cons=10.0, soft_alpha=2.0)

# --config=full defaults: the released recipe (its training scripts), for SFT and FPO alike: soft targets 2^-d, loss
# weights 10 / 10, learning rates, AdamW betas (0.9, 0.999), 3 % warm-up, batch 1, and its data filters.
FULL = dict(soft_alpha=2.0, w_gnd=10.0, w_cons=10.0, lr=2e-5, lora_lr=5e-5, beta2=0.999, warmup=0.03, batch_size=1,
            min_duration=5.0, max_duration=350.0, max_words=200, bucket=0)  # batch 1: nothing to pad
FULL_FPO = dict(init="", out="runs/full-fpo", grad_accum=8)  # the released FPO: gradient accumulation 8; --init yours


def parse(argv):
    """--name=value overrides of Train and of the model Config chosen by --config (FPO and FULL: their defaults);
    with --resume, of the run's saved ones, which no flag may then contradict. -> (Train, Config, the names of the
    Config fields given as flags)."""
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\n" + inspect.getsource(Train) + "\n" + inspect.getsource(Config))
        sys.exit(0)
    kv = {}
    args = list(argv)
    while args:  # --name=value, --name value, or a bare --flag (true)
        key, eq, val = args.pop(0).removeprefix("--").partition("=")
        if not eq and args and not args[0].startswith("--"):
            val = args.pop(0)
        kv[key.replace("-", "_")] = val or "true"
    if unknown := set(kv) - {f.name for f in fields(Train) + fields(Config)}:
        raise InputError(f"unknown option(s): {', '.join('--' + k for k in unknown)} (see python train.py --help)")
    if kv.get("config", "nano") not in CONFIGS:
        raise InputError(f"--config={kv['config']}: choose one of {', '.join(CONFIGS)}")

    def override(obj):
        return replace(obj, **{k: cast(k, type(getattr(obj, k)), v) for k, v in kv.items() if hasattr(obj, k)})
    run = override(Train())
    if run.resume:  # the run continues as it was started: its saved settings, which no flag may contradict
        if (ckpt := latest(run.out)) == run.out:
            raise InputError(f"--resume: no checkpoint in {run.out} (expected {run.out}/latest); give the run's --out")
        try:
            state = json.load(open(os.path.join(ckpt, "state.json")))
            # a run saved before --bucket existed trained unbucketed
            saved = {"bucket": 0} | {k: v for k, v in state["train"].items() if hasattr(run, k)}
            saved = replace(Train(**saved), resume=True)
            saved_cfg = _config(state["config"])
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{ckpt}: not a nanod2vlm checkpoint ({e}); name an earlier step in "
                                  f"{run.out}/latest") from None
        run, cfg = override(saved), override(saved_cfg)
        if bad := [f"--{k}={v} (the run's: {getattr(x, k)})" for x, y in ((saved, run), (saved_cfg, cfg))
                   for k, v in asdict(y).items() if v != getattr(x, k) and k not in FREE_ON_RESUME]:
            raise InputError(f"--resume continues {ckpt} as it was started; these flags contradict it: "
                             f"{', '.join(bad)} (a new run: --init={ckpt} --out=NEW)")
        print(f"--resume: {ckpt} with its model and its run's settings: " + ", ".join(
            f"{k}={v}" for k, v in asdict(run).items() if v != getattr(Train(), k) and k != "resume"))
    else:
        fpo, full = run.stage == "fpo", run.config == "full"
        presets = (FPO if fpo else {}) | (FULL if full else {}) | (FULL_FPO if fpo and full else {})
        run = replace(run, **{k: v for k, v in presets.items() if k not in kv})
        if fpo and not run.init:
            raise InputError("--stage=fpo: give --init, the SFT run (or its official export) to start from")
        cfg = override(CONFIGS[run.config])
    low = dict(steps=1, batch_size=1, grad_accum=1, ckpt_every=1)  # the other numbers: >= 0
    bad = [f"--{k}={v}: give a number >= {low.get(k, 0)}" for k, v in asdict(run).items()
           if type(v) in (int, float) and not v >= low.get(k, 0)]
    if run.stage not in ("sft", "fpo"):
        bad.append(f"--stage={run.stage}: sft or fpo")
    if bad:
        raise InputError("; ".join(bad))
    writable(run.out, "--out")  # now, not at the first checkpoint
    writable(os.path.join(run.data, "cache"), "--data (its frame cache)")
    return run, cfg, {f.name for f in fields(Config)} & set(kv)


FREE_ON_RESUME = {"resume", "out", "ckpt_every", "compile", "vit_cache", "eval_json"}  # the losses stay the same


def cast(key, typ, val):
    """--key=val -> the field's type, or an InputError naming the option."""
    try:
        return BOOL[val.lower()] if typ is bool else tuple(val.split(",")) if typ is tuple else typ(val)
    except (KeyError, ValueError):
        raise InputError(f"--{key}={val}: not a valid {typ.__name__}") from None


BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def lr_at(step, run):
    """Cosine schedule with linear warm-up."""
    warm = max(1, int(run.warmup * run.steps))
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(step, run.steps) / run.steps))


def batch_indices(g, n, bs, seed, lengths=None, window=0):
    """The g-th micro-batch of an endless stream of seeded epoch permutations: a pure function of g, so resume
    and any number of processes see exactly the data an uninterrupted single process would. window > 0: each run
    of `window` batches of the stream is sorted by `lengths` and cut into batches of similar lengths (less padding),
    taken in a seeded order; the stream's samples are the same."""
    w = max(1, window)
    first = g // w * w * bs  # the stream position where g's window starts
    epochs = range(first // n, (first + w * bs - 1) // n + 1)  # the epochs the window reaches into, each permuted once
    perm = {e: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + e)) for e in epochs}
    out = [perm[i // n][i % n].item() for i in range(first, first + w * bs)]
    if window:
        out.sort(key=lambda j: lengths[j])
        k = torch.randperm(w, generator=torch.Generator().manual_seed(seed * 100003 + g // w))[g % w]
        out = out[k * bs:(k + 1) * bs]
    return out


def to(b, dev):
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}


def amp(dev):
    """bf16 autocast on a GPU (where cast_frozen holds Phi-3's frozen weights in bf16); fp32 on the CPU."""
    return torch.autocast("cuda", torch.bfloat16, enabled=dev != "cpu")


def vit_features(model, frames, dev):
    """Normalised frames (T, 3, S, S) -> frozen ViT patch features (T, P, W) on the CPU (bf16 under CUDA); the
    cache calls it under no_grad."""
    with amp(dev):
        return model.visual(frames.to(dev)).cpu()


def vit_tag(model, dev):
    """Names the feature extractor in the cache key: a hash of the frozen tower's weights, and bf16 where the
    features were computed under a GPU's autocast."""
    h = hashlib.sha1()
    for k, v in model.visual.state_dict().items():
        h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    return "vit" + h.hexdigest()[:12] + ("" if dev == "cpu" else "bf16")


def build_tokenizers(run):
    """nano: a sentencepiece model and a WordPiece vocab trained on the training texts (the world's grammar);
    full: Phi-3's tokenizer.model and bert-base-uncased's vocab.txt."""
    if run.hf_llm:
        return Tokenizer.phi3(run.hf_llm), WordPiece(run.bert_vocab)
    records = read_annotations(run.train_json or os.path.join(run.data, "train.json"))
    questions = [turns(r)["human"].replace("<image>\n", "") for r in records]
    answers = [turns(r)["gpt"] for r in records]
    # sentencepiece learns the text as the decoder reads it: each question in the chat template (else the system
    # prompt is spelled in byte-level pieces in every prompt), each answer; WordPiece the questions and answers
    tok = Tokenizer.nano([Tokenizer.chat(q) for q in questions] + answers, os.path.join(run.data, "tokenizer.model"))
    return tok, WordPiece.build(questions + answers, os.path.join(run.data, "vocab.txt"))


# ------------------------------------------------------------------------------------------------------- main
@cli
def main(argv):
    run, cfg, model_flags = parse(argv)
    # torchrun sets RANK and WORLD_SIZE: one process per device, each with its share of every batch
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if ddp := world > 1:
        if dev != "cpu":
            torch.cuda.set_device(dev)
        dist.init_process_group("gloo" if dev == "cpu" else "nccl")
    torch.manual_seed(run.seed)
    say = print if rank == 0 else (lambda *a, **k: None)

    # data: the synthetic world (rendered once, from the world's own seed: every --seed trains on the same videos),
    # tokenizers, datasets
    if run.config == "nano" and not os.path.exists(os.path.join(run.data, "train.json")):
        from nanod2vlm.world import ensure_world
        if rank == 0:
            ensure_world(run.data, n_train=run.world_train, n_test=run.world_test)
        if ddp:
            dist.barrier()
    init = latest(run.out) if run.resume else run.init
    if init:  # the checkpoint brings its tokenizers, weights and config (an official folder: Phi-3's, the rest cfg)
        model, tok, wp, state = load_model(init, bert_vocab=run.bert_vocab, cfg=cfg)
        # a model flag that the checkpoint's model contradicts is refused, not silently dropped
        if bad := [f"--{k}={getattr(cfg, k)} (the checkpoint's: {getattr(model.cfg, k)})" for k in sorted(model_flags)
                   if getattr(cfg, k) != getattr(model.cfg, k)]:
            raise InputError(f"{init} brings its own model; these flags contradict it: {', '.join(bad)}")
        cfg = model.cfg
    else:
        tok, wp = build_tokenizers(run)
        cfg = replace(cfg, vocab_size=max(cfg.vocab_size, tok.vocab_size) if run.hf_llm else tok.vocab_size,
                      qf_vocab=len(wp.vocab), **{k: getattr(tok, k) for k in TOKEN_IDS})
        state = dict(base=dict(hf_llm=run.hf_llm, eva=run.eva))
        model = build_d2vlm(cfg, **state["base"])
    if cfg.lora_r:
        mark_trainable(model)
        if "official" not in state["base"]:  # no E.T. Chat compressor to start from: the random one trains whole
            model.compressor.requires_grad_(True)
    cache = FrameCache(os.path.join(run.data, "cache"))
    train_json = run.train_json or os.path.join(run.data, "train.json" if run.stage == "sft" else "fpo_pairs.json")
    video = dict(fps=cfg.fps, size=cfg.img_size, max_frames=cfg.max_frames, alpha=run.soft_alpha or None)
    if run.vit_cache:  # the frozen tower encodes each video once; batches then carry its features (B, T, P, W)
        video.update(encode=lambda x: vit_features(model, x, dev), tag=vit_tag(model, dev))
    if run.stage == "sft":
        every = read_annotations(train_json, videos=os.path.dirname(train_json))  # every video there, checked now
        # the released SFT's filters: the video's duration, the words of the first answer split on " "
        records = [ablate(r, cfg) for r in every if run.min_duration <= r["duration"] <= run.max_duration
                   and (not run.max_words or len(turns(r)["gpt"].split(" ")) <= run.max_words)]
        if len(records) < len(every):
            say(f"{len(every) - len(records)} of {len(every)} records dropped: duration outside [{run.min_duration}, "
                f"{run.max_duration}] s or more than {run.max_words} words in the first answer")
        ds = VideoDataset(train_json, tok, wp.encode, cache, records=records, **video)
    else:
        # synth.py writes the preference pairs (Sec. 5) once, from its own seed: every --seed trains on the same pairs
        if not os.path.exists(train_json) and rank == 0:
            synth = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synth.py")
            if subprocess.run([sys.executable, synth, os.path.join(run.data, "train.json"), train_json]).returncode:
                raise InputError(f"synth.py could not write {train_json} (its error is above)")
        if ddp:
            dist.barrier()
        chosen, rejected = read_pairs(train_json)
        ds = VideoDataset(train_json, tok, wp.encode, cache, records=chosen, rejected=rejected, exact=True, **video)
    # the learning picture: one held-out question's first <evi>, its similarity to every frame (teacher-forced) at a
    # few steps; kept in the checkpoints' state, so that a resumed run draws the whole picture
    held_out = os.path.join(run.data, "test.json")
    probe = None
    if run.config == "nano" and rank == 0 and os.path.exists(held_out):  # rank 0 draws it
        rec = ablate(read_annotations(held_out)[0], cfg)
        probe = dict(VideoDataset(held_out, tok, wp.encode, cache, records=[rec], **video)[0], record=rec)
    probe_at = {0, run.steps // 16, run.steps // 8, run.steps // 4, run.steps // 2, run.steps}
    model.to(dev)
    if dev != "cpu":  # Phi-3's frozen weights in bf16 (the ViT keeps fp32); everything runs under bf16 autocast there
        cast_frozen(model.llm, torch.bfloat16)
    # AdamW over what trains: LoRA at its own learning rate, everything else at --lr; base_lr: the schedule's peak
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trained]
    groups = [dict(params=[p for n, p in trained if ("lora_" in n) == lora], lr=lr, base_lr=lr)
              for lora, lr in ((False, run.lr), (True, run.lora_lr))]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, run.beta2), weight_decay=run.weight_decay,
                            fused=True)  # one kernel over all parameters, on the CPU too
    step = 0
    history = []  # the logged losses of every step
    probes = []  # (step, the probe's sigmoid(sim)) for the learning picture
    if run.resume:
        step, history, probes = state["step"], state["history"], state.get("probes", [])
        load_optimizer(opt, os.path.join(init, "optim.safetensors"))
        say(f"resumed {init} at step {step}")
    durations = [r["duration"] for r in ds.records]  # a sample's length is mostly its frames
    fwd = torch.compile(model, dynamic=True) if run.compile else model
    say(f"{run.stage} | {run.config}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
        f"({sum(p.numel() for p in params) / 1e6:.2f}M trainable) | {len(ds)} samples | {world} process(es) on {dev}")

    # loop (save_checkpoint makes run.out)
    model.train()
    bar = tqdm(total=run.steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    t0 = time.time()
    ntok = 0  # the tokens seen, for the tokens/s on the bar
    if probe and step == 0:
        probes.append((0, probe_sim(model, probe, tok.pad_id, dev)))
    while step < run.steps:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_at(step, run)
        logs = {}
        for micro in range(run.grad_accum):
            gidx = (step * run.grad_accum + micro) * world + rank
            idx = batch_indices(gidx, len(ds), run.batch_size, run.seed, durations, run.bucket)
            b = to(collate([ds[i] for i in idx], tok.pad_id), dev)
            with amp(dev):
                out = fwd(b)
                if run.stage == "sft":
                    loss, parts = sft_loss(*out, b, run.w_gnd, run.w_cons, match=cfg.evi_unit == "frame")
                else:
                    loss, parts = fpo_step_loss(*out, b, run.beta, run.w_gnd, run.w_cons)
            (loss / run.grad_accum).backward()
            ntok += int(b["valid"].sum() + b["resp_valid"].sum()) * world
            for k, v in dict(loss=loss.item(), **parts).items():
                logs[k] = logs.get(k, 0.0) + v / run.grad_accum
        if ddp:  # average gradients and logged losses over processes: what DistributedDataParallel does
            grads = [p.grad for p in params if p.grad is not None]
            flat = torch.cat([grad.flatten() for grad in grads])  # one all-reduce for all, not one per parameter
            dist.all_reduce(flat)
            for grad, x in zip(grads, flat.split([grad.numel() for grad in grads])):
                grad.copy_(x.view_as(grad) / world)
            vals = torch.tensor(list(logs.values()), device=dev)  # NCCL reduces device tensors only
            dist.all_reduce(vals)
            logs = dict(zip(logs, (vals / world).tolist()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append(dict(step=step, **logs))
        if probe and step in probe_at:
            probes.append((step, probe_sim(model, probe, tok.pad_id, dev)))
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=f"{ntok / (time.time() - t0):.0f}")
        if rank == 0 and (step % run.ckpt_every == 0 or step == run.steps):
            save_checkpoint(run.out, model, opt, tok, wp, dict(step=step, train=asdict(run), base=state["base"],
                                                             history=history, probes=probes))
    bar.close()
    if ddp:
        dist.barrier()
    if rank == 0:
        plot_learning(history, probes, probe, os.path.join(run.out, "learning.png"))
        say(f"checkpoint: {latest(run.out)} | losses and the learning picture: {run.out}/learning.png")
        # the final evaluation: every file of --eval_json, metrics.json keyed by each file's name ("test", "val")
        metrics = {}
        for path in (run.eval_json or os.path.join(run.data, "test.json")).split(","):
            if path == "none":
                break
            name = os.path.splitext(os.path.basename(path))[0]
            with amp(dev):
                metrics[name] = evaluate(model.eval(), tok, wp, path, cache, predictions_path(run.out, path))
            print(f"== {path}")
            print_metrics(metrics[name])
        if metrics:
            write_atomic(os.path.join(run.out, "metrics.json"), json.dumps(metrics, indent=1))
    if ddp:
        dist.destroy_process_group()


def probe_sim(model, sample, pad_id, dev):
    """sigmoid(sim) of the sample's first <evi> over its frames, teacher-forced, without dropout."""
    model.eval()
    with torch.no_grad(), amp(dev):
        sim = model(to(collate([sample], pad_id), dev))[1]
    model.train()
    return torch.sigmoid(sim[0].float()).tolist()


def plot_learning(history, probes, probe, path):
    """The training losses, and beside them the learning picture: the probe's <evi> similarities at several steps
    against its ground-truth interval."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # not pyplot, as sample.py draws: no window and no global figure
    fig = Figure(figsize=(13, 4))
    ax, bx = fig.subplots(1, 2, width_ratios=(1, 1.3))
    for k in [k for k in history[0] if k != "step"]:
        ax.plot([h["step"] for h in history], [h[k] for h in history], label=k, lw=1)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training losses")
    ax.legend()
    if probe:
        for i, (step, p) in enumerate(probes):
            colour = colormaps["viridis"](i / max(1, len(probes) - 1))
            bx.plot(probe["times"], p, color=colour, lw=1.2, label=f"step {step}")
        bx.axvspan(*probe["record"]["time_gt"]["evidence_grounding"][0], color="tab:green", alpha=0.2,
                   label="ground truth")
        question = turns(probe["record"])["human"].replace("<image>\n", "")
        bx.set(xlabel="seconds", ylabel="sigmoid(sim) of the first <evi>", ylim=(0, 1.05),
               title=f"held-out {probe['record']['video']}: {question}")
        bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
