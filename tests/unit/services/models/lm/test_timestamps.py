import math

import numpy as np
import pytest
import torch
from torch import nn

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.models.lm.timestamps import (
    HEAD_NAME,
    TimestampHeads,
    TimestampMatcher,
    add_source_frames,
    capture_norm_input,
    format_seconds,
    frame_at,
    frame_matching_loss,
    load_timestamp_heads,
    seconds_to_frames,
    similarity,
    soft_targets,
    source_frames,
    time_token_item,
)


def test_heads_are_layernorm_linear_gelu_linear_with_etchat_names():
    heads = TimestampHeads(8)
    shapes = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
    for head in ("frm_head", "vid_head"):
        assert shapes[f"{head}.0.weight"] == (8,)  # LayerNorm(h)
        assert shapes[f"{head}.1.weight"] == (4, 8)  # Linear(h, h/2)
        assert shapes[f"{head}.3.weight"] == (8, 4)  # Linear(h/2, h)
    assert len(shapes) == 12
    x = torch.randn(3, 8)
    f = heads.frm_head
    assert torch.allclose(heads.keys(x), f[3](nn.functional.gelu(f[1](f[0](x)))))
    with pytest.raises(InvalidArgumentError, match="expected an even hidden size >= 2, got 7"):
        TimestampHeads(7)


def test_soft_targets_are_unnormalised_powers_of_alpha():
    got = soft_targets(torch.tensor([1.0, -3.0, 10.0, 0.5]), 4, 2.0)
    expected = torch.tensor(
        [
            [0.5, 1.0, 0.5, 0.25],  # t = 1
            [1.0, 0.5, 0.25, 0.125],  # t = -3 clamps to 0
            [0.125, 0.25, 0.5, 1.0],  # t = 10 clamps to 3
            [2**-0.5, 2**-0.5, 2**-1.5, 2**-2.5],  # fractional t
        ]
    )
    assert torch.allclose(got, expected)
    assert torch.allclose(soft_targets(torch.tensor([2.0]), 3, 3.0), torch.tensor([[1 / 9, 1 / 3, 1.0]]))


def test_loss_is_cross_entropy_with_unnormalised_targets_by_hand():
    # h = 2: q = (1, 0), keys (2, 0) and (0, 0): sim = (2 / sqrt 2, 0) = (sqrt 2, 0).
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    lse = math.log(math.exp(math.sqrt(2)) + 1)
    # t = 0, alpha 2: target (1, 0.5); loss = -(1 * (sqrt2 - lse) + 0.5 * (0 - lse)).
    one = 1.5 * lse - math.sqrt(2)
    got = frame_matching_loss([q], [k], [torch.tensor([0.0])], alpha=2.0)
    assert got.item() == pytest.approx(one, rel=1e-6)
    # t = 1: target (0.5, 1): -(0.5 * (sqrt2 - lse) + 1 * (0 - lse)).
    two = 1.5 * lse - 0.5 * math.sqrt(2)
    # Two queries in one sample: mean over them; a sample without queries does not count.
    both = frame_matching_loss(
        [torch.cat([q, q]), q[:0]], [k, k], [torch.tensor([0.0, 1.0]), torch.tensor([])], alpha=2.0
    )
    assert both.item() == pytest.approx((one + two) / 2, rel=1e-6)
    # Two samples: the mean of their losses.
    per_sample = frame_matching_loss([q, q], [k, k], [torch.tensor([0.0]), torch.tensor([1.0])], alpha=2.0)
    assert per_sample.item() == pytest.approx((one + two) / 2, rel=1e-6)


def test_loss_without_targets_is_zero_and_keeps_both_heads_in_the_graph():
    heads = TimestampHeads(4)
    keys = heads.keys(torch.randn(3, 4))
    queries = heads.queries(torch.randn(0, 4))
    loss = frame_matching_loss([queries], [keys], [torch.zeros(0)], alpha=2.0)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in heads.parameters())


def test_loss_checks_its_arguments():
    q, k = torch.zeros(2, 4), torch.zeros(3, 4)
    with pytest.raises(
        InvalidArgumentError, match="expected one target per <vid> query, got 2 queries and 1"
    ):
        frame_matching_loss([q], [k], [torch.zeros(1)], alpha=2.0)
    with pytest.raises(InvalidArgumentError, match="got 1, 1 and 2"):
        frame_matching_loss([q], [k], [torch.zeros(2), torch.zeros(2)], alpha=2.0)


def test_loss_trains_the_heads_towards_the_true_frame():
    torch.manual_seed(0)
    heads = TimestampHeads(8)
    frames = torch.randn(6, 8)
    query_state = torch.randn(1, 8)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(100):
        loss = frame_matching_loss(
            [heads.queries(query_state)], [heads.keys(frames)], [torch.tensor([4.0])], alpha=2.0
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    sim = similarity(heads.queries(query_state), heads.keys(frames))
    assert int(sim.argmax()) == 4


def test_seconds_to_frames_interpolates_over_frame_times():
    assert seconds_to_frames([0, 3, 1.5], [0, 1, 2, 3]).tolist() == [0, 3, 1.5]  # 1 fps: identity
    assert seconds_to_frames([3.5, 0.0, 9.0], [0.5, 2.5, 4.5]).tolist() == [1.5, 0.0, 2.0]
    assert seconds_to_frames([5.0], [0.0]).tolist() == [0.0]
    with pytest.raises(InvalidArgumentError, match="strictly increasing"):
        seconds_to_frames([1.0], [0.0, 2.0, 1.0])
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        seconds_to_frames([1.0], np.zeros(0))


def test_format_seconds():
    assert [format_seconds(s) for s in (12.0, 12.5, 0.04, 3.96)] == ["12", "12.5", "0", "4"]


def test_heads_round_trip_through_a_bundle_and_refuse_a_mismatch():
    heads = TimestampHeads(8)
    flat = {f"{HEAD_NAME}.{k}": v for k, v in heads.state_dict().items()}
    loaded = load_timestamp_heads(flat, hidden_size=8)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in heads.state_dict().items())
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(
        FailedPreconditionError,
        match=r"timestamps.frm_head.0.weight: expected shape \(16,\) \(LLM hidden size 16\), got \(8,\)",
    ):
        load_timestamp_heads(flat, hidden_size=16)
    del flat[f"{HEAD_NAME}.vid_head.3.bias"]
    with pytest.raises(FailedPreconditionError, match=r"missing key timestamps\.vid_head\.3\.bias"):
        load_timestamp_heads(flat, hidden_size=8)


def _identity_heads() -> TimestampHeads:
    heads = TimestampHeads(4)
    heads.frm_head = nn.Sequential(nn.Identity())  # keys = states
    heads.vid_head = nn.Sequential(nn.Identity())  # queries = states
    nn.Module.add_module(heads, "anchor", nn.Linear(1, 1))  # parameters() must not be empty (dtype)
    return heads


def test_matcher_matches_predicting_positions_and_feeds_the_frame_back():
    eye = torch.eye(4)
    # Prompt of 6 positions; the video's 3 frames are at [1, 4): states e0, e1, e2.
    norm_input = torch.stack([eye[3], eye[0], eye[1], eye[2], eye[3], eye[3]])[None]  # (1, 6, 4)
    hidden = torch.stack([eye[3]] * 5 + [eye[2] * 2])[None]  # last position looks like frame 2
    frame_embeds = torch.arange(6.0).reshape(3, 2)  # (F, D) with D = 2
    matcher = TimestampMatcher(
        _identity_heads(), token_id=7, span=(1, 4), frame_embeds=frame_embeds, times=[0.0, 2.0, 4.0]
    )
    assert matcher.prefill(norm_input, hidden) == 2
    assert matcher.on_token(5) is None and matcher.embedding_offset(5) is None
    stamp = matcher.on_token(7)
    assert stamp is not None and (stamp.index, stamp.frame, stamp.seconds) == (0, 2, 4.0)
    offset = matcher.embedding_offset(7)
    assert offset is not None and torch.equal(offset, torch.tensor([4.0, 5.0]))
    assert matcher.step(eye[0][None, None]) == 0
    again = matcher.on_token(7)
    assert again is not None and again.seconds == 0.0
    assert [t.frame for t in matcher.timestamps] == [2, 0] and matcher.matches == [2, 0]


def test_matcher_checks_span_and_order():
    heads = _identity_heads()
    with pytest.raises(InvalidArgumentError, match="expected 3 frame embeddings and times"):
        TimestampMatcher(heads, token_id=1, span=(1, 4), frame_embeds=torch.zeros(2, 2), times=[0, 1, 2])
    matcher = TimestampMatcher(
        heads, token_id=1, span=(1, 4), frame_embeds=torch.zeros(3, 2), times=[0, 1, 2]
    )
    with pytest.raises(InvalidArgumentError, match="step\\(\\) before prefill\\(\\)"):
        matcher.step(torch.zeros(1, 1, 4))
    with pytest.raises(InvalidArgumentError, match="the prefill has 3 positions"):
        matcher.prefill(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))


def test_capture_norm_input_is_the_last_block_output_of_a_real_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (1, 6))
    with capture_norm_input(lm) as captured:
        out = lm(input_ids=ids, output_hidden_states=True)
    assert captured.value is not None and captured.value.shape == (1, 6, 16)
    assert torch.allclose(lm.model.norm(captured.value), out.hidden_states[-1])
    last_block = lm.model.layers[-1](
        out.hidden_states[-2],
        position_embeddings=lm.model.rotary_emb(out.hidden_states[-2], torch.arange(6)[None]),
    )
    last_block = last_block[0] if isinstance(last_block, tuple) else last_block
    assert torch.allclose(captured.value, last_block, atol=1e-5)
    before = captured.value
    lm(input_ids=ids)  # outside the block: the hook is gone
    assert captured.value is before
    with (
        pytest.raises(InvalidArgumentError, match="decoder has a final `norm`"),
        capture_norm_input(nn.Linear(2, 2)),
    ):
        pass


def test_a_time_token_names_the_next_visual_span_else_the_last() -> None:
    spans = [(5, 3), (20, 4)]
    assert [time_token_item(p, spans) for p in (0, 10, 19, 30)] == [0, 1, 1, 1]
    with pytest.raises(InvalidArgumentError):
        time_token_item(3, [])


def test_source_frames_round_half_to_even_and_clamp_as_etchat() -> None:
    # E.T. Chat: frame_token[src.round().clamp(0, T - 1)], frame f at f seconds (1 fps from 0)
    assert [frame_at(x, 6) for x in (2.5, 3.5, 0.49, -1.0, 7.0)] == [2, 4, 0, 0, 5]
    chosen = source_frames([(30, 2.5), (31, 3.5), (40, 9.0)], [(10, 6)], [()])
    assert chosen == [(30, 0, 2), (31, 0, 4), (40, 0, 5)]
    at_half = source_frames([(30, 1.4)], [(10, 3)], [(0.5, 1.5, 2.5)])  # times map seconds to frames
    assert at_half == [(30, 0, 1)]


def test_add_source_frames_adds_each_frame_at_its_token() -> None:
    embeds = torch.zeros(2, 4, 3)
    frames = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = add_source_frames(embeds, [0, 1], [2, 3], frames)
    assert torch.equal(out[0, 2], frames[0]) and torch.equal(out[1, 3], frames[1])
    assert float(out.abs().sum()) == float(frames.sum()) and float(embeds.abs().sum()) == 0.0
    assert add_source_frames(embeds, [], [], torch.zeros(0, 3)) is embeds
