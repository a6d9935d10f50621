"""The four model families, as small causal language models over integer tokens.

Transformer-PSM, GLA and the Mamba-style block get their sequence mixing from layers that psmc
generates (`psmc.load` of examples/*.psm); the baseline is a plain-torch causal transformer.
Every model maps tokens [B, T] to logits [B, T, vocab]. Transformer-PSM and the baseline also
stream: `init_state` then `step` one token at a time.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

EXAMPLES_DIR = Path(__file__).resolve().parents[1]


def psmc_op(name: str):
    """The layer class psmc generates for examples/<name>.psm (compiled once, cached by psmc)."""
    import psmc  # imported here so that data and plotting code work without a compiler

    return getattr(psmc.load(str(EXAMPLES_DIR / f"{name}.psm")), name)


# Same non-embedding parameter budget (within 20 %, checked in tests), width 64-128, 2 layers.
# One Transformer-PSM layer holds two transformer blocks (Agg and Inf), hence its smaller width.
MODEL_CONFIGS = {
    "tpsm": dict(D=64, H=4, layers=2),
    "transformer": dict(D=96, H=4, layers=2),
    "gla": dict(D=96, layers=2, K=16, V=32),
    "mamba": dict(D=112, layers=2, N=16, expand=2),
}

EMBEDDING_PREFIXES = ("embed.", "pos.", "head.")


def non_embedding_params(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(EMBEDDING_PREFIXES))


class LMState:
    """Streaming state of a whole model: one state per layer plus the position counter."""

    def __init__(self, layer_states: list, position: int = 0):
        self.layer_states, self.position = layer_states, position

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self.layer_states)


class TokenLM(nn.Module):
    """Embedding -> mixing layers -> LayerNorm -> linear head. Each subclass defines
    `mix(h)`: [B, T, D] embeddings -> [B, T, D] features, causally."""

    def __init__(self, vocab: int, D: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.mix(self.embed(tokens))))


# ---------------------------------------------------------------- Transformer-PSM

class TransformerPSMLM(TokenLM):
    """Enc = token embedding + a learned position INSIDE the chunk (so any length is valid),
    then stacked psmc transformer_psm layers (one Agg block + one Inf block each)."""

    def __init__(self, vocab: int, D: int, H: int, layers: int, C: int):
        super().__init__(vocab, D)
        self.C = C
        self.pos = nn.Embedding(C, D)
        layer_class = psmc_op("transformer_psm")
        self.layers = nn.ModuleList(layer_class(C=C, D=D, H=H) for _ in range(layers))

    def mix(self, h):
        h = h + self.pos(torch.arange(h.shape[1]) % self.C)
        for layer in self.layers:
            h = layer(x=h)
        return h

    def init_state(self, batch: int) -> LMState:
        return LMState([layer.init_state(batch_shape=(batch,)) for layer in self.layers])

    def step(self, state: LMState, token: torch.Tensor):
        """token [B] -> logits [B, vocab] and the next state."""
        h = self.embed(token) + self.pos.weight[state.position % self.C]
        new_states = []
        for layer, layer_state in zip(self.layers, state.layer_states):
            h, layer_state = layer.step(layer_state, x=h)
            new_states.append(layer_state)
        return self.head(self.norm(h)), LMState(new_states, state.position + 1)


# ---------------------------------------------------------------- softmax transformer baseline

def sinusoid(positions: torch.Tensor, D: int) -> torch.Tensor:
    """Fixed sinusoidal positions: defined at every length, unlike learned absolute ones."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, D, 2) / D)
    angles = positions.float()[:, None] * freqs[None]
    return torch.stack([angles.sin(), angles.cos()], -1).reshape(len(positions), D)


class KVCache:
    """Keys and values of one attention layer, grown by doubling so appends are amortised O(1)."""

    def __init__(self):
        self.k = self.v = None
        self.length = 0

    def _grown(self, old: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        capacity = max(16, 2 * self.length)
        fresh = like.new_zeros(*like.shape[:2], capacity, like.shape[-1])
        if old is not None:
            fresh[:, :, :self.length] = old[:, :, :self.length]
        return fresh

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """k, v: [B, H, 1, dh] of the new token -> all keys and values so far."""
        if self.k is None or self.length == self.k.shape[2]:
            self.k, self.v = self._grown(self.k, k), self._grown(self.v, v)
        self.k[:, :, self.length], self.v[:, :, self.length] = k[:, :, 0], v[:, :, 0]
        self.length += 1
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    @property
    def nbytes(self) -> int:
        # Bytes the cache must hold at this length (the spare doubling capacity is not counted).
        return 0 if self.k is None else 2 * self.length * self.k[:, :, 0].numel() * self.k.element_size()


class CausalBlock(nn.Module):
    """Pre-LN GPT-2 block without biases (like psmc's transformer_psm block)."""

    def __init__(self, D: int, H: int):
        super().__init__()
        self.H = H
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D, bias=False), nn.GELU(), nn.Linear(4 * D, D, bias=False))

    def _heads(self, x):
        B, T, D = x.shape
        return [t.reshape(B, T, self.H, D // self.H).transpose(1, 2) for t in self.qkv(self.ln1(x)).chunk(3, -1)]

    def _finish(self, x, attended):
        x = x + self.out(attended.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.ln2(x))

    def forward(self, x):
        q, k, v = self._heads(x)
        return self._finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, cache: KVCache, x):
        q, k, v = self._heads(x[:, None])
        keys, values = cache.append(k, v)
        return self._finish(x[:, None], F.scaled_dot_product_attention(q, keys, values))[:, 0]


class TransformerLM(TokenLM):
    def __init__(self, vocab: int, D: int, H: int, layers: int):
        super().__init__(vocab, D)
        self.blocks = nn.ModuleList(CausalBlock(D, H) for _ in range(layers))

    def mix(self, h):
        h = h + sinusoid(torch.arange(h.shape[1]), h.shape[-1])
        for block in self.blocks:
            h = block(h)
        return h

    def init_state(self, batch: int) -> LMState:
        return LMState([KVCache() for _ in self.blocks])

    def step(self, state: LMState, token: torch.Tensor):
        h = self.embed(token) + sinusoid(torch.tensor([state.position]), self.embed.embedding_dim)
        for block, cache in zip(self.blocks, state.layer_states):
            h = block.step(cache, h)
        # The caches are updated in place: a KV cache is one growing buffer per layer.
        return self.head(self.norm(h)), LMState(state.layer_states, state.position + 1)


# ---------------------------------------------------------------- GLA

class GLAMixer(nn.Module):
    """GLA's token mixer (Yang et al. 2024) around psmc's gla op: low-rank forget gate,
    per-head normalisation and a SiLU output gate."""

    GATE_RANK, GATE_NORMALISER = 16, 16.0  # the GLA paper's choices: forget slowly at init

    def __init__(self, D: int, K: int, V: int):
        super().__init__()
        self.H, self.K, self.V = D // V, K, V
        self.q, self.k = nn.Linear(D, self.H * K, bias=False), nn.Linear(D, self.H * K, bias=False)
        self.v, self.gate = nn.Linear(D, self.H * V, bias=False), nn.Linear(D, self.H * V, bias=False)
        self.forget = nn.Sequential(nn.Linear(D, self.GATE_RANK, bias=False), nn.Linear(self.GATE_RANK, self.H * K))
        self.out = nn.Linear(self.H * V, D, bias=False)
        self.gla = psmc_op("gla")(K=K, V=V)

    def forward(self, x):
        B, T, _ = x.shape
        heads = lambda t, n: t.reshape(B, T, self.H, n)
        gk = F.logsigmoid(self.forget(x)) / self.GATE_NORMALISER
        o = self.gla(k=heads(self.k(x), self.K), v=heads(self.v(x), self.V), gk=heads(gk, self.K),
                     q=heads(self.q(x), self.K))
        o = F.layer_norm(o, (self.V,)).reshape(B, T, self.H * self.V)
        return self.out(o * F.silu(self.gate(x)))


def mlp(D: int) -> nn.Module:
    return nn.Sequential(nn.Linear(D, 4 * D, bias=False), nn.GELU(), nn.Linear(4 * D, D, bias=False))


class GLALM(TokenLM):
    """Pre-LN blocks: x + GLA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, vocab: int, D: int, layers: int, K: int, V: int):
        super().__init__(vocab, D)
        self.mixers = nn.ModuleList(GLAMixer(D, K, V) for _ in range(layers))
        self.mlps = nn.ModuleList(mlp(D) for _ in range(layers))
        self.ln_mix = nn.ModuleList(nn.LayerNorm(D) for _ in range(layers))
        self.ln_mlp = nn.ModuleList(nn.LayerNorm(D) for _ in range(layers))

    def mix(self, h):
        for mixer, ffn, ln_a, ln_b in zip(self.mixers, self.mlps, self.ln_mix, self.ln_mlp):
            h = h + mixer(ln_a(h))
            h = h + ffn(ln_b(h))
        return h


# ---------------------------------------------------------------- Mamba-style

class MambaMixer(nn.Module):
    """Mamba's block (Gu & Dao 2023) around psmc's selective_ssm op: gated expansion, causal
    depthwise convolution, input-dependent (delta, B, C), skip D, SiLU gate."""

    CONV = 4

    def __init__(self, D: int, N: int, expand: int):
        super().__init__()
        E, self.N = expand * D, N
        self.dt_rank = math.ceil(D / 16)
        self.in_proj = nn.Linear(D, 2 * E, bias=False)
        self.conv = nn.Conv1d(E, E, self.CONV, groups=E, padding=self.CONV - 1)
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, E)
        with torch.no_grad():  # Mamba's init: softplus(bias) spread log-uniformly over [1e-3, 1e-1]
            dt = torch.exp(torch.rand(E) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1).float()).repeat(E, 1))
        self.skip = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, D, bias=False)
        self.ssm = psmc_op("selective_ssm")(N=N)

    def forward(self, x):
        T = x.shape[1]
        u, z = self.in_proj(x).chunk(2, -1)
        u = F.silu(self.conv(u.transpose(1, 2))[..., :T].transpose(1, 2))
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.N, self.N], -1)
        delta = F.softplus(self.dt_proj(dt))
        # A is shared by all positions; expanded (a view, no copy) because psmc checks that every
        # input's time axis matches instead of broadcasting a size-1 one.
        A = -torch.exp(self.A_log).expand(*u.shape[:2], -1, -1)
        y = self.ssm(u=u, delta=delta, A=A, B=Bm[:, :, None], C=Cm[:, :, None])
        return self.out_proj((y + u * self.skip) * F.silu(z))


class MambaLM(TokenLM):
    def __init__(self, vocab: int, D: int, layers: int, N: int, expand: int):
        super().__init__(vocab, D)
        self.mixers = nn.ModuleList(MambaMixer(D, N, expand) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(layers))

    def mix(self, h):
        for mixer, norm in zip(self.mixers, self.norms):
            h = h + mixer(norm(h))
        return h


MODEL_CLASSES = {"tpsm": TransformerPSMLM, "transformer": TransformerLM, "gla": GLALM, "mamba": MambaLM}
MODEL_LABELS = {"tpsm": "Transformer-PSM", "transformer": "Transformer", "gla": "GLA", "mamba": "Mamba-style"}


def build_model(kind: str, vocab: int, **overrides) -> TokenLM:
    """A model of the shared budget; Transformer-PSM needs its chunk size C in `overrides`."""
    return MODEL_CLASSES[kind](vocab, **{**MODEL_CONFIGS[kind], **overrides})
