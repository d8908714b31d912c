"""SASRec: causal self-attention over item sequences (Kang & McAuley, 2018).

Follows the reference implementation behind the published full-ranking numbers (S3-Rec / ICLRec line):
item + learned position embeddings, LayerNorm and dropout on the input, post-LayerNorm transformer
blocks with GELU feed-forward, weights initialised N(0, 0.02). ``model.layer_norm: pre`` moves each
block's LayerNorm before its sublayer (x + f(LN(x))) and adds a final LayerNorm after the last
block, as the original SASRec and most recent transformers do; everything else (input LayerNorm
and dropout included) stays the same, so the two differ in that one change.

``model.architecture: sasrec`` is Kang & McAuley's original block instead, the one behind the
strongest public full-CE SASRec logs on Beauty: item embeddings scaled by √d with no input
LayerNorm, a LayerNorm on the attention query only (the keys, values and residual read the raw
stream), a LayerNorm before a ReLU feed-forward of width d, a final LayerNorm, and Xavier-normal
initialisation. The model only maps tensors to tensors: no loss, sampling or device moves live here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from annsample.config import ModelConfig


class _SelfAttention(nn.Module):
    def __init__(
        self, hidden_size: int, num_heads: int, dropout: float, pre_norm: bool = False
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = dropout
        self.out_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            return x + self.out_dropout(self.out(self._attend(self.norm(x), attn_mask)))
        return self.norm(x + self.out_dropout(self.out(self._attend(x, attn_mask))))

    def _attend(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Multi-head causal self-attention of x (B, T, D), before the output projection."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).unbind(dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D/H)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return y.transpose(1, 2).reshape(B, T, D)


class _FeedForward(nn.Module):
    def __init__(self, hidden_size: int, dropout: float, pre_norm: bool = False) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.fc1 = nn.Linear(hidden_size, 4 * hidden_size)
        self.fc2 = nn.Linear(4 * hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm(x)))))
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class _KangBlock(nn.Module):
    """One block of the original SASRec: ``x + MHA(LN(x), x, x)``, then ``y + FFN(y)`` with
    ``y = LN(x)`` and a ReLU feed-forward of width d (Kang & McAuley, 2018)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = dropout
        self.ff_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H = self.num_heads
        q = self.q(self.query_norm(x)).view(B, T, H, D // H).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in self.kv(x).view(B, T, 2, H, D // H).unbind(dim=2))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.out(y.transpose(1, 2).reshape(B, T, D))
        x = self.ff_norm(x)
        return x + self.dropout2(self.fc2(self.dropout1(F.relu(self.fc1(x)))))


class SASRec(nn.Module):
    """Sequential recommender whose hidden state at position t scores item j as ``h_t · e_j``.

    Args:
        n_items: catalog size N; item ids are 1..N and 0 is padding.
        max_len: longest input sequence T (positions are learned).
        config: architecture settings.
    """

    def __init__(self, n_items: int, max_len: int, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = config or ModelConfig()
        self.n_items = n_items
        self.max_len = max_len
        self.item_embedding = nn.Embedding(
            n_items + 1, config.hidden_size, padding_idx=0, sparse=config.sparse_embeddings
        )
        self.position_embedding = nn.Embedding(max_len, config.hidden_size)
        self.input_dropout = nn.Dropout(config.dropout)
        self.kang = config.architecture == "sasrec"
        if self.kang:
            self.input_scale = config.hidden_size**0.5
            self.blocks = nn.ModuleList(
                _KangBlock(config.hidden_size, config.num_heads, config.dropout)
                for _ in range(config.num_blocks)
            )
            self.final_norm = nn.LayerNorm(config.hidden_size, eps=1e-8)
            self._init_xavier()
            return
        self.input_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        pre_norm = config.layer_norm == "pre"
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                [
                    _SelfAttention(config.hidden_size, config.num_heads, config.dropout, pre_norm),
                    _FeedForward(config.hidden_size, config.dropout, pre_norm),
                ]
            )
            for _ in range(config.num_blocks)
        )
        # pre-LN leaves the residual stream unnormalised; post-LN has no extra module, so its
        # weights (and checkpoints) are what they were before layer_norm existed
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=1e-12) if pre_norm else None
        self._init_weights(config.init_std)

    def _init_weights(self, std: float) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            # padding never scores: keep its row at zero (padding_idx also keeps its gradient at zero)
            self.item_embedding.weight[0].zero_()

    def _init_xavier(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.xavier_normal_(module.weight)
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    @property
    def item_embeddings(self) -> torch.Tensor:
        """The item table E, (N+1, d) float32; row 0 is padding."""
        return self.item_embedding.weight

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``ids`` (any shape) -> (..., d); keeps gradients sparse when configured."""
        return self.item_embedding(ids)

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states for every position.

        Args:
            seq: (B, T) int64 item ids, right-aligned, 0 = padding, T <= max_len.

        Returns:
            (B, T, d) float32; position t only attends to positions <= t that are not padding.
        """
        B, T = seq.shape
        positions = torch.arange(self.max_len - T, self.max_len, device=seq.device)
        x = self.item_embedding(seq)  # (B, T, d)
        if self.kang:
            x = self.input_dropout(x * self.input_scale + self.position_embedding(positions)[None])
        else:
            x = self.input_dropout(self.input_norm(x + self.position_embedding(positions)[None]))
        # Causal and key-padding mask. A padding query then attends to nothing but itself so its
        # softmax stays finite; its output is never used (losses only read real positions).
        keep = (
            torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()[None]
            & (seq > 0)[:, None, :]
        )
        keep = keep | torch.eye(T, dtype=torch.bool, device=seq.device)[None]
        attn_mask = keep[:, None]  # (B, 1, T, T), True = may attend
        if self.kang:
            for block in self.blocks:
                x = block(x, attn_mask)
        else:
            for attention, feed_forward in self.blocks:
                x = feed_forward(attention(x, attn_mask))
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def score_all(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of every item for hidden states ``h`` (Q, d) -> (Q, N+1)."""
        return h @ self.item_embeddings.T

    def extra_repr(self) -> str:
        return f"n_items={self.n_items}, max_len={self.max_len}"


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
