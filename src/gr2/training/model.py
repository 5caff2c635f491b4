"""The GR-2 style video-language-action GPT, in one file.

A window of T steps is one sequence:

    [text] | [view 0 tokens][view 1 tokens]...[state][action query] | ... (T steps)

Attention is block-causal: every position of step t sees the text and all positions of steps <= t,
the rest of its own step included, and nothing of step t+1. So the output at view token (t, v, i)
predicts token (t+1, v, i): the whole next frame of every view in one pass rather than token by
token; and the output at step t's action query conditions the cVAE head that decodes a_{t:t+k}.
Pre-training on web video has neither state nor action: each step is its view tokens alone.

Batches are dicts (LeRobot's words where they exist):
    frames          (B, T, V, h, w) or (B, T, V, h*w) VQ token ids; V <= n_views, T <= history
    text_embedding  (B, text_dim) CLIP text embeddings (all zeros: no caption), or
    text            list of B strings, encoded by the frozen CLIP text tower
    state           (B, T, state_dim)                           [fine-tuning, select_action]
    action          (B, T, k, action_dim): a_{t:t+k} for each step t                [fine-tuning]
    action_is_pad   (B, T, k) bool, chunk entries past the episode's end            [optional]
    step_is_pad     (B, T) bool, history steps before the episode's start           [optional]
Which dimensions are what comes from the layouts the lake declares (robot/layout.py): the action's
binary grippers (`action_binary`) are commands whose sign is what counts, learned as labels and
returned as -1/+1; every other action dimension (arm, continuous gripper, hand joint) is regressed,
normalised by the data. The state's grippers (`state_gripper`) get their own encoder, as in GR-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {
    # CPU tests and the Meta-World floor: one corner camera and a wrist camera at 64x64, f=8.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, grid_h=8, grid_w=8, codebook_size=1024,
                 history=4, state_dim=4, action_dim=4,
                 vae_n_embd=128, vae_n_head=4, vae_n_layer=2),
    # The paper's two smallest, 30M and 95M trainable: GR-1's GPT-2 shape for S, twice as wide
    # for B; GR-MG's 4 + 4 head blocks, their width set so the totals land on the paper's.
    "S": dict(n_layer=12, n_head=12, n_embd=384, vae_n_embd=224, vae_n_head=8, vae_n_layer=4),
    "B": dict(n_layer=12, n_head=12, n_embd=768, vae_n_embd=128, vae_n_head=4, vae_n_layer=4),
}


@dataclass(frozen=True)
class GR2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
    n_views: int = 2  # a static head camera and a wrist camera
    grid_h: int = 16  # VQ token grid of one view
    grid_w: int = 16
    codebook_size: int = 8192  # must be the tokenizer's
    history: int = 10  # T steps in a window (GR-1: 10, frames 1/3 s apart)
    chunk: int = 5  # k actions decoded per step (GR-MG: 5)
    state_dim: int = 7  # 3 pos + 3 rot + 1 gripper; Meta-World: 3 pos + 1 gripper
    action_dim: int = 7
    # Indices of the action's binary grippers and of the state's grippers, from the lake's layouts;
    # None: the last dimension (GR-1's layout), what a model built without a lake assumes.
    action_binary: tuple[int, ...] | None = None
    state_gripper: tuple[int, ...] | None = None
    text_dim: int = 512  # width of the CLIP text embedding
    clip_model: str | None = None  # open_clip text tower (training/text.py); None: batches carry text_embedding
    clip_pretrained: str | None = None  # open_clip tag or local file; None: random init
    latent_dim: int = 32
    vae_n_embd: int = 256
    vae_n_head: int = 8
    vae_n_layer: int = 4  # blocks in the encoder and again in the decoder (GR-MG: 4 + 4)
    arm_weight: float = 1.0
    gripper_weight: float = 0.01
    kl_weight: float = 1.0
    image_weight: float = 0.1  # next-frame CE beside the action loss; pre-training uses CE alone

    def __post_init__(self):
        for name, width in (("action_binary", self.action_dim), ("state_gripper", self.state_dim)):
            dims = getattr(self, name)
            if dims is not None:
                object.__setattr__(self, name, tuple(int(i) for i in dims))  # a JSON list after a load
                if any(not 0 <= i < width for i in dims):
                    raise ValueError(f"{name} {list(dims)}: every index must be within 0..{width - 1}")

    @property
    def tokens_per_view(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def binary_dims(self) -> list[int]:
        return list(self.action_binary) if self.action_binary is not None else [self.action_dim - 1]

    @property
    def regressed_dims(self) -> list[int]:
        return [i for i in range(self.action_dim) if i not in self.binary_dims]

    @property
    def state_gripper_dims(self) -> list[int]:
        return list(self.state_gripper) if self.state_gripper is not None else [self.state_dim - 1]

    @property
    def state_arm_dims(self) -> list[int]:
        return [i for i in range(self.state_dim) if i not in self.state_gripper_dims]

    @classmethod
    def named(cls, size: str, **overrides) -> GR2Config:
        """A size from SIZES ('tiny', 'S', 'B') with any field overridden."""
        if size not in SIZES:
            raise ValueError(f"unknown GR-2 size {size!r}; known: {sorted(SIZES)}")
        return replace(cls(**SIZES[size]), **overrides)


# --------------------------------------------------------------------------------------------
# The transformer: nanoGPT's block, with the mask left to the caller.


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        assert n_embd % n_head == 0, f"width {n_embd} is not a multiple of {n_head} heads"
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head = n_head
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = (t.view(B, L, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))
        # mask: bool, True where attention is allowed, broadcastable to (B, heads, L, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, L, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


def block_causal_mask(n_steps: int, per_step: int, device=None) -> torch.Tensor:
    """(1 + n_steps*per_step)^2 bool, True where allowed: the leading text token sees only itself,
    a position of step t sees the text and every position of steps <= t."""
    step = torch.arange(n_steps, device=device).repeat_interleave(per_step)
    step = torch.cat([step.new_full((1,), -1), step])
    return step[None, :] <= step[:, None]


# --------------------------------------------------------------------------------------------
# Actions: GR-MG's conditional VAE head.


class ActionVAE(nn.Module):
    """Encoder: (context, true chunk) -> mu, logvar. Decoder: (z, context) -> regressed dims and
    binary gripper logits.

    The context is the GPT's output at one step's action query. At inference z = 0, the prior's
    mean, so the chunk is a deterministic function of the context."""

    def __init__(self, config: GR2Config):
        super().__init__()
        d, k = config.vae_n_embd, config.chunk
        self.context_proj = nn.Linear(config.n_embd, d)
        self.action_proj = nn.Linear(config.action_dim, d)
        self.cls = nn.Parameter(torch.zeros(d))
        self.encoder_pos = nn.Parameter(torch.zeros(2 + k, d))
        self.encoder = nn.ModuleList(
            Block(d, config.vae_n_head, config.dropout, config.bias) for _ in range(config.vae_n_layer))
        self.encoder_ln = nn.LayerNorm(d, bias=config.bias)
        self.to_latent = nn.Linear(d, 2 * config.latent_dim)
        self.latent_proj = nn.Linear(config.latent_dim, d)
        self.queries = nn.Parameter(torch.zeros(k, d))
        self.decoder_pos = nn.Parameter(torch.zeros(2 + k, d))
        self.decoder = nn.ModuleList(
            Block(d, config.vae_n_head, config.dropout, config.bias) for _ in range(config.vae_n_layer))
        self.decoder_ln = nn.LayerNorm(d, bias=config.bias)
        self.arm_head = nn.Linear(d, len(config.regressed_dims))
        # a layout without a binary gripper (a hand, a continuous gripper) has no labels to predict
        self.gripper_head = nn.Linear(d, len(config.binary_dims)) if config.binary_dims else None

    def encode(self, context, action, action_is_pad):
        """context (N, n_embd), action (N, k, A), action_is_pad (N, k) -> mu, logvar (N, latent)."""
        N = context.shape[0]
        x = torch.cat([self.cls.expand(N, 1, -1), self.context_proj(context)[:, None],
                       self.action_proj(action)], dim=1) + self.encoder_pos
        # padded actions are hidden from every query (cls and context always stay visible)
        keep = torch.cat([action_is_pad.new_ones(N, 2), ~action_is_pad], dim=1)[:, None, None, :]
        for block in self.encoder:
            x = block(x, keep)
        mu, logvar = self.to_latent(self.encoder_ln(x[:, 0])).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, context, z):
        """context (N, n_embd), z (N, latent) -> regressed (N, k, A-b), binary gripper logits (N, k, b)."""
        N = context.shape[0]
        x = torch.cat([self.latent_proj(z)[:, None], self.context_proj(context)[:, None],
                       self.queries.expand(N, -1, -1)], dim=1) + self.decoder_pos
        for block in self.decoder:
            x = block(x)
        x = self.decoder_ln(x[:, 2:])
        logits = self.gripper_head(x) if self.gripper_head is not None else x.new_zeros(*x.shape[:2], 0)
        return self.arm_head(x), logits


# --------------------------------------------------------------------------------------------
# The model.


class GR2(nn.Module):
    def __init__(self, config: GR2Config, text_encoder: nn.Module | None = None):
        """text_encoder: the frozen tower that embeds raw `text` (training/text.py), if batches carry any."""
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.codebook_size, c.n_embd)
        self.grid_pos = nn.Parameter(torch.zeros(c.tokens_per_view, c.n_embd))
        self.view_emb = nn.Parameter(torch.zeros(c.n_views, c.n_embd))
        self.step_emb = nn.Parameter(torch.zeros(c.history, c.n_embd))
        self.text_proj = nn.Linear(c.text_dim, c.n_embd)
        # GR-1's state encoder: arm and gripper apart, then mixed (a state without a gripper: arm alone)
        self.state_arm = nn.Linear(len(c.state_arm_dims), c.n_embd)
        self.state_gripper = nn.Linear(len(c.state_gripper_dims), c.n_embd) if c.state_gripper_dims else None
        self.state_proj = nn.Linear((2 if c.state_gripper_dims else 1) * c.n_embd, c.n_embd)
        self.action_query = nn.Parameter(torch.zeros(c.n_embd))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.n_embd, c.n_head, c.dropout, c.bias) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.frame_head = nn.Linear(c.n_embd, c.codebook_size, bias=False)
        self.frame_head.weight = self.tok_emb.weight  # weight tying, as GPT-2 ties its vocabulary
        self.action_head = ActionVAE(c)

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):  # GPT-2's scaled residuals
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))
        for p in (self.grid_pos, self.view_emb, self.step_emb, self.action_query,
                  self.action_head.cls, self.action_head.encoder_pos, self.action_head.queries,
                  self.action_head.decoder_pos):
            torch.nn.init.normal_(p, mean=0.0, std=0.02)

        # attached after the init above, which must not touch pretrained CLIP weights
        if text_encoder is not None and text_encoder.embed_dim != c.text_dim:
            raise ValueError(f"{text_encoder.model_name} embeds text in {text_encoder.embed_dim} "
                             f"dimensions but config.text_dim is {c.text_dim}")
        self.text_encoder = text_encoder

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, trainable_only: bool = True) -> int:
        """Parameter count; by default the trainable ones, i.e. without the frozen text tower."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- the trunk

    def _frames(self, batch: dict) -> torch.Tensor:
        frames = batch["frames"]
        if frames.dim() == 5:
            frames = frames.flatten(3)
        c = self.config
        if (frames.dim() != 4 or frames.shape[3] != c.tokens_per_view or frames.shape[2] > c.n_views
                or frames.shape[1] > c.history):
            raise ValueError(
                f"frames of shape {tuple(batch['frames'].shape)} do not fit this model: expected "
                f"(B, T<={c.history}, V<={c.n_views}, {c.grid_h}, {c.grid_w}) token ids")
        return frames.long()

    def _embed_text(self, batch: dict) -> torch.Tensor:
        if "text_embedding" in batch:
            e = batch["text_embedding"].float()
        elif "text" in batch:
            if self.text_encoder is None:
                raise ValueError("batch has raw text but the model has no text encoder "
                                 "(config.clip_model is None): pass text_embedding instead")
            e = self.text_encoder(batch["text"])
        else:
            raise ValueError("batch needs 'text_embedding' or 'text'")
        # normalised here so stored and fresh embeddings agree however they were saved
        return self.text_proj(F.normalize(e, dim=-1))[:, None]

    def _trunk(self, batch: dict) -> torch.Tensor:
        """Hidden states (B, T, P, n_embd): P = V*h*w view tokens [+ state, action query]."""
        c = self.config
        frames = self._frames(batch)
        B, T, V, _ = frames.shape
        x = self.tok_emb(frames) + self.grid_pos + self.view_emb[:V, None]
        x = x.flatten(2, 3)
        if "state" in batch:
            state = batch["state"].float()
            parts = [self.state_arm(state[..., c.state_arm_dims])]
            if self.state_gripper is not None:
                parts.append(self.state_gripper(state[..., c.state_gripper_dims]))
            s = self.state_proj(torch.cat(parts, dim=-1))
            q = self.action_query.expand(B, T, -1)
            x = torch.cat([x, s[:, :, None], q[:, :, None]], dim=2)
        x = x + self.step_emb[:T, None]
        P = x.shape[2]
        x = self.drop(torch.cat([self._embed_text(batch), x.flatten(1, 2)], dim=1))
        mask = block_causal_mask(T, P, x.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)[:, 1:].unflatten(1, (T, P))

    # ---- training and acting

    def frame_logits(self, batch: dict) -> torch.Tensor:
        """Logits (B, T, V, h*w, codebook) for the frame that follows each step of the window."""
        frames = self._frames(batch)
        V, N = frames.shape[2], frames.shape[3]
        return self.frame_head(self._trunk(batch)[:, :, :V * N]).unflatten(2, (V, N))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Losses and metrics: 'loss' to minimise, its parts, token accuracy, action error.

        With 'action' in the batch (fine-tuning): cVAE action loss + image_weight * next-frame CE.
        Without (pre-training, video only): next-frame CE alone."""
        c = self.config
        frames = self._frames(batch)
        if frames.shape[1] < 2 and "action" not in batch:
            raise ValueError("pre-training needs windows of at least 2 steps: nothing to predict")
        if "action" in batch and "state" not in batch:
            raise ValueError("fine-tuning batches need 'state' beside 'action'")
        h = self._trunk(batch)
        out = self._next_frame_losses(h, frames, batch.get("step_is_pad"))
        loss_image = out.get("loss_image", h.new_zeros(()))
        if "action" not in batch:
            out["loss"] = loss_image
            return out
        action = self._action_losses(h, batch)
        out.update(loss=(c.arm_weight * action["loss_arm"] + c.gripper_weight * action["loss_gripper"]
                         + c.kl_weight * action["loss_kl"] + c.image_weight * loss_image), **action)
        return out

    def _next_frame_losses(self, h: torch.Tensor, frames: torch.Tensor, step_is_pad: torch.Tensor | None) -> dict:
        """Cross-entropy and accuracy of each step's view outputs against the next step's tokens."""
        B, T, V, N = frames.shape
        if T < 2:
            return {}
        logits = self.frame_head(h[:, :-1, :V * N])
        target = frames[:, 1:].flatten(2)
        ce = F.cross_entropy(logits.flatten(0, 2).float(), target.flatten(),
                             reduction="none").view(B, T - 1, V * N).mean(-1)
        hit = (logits.argmax(-1) == target).float().mean(-1)
        valid = torch.ones_like(ce, dtype=torch.bool)
        if step_is_pad is not None:
            valid = ~step_is_pad[:, :-1] & ~step_is_pad[:, 1:]
        return {"loss_image": _masked_mean(ce, valid), "token_accuracy": _masked_mean(hit, valid)}

    def _action_losses(self, h: torch.Tensor, batch: dict) -> dict:
        """The cVAE's losses for each step's chunk, decoded from its action query's output."""
        c = self.config
        action = batch["action"].float()
        k, A = action.shape[2], action.shape[3]
        if (k, A) != (c.chunk, c.action_dim):
            raise ValueError(f"action of shape {tuple(action.shape)}: expected (B, T, {c.chunk}, {c.action_dim})")
        pad = batch.get("action_is_pad")
        pad = torch.zeros(action.shape[:3], dtype=torch.bool, device=action.device) if pad is None else pad.bool()
        if batch.get("step_is_pad") is not None:
            pad = pad | batch["step_is_pad"][:, :, None]
        context = h[:, :, -1].flatten(0, 1)
        action, pad = action.flatten(0, 1), pad.flatten(0, 1)

        mu, logvar = self.action_head.encode(context, action, pad)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = torch.zeros_like(mu)  # evaluate as we act: the prior's mean
        arm, gripper_logit = self.action_head.decode(context, z)
        mu, logvar, arm, gripper_logit = mu.float(), logvar.float(), arm.float(), gripper_logit.float()

        valid = ~pad
        arm_target, closed = action[..., c.regressed_dims], (action[..., c.binary_dims] > 0).float()
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
        out = {
            "loss_arm": _masked_mean(F.smooth_l1_loss(arm, arm_target, reduction="none").mean(-1), valid),
            "loss_gripper": arm.new_zeros(()),
            "loss_kl": _masked_mean(kl, valid.any(-1)),
            "action_l1": _masked_mean((arm - arm_target).abs().mean(-1), valid),
        }
        if c.binary_dims:  # no binary gripper (a hand, a continuous gripper): nothing to classify
            out["loss_gripper"] = _masked_mean(
                F.binary_cross_entropy_with_logits(gripper_logit, closed, reduction="none").mean(-1), valid)
            out["gripper_accuracy"] = _masked_mean(((gripper_logit > 0).float() == closed).float().mean(-1), valid)
        return out

    @torch.no_grad()
    def select_action(self, obs: dict) -> torch.Tensor:
        """The chunk a_{t:t+k} for the last step of obs: (B, k, action_dim), binary grippers as -1/+1.

        obs holds frames, state and text over the history seen so far. The latent is zero, so
        the answer is deterministic; call .eval() first, as dropout is not."""
        if "state" not in obs:
            raise ValueError("select_action needs 'state' beside 'frames'")
        context = self._trunk(obs)[:, -1, -1]
        z = context.new_zeros(context.shape[0], self.config.latent_dim)
        arm, gripper_logit = self.action_head.decode(context, z)
        c = self.config
        chunk = arm.new_zeros(*arm.shape[:2], c.action_dim)
        chunk[..., c.regressed_dims] = arm
        chunk[..., c.binary_dims] = torch.where(gripper_logit > 0, 1.0, -1.0).to(arm.dtype)
        return chunk


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)
