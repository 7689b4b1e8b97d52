"""Benchmarks behind the README's speed figures, each measured side by side in one run: `python -m nanod2vlm.bench`.

cpu    a tiny Phi-3, same config and same weights, ours vs transformers + peft: LoRA training step and KV-cached
       greedy generation, tokens/s and the ratios.
evi    the <evi> work of one generated <evi> token vs one full-width decoder step (paper App. C.3: 1.4%).
video  read_video at 1 fps vs decoding every frame of a 60 s 30 fps clip.
gpu    (--gpu, needs CUDA) full-config D2VLM SFT step, bf16, torch.compile: time, MFU, peak memory; and its Phi-3
       part, ours vs transformers + peft.
Every figure is the median over --steps repeats after warm-up; ours and theirs alternate, so the load of a shared
machine falls on both alike.
"""
import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import av
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from nanod2vlm.checkpoint import load_phi3
from nanod2vlm.data import collate, read_video
from nanod2vlm.loss import L_gnd, L_sft, evi_valid
from nanod2vlm.model import CONFIGS, D2VLM, Block, Cache, Config, add_lora, build_mask, cast_frozen, \
    head, mark_trainable, rope_cos_sin, span_of

ROWS = []  # (name, value, unit, target, PASS/FAIL or "")


def lm_loss(llm, x, pos, mask, ids):
    """Next-token loss of a Phi-3 forward, as transformers computes it with labels=ids."""
    return L_sft(llm.lm_head(llm(x, pos, mask)[0])[:, :-1], ids[:, 1:])


def row(name, value, unit="", target=None, ok=None):
    ROWS.append((name, value, unit, target or "", "" if ok is None else ("PASS" if ok else "FAIL")))
    print(f"  {name:<44} {value:>12.4g} {unit}", flush=True)


def side_by_side(fns, steps, warmup=2, sync=lambda: None):
    """Median seconds of each fn over `steps` rounds; each round runs every fn once, in turn."""
    def clock(f):
        sync()
        t = time.perf_counter()
        f()
        sync()
        return time.perf_counter() - t
    for _ in range(warmup):
        [f() for f in fns]
    rounds = [[clock(f) for f in fns] for _ in range(steps)]
    return [statistics.median(r) for r in zip(*rounds)]


def hf_phi3(cfg, attn="sdpa"):
    import transformers
    transformers.utils.logging.disable_progress_bar()
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, intermediate_size=cfg.n_mlp,
        num_attention_heads=cfg.n_head, max_position_embeddings=cfg.max_pos, rms_norm_eps=cfg.rms_eps,
        rope_scaling=None, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=attn))


def lora_pair(hf, ours, cfg):
    """LoRA on the same targets with the same r, alpha, dropout in both; AdamW on the trainable parameters."""
    import peft
    lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=list(cfg.lora_targets))
    theirs = peft.get_peft_model(hf, lora)
    mark_trainable(add_lora(ours, cfg))
    opt = lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    return theirs.train(), ours.train(), opt(theirs), opt(ours)


def step_fn(opt, loss):
    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
    return step


def bench_cpu(args):
    if args.tiny:
        cfg, B, L, P, N = Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_mlp=128, max_pos=256), 2, 32, 8, 8
    else:
        cfg = Config(vocab_size=1024, n_embd=256, n_layer=4, n_head=8, n_mlp=688, max_pos=1024)
        B, L, P, N = 4, 256, 32, 128
    cfg = replace(cfg, lora_r=8, lora_alpha=16.0)
    print(f"cpu: Phi-3 C={cfg.n_embd} layers={cfg.n_layer} heads={cfg.n_head} mlp={cfg.n_mlp} vocab={cfg.vocab_size} "
          f"fp32, {torch.get_num_threads()} threads; train B={B} L={L}; generate prompt {P} + {N} new tokens, B=1")
    torch.manual_seed(0)
    hf = hf_phi3(cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_phi3(d, cfg)
    hf.eval(), ours.eval()
    prompt = torch.randint(3, cfg.vocab_size, (1, P))
    gen_ours = lambda: ours.generate(ours.model.embed_tokens(prompt), N)
    gen_hf = lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=N,
                                 min_new_tokens=N, pad_token_id=0)[0, P:].tolist()
    same = gen_ours() == gen_hf()
    row("generate: same greedy ids (1 = yes)", float(same), "", "1", same)
    t_ours, t_hf = side_by_side([gen_ours, gen_hf], args.steps)
    row("generate tokens/s, ours", N / t_ours, "tok/s")
    row("generate tokens/s, transformers", N / t_hf, "tok/s")
    row("generate speed-up, ours / transformers", t_hf / t_ours, "x", ">= 1.5", t_hf / t_ours >= 1.5)

    theirs, ours, opt_theirs, opt_ours = lora_pair(hf, ours, cfg)
    ids, pos = torch.randint(3, cfg.vocab_size, (B, L)), torch.arange(L).expand(B, L)
    mask = build_mask(torch.ones(B, L, dtype=torch.bool))
    loss_ours = lambda: lm_loss(ours, ours.model.embed_tokens(ids), pos, mask, ids)
    loss_theirs = lambda: theirs(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        diff = (loss_ours() - loss_theirs()).abs().item()
    row("train: |loss ours - loss transformers|", diff, "", "< 1e-4", diff < 1e-4)
    t_ours, t_hf = side_by_side([step_fn(opt_ours, loss_ours), step_fn(opt_theirs, loss_theirs)], args.steps)
    row("train step tokens/s, ours", B * L / t_ours, "tok/s")
    row("train step tokens/s, transformers + peft", B * L / t_hf, "tok/s")
    row("train speed-up, ours / transformers + peft", t_hf / t_ours, "x", ">= 1.3", t_hf / t_ours >= 1.3)


@torch.no_grad()
def bench_evi(args):
    """One full-width decoder layer's decode step (1 new token over a ctx-position KV cache), times n_layer, plus
    lm_head: the network forward of one token. Against it, what an <evi> token adds
    (D2VLM.generate): evi_head on one hidden state, sim against the cached frm_head outputs, sigmoid, span_of,
    the mean of the chosen frames. frm_head itself runs once per video, at prefill: reported on its own."""
    tiny = (Config(n_embd=64, n_head=4, n_mlp=128, n_layer=2), 8, 32)
    cfg, T, ctx = tiny if args.tiny else (CONFIGS["full"], 350, 2048)
    C, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    print(f"evi: C={C} heads={cfg.n_head} mlp={cfg.n_mlp} vocab={cfg.vocab_size}, {T} frames, KV cache {ctx}, fp32; "
          f"decoder step = {cfg.n_layer} x one layer + lm_head")
    block, lm_head, evi_head, frm_head = Block(cfg), torch.nn.Linear(C, cfg.vocab_size, bias=False), head(C), head(C)
    kv = {0: (torch.randn(1, cfg.n_head, ctx, hd), torch.randn(1, cfg.n_head, ctx, hd))}  # ctx cached keys, values
    x, mask = torch.randn(1, 1, C), torch.ones(1, 1, 1, ctx + 1, dtype=torch.bool)
    h_frames, F_V = torch.randn(T, C), torch.randn(T, C)
    f_frm = frm_head(h_frames)

    def evi():
        sim = (f_frm @ evi_head(x[0, -1])).float() / math.sqrt(C)
        s, t = span_of(torch.sigmoid(sim), cfg.evi_threshold)
        return F_V[s:t + 1].mean(0)
    layer = lambda: block(x, *rope_cos_sin(torch.tensor([[ctx]]), hd, cfg.rope_theta, x.dtype), mask, Cache(kv=kv), 0)
    fns = [layer, lambda: lm_head(x), evi, lambda: frm_head(h_frames)]
    t_layer, t_head, t_evi, t_frm = side_by_side(fns, args.steps)
    t_step = cfg.n_layer * t_layer + t_head
    row("decoder forward per token (ms)", 1e3 * t_step, "ms")
    row("<evi> work per <evi> token (ms)", 1e3 * t_evi, "ms")
    row("<evi> share of a decode step (%)", 100 * t_evi / t_step, "%", "<= 1.4", t_evi / t_step <= 0.014)
    row(f"frm_head over {T} frames, once per video (ms)", 1e3 * t_frm, "ms")


def bench_video(args):
    seconds, fps, S = (3, 30, 224) if args.tiny else (60, 30, 224)
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/clip.mp4"
        with av.open(path, "w") as c:  # moving gradients, libx264 defaults
            s = c.add_stream("libx264", rate=fps)
            s.width, s.height, s.pix_fmt = S, S, "yuv420p"
            y, x = np.mgrid[:S, :S]
            for i in range(seconds * fps):
                img = np.stack([(x + 4 * i) % 256, (y + 2 * i) % 256, ((x + y) // 2 + 3 * i) % 256], -1)
                c.mux(s.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")))
            c.mux(s.encode())

        def every_frame():
            with av.open(path) as c:
                c.streams.video[0].thread_type = "AUTO"
                return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
        print(f"video: {seconds} s, {fps} fps, {S}x{S} libx264 clip; read_video(fps=1, size={S}) vs every frame")
        t_read, t_all = side_by_side([lambda: read_video(path, fps=1, size=S), every_frame], args.steps, warmup=1)
    row("read_video at 1 fps: video s per wall s", seconds / t_read, "x")
    row("decode every frame: video s per wall s", seconds / t_all, "x")
    row("read_video speed-up over every frame", t_all / t_read, "x")


def count_flops(fn):
    """FLOPs of one call of fn as PyTorch's counter sees them: matmuls, convolutions and, on CUDA, attention
    (over the whole masked square). The optimizer's element-wise work counts nothing."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_gpu(args, dev="cuda"):
    """Full-config SFT step in bf16 with torch.compile, training what train.py trains (is_adapter): `T` cached
    ViT features through the compressor, T frame tokens + `L` text tokens through Phi-3, the <evi> heads,
    L_sft + L_gnd. Timed alone, so its peak memory is its own. Then the Phi-3 part of that step (LoRA only,
    inputs_embeds, the same 4-D frame mask), ours vs transformers + peft side by side: transformers has no D2VLM.
    MFU = the FLOPs of one eager step (count_flops) / step time / 989 TFLOP/s (H100 SXM dense bf16)."""
    cfg, T, L = (Config(lora_r=4, lora_alpha=8.0), 8, 24) if args.tiny else (CONFIGS["full"], 350, 2048)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(0)
    with torch.device(dev):  # as train.py: trained parameters fp32, Phi-3's frozen ones bf16, bf16 autocast
        model = D2VLM(cfg)
    add_lora(model.llm, cfg)
    mark_trainable(model)
    cast_frozen(model.llm, torch.bfloat16)
    amp = lambda: torch.autocast(dev, torch.bfloat16)
    n, P, E = T + L, (cfg.img_size // cfg.patch) ** 2, 4  # E <evi> tokens in the response
    prompt = torch.randint(10, cfg.vocab_size, (T + 16,))
    prompt[8:8 + T] = cfg.image_id
    resp = torch.randint(10, cfg.vocab_size, (L - 16,))
    evi_pos = torch.arange(E) * ((L - 16) // E)
    resp[evi_pos] = cfg.evi_id
    span = torch.tensor([[T // 4, T // 2]] * E)
    sample = dict(ids=prompt, frames=torch.randn(T, P, cfg.vit_width, dtype=torch.bfloat16), times=torch.arange(T * 1.0),
                  q_ids=torch.randint(1, 100, (16,)), src_pos=torch.zeros(0, dtype=torch.long), src_span=torch.zeros(0, 2),
                  responses=[dict(resp=resp, evi_pos=evi_pos, evi_stage=torch.tensor([1, 1, 2, 2]),
                                  evi_k=torch.tensor([0, 1, 0, 1]), evi_span=span, evi_y=torch.rand(E, T))], meta={})
    b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in collate([sample], 0).items()}  # cached ViT features

    def loss_model():
        with amp():
            logits, sim, _ = model(b)
            return L_sft(logits, b["labels"]) + L_gnd(sim, b["evi_y"], evi_valid(b), b["evi_b"])
    step_model = step_fn(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), loss_model)
    flops = count_flops(step_model)
    if dev == "cuda":
        model.compile()
        torch.cuda.reset_peak_memory_stats()
    (t_model,) = side_by_side([step_model], args.steps, warmup=3, sync=sync)
    peak = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else 0.0
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"gpu: {torch.cuda.get_device_name() if dev == 'cuda' else dev}, {T} frames + {L} tokens, bf16, LoRA "
          f"r={cfg.lora_r}, {n_train / 1e6:.0f}M trained, {flops / 1e12:.2f} TFLOP/step")
    row("gpu D2VLM SFT step time (ms)", 1e3 * t_model, "ms")
    row("gpu D2VLM SFT step tokens/s", n / t_model, "tok/s")
    mfu = 100 * flops / t_model / 989e12
    row("gpu D2VLM SFT MFU (% of 989 TFLOP/s)", mfu, "%", ">= 45", mfu >= 45)
    row("gpu D2VLM SFT peak memory (GB)", peak, "GB", "<= 40", peak <= 40)

    with torch.device(dev):  # the Phi-3 part: same weights in transformers, LoRA only on both sides
        hf = hf_phi3(cfg).to(torch.bfloat16)
    hf.load_state_dict({k: v for k, v in model.llm.state_dict().items() if "lora_" not in k})
    theirs, ours, opt_theirs, opt_ours = lora_pair(hf, model.llm, cfg)
    cast_frozen(ours, torch.bfloat16)  # now also the embeddings and lm_head, frozen as in peft
    if dev == "cuda":
        ours.compile(), theirs.compile()
    ids = torch.cat([b["ids"], b["resp"]], 1)
    valid, frm = torch.ones_like(ids, dtype=torch.bool), ids == cfg.image_id
    x, mask = torch.randn(1, n, cfg.n_embd, device=dev, dtype=torch.bfloat16), build_mask(valid, frm)
    pos = torch.arange(n, device=dev)[None]

    def loss_ours():
        with amp():
            return lm_loss(ours, x, pos, mask, ids)

    def loss_theirs():
        with amp():
            return theirs(inputs_embeds=x, attention_mask=mask, labels=ids).loss
    t_ours, t_hf = side_by_side([step_fn(opt_ours, loss_ours), step_fn(opt_theirs, loss_theirs)], args.steps,
                                warmup=3, sync=sync)
    row("gpu Phi-3 LoRA step time, ours (ms)", 1e3 * t_ours, "ms")
    row("gpu Phi-3 LoRA step time, transformers + peft (ms)", 1e3 * t_hf, "ms")
    row("gpu Phi-3 LoRA speed-up, ours / transformers + peft", t_hf / t_ours, "x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["cpu", "evi", "video", "gpu"], help="run one part (default: cpu, evi, video)")
    p.add_argument("--gpu", action="store_true", help="also run the CUDA part")
    p.add_argument("--steps", type=int, default=7, help="timed repeats per figure (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, the same for ours and theirs (on a "
                   "shared 2-core machine 2 threads oversubscribe: an 8x slower, noisy step)")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds; the figures mean nothing)")
    p.add_argument("--json", help="also write the table to this path")
    args = p.parse_args(argv)
    parts = [args.only] if args.only else ["cpu", "evi", "video"] + ["gpu"] * args.gpu
    if "gpu" in parts and not torch.cuda.is_available():
        sys.exit("nanod2vlm.bench: the gpu part needs a CUDA GPU (MFU is against an H100's 989 TFLOP/s bf16); "
                 "none here: run without --gpu / --only gpu")
    torch.set_num_threads(args.threads)
    ROWS.clear()
    for part in parts:
        globals()[f"bench_{part}"](args)
    print(f"\n{'figure':<48} {'value':>12} {'unit':<6} {'target':<8} result")
    for name, value, unit, target, ok in ROWS:
        print(f"{name:<48} {value:>12.4g} {unit:<6} {target:<8} {ok}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(zip(("name", "value", "unit", "target", "result"), r)) for r in ROWS], f, indent=1)
    return ROWS


if __name__ == "__main__":
    main()
