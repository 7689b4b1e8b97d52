"""nanod2vlm: the whole D²VLM model in one file.

Read top-down: config, primitives (RMSNorm, RoPE, attention, LoRA), the EVA-CLIP vision tower,
the Q-Former frame compressor, the Phi-3 decoder, then the D²VLM model that owns the <evi> mechanism.
Loading and saving it: nanod2vlm/checkpoint.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class Config:
    # Phi-3 decoder. Defaults are the nano model: a few million parameters that train on a CPU.
    vocab_size: int = 512
    n_embd: int = 128          # hidden_size
    n_layer: int = 4
    n_head: int = 4
    n_mlp: int = 384           # intermediate_size (gate_up_proj stores 2 * n_mlp rows)
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_pos: int = 4096
    # EVA-CLIP ViT vision tower (frozen)
    img_size: int = 32
    patch: int = 8
    vit_width: int = 64
    vit_layers: int = 2        # blocks kept: the full checkpoint has 40, D²VLM uses the first 39
    vit_heads: int = 4
    vit_mlp: int = 256
    # Q-Former frame compressor: one token per frame
    qf_width: int = 64
    qf_layers: int = 2
    qf_heads: int = 4
    qf_mlp: int = 256
    qf_queries: int = 4
    qf_cross_every: int = 2
    qf_vocab: int = 512        # WordPiece vocabulary of the question text fed to the Q-Former
    qf_max_pos: int = 512
    qf_dropout: float = 0.0    # BERT's dropout while training (released: bert-base-uncased's 0.1; nano: README)
    # LoRA on the decoder (r = 0: no LoRA, every weight trains, as the nano model does from scratch)
    lora_r: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    lora_targets: tuple = ("qkv_proj", "o_proj")
    # <evi> mechanism
    # Layers are numbered as HF's hidden_states: 0 = the input embeddings, i = the output of block i, -2 = the block
    # before the last (the paper names neither layer; these are the released code's).
    evi_layer: int = -2        # the states evi_head and frm_head read (released: hidden_states[-2])
    capture_layer: int = 1     # visual semantic capture pools these frame states, F~_V (released: 6 of 32; nano: README)
    evi_threshold: float = 0.6 # inference: salient frames have sigmoid(sim) >= 0.6 * max
    evi_capture: bool = True   # visual semantic capture: <evi> input += mean of its frames (Tab. 6 ablation: off)
    evi_unit: str = "event"    # "frame": an <evi> per boundary frame, as earlier grounding tokens (Tab. 6 ablation)
    interleave: bool = True    # False: the answer gives text timestamps instead of <evi> references (Tab. 4 ablation)
    # special token ids, set from the tokenizer when the model is built (saved with every checkpoint)
    image_id: int = 3
    evi_id: int = 4
    evi_end_id: int = 5
    end_id: int = 6
    # video
    fps: float = 1.0
    max_frames: int = 350


CONFIGS = {"nano": Config(),
           "full": Config(vocab_size=32064, n_embd=3072, n_layer=32, n_head=32, n_mlp=8192,
                          img_size=224, patch=14, vit_width=1408, vit_layers=39, vit_heads=16, vit_mlp=6144,
                          qf_width=768, qf_layers=12, qf_heads=12, qf_mlp=3072, qf_queries=32, qf_vocab=30523,
                          qf_dropout=0.1, lora_r=128, lora_alpha=256.0, lora_dropout=0.05, capture_layer=6)}


# ---------------------------------------------------------------------------------------------------------
# Primitives

class RMSNorm(nn.Module):
    """Phi-3 RMSNorm: normalise in fp32, cast back, then scale (the same order as HF, so bf16 matches)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(pos, head_dim, theta, dtype):
    """RoPE tables for explicit positions pos (B, L) -> cos, sin (B, 1, L, head_dim), built in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float) / head_dim)
    freqs = pos[:, None, :, None].float() * inv_freq  # (B, 1, L, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate (B, nh, L, hd) with the HF "rotate_half" convention: dimension i pairs with i + hd/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def take(x, rows):
    """x[rows] along the first dim. An index tensor goes through index_select, whose backward adds repeated rows in
    a fixed order; indexing's backward adds them in parallel in any order (a run would not repeat bit for bit)."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def rows_at(x, at):
    """x (B, L, ...) at positions at (B, n) -> (B, n, ...)."""
    return x[torch.arange(len(at), device=at.device)[:, None], at]


def attend(q, k, v, n_head, mask=None, dropout=0.0):
    """Multi-head attention of q (B, Lq, C) over k, v (B, Lk, C'), heads split off the channels -> (B, Lq, C);
    dropout on the attention probabilities."""
    q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=n_head) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return rearrange(y, "b h l d -> b l (h d)")


class Attention(nn.Module):
    """Phi-3's multi-head self-attention with a fused qkv_proj (rows: all q heads, then k, then v), no biases."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv_proj = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, at=None):
        """x (B, L, C) -> (B, L, C), or with `at` (B, n) only at those positions (B, n, C)."""
        q, k, v = rearrange(self.qkv_proj(x), "b l (three h d) -> three b h l d", three=3, h=self.n_head)
        q, k = (apply_rope(t, cos, sin) for t in (q, k))
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, Lk, hd): all cached keys plus the new ones
        if at is not None:  # queries only at positions at (B, n); keys and values stay at every position
            q = rows_at(q.transpose(1, 2), at).transpose(1, 2)
            mask = mask if mask is None else rows_at(mask.transpose(1, 2), at).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(rearrange(y, "b h l d -> b l (h d)"))


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A dropout(x), on a bias-free nn.Linear (Phi-3 has no biases). Owns the wrapped
    `weight`, so `...qkv_proj.weight` still loads; B starts at zero, so a fresh adapter leaves the model unchanged."""

    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        self.weight = base.weight  # (out, in), the same Parameter
        self.lora_A = nn.Parameter(base.weight.new_empty(r, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as in peft
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged(self):
        """W + (alpha / r) B A: the plain weight this layer computes with (an export writes it)."""
        return self.weight + self.scale * (self.lora_B @ self.lora_A)


def add_lora(model, cfg):
    """Wrap every nn.Linear whose name ends in one of cfg.lora_targets with a LoRALinear (in place)."""
    for name, m in list(model.named_modules()):  # a list: the loop replaces modules
        if isinstance(m, nn.Linear) and name.endswith(tuple(cfg.lora_targets)):
            model.set_submodule(name, LoRALinear(m, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout))
    return model


# What trains when a pretrained LLM is adapted, as in the released D²VLM: LoRA, the embedding and output layers (the
# new <evi>, </evi> rows start untrained), both <evi> heads, the compressor's own layers and its BERT self- and
# cross-attention; the ViT, the decoder's weights, the BERT embeddings and FFNs stay frozen. Module names.
ADAPTER = {"lora_A", "lora_B", "embed_tokens", "lm_head", "evi_head", "frm_head", "qformer_query", "qformer_ln",
           "qformer_proj", "qformer_q_proj", "qformer_k_proj", "qformer_v_proj", "attention", "crossattention"}


def is_adapter(name):
    """A parameter that trains when LoRA is on (one of ADAPTER is in its path): what an adapter file holds."""
    return not ADAPTER.isdisjoint(name.split("."))


def mark_trainable(model):
    """Freeze everything but the adapter (is_adapter)."""
    for name, p in model.named_parameters():
        p.requires_grad = is_adapter(name)


def cast_frozen(model, dtype):
    """Frozen parameters to dtype (on a GPU: bf16, the autocast dtype: half their memory, and no bf16 copy of each
    frozen weight kept for the backward pass); trained ones stay fp32 for AdamW. Run it under autocast."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


# ---------------------------------------------------------------------------------------------------------
# EVA-CLIP ViT-G/14 (frozen). Parameter names equal timm's `Eva` keys, which are also the LAVIS/BLIP-2
# `eva_vit_g` keys (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.q_bias,attn.v_bias,
# attn.proj,norm2,mlp.fc1,mlp.fc2}): both checkpoints load without renaming.

class EVAAttention(nn.Module):
    """Self-attention with a fused qkv weight and separate q and v biases (EVA has no k bias)."""

    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, -1)
        return self.proj(attend(q, k, v, self.n_head))


class EVABlock(nn.Module):
    """Pre-LN transformer block (LayerNorm eps 1e-6, GELU MLP, no layer scale)."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.vit_width
        self.norm1 = nn.LayerNorm(C, eps=1e-6)
        self.attn = EVAAttention(C, cfg.vit_heads)
        self.norm2 = nn.LayerNorm(C, eps=1e-6)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(C, cfg.vit_mlp), fc2=nn.Linear(cfg.vit_mlp, C)))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class EVAViT(nn.Module):
    """EVA-CLIP ViT-G/14 cut after cfg.vit_layers blocks (D²VLM: 39 of 40), no final norm, CLS dropped."""

    def __init__(self, cfg):
        super().__init__()
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, cfg.vit_width, cfg.patch, stride=cfg.patch)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vit_width))
        # one position per patch, and the CLS token's
        self.pos_embed = nn.Parameter(torch.randn(1, (cfg.img_size // cfg.patch) ** 2 + 1, cfg.vit_width) * 0.02)
        self.blocks = nn.Sequential(*(EVABlock(cfg) for _ in range(cfg.vit_layers)))

    def forward(self, images):  # (N, 3, S, S) CLIP-normalised
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (N, n_patches, C)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        return self.blocks(x)[:, 1:]  # (N, n_patches, C): patch tokens of the last kept block


# ---------------------------------------------------------------------------------------------------------
# Q-Former frame compressor (E.T. Chat). The BERT part's keys equal HF `InstructBlipQFormerModel`; the official
# checkpoint's LAVIS names map onto them in nanod2vlm/checkpoint.py (etchat_rename).

def _dense(n_in, n_out, ln=False):
    """BERT's `{dense}` or post-LN `{dense, LayerNorm}` sub-module (eps 1e-12), named as in the checkpoints."""
    m = nn.ModuleDict(dict(dense=nn.Linear(n_in, n_out)))
    if ln:
        m["LayerNorm"] = nn.LayerNorm(n_out, eps=1e-12)
    return m


class BertAttention(nn.Module):
    """Post-LN multi-head attention of x over kv: LN(x + dropout(dense(attn(x, kv)))), the attention probabilities
    dropped out too (while training)."""

    def __init__(self, cfg, kv_width):
        super().__init__()
        W = cfg.qf_width
        self.n_head = cfg.qf_heads
        self.attention = nn.ModuleDict(dict(query=nn.Linear(W, W), key=nn.Linear(kv_width, W),
                                            value=nn.Linear(kv_width, W)))
        self.output = _dense(W, W, ln=True)
        self.p = cfg.qf_dropout

    def forward(self, x, kv, mask=None):
        a = self.attention
        y = attend(a.query(x), a.key(kv), a.value(kv), self.n_head, mask, self.p if self.training else 0.0)
        return self.output.LayerNorm(x + F.dropout(self.output.dense(y), self.p, self.training))


def _ffn(x, intermediate, output, p, training):
    """BERT's FFN, post-LN: LN(x + dropout(dense(gelu(dense(x)))))."""
    return output.LayerNorm(x + F.dropout(output.dense(F.gelu(intermediate.dense(x))), p, training))


class QFormerLayer(nn.Module):
    """Queries and question text attend to each other; only the queries cross-attend to the image, and queries
    and text have separate FFNs (`*_query` for the queries)."""

    def __init__(self, cfg, cross):
        super().__init__()
        W, M = cfg.qf_width, cfg.qf_mlp
        self.attention = BertAttention(cfg, W)
        self.crossattention = BertAttention(cfg, cfg.vit_width) if cross else None
        self.intermediate, self.output = _dense(W, M), _dense(M, W, ln=True)
        self.intermediate_query, self.output_query = _dense(W, M), _dense(M, W, ln=True)
        self.p = cfg.qf_dropout

    def forward(self, x, n_query, mask, img, rows=slice(None), queries_only=False):
        # queries_only (the Q-Former's last layer, whose text outputs nothing reads): only the queries' rows are
        # computed. rows (the first layer): x holds one row per question, and image i is question rows[i]'s.
        # Both give the same values in less time.
        x = self.attention(x[:, :n_query] if queries_only else x, x, mask)
        q, t = x[:, :n_query], _ffn(x[:, n_query:], self.intermediate, self.output, self.p, self.training)
        q, t = take(q, rows), take(t, rows)  # from here on, one row per image
        if self.crossattention is not None:
            q = self.crossattention(q, img)
        q = _ffn(q, self.intermediate_query, self.output_query, self.p, self.training)
        return torch.cat([q, t], 1)


class QFormer(nn.Module):
    """InstructBLIP's BERT Q-Former (cross-attention in layers 0, qf_cross_every, ...); returns the query outputs."""

    def __init__(self, cfg):
        super().__init__()
        W = cfg.qf_width
        self.embeddings = nn.ModuleDict(dict(word_embeddings=nn.Embedding(cfg.qf_vocab, W),
                                             position_embeddings=nn.Embedding(cfg.qf_max_pos, W),
                                             layernorm=nn.LayerNorm(W, eps=1e-12)))
        self.p = cfg.qf_dropout
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(
            QFormerLayer(cfg, i % cfg.qf_cross_every == 0) for i in range(cfg.qf_layers))))

    def forward(self, query, q_ids, q_valid, img, rows=slice(None)):
        """query (B, Q, W), question q_ids, q_valid (B, Lq), img (N, P, V): image i is asked question rows[i]
        (default: question i). Returns the query outputs of each image (N, Q, W)."""
        e = self.embeddings
        n_query = query.size(1)
        text = e.word_embeddings(q_ids) + e.position_embeddings(torch.arange(q_ids.size(1), device=q_ids.device))
        x = e.layernorm(torch.cat([query, text], 1))  # queries carry no position embedding
        x = F.dropout(x, self.p, self.training)
        mask = torch.cat([q_valid.new_ones(len(q_valid), n_query), q_valid], 1)[:, None, None, :]  # pad keys off
        # Only queries cross-attend to the image, after the self-attention: the first layer's self-attention and
        # text FFN see the question and the learned queries alone, so they run once per question, not per image.
        # (Training with dropout, a question's frames then share its dropout there; the released code draws it per
        # frame.)
        x = self.encoder.layer[0](x, n_query, mask, img, rows, queries_only=len(self.encoder.layer) == 1)
        for i, layer in enumerate(self.encoder.layer[1:], 1):
            x = layer(x, n_query, mask[rows], img, queries_only=i == len(self.encoder.layer) - 1)
        return x  # (N, n_query, W)


class FrameCompressor(nn.Module):
    """Instruction-aware compressor: the patches of one frame plus the question -> one LLM token."""

    def __init__(self, cfg):
        super().__init__()
        V = cfg.vit_width
        self.qformer_bert = QFormer(cfg)
        self.qformer_query = nn.Parameter(torch.randn(1, cfg.qf_queries, cfg.qf_width) * 0.02)
        self.qformer_ln = nn.LayerNorm(V)
        self.qformer_proj = nn.Linear(cfg.qf_width, V)
        self.qformer_q_proj = nn.Sequential(nn.LayerNorm(V), nn.Linear(V, V))
        self.qformer_k_proj = nn.Sequential(nn.LayerNorm(V), nn.Linear(V, V))
        # official code: `v_proj` is not a value projection but the output LN + Linear(vit_width -> n_embd)
        self.qformer_v_proj = nn.Sequential(nn.LayerNorm(V), nn.Linear(V, cfg.n_embd))

    def forward(self, patches, q_ids, q_valid, rows=slice(None)):  # (N, P, V), (B, Lq), (B, Lq); frame i asks rows[i]
        query = self.qformer_query.expand(len(q_ids), -1, -1)
        query = self.qformer_proj(self.qformer_bert(query, q_ids, q_valid, self.qformer_ln(patches), rows))  # (N, Q, V)
        att = self.qformer_q_proj(query) @ self.qformer_k_proj(patches).transpose(1, 2)  # (N, Q, P)
        att = (att / patches.size(-1) ** 0.5).softmax(-1)
        # (N, V): the raw patches pooled by the queries, plus the queries; v_proj takes it to (N, n_embd)
        return self.qformer_v_proj((att @ patches + query).mean(1))


# ---------------------------------------------------------------------------------------------------------
# The Phi-3 decoder

def build_mask(valid, frm=None):
    """Attention mask (B, 1, L, L), True = may attend. valid (B, L) bool: not padding; frm (B, L) bool: frame
    positions. Rule: (causal OR (frm_i AND frm_j)) AND valid_j: frame tokens see each other both ways (as released,
    `bi_attention`), everything else is causal. Each row also sees itself, so padding rows never give NaN.
    A pass over the last n positions, with the ones before it cached, takes the last n rows."""
    t = torch.arange(valid.shape[1], device=valid.device)
    mask = (t[None, :] <= t[:, None])[None]  # causal (1, L, L)
    if frm is not None:
        mask = mask | (frm[:, :, None] & frm[:, None, :])
    mask = (mask & valid[:, None, :]) | torch.eye(len(t), dtype=torch.bool, device=valid.device)
    return mask[:, None]


class Cache:
    """Each layer's keys and values so far, (B, nh, L, hd). A pass attends over them and its own, and appends its
    own: generation's prefill stores the prompt's, each decode step appends one token's; training's prompt pass
    stores the prompt's, in the autograd graph, and the response pass attends over them (the prompt's gradients
    flow back through them). `rows` picks, for each sequence of the later pass, the cached one it continues (FPO:
    a chosen and a rejected response share one prompt pass). `kv`: what it starts with (bench.py times one decode
    step over a given cache)."""

    def __init__(self, rows=slice(None), kv=()):
        self.kv = dict(kv)  # layer -> (keys, values)
        self.rows = rows

    def update(self, layer, k, v):
        """Append the new keys/values (B, nh, L, hd) of `layer`; return all of them."""
        if layer in self.kv:
            k, v = (torch.cat([take(old, self.rows), new], 2) for old, new in zip(self.kv[layer], (k, v)))
        self.kv[layer] = (k, v)
        return k, v


class Block(nn.Module):
    """Pre-norm decoder block: attention, then a SiLU-gated MLP whose gate and up projections the checkpoint stores
    fused in one matrix, gate rows first."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.mlp = nn.ModuleDict(dict(gate_up_proj=nn.Linear(cfg.n_embd, 2 * cfg.n_mlp, bias=False),
                                      down_proj=nn.Linear(cfg.n_mlp, cfg.n_embd, bias=False)))

    def forward(self, x, cos, sin, mask, cache=None, layer=0, at=None):
        """-> the block's output (B, L, C); given `at` (B, n), only there (B, n, C), while its keys and values are
        still computed (and cached) at all L positions."""
        y = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, at)
        x = (x if at is None else rows_at(x, at)) + y
        gate, up = self.mlp.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.mlp.down_proj(up * F.silu(gate))


class Phi3(nn.Module):
    """Phi-3-mini; state_dict() keys equal HF Phi3ForCausalLM's, so checkpoints load without a mapping."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(dict(embed_tokens=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                                        layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                                        norm=RMSNorm(cfg.n_embd, cfg.rms_eps)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, x, pos, mask, cache=None, keep=(), at=None):
        """x (B, L, C) input embeddings (the caller embeds ids and may edit them); pos (B, L) long RoPE
        positions; mask (B, 1, L, Lk) bool (see build_mask), or None to let every query see every key (a decode
        step over an unpadded cache: no mask to build, and the faster SDPA path); cache: a Cache or None. Returns
        the final-norm output (B, L, C) (logits = lm_head of it, where they are needed) and the hidden states named
        by `keep`, numbered as HF's hidden_states (0: the input, i: the output of block i, -1: of the last).
        at (B, n): return the output (B, n, C) only at these positions; unless `keep` holds the last block's states,
        that block computes only there (its keys and values still at every position, for a later pass)."""
        cos, sin = rope_cos_sin(pos, self.cfg.n_embd // self.cfg.n_head, self.cfg.rope_theta, x.dtype)
        n_layer = self.cfg.n_layer
        cut = at is not None and n_layer not in [i % (n_layer + 1) for i in keep]  # a kept last block needs all rows
        hs = [x]
        for layer, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, cache, layer, at if cut and layer == n_layer - 1 else None)
            hs.append(x)
        if at is not None and not cut:
            x = rows_at(x, at)
        return self.model.norm(x), [hs[i] for i in keep]

    @torch.no_grad()
    def generate(self, x, max_new_tokens, end_id=None, frm=None, keep=(), embed=None, temperature=0.0, seed=0,
                 penalty=1.0, seen=(), exempt=()):
        """The one decode loop (text-only Phi-3 for synth.py --llm, and D2VLM): prefill the prompt's input embeddings
        x (1, L, C) (frame positions frm (1, L) see each other both ways) into a KV cache, then one token at a time
        -> the new ids, up to and including end_id.
        Greedy, or sampled at `temperature`. penalty: HF's repetition penalty (a logit < 0 is multiplied by it, else
        divided, once per id) on the ids in `seen` and on every generated id, but never on those in `exempt`.
        embed(ids, hs) -> the next input (1, 1, C) for the token just generated, ids[-1], given the kept states `hs`
        of the forward that predicted it (the whole prompt's for the first token); default: the token's embedding."""
        dev = x.device
        cache = Cache()
        pos = torch.arange(x.shape[1], device=dev)[None]
        mask = build_mask(torch.ones_like(pos, dtype=torch.bool), frm)
        gen = torch.Generator(device=dev).manual_seed(seed)
        seen = set(seen)
        ids = []
        for _ in range(max_new_tokens):
            # forward what the cache lacks: the whole prompt first (the prefill), then the newest token
            out, hs = self(x, pos, mask, cache, keep)
            # the next token, from the last position's logits
            logits = self.lm_head(out[0, -1]).float()
            if penalty != 1.0:
                j = torch.tensor(sorted(seen - set(exempt)), dtype=torch.long, device=dev)
                logits[j] = torch.where(logits[j] < 0, logits[j] * penalty, logits[j] / penalty)
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=gen).item()
            else:
                nxt = logits.argmax().item()
            ids.append(nxt)
            if nxt == end_id:
                break
            seen.add(nxt)
            # its input for the next step (D2VLM grounds an <evi> here, so one as the last allowed token still grounds)
            x = embed(ids, hs) if embed else self.model.embed_tokens.weight[nxt][None, None]
            pos = pos[:, -1:] + 1
            mask = None  # a single new token sees every cached one: no mask to build, and SDPA's faster path
        return ids


# ----------------------------------------------------------------------------------------------------------
# D²VLM (Sec. 3.2): frame tokens into Phi-3; <evi> tokens ground events and pool their frames into themselves

def head(H):
    """evi_head / frm_head, as released: LN → Linear(H, H/2) → GELU → Linear(H/2, H)."""
    return nn.Sequential(nn.LayerNorm(H), nn.Linear(H, H // 2), nn.GELU(), nn.Linear(H // 2, H))


def span_of(p, threshold=0.6):
    """Inference rule (released code; the paper's supplementary Tab. 3 compares thresholds 0.4-0.8): frames with
    p >= threshold * max(p) are salient; each contiguous run of salient frames is a group, scored by its mean p; the
    best group is the event. Inclusive frame indices. On an exact tie of means the released code's span runs from
    the first tied group to the last."""
    step = F.pad((p >= threshold * p.max()).int(), (1, 1)).diff()  # +1 where a group starts, -1 after it ends
    starts = (step == 1).nonzero()[:, 0]
    ends = (step == -1).nonzero()[:, 0] - 1
    means = torch.stack([p[s:e + 1].mean() for s, e in zip(starts, ends)])
    tied = (means == means.max()).nonzero()[:, 0]
    return int(starts[tied[0]]), int(ends[tied[-1]])


def pool(states, spans):
    """Mean of states (N, T, C) over each inclusive frame span (N, 2) -> (N, C): what an <evi> captures."""
    t = torch.arange(states.shape[1], device=states.device)
    inside = ((t >= spans[:, :1]) & (t <= spans[:, 1:])).to(states.dtype)  # (N, T)
    return torch.einsum("nt,ntc->nc", inside, states) / inside.sum(1, keepdim=True)


class D2VLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.visual = EVAViT(cfg).requires_grad_(False)  # frozen during SFT and FPO
        self.compressor = FrameCompressor(cfg)
        self.llm = Phi3(cfg)
        self.evi_head, self.frm_head = head(cfg.n_embd), head(cfg.n_embd)

    def frame_tokens(self, frames, frm_valid, q_ids, q_valid):
        """F_V, one token per frame (B, T, C), zeros for padding frames. `frames`: pixels (B, T, 3, S, S) or cached
        ViT features (B, T, P, W)."""
        b, t = frm_valid.nonzero(as_tuple=True)  # the real frames (torch.compile: the forward's one graph break)
        x = frames[b, t]
        if x.dim() == 4:
            with torch.no_grad():
                x = self.visual(x)
        tok = self.compressor(x, q_ids, q_valid, rows=b)  # frame (b, t) asks sample b's question
        return tok.new_zeros(*frm_valid.shape, tok.shape[-1]).index_put((b, t), tok)

    def embed(self, ids, F_V, src_b, src_pos, src_span):
        """The prompt's input embeddings x (B, L, C): F_V in place of the frame placeholders, and each question-side
        <evi> (sample src_b, position src_pos) plus the mean of F_V over its frames src_span (as released); and each
        frame's position (B, T). A sample's placeholders are one run (data.py, eval.answer): position start + t holds
        frame t. Gathers of fixed shapes, so torch.compile traces them; padding frames point at some other position."""
        T = F_V.shape[1]
        L = ids.shape[1]
        frm = ids == self.cfg.image_id
        start = frm.int().argmax(1, keepdim=True)  # the first placeholder
        frame_at = (torch.arange(L, device=ids.device) - start).clamp(0, T - 1)  # (B, L): the frame a position holds
        # gathers by indexing: take_along_dim would fix B, L and T in torch.compile's graph (a recompile per length)
        x = torch.where(frm[..., None], rows_at(F_V, frame_at), self.llm.model.embed_tokens(ids))
        x = x.index_put((src_b, src_pos), pool(take(F_V, src_b), src_span).to(x.dtype), accumulate=True)
        return x, (start + torch.arange(T, device=ids.device)).clamp(max=L - 1)

    def forward(self, b):
        """Teacher-forced pass (Sec. 3.2) over the batch of data.collate -> logits (N, R, vocab), where logits[n, j]
        predicts response token j; sim (K, T), the frame logits of every response <evi>; F_<evi> (K, C)."""
        cfg = self.cfg
        # The prompt: the compressor's one token per frame, F_V (Sec. 3.1), in place of the frame placeholders, and
        # the question's text tokens F_Q; a question-side <evi> (an input interval) gets the mean of F_V over it.
        F_V = self.frame_tokens(b["frames"], b["frm_valid"], b["q_ids"], b["q_valid"])
        x, frm_pos = self.embed(b["ids"], F_V, b["src_b"], b["src_pos"], b["src_span"])
        # 1. The prompt pass. Its states do not depend on the response: the frame states of layer capture_layer
        # (F~_V) and evi_layer (for frm_head), and its keys/values, which the response pass attends to. (The released
        # code runs a first pass over the prompt, then a full pass over prompt and response: the same values and, up
        # to LoRA dropout drawn twice there, the same gradients, with the prompt computed twice.) Frames see each
        # other both ways; the text is causal.
        valid = b["valid"]
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        mask = build_mask(valid, b["ids"] == cfg.image_id)
        r = b["resp_b"]  # the prompt of each response
        cache = Cache(rows=r)
        # The prompt pass's output is read only at each prompt's last real position (the batch is right-padded),
        # whose logits predict the first response token.
        last = (valid.sum(1) - 1)[:, None]
        out_p, (h_p, cap_p) = self.llm(x, pos, mask, cache, keep=(cfg.evi_layer, cfg.capture_layer), at=last)
        f_frm = self.frm_head(rows_at(h_p, frm_pos))  # (B, T, C): frame t of sample i is h_p[i, frm_pos[i, t]]
        F_cap = rows_at(cap_p, frm_pos)  # F~_V (B, T, C)
        # 2. The response pass. Visual semantic capture (Sec. 3.2): each <evi> input is its embedding plus the mean
        # of F~_V over its interval (the ground truth's here; at inference the one its similarities pick).
        xr = self.llm.model.embed_tokens(b["resp"])
        video = r[b["evi_b"]]  # the prompt (video) of each <evi>
        if cfg.evi_capture:
            pooled = pool(take(F_cap, video), b["evi_span"])
            xr = xr.index_put((b["evi_b"], b["evi_pos"]), pooled.to(xr.dtype), accumulate=True)
        # Response token j sits at position n_prompt + j and sees its prompt (the cache, through rows) and, causally,
        # the response: the last R rows of the mask over prompt + response.
        n_prompt = take(last, r) + 1  # (N, 1): the length of each response's prompt
        R = xr.shape[1]
        pos_r = n_prompt + torch.arange(R, device=x.device)
        mask_r = build_mask(torch.cat([valid[r], b["resp_valid"]], 1))[:, :, -R:]
        out_r, (h_r,) = self.llm(xr, pos_r, mask_r, cache, keep=(cfg.evi_layer,))
        # The states that predict response token j: the prompt's last position for j = 0, response position j - 1.
        logits = self.llm.lm_head(torch.cat([take(out_p, r), out_r[:, :-1]], 1))
        h = torch.cat([take(rows_at(h_p, last), r), h_r[:, :-1]], 1)
        # Grounding: each <evi>'s evi_head output against the frm_head output of each frame of its video, a dot
        # product scaled by sqrt(C): the sim of the grounding loss and of p_g, as a logit.
        f_evi = self.evi_head(h[b["evi_b"], b["evi_pos"]])
        sim = torch.einsum("nc,ntc->nt", f_evi, take(f_frm, video)) / math.sqrt(cfg.n_embd)
        return logits, sim, f_evi

    @torch.no_grad()
    def generate(self, frames, times, q_ids, prompt_ids, max_new_tokens=2048, temperature=0.0, seed=0, src=(),
                 repetition_penalty=1.0):
        """Decode one video. Each generated <evi> scores the frames, takes the best salient group as its interval,
        and gets the mean of that group's F~_V (prefill states of layer capture_layer) added to its input.
        src: the inclusive frame span (data.frame_span) of each question-side <evi> of the prompt. Returns the new ids
        and one dict per <evi>: stage (1 or 2), frame span, seconds, sim over frames."""
        cfg = self.cfg
        dev = frames.device
        T = len(frames)
        ids = torch.tensor([prompt_ids], device=dev)
        frm = ids == cfg.image_id
        if frm.sum() != T:
            raise ValueError(f"the prompt has {int(frm.sum())} frame placeholders for {T} frames")
        src_pos = (ids[0] == cfg.evi_id).nonzero()[:, 0]  # the question-side <evi> (they follow the video)
        if len(src) != len(src_pos):
            raise ValueError(f"{len(src)} src intervals for {len(src_pos)} <evi> in the question")
        # The prompt's input embeddings, made as the teacher-forced pass makes them, for a batch of one.
        q = torch.tensor([q_ids], device=dev)
        F_V = self.frame_tokens(frames[None], torch.ones(1, T, dtype=torch.bool, device=dev), q, q > -1)
        spans = torch.tensor(src, dtype=torch.long, device=dev).view(-1, 2)
        x, frm_pos = self.embed(ids, F_V, torch.zeros_like(src_pos), src_pos, spans)
        evis = []
        prefill = {}  # the frames' frm_head outputs and F~_V, read from the prefill

        def ground(ids, hs):
            """The next input for ids[-1], the token just generated, given the kept states hs (evi_layer,
            capture_layer) of the forward that predicted it: its embedding, and for an <evi> the mean of F~_V over
            the event it grounds (visual semantic capture)."""
            if not prefill:  # the first call sees the whole prompt: the frames' states are final there
                prefill["f_frm"] = self.frm_head(hs[0][0, frm_pos[0]])
                prefill["F_cap"] = hs[1][:, frm_pos[0]]
            e = self.llm.model.embed_tokens.weight[ids[-1]][None, None]
            if ids[-1] != cfg.evi_id:
                return e
            # its similarity to each frame (as in the teacher-forced pass), then its event: the best salient group
            sim = (prefill["f_frm"] @ self.evi_head(hs[0][0, -1])).float() / math.sqrt(cfg.n_embd)
            if cfg.evi_unit == "event":
                s, t = span_of(torch.sigmoid(sim), cfg.evi_threshold)
            else:  # Tab. 6 ablation: an <evi> names one boundary frame, its most similar one
                s = t = int(sim.argmax())
            stage = 2 if cfg.evi_end_id in ids else 1  # </evi> ends stage 1, the pure grounding
            evis.append(dict(stage=stage, span=(s, t), seconds=(float(times[s]), float(times[t])), sim=sim.tolist()))
            if cfg.evi_capture:
                e = e + pool(prefill["F_cap"], torch.tensor([[s, t]], device=dev)).to(e.dtype)
            return e
        keep = (cfg.evi_layer, cfg.capture_layer)  # the states ground reads: hs[0] for the heads, hs[1] is F~_V
        return self.llm.generate(x, max_new_tokens, cfg.end_id, frm, keep, ground, temperature, seed,
                                 repetition_penalty, seen=prompt_ids, exempt=(cfg.image_id, cfg.evi_id)), evis
