"""Tests for annsample.model: shapes, causality, padding invariance, the padding row, init."""

from __future__ import annotations

import pytest
import torch

from annsample.config import ModelConfig
from annsample.model import SASRec, count_parameters

N_ITEMS, MAX_LEN = 40, 12
CONFIG = ModelConfig(hidden_size=16, num_blocks=2, num_heads=2, dropout=0.3)


def make_model(config: ModelConfig = CONFIG, seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(N_ITEMS, MAX_LEN, config)


def right_aligned(rows: list[list[int]], width: int = MAX_LEN) -> torch.Tensor:
    """(B, width) int64 with each row's items at the right and 0 padding on the left."""
    out = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, width - len(row) :] = torch.tensor(row)
    return out


ROWS = [[3, 7, 1], [5, 9, 2, 8, 4, 6, 11, 12, 13, 14, 15, 16], [40], [2, 2, 2, 30, 31]]


def test_encode_and_item_table_shapes():
    model = make_model().eval()
    seq = right_aligned(ROWS)
    h = model.encode(seq)
    assert h.shape == (len(ROWS), MAX_LEN, CONFIG.hidden_size)
    assert h.dtype == torch.float32
    assert model.item_embeddings.shape == (N_ITEMS + 1, CONFIG.hidden_size)
    assert model.score_all(h[:, -1]).shape == (len(ROWS), N_ITEMS + 1)


def test_encode_accepts_shorter_sequences():
    model = make_model().eval()
    assert model.encode(right_aligned(ROWS[:1], width=4)).shape == (1, 4, CONFIG.hidden_size)


def test_outputs_are_finite_for_all_padding_rows():
    model = make_model().eval()
    seq = right_aligned([[], [1, 2]])
    assert torch.isfinite(model.encode(seq)).all()


def test_score_all_is_dot_product_with_item_table():
    model = make_model().eval()
    h = model.encode(right_aligned(ROWS))[:, -1]
    expected = torch.stack(
        [torch.stack([h[b] @ e for e in model.item_embeddings]) for b in range(len(ROWS))]
    )
    torch.testing.assert_close(model.score_all(h), expected)


@pytest.mark.parametrize("position", [5, 9, MAX_LEN - 1])
def test_causality_later_items_do_not_change_earlier_outputs(position):
    model = make_model().eval()
    seq = right_aligned([list(range(1, MAX_LEN + 1))])
    changed = seq.clone()
    changed[0, position:] = torch.arange(20, 20 + MAX_LEN - position)
    with torch.no_grad():
        h, h_changed = model.encode(seq), model.encode(changed)
    torch.testing.assert_close(h[:, :position], h_changed[:, :position], rtol=0, atol=1e-6)
    assert not torch.allclose(h[:, position:], h_changed[:, position:])  # the change is seen


def test_left_padding_does_not_change_the_last_output():
    """Training and evaluation trim the common left padding of a batch: outputs must not move."""
    model = make_model().eval()
    seq = right_aligned(ROWS)
    with torch.no_grad():
        full = model.encode(seq)[:, -1]
        for width in (MAX_LEN - 1, 6, 3):
            trimmed = model.encode(seq[:, -width:])[:, -1]
            # rows longer than the width lose real items, so only the rows that still fit compare
            fits = torch.tensor([len(row) <= width for row in ROWS])
            torch.testing.assert_close(trimmed[fits], full[fits], rtol=0, atol=1e-5)


def test_real_positions_do_not_depend_on_batch_neighbours_or_trimming():
    model = make_model().eval()
    row = ROWS[0]
    with torch.no_grad():
        alone = model.encode(right_aligned([row], width=len(row)))[0]  # (len(row), d)
        in_batch = model.encode(right_aligned(ROWS))[0, -len(row) :]
    torch.testing.assert_close(alone, in_batch, rtol=0, atol=1e-5)


def test_last_position_sees_the_first_item():
    """The padding mask must not hide real items: changing the first item moves the last output."""
    model = make_model().eval()
    with torch.no_grad():
        a = model.encode(right_aligned([[9, 3, 7, 1]]))[:, -1]
        b = model.encode(right_aligned([[10, 3, 7, 1]]))[:, -1]
    assert not torch.allclose(a, b)


def test_padding_row_is_zero_and_gets_no_gradient():
    model = make_model().train()
    assert torch.count_nonzero(model.item_embeddings[0]) == 0
    # a generic loss through the embedding lookup (a plain sum would be flat after LayerNorm)
    h = model.encode(right_aligned(ROWS))
    (h * torch.randn(h.shape)).sum().backward()
    grad = model.item_embedding.weight.grad
    assert torch.count_nonzero(grad[0]) == 0
    assert torch.count_nonzero(grad[1:]) > 0
    torch.optim.Adam(model.parameters(), lr=0.1).step()
    assert torch.count_nonzero(model.item_embeddings[0]) == 0


def test_sparse_embeddings_give_a_sparse_gradient_on_the_item_table():
    model = make_model(
        ModelConfig(hidden_size=16, num_blocks=1, num_heads=2, sparse_embeddings=True)
    )
    seq = right_aligned(ROWS)
    h = model.encode(seq)
    (h * torch.randn(h.shape)).sum().backward()
    grad = model.item_embedding.weight.grad
    assert grad.is_sparse
    dense = grad.to_dense()
    assert torch.count_nonzero(dense[0]) == 0
    touched = torch.unique(seq[seq > 0])
    assert set(torch.nonzero(dense.abs().sum(dim=1)).flatten().tolist()) == set(touched.tolist())
    assert not model.position_embedding.weight.grad.is_sparse


def test_dense_and_sparse_models_compute_the_same_outputs():
    dense = make_model(ModelConfig(hidden_size=16, num_blocks=1, num_heads=2), seed=4).eval()
    sparse = make_model(
        ModelConfig(hidden_size=16, num_blocks=1, num_heads=2, sparse_embeddings=True), seed=4
    ).eval()
    seq = right_aligned(ROWS)
    with torch.no_grad():
        torch.testing.assert_close(dense.encode(seq), sparse.encode(seq))


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    model = make_model(ModelConfig(hidden_size=16, num_blocks=2, num_heads=2, dropout=0.5))
    seq = right_aligned(ROWS)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(seq), model.encode(seq), rtol=0, atol=0)
        model.train()
        assert not torch.allclose(model.encode(seq), model.encode(seq))


def test_zero_dropout_train_mode_equals_eval_mode():
    model = make_model(ModelConfig(hidden_size=16, num_blocks=2, num_heads=2, dropout=0.0))
    seq = right_aligned(ROWS)
    with torch.no_grad():
        train_out = model.train().encode(seq)
        eval_out = model.eval().encode(seq)
    torch.testing.assert_close(train_out, eval_out)


def test_same_seed_gives_the_same_weights():
    a, b = make_model(seed=3), make_model(seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(a.item_embeddings, make_model(seed=4).item_embeddings)


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_init_std(std):
    config = ModelConfig(hidden_size=64, num_blocks=1, num_heads=2, init_std=std)
    torch.manual_seed(0)
    model = SASRec(2000, 50, config)
    items = model.item_embeddings[1:].detach()
    assert items.mean().abs() < 0.1 * std
    assert items.std().item() == pytest.approx(std, rel=0.02)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.weight.std().item() == pytest.approx(std, rel=0.1), name
            assert torch.count_nonzero(module.bias) == 0, name
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.count_nonzero(module.bias) == 0, name


def test_count_parameters_counts_every_trainable_weight():
    model = make_model()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.item_embedding.weight.requires_grad_(False)
    assert (
        count_parameters(model) == sum(p.numel() for p in model.parameters()) - (N_ITEMS + 1) * 16
    )


# --------------------------------------------------------------------------- layer norm placement

PRE = ModelConfig(hidden_size=16, num_blocks=2, num_heads=2, dropout=0.3, layer_norm="pre")


def reference_post_ln(model: SASRec, seq: torch.Tensor) -> torch.Tensor:
    """The post-LN forward as annsample computed it before ``model.layer_norm`` existed (eval)."""
    B, T = seq.shape
    positions = torch.arange(model.max_len - T, model.max_len)
    x = model.input_norm(model.item_embedding(seq) + model.position_embedding(positions)[None])
    keep = torch.ones(T, T, dtype=torch.bool).tril()[None] & (seq > 0)[:, None, :]
    mask = (keep | torch.eye(T, dtype=torch.bool)[None])[:, None]
    for attention, feed_forward in model.blocks:
        H, D = attention.num_heads, x.shape[-1]
        q, k, v = attention.qkv(x).view(B, T, 3, H, D // H).unbind(dim=2)
        y = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        x = attention.norm(x + attention.out(y.transpose(1, 2).reshape(B, T, D)))
        x = feed_forward.norm(x + feed_forward.fc2(torch.nn.functional.gelu(feed_forward.fc1(x))))
    return x


def test_default_post_ln_model_is_bit_identical_to_the_old_one():
    model = make_model().eval()
    assert model.final_norm is None
    with torch.no_grad():
        assert torch.equal(
            model.encode(right_aligned(ROWS)), reference_post_ln(model, right_aligned(ROWS))
        )
    # the same weights and names as before, so old checkpoints load
    assert not any("final_norm" in name for name in model.state_dict())


def test_pre_ln_adds_only_a_final_layer_norm_and_moves_each_norm_before_its_sublayer():
    post, pre = make_model(seed=5), make_model(PRE, seed=5)
    extra = set(pre.state_dict()) - set(post.state_dict())
    assert extra == {"final_norm.weight", "final_norm.bias"}
    assert count_parameters(pre) == count_parameters(post) + 2 * PRE.hidden_size
    pre.load_state_dict(post.state_dict(), strict=False)  # the same weights, placed differently
    seq = right_aligned(ROWS)
    with torch.no_grad():
        h_pre, h_post = pre.eval().encode(seq), post.eval().encode(seq)
    assert not torch.allclose(h_pre, h_post)
    # hand-computed pre-LN: x + f(LN(x)) per sublayer, then the final LayerNorm
    with torch.no_grad():
        B, T = seq.shape
        x = pre.input_norm(pre.item_embedding(seq) + pre.position_embedding.weight[None, :T])
        keep = torch.ones(T, T, dtype=torch.bool).tril()[None] & (seq > 0)[:, None, :]
        mask = (keep | torch.eye(T, dtype=torch.bool)[None])[:, None]
        for attention, feed_forward in pre.blocks:
            x = x + attention.out(attention._attend(attention.norm(x), mask))
            x = x + feed_forward.fc2(
                torch.nn.functional.gelu(feed_forward.fc1(feed_forward.norm(x)))
            )
        torch.testing.assert_close(h_pre, pre.final_norm(x), rtol=0, atol=1e-6)


def assert_causal_and_padding_invariant(model: SASRec) -> None:
    """Later items do not change earlier states; trimming left padding does not change the last."""
    seq = right_aligned([list(range(1, MAX_LEN + 1))])
    changed = seq.clone()
    changed[0, 6:] = torch.arange(20, 20 + MAX_LEN - 6)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode(seq)[:, :6], model.encode(changed)[:, :6], rtol=0, atol=1e-6
        )
        full = model.encode(right_aligned(ROWS))[:, -1]
        trimmed = model.encode(right_aligned(ROWS)[:, -6:])[:, -1]
    fits = torch.tensor([len(row) <= 6 for row in ROWS])
    torch.testing.assert_close(trimmed[fits], full[fits], rtol=0, atol=1e-5)


def test_pre_ln_keeps_causality_padding_invariance_and_trains_the_final_norm():
    model = make_model(PRE).eval()
    assert_causal_and_padding_invariant(model)
    model.train()
    h = model.encode(right_aligned(ROWS))
    (h * torch.randn(h.shape)).sum().backward()
    assert model.final_norm.weight.grad is not None
    assert torch.count_nonzero(model.final_norm.weight.grad) > 0


# --------------------------------------------------------------------------- original SASRec block

KANG = ModelConfig(hidden_size=16, num_blocks=2, num_heads=2, dropout=0.3, architecture="sasrec")


def test_sasrec_architecture_matches_a_hand_computed_original_block():
    model = make_model(KANG).eval()
    seq = right_aligned(ROWS)
    B, T = seq.shape
    with torch.no_grad():
        x = model.item_embedding(seq) * 4.0 + model.position_embedding.weight[None, :T]  # √16
        keep = torch.ones(T, T, dtype=torch.bool).tril()[None] & (seq > 0)[:, None, :]
        mask = (keep | torch.eye(T, dtype=torch.bool)[None])[:, None]
        for block in model.blocks:
            q = block.q(block.query_norm(x)).view(B, T, 2, 8).transpose(1, 2)
            k, v = block.kv(x).view(B, T, 2, 2, 8).unbind(dim=2)
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
            )
            x = block.ff_norm(x + block.out(y.transpose(1, 2).reshape(B, T, 16)))
            x = x + block.fc2(torch.relu(block.fc1(x)))
        torch.testing.assert_close(model.encode(seq), model.final_norm(x), rtol=0, atol=1e-5)
    # a feed-forward of width d, not 4d, and no input LayerNorm
    assert model.blocks[0].fc1.weight.shape == (16, 16)
    assert not hasattr(model, "input_norm")


def test_sasrec_architecture_is_causal_padding_invariant_and_xavier_initialised():
    model = make_model(KANG).eval()
    assert_causal_and_padding_invariant(model)
    assert torch.count_nonzero(model.item_embeddings[0]) == 0
    # Xavier-normal: std sqrt(2 / (fan_in + fan_out)), not the s3rec N(0, 0.02)
    big = SASRec(4000, MAX_LEN, KANG)
    expected = (2.0 / (4001 + 16)) ** 0.5
    assert abs(big.item_embeddings[1:].std().item() / expected - 1) < 0.05
