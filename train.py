"""Train D²VLM: `python train.py` (SFT on the synthetic world, nano model, CPU) or `python train.py --stage fpo`.

A recipe in order: config, data, model, optimizer, loop, checkpoint, evaluation. Every field of `Train` and of
the model's `Config` can be overridden as `--name=value`. Multi-process: `torchrun --nproc_per_node=N train.py`.
"""
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanod2vlm.data import FrameCache, VideoDataset, ablate, collate, read_annotations
from nanod2vlm.loss import fpo_step_loss, sft_loss
from nanod2vlm.model import (CONFIGS, LORA_EXTRA, CheckpointError, build_d2vlm, cast_frozen, mark_trainable,
                             save_adapter, save_safetensors)
from nanod2vlm.tokenizer import Tokenizer, WordPiece
from nanod2vlm.eval import evaluate, load_model, predictions_path, print_metrics


@dataclass
class Train:
    stage: str = "sft"             # sft | fpo
    config: str = "nano"           # nano | full
    data: str = "data/world"       # folder with train.json / test.json; the synthetic world is rendered there if missing
    world_train: int = 300         # synthetic world size (videos) when it is rendered
    world_test: int = 60
    train_json: str = ""           # default: {data}/train.json (sft) or {data}/fpo_pairs.json (fpo)
    eval_json: str = ""            # default: {data}/test.json; "none" skips the final evaluation
    out: str = "runs/nano"
    init: str = ""                 # start from this checkpoint folder (fpo: the SFT run)
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
    w_gnd: float = 10.0            # the released weight (Eq. 2 as printed: 1)
    w_cons: float = 1.0            # released: 10; 0 = the "no consistency loss" ablation
    soft_alpha: float = 0.0        # 0: hard 1/0 frame targets (paper); 2: the released soft targets alpha^-d
    beta: float = 0.1              # FPO (released; Eq. (4) as printed: 1)
    ckpt_every: int = 200
    vit_cache: bool = False        # cache the frozen ViT's features per video in {data}/cache (full scale: a must)
    compile: bool = False
    seed: int = 0


# --stage=fpo defaults: the released objective (loss.fpo_step_loss: SFT terms 10/10 on the chosen response, beta 0.1,
# soft targets, no reference model); steps, lr and batch are the nano run's.
FPO = dict(init="runs/nano", out="runs/nano-fpo", steps=200, lr=1e-4, batch_size=8, w_cons=10.0, soft_alpha=2.0)


def parse(argv):
    """--name=value overrides of Train and of the model Config chosen by --config (FPO has its own defaults)."""
    kv, args = {}, list(argv)
    while args:  # --name=value, --name value, or a bare --flag (true)
        key, eq, val = args.pop(0).removeprefix("--").partition("=")
        if not eq and args and not args[0].startswith("--"):
            val = args.pop(0)
        kv[key.replace("-", "_")] = val or "true"
    if kv.get("config", "nano") not in CONFIGS:
        sys.exit(f"--config={kv['config']}: choose one of {', '.join(CONFIGS)}")

    def override(obj):
        types = {f.name: type(getattr(obj, f.name)) for f in fields(obj)}
        return replace(obj, **{k: cast(types[k], kv.pop(k)) for k in list(kv) if k in types})
    given = set(kv)
    t = override(Train())
    if t.stage == "fpo":
        t = replace(t, **{k: v for k, v in FPO.items() if k not in given})
    cfg = override(CONFIGS[t.config])
    if kv:
        sys.exit(f"unknown option(s): {', '.join('--' + k for k in kv)} (see the Train and Config dataclasses)")
    return t, cfg


def cast(typ, val):
    if typ is bool:
        return val.lower() in ("1", "true", "yes")
    return tuple(val.split(",")) if typ is tuple else typ(val)


def lr_at(step, t):
    """Cosine schedule with linear warm-up."""
    warm = max(1, int(t.warmup * t.steps))
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(step, t.steps) / t.steps))


def batch_indices(g, n, bs, seed):
    """The g-th micro-batch of an endless stream of seeded epoch permutations: a pure function of g, so resume
    and any number of processes see exactly the data an uninterrupted single process would."""
    out = []
    for i in range(g * bs, (g + 1) * bs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + i // n))
        out.append(perm[i % n].item())
    return out


def to(b, dev):
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}


# ------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out, step, model, opt, t, history):
    """Write {out}/step-N (weights, optimizer, state) under a temporary name, rename it, then point `latest` at
    it: a kill at any moment leaves the last good checkpoint intact."""
    final = os.path.join(out, f"step-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if model.cfg.lora_r:  # only what trained: the base weights come from --hf_llm / --eva
        save_adapter(model, os.path.join(tmp, "model.safetensors"), LORA_EXTRA)
    else:
        save_safetensors(model, os.path.join(tmp, "model.safetensors"))
    opt_state = {f"{i}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
    save_safetensors(opt_state, os.path.join(tmp, "optim.safetensors"))
    state = dict(step=step, train=asdict(t), config=asdict(model.cfg), history=history)
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(out, "latest.tmp"), "w") as f:
        f.write(os.path.basename(final))
    os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
    for old in sorted(d for d in os.listdir(out) if d.startswith("step-") and d != os.path.basename(final))[:-1]:
        shutil.rmtree(os.path.join(out, old), ignore_errors=True)  # keep the last two


def amp(dev):
    """bf16 autocast on a GPU (where cast_frozen holds Phi-3's frozen weights in bf16); fp32 on the CPU."""
    return torch.autocast("cuda", torch.bfloat16, enabled=dev != "cpu")


def vit_features(model, frames, dev):
    """Normalised frames (T, 3, S, S) -> frozen ViT patch features (T, P, W) on the CPU (bf16 under CUDA); the
    cache calls it under no_grad."""
    with amp(dev):
        return model.visual(frames.to(dev)).cpu()


def vit_tag(model):
    """Names the feature extractor in the cache key: a hash of the frozen tower's weights."""
    h = hashlib.sha1()
    for k, v in model.visual.state_dict().items():
        h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    return "vit" + h.hexdigest()[:12]


def build_tokenizers(t):
    """nano: a sentencepiece model and a WordPiece vocab trained on the training texts (the world's grammar);
    full: Phi-3's tokenizer.model and bert-base-uncased's vocab.txt."""
    if t.hf_llm:
        return Tokenizer.phi3(t.hf_llm), WordPiece(t.bert_vocab)
    texts = [c["value"].replace("<image>\n", "") for r in read_annotations(t.train_json or os.path.join(t.data, "train.json"))
             for c in r["conversations"]]
    os.makedirs(t.out, exist_ok=True)
    return Tokenizer.nano(texts, os.path.join(t.data, "tokenizer.model")), WordPiece.build(texts, os.path.join(t.out, "vocab.txt"))


def save_tokenizers(tok, wp, out):
    """Beside the checkpoints, so sample.py finds them (a Phi-3 run reads its tokenizer from --hf_llm)."""
    os.makedirs(out, exist_ok=True)
    if tok.proto is not None and tok.vocab_size < 32000:
        with open(os.path.join(out, "tokenizer.model"), "wb") as f:
            f.write(tok.proto)
    with open(os.path.join(out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(w + "\n" for w in sorted(wp.vocab, key=wp.vocab.get)))


class PairDataset:
    """FPO pairs from synth.py: pair i is one sample with two responses to the same video and question, the chosen
    and the rejected one (they share the prompt pass)."""

    def __init__(self, path, tok, q_tokenize, cache, **video):
        pairs = json.load(open(path))
        side = lambda p, s: dict(video=p["video"], duration=p["duration"], task=p.get("task"), time_gt=p[s]["time_gt"],
                                 conversations=[dict(value=p["question"], **{"from": "human"}),
                                                dict(value=p[s]["value"], **{"from": "gpt"})])
        self.chosen, self.rejected = (VideoDataset(path, tok, q_tokenize, cache, records=[side(p, s) for p in pairs],
                                                   exact=True, **video) for s in ("chosen", "rejected"))

    def __len__(self):
        return len(self.chosen)

    def __getitem__(self, i):
        chosen, rejected = self.chosen[i], self.rejected[i]
        return dict(chosen, responses=chosen["responses"] + rejected["responses"])


# ------------------------------------------------------------------------------------------------------- main
def main(argv):
    t, cfg = parse(argv)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(t.seed)
    say = print if rank == 0 else (lambda *a, **k: None)

    # data: the synthetic world (rendered once), tokenizers, datasets
    if t.config == "nano" and not os.path.exists(os.path.join(t.data, "train.json")):
        from nanod2vlm.world import ensure_world
        if rank == 0:
            ensure_world(t.data, n_train=t.world_train, n_test=t.world_test, seed=t.seed)
        if ddp:
            dist.barrier()
    resume_from = None
    if t.resume:
        latest = os.path.join(t.out, "latest")
        if not os.path.exists(latest):
            raise SystemExit(f"--resume: no checkpoint in {t.out} (expected {latest})")
        resume_from = os.path.join(t.out, open(latest).read().strip())
    init = resume_from or t.init
    if init:  # the checkpoint brings its own config, tokenizers and weights
        model, tok, wp, state = load_model(init)
        cfg = model.cfg
    else:
        tok, wp = build_tokenizers(t)
        cfg = replace(cfg, vocab_size=max(cfg.vocab_size, tok.vocab_size) if t.hf_llm else tok.vocab_size,
                      qf_vocab=len(wp.vocab), image_id=tok.image_id, evi_id=tok.evi_id, evi_end_id=tok.evi_end_id,
                      end_id=tok.end_id)
        model = build_d2vlm(cfg, t.hf_llm, t.eva)
    if cfg.lora_r:
        mark_trainable(model, extra=LORA_EXTRA)
    if rank == 0:
        save_tokenizers(tok, wp, t.out)
    cache = FrameCache(os.path.join(t.data, "cache"))
    train_json = t.train_json or os.path.join(t.data, "train.json" if t.stage == "sft" else "fpo_pairs.json")
    video = dict(fps=cfg.fps, size=cfg.img_size, max_frames=cfg.max_frames, alpha=t.soft_alpha or None)
    if t.vit_cache:  # the frozen tower encodes each video once; batches then carry its features (B, T, P, W)
        video.update(encode=lambda x: vit_features(model, x, dev), tag=vit_tag(model))
    if t.stage == "sft":
        records = [ablate(r, cfg) for r in read_annotations(train_json)]
        ds = VideoDataset(train_json, tok, wp.encode, cache, records=records, **video)
    else:
        if not os.path.exists(train_json):
            import synth
            if rank == 0:
                synth.main([os.path.join(t.data, "train.json"), train_json, f"--seed={t.seed}"])
            if ddp:
                dist.barrier()
        ds = PairDataset(train_json, tok, wp.encode, cache, **video)
    model.to(dev)
    if dev != "cpu":  # Phi-3's frozen weights in bf16 (the ViT keeps fp32); everything runs under bf16 autocast there
        cast_frozen(model.llm, torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    groups = [dict(params=rest, lr=t.lr)] + ([dict(params=lora, lr=t.lora_lr)] if lora else [])
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=t.weight_decay, fused=dev != "cpu")
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    step, history = 0, []
    if resume_from:
        step, history = state["step"], state["history"]
        load_optimizer(opt, os.path.join(resume_from, "optim.safetensors"))
        say(f"resumed {resume_from} at step {step}")
    fwd = torch.compile(model, dynamic=True) if t.compile else model
    n_params = sum(p.numel() for p in params)
    say(f"{t.stage} | {t.config}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
        f"({n_params / 1e6:.2f}M trainable) | {len(ds)} samples | {world} process(es) on {dev}")

    # loop
    os.makedirs(t.out, exist_ok=True)
    model.train()
    bar = tqdm(total=t.steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    t0, ntok = time.time(), 0
    while step < t.steps:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_at(step, t)
        logs = {}
        for micro in range(t.grad_accum):
            gidx = (step * t.grad_accum + micro) * world + rank
            idx = batch_indices(gidx, len(ds), t.batch_size, t.seed)
            b = to(collate([ds[i] for i in idx], tok.pad_id), dev)
            with amp(dev):
                out = fwd(b)
                if t.stage == "sft":
                    loss, parts = sft_loss(*out, b, t.w_gnd, t.w_cons, match=cfg.evi_unit == "frame")
                else:
                    loss, parts = fpo_step_loss(*out, b, t.beta, t.w_gnd, t.w_cons)
            (loss / t.grad_accum).backward()
            ntok += int(b["valid"].sum() + b["resp_valid"].sum()) * world
            for k, v in dict(loss=loss.item(), **parts).items():
                logs[k] = logs.get(k, 0.0) + v / t.grad_accum
        if ddp:  # average gradients and logged losses over processes: what DistributedDataParallel does
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            vals = torch.tensor(list(logs.values()))
            dist.all_reduce(vals)
            logs = dict(zip(logs, (vals / world).tolist()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append(dict(step=step, **logs))
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=f"{ntok / (time.time() - t0):.0f}")
        if rank == 0 and (step % t.ckpt_every == 0 or step == t.steps):
            save_checkpoint(t.out, step, model, opt, t, history)
    bar.close()
    if ddp:
        dist.barrier()
    if rank == 0:
        plot_losses(history, os.path.join(t.out, "loss.png"))
        say(f"checkpoint: {t.out}/{open(os.path.join(t.out, 'latest')).read().strip()} | loss curve: {t.out}/loss.png")
        eval_json = t.eval_json or os.path.join(t.data, "test.json")
        if eval_json != "none":
            with amp(dev):
                metrics = evaluate(model.eval(), tok, wp, eval_json, cache, predictions_path(t.out, eval_json))
            print_metrics(metrics)
            with open(os.path.join(t.out, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
    if ddp:
        dist.destroy_process_group()


def load_optimizer(opt, path):
    """AdamW's state ({i}.step, {i}.exp_avg, ...), checked against the parameters' shapes: a corrupt or foreign
    file fails here, naming itself, rather than inside the first opt.step()."""
    from safetensors.torch import load_file
    try:
        flat = load_file(path)
    except Exception as e:  # safetensors raises its own error type on a corrupt file
        raise CheckpointError(f"{path}: not a readable optimizer state ({e})") from None
    params = [p for g in opt.param_groups for p in g["params"]]
    sd, bad = opt.state_dict(), []
    for key, v in flat.items():
        i, name = key.split(".", 1)
        want = () if name == "step" else tuple(params[int(i)].shape) if int(i) < len(params) else "no parameter"
        if tuple(v.shape) != want:
            bad.append(f"{key} (checkpoint {tuple(v.shape)}, model {want})")
        sd["state"].setdefault(int(i), {})[name] = v
    if bad:
        raise CheckpointError(f"{path} does not fit the model: {len(bad)} shape mismatches: " + ", ".join(bad[:8]))
    opt.load_state_dict(sd)


def plot_losses(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in history[0] if k != "step"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot([h["step"] for h in history], [h[k] for h in history], label=k, lw=1)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training losses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except CheckpointError as e:  # a bad --init / --resume checkpoint: which file and why, not a traceback
        sys.exit(f"error: {e}")
