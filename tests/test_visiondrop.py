"""VisionDrop on tiny LLaVA models: decode consistency, exact budgets, batching, what is kept, generation modes."""

from __future__ import annotations

import pytest
import torch

import visiondrop as vd
from conftest import BOS, EOS, N_TOKENS, RAGGED, generate, image, make_batch, tiny_llava
from visiondrop.models.base import VisionTokens

NEW = 8  # generated tokens compared


def _new_tokens(out: torch.Tensor, batch: dict) -> torch.Tensor:
    return out[:, batch["input_ids"].shape[1] :]


@pytest.mark.parametrize("budget", [6, 16, 40, 0.5])
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_cached_decode_equals_full_recomputation(llava_any, budget, positions):
    """Image-query scores only see tokens up to the image, so use_cache=False must reproduce the cached run."""
    batch = make_batch(RAGGED)
    method = vd.VisionDrop(budget=budget, positions=positions)
    with method.apply(llava_any):
        cached = generate(
            llava_any, batch, max_new_tokens=NEW, output_scores=True, return_dict_in_generate=True
        )
        full = generate(
            llava_any,
            batch,
            max_new_tokens=NEW,
            output_scores=True,
            return_dict_in_generate=True,
            use_cache=False,
        )
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.scores, full.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The caller's prompt comes back in front of the new tokens, as from an unpatched generate().
    assert torch.equal(cached.sequences[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert len(set(_new_tokens(cached.sequences, batch)[0].tolist())) > 2  # a model that says something


@pytest.mark.parametrize("budget", [6, 16, 40])
def test_visual_tokens_per_stage_equal_the_schedule_for_every_sample(llava, budget):
    batch = make_batch(RAGGED)
    method = vd.VisionDrop(budget=budget)
    schedule = method.schedule(N_TOKENS, 8)
    with method.apply(llava) as run:
        generate(llava, batch)
    report = run.report
    assert [len(s.images) for s in report.samples] == [1, 2, 0]
    for im in report.images:
        assert im.counts() == schedule.counts()
        assert [st.layer for st in im.stages] == [s.layer for s in schedule.stages]
        assert [st.contextual for st in im.stages] == [s.contextual for s in schedule.stages]
        assert im.layer_average == schedule.layer_average
        assert len(im.stages[-1].token_patch) == schedule.final_count
    assert report.samples[0].layer_average == pytest.approx(budget, abs=1)
    assert str(report).count("sample") == 3 and "no image" in str(report)


def test_sequence_lengths_shrink_by_exactly_the_removed_tokens(llava):
    """The layers really see fewer tokens: check the hidden-state lengths layer by layer."""
    batch = make_batch([[BOS, 5, *image(), 7, 8]])
    method = vd.VisionDrop(budget=16)
    schedule = method.schedule(N_TOKENS, 8)
    with method.apply(llava), torch.no_grad():
        out = llava(**batch, output_hidden_states=True)
    text = 4
    expected = [n + text for n in schedule.tokens_per_layer()]
    seen = [h.shape[1] for h in out.hidden_states[1:]]  # hidden_states[i + 1] = output of layer i
    assert seen == expected
    assert out.logits.shape[1] == schedule.final_count + text


def test_a_batch_gives_the_same_tokens_as_its_prompts_one_at_a_time(llava):
    batch = make_batch(RAGGED)
    method = vd.VisionDrop(budget=16)
    with method.apply(llava):
        together = _new_tokens(generate(llava, batch, max_new_tokens=NEW), batch)
        image_index = 0
        for i, row in enumerate(RAGGED):
            single = make_batch([row])
            count = row.count(99) // N_TOKENS
            if count:
                single["pixel_values"] = batch["pixel_values"][image_index : image_index + count]
            image_index += count
            alone = _new_tokens(generate(llava, single, max_new_tokens=NEW), single)[0]
            row_tokens = together[i, : alone.shape[0]]
            assert torch.equal(row_tokens, alone), f"row {i}"


def test_right_padding_gives_the_same_result_as_left_padding(llava):
    """Pruned rows are re-laid out left-padded, so the padding side the caller used does not matter."""
    left, right = make_batch(RAGGED, side="left"), make_batch(RAGGED, side="right")
    with vd.VisionDrop(budget=16).apply(llava):
        a = _new_tokens(generate(llava, left), left)
        b = _new_tokens(generate(llava, right), right)
    assert torch.equal(a, b)


class _Recorder(vd.VisionDrop):
    """VisionDrop that keeps the scores it ranked by (tests only)."""

    def select_vision(self, tokens, stage):
        self.vision_scores = tokens.cls_attention() if self.score == "cls" else tokens.visual_attention()
        return super().select_vision(tokens, stage)

    def select_llm(self, tokens, stage):
        self.llm_scores = [*getattr(self, "llm_scores", []), tokens.visual_attention(debias=self.debias)]
        return super().select_llm(tokens, stage)


def _cls_attention_by_hand(model, pixel_values):
    """[CLS] attention at the feature layer computed from the weights, independently of visiondrop."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    layer_idx = (
        len(out.hidden_states) - 1 + model.config.vision_feature_layer
    )  # the layer that outputs hs[-2]
    layer = tower.encoder.layers[layer_idx]
    x = layer.layer_norm1(out.hidden_states[layer_idx])
    attn = layer.self_attn
    heads = lambda t: t.view(t.shape[0], t.shape[1], attn.num_heads, -1).transpose(1, 2)  # noqa: E731
    q, k = heads(attn.q_proj(x)), heads(attn.k_proj(x))
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1).mean(1)  # (I, 1+N, 1+N)
    return probs[:, 0, 1:]  # [CLS] row, patch columns


@pytest.mark.parametrize("keep_cls", [True, False])
def test_vision_stage_keeps_exactly_the_top_cls_attention_patches(llava, keep_cls):
    batch = make_batch(RAGGED)
    method = vd.VisionDrop(budget=16, keep_cls=keep_cls)
    stage = method.schedule(N_TOKENS, 8).vision
    with torch.no_grad():
        by_hand = _cls_attention_by_hand(llava, batch["pixel_values"])
        with method.apply(llava) as run:
            llava(**batch)
    top = stage.dominant - (1 if keep_cls else 0)
    for im, scores in zip(run.report.images, by_hand, strict=True):
        expected = sorted(scores.topk(top).indices.tolist())
        view = im.stages[0]
        assert view.kept_patches() == expected
        assert (view.token_patch[0] == -1) == keep_cls  # [CLS] passed on first when kept
        # Every patch is either kept or merged into a contextual token: nothing is thrown away.
        assert all(owner >= 0 for owner in view.patch_owner)


def test_in_llm_stage_keeps_exactly_the_top_visual_scores(llava):
    """With the vision stage keeping everything, scores at the first boundary can be computed by hand from the
    unpruned model's hidden states after layer 2 with layer 2's weights."""
    batch = make_batch([[BOS, 5, 6, *image(), 7, 8]])
    method = _Recorder(stages=[(N_TOKENS, 0), (2, 20, 4)])
    with torch.no_grad():
        hidden = llava(**batch, output_hidden_states=True).hidden_states[2]  # residual after layer 2 (count)
        with method.apply(llava) as run:
            llava(**batch)
        layer = llava.model.language_model.layers[2]
        rotary = llava.model.language_model.rotary_emb
        positions = torch.arange(hidden.shape[1])[None]
        cos, sin = rotary(hidden, positions)
        x = layer.input_layernorm(hidden)
        attn = layer.self_attn
        q = attn.q_proj(x).view(1, -1, 4, 16).transpose(1, 2)
        k = attn.k_proj(x).view(1, -1, 2, 16).transpose(1, 2)
        rot = lambda t: torch.cat([-t[..., 8:], t[..., :8]], -1)  # noqa: E731
        q, k = q * cos[:, None] + rot(q) * sin[:, None], k * cos[:, None] + rot(k) * sin[:, None]
        k = k.repeat_interleave(2, dim=1)  # GQA: query head h uses KV head h // 2
        logits = (q @ k.transpose(-1, -2)) / 4.0
        causal = torch.ones(hidden.shape[1], hidden.shape[1], dtype=torch.bool).tril()
        probs = logits.masked_fill(~causal, float("-inf")).softmax(-1).mean(1)[0]
        cols = torch.arange(3, 3 + N_TOKENS)
        by_hand = probs[cols][:, cols].mean(0)
    torch.testing.assert_close(method.llm_scores[0][0], by_hand, rtol=1e-4, atol=1e-6)
    expected = sorted(by_hand.topk(20).indices.tolist())
    view = run.report.images[0].stages[1]
    assert view.kept_patches() == expected
    assert all(owner >= 0 for owner in view.patch_owner)


class _FakeTokens(VisionTokens):
    """Vision tokens with scores and keys chosen by hand."""

    def __init__(self, hidden, scores, keys):
        super().__init__(hidden, has_cls=True, grids=((2, 4),))
        self._scores, self._keys = scores, keys

    def cls_attention(self):
        return self._scores

    def keys(self):
        return self._keys


def test_reference_mode_reproduces_the_release_arithmetic_on_a_worked_example():
    scores = torch.tensor([[0.0, 0.10, 0.50, 0.05, 0.30, 0.02, 0.01, 0.20, 0.07]])
    keys = torch.tensor(
        [[[0, 0], [1, 0], [9, 9], [1, 0.1], [9, 9], [0.1, 1], [0, 1], [0.2, 1], [1, 0.2]]],
        dtype=torch.float32,
    )
    hidden = torch.arange(9, dtype=torch.float32).view(1, 9, 1).expand(1, 9, 3) * 10
    tokens = _FakeTokens(hidden, scores, keys)
    method = vd.VisionDrop.reference(stages=[(3, 2)])
    selection = method.select_vision(tokens, vd.Stage(0, 3, 2))
    out = selection.apply(hidden)[0, :, 0].tolist()
    # [CLS], patches 2 and 4 by score; anchors R[0]=1 and R[3]=6 of R=[1,3,5,6,7,8];
    # 3 and 8 join anchor 1, 5 and 7 join anchor 6; contextual = anchor + mean(members).
    assert out == [0, 20, 40, 10 + (30 + 80) / 2, 60 + (50 + 70) / 2]
    mean = vd.VisionDrop(stages=[(3, 2)], merge="mean").select_vision(tokens, vd.Stage(0, 3, 2))
    assert mean.apply(hidden)[0, 3:, 0].tolist() == [(10 + 30 + 80) / 3, (60 + 50 + 70) / 3]


@pytest.mark.parametrize("score", ["cls", "visual"])
@pytest.mark.parametrize("merge", ["reference", "mean"])
def test_every_option_runs_and_stays_decode_consistent(llava, score, merge):
    batch = make_batch(RAGGED)
    method = vd.VisionDrop(budget=12, score=score, merge=merge, keep_cls=False, debias=True)
    with method.apply(llava) as run:
        cached = generate(llava, batch)
        full = generate(llava, batch, use_cache=False)
    assert torch.equal(cached, full)
    assert all(st.token_patch[0] != -1 for im in run.report.images for st in im.stages)  # no [CLS] passed on


def test_beam_search_and_sampling(llava):
    batch = make_batch(RAGGED)
    with vd.VisionDrop(budget=16).apply(llava):
        beams = generate(llava, batch, num_beams=3, num_return_sequences=2)
        beams_full = generate(llava, batch, num_beams=3, num_return_sequences=2, use_cache=False)
        torch.manual_seed(7)
        sampled = generate(llava, batch, do_sample=True, top_k=20)
        torch.manual_seed(7)
        sampled_again = generate(llava, batch, do_sample=True, top_k=20)
        torch.manual_seed(7)
        sampled_full = generate(llava, batch, do_sample=True, top_k=20, use_cache=False)
    assert beams.shape[0] == 2 * batch["input_ids"].shape[0]
    assert torch.equal(beams, beams_full)
    assert torch.equal(beams[:, : batch["input_ids"].shape[1]], batch["input_ids"].repeat_interleave(2, 0))
    assert torch.equal(sampled, sampled_again) and torch.equal(sampled, sampled_full)


def test_a_second_generate_continues_the_conversation(llava):
    batch = make_batch([[BOS, 5, *image(), 7, 8], [BOS, 6, 6, *image(), 9]])
    turn = torch.tensor([[11, 12, 13], [14, 15, 16]])
    with vd.VisionDrop(budget=16).apply(llava):
        first = generate(llava, batch, max_new_tokens=4, return_dict_in_generate=True, eos_token_id=None)
        ids = torch.cat([first.sequences, turn], dim=1)
        mask = torch.cat(
            [batch["attention_mask"], torch.ones(2, ids.shape[1] - batch["attention_mask"].shape[1])], 1
        )
        second = generate(
            llava,
            {"input_ids": ids, "attention_mask": mask.long()},
            past_key_values=first.past_key_values,
            max_new_tokens=5,
            eos_token_id=None,
        )
        # The same conversation recomputed from scratch, images included.
        whole = {"input_ids": ids, "attention_mask": mask.long(), "pixel_values": batch["pixel_values"]}
        reference = generate(llava, whole, max_new_tokens=5, use_cache=False, eos_token_id=None)
    assert torch.equal(second[:, : ids.shape[1]], ids)
    assert torch.equal(second, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_with_exact_counts(dtype):
    model = tiny_llava(dtype=dtype)
    batch = make_batch(RAGGED, dtype=dtype)
    method = vd.VisionDrop(budget=16)
    with method.apply(model) as run, torch.no_grad():
        logits = model(**batch).logits
        generate(model, batch)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert all(im.counts() == method.schedule(N_TOKENS, 8).counts() for im in run.report.images)


def test_multi_head_attention_model_and_positional_call(llava):
    model = tiny_llava(kv_heads=4, seed=3)
    batch = make_batch(RAGGED)
    with vd.VisionDrop(budget=16).apply(model):
        cached = generate(model, batch)
        full = generate(model, batch, use_cache=False)
        positional = model.generate(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            max_new_tokens=6,
            do_sample=False,
        )
    assert torch.equal(cached, full) and torch.equal(cached, positional)


def test_generation_stops_at_eos_like_the_unpatched_model(llava):
    batch = make_batch(RAGGED)
    with vd.VisionDrop(budget=16).apply(llava):
        out = generate(llava, batch, max_new_tokens=30, eos_token_id=EOS)
    assert out.shape[1] <= batch["input_ids"].shape[1] + 30


def test_report_gives_the_analytic_cost_of_the_run(llava):
    from visiondrop import flops

    batch = make_batch([[BOS, 5, *image(), 7, 8]])
    method = vd.VisionDrop(budget=16)
    with method.apply(llava) as run:
        generate(llava, batch)
    arch = flops.ArchSpec.from_config(llava.config)
    schedule = method.schedule(N_TOKENS, 8)
    text = 4
    expected = flops.prefill_flops(
        arch,
        visual_tokens_per_layer=schedule.tokens_per_layer(),
        text_tokens=text,
        vision_tokens=[N_TOKENS + 1],
        projector_tokens=schedule.input_count,
    )
    unpruned = flops.prefill_flops(
        arch, visual_tokens_per_layer=N_TOKENS, text_tokens=text, vision_tokens=[65]
    )
    got = run.report.flops
    assert got["tflops"] == pytest.approx(expected.tflops)
    assert got["unpruned_tflops"] == pytest.approx(unpruned.tflops)
    assert got["ratio"] == pytest.approx(unpruned.total / expected.total)
    kv = flops.kv_cache_bytes(arch, [text + n for n in schedule.tokens_per_layer()], 4)
    assert got["kv_bytes"] == kv and "fewer" in str(run.report)


def test_profiling_times_only_when_asked(llava):
    batch = make_batch(RAGGED)
    with vd.VisionDrop(budget=16).apply(llava) as quiet:
        generate(llava, batch)
    with vd.VisionDrop(budget=16).apply(llava, profile=True) as timed:
        generate(llava, batch)
    assert quiet.timings == {"vision_select_s": 0.0, "llm_select_s": 0.0}
    assert timed.timings["vision_select_s"] > 0 and timed.timings["llm_select_s"] > 0


@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_a_single_prompt_without_a_mask_decodes_consistently(llava, positions):
    """No padding and no attention_mask: transformers would read preserve's position gaps as packed sequences."""
    batch = make_batch([RAGGED[1]])
    del batch["attention_mask"]
    with vd.VisionDrop(budget=16, positions=positions).apply(llava):
        cached = generate(llava, batch, max_new_tokens=NEW)
        full = generate(llava, batch, max_new_tokens=NEW, use_cache=False)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_a_hand_written_decode_loop_matches_generate(llava, positions):
    """model(...) with a cache, the caller's mask grown as for the unpruned model, as many decode loops do."""
    batch = make_batch(RAGGED)
    method = vd.VisionDrop(budget=16, positions=positions)
    with method.apply(llava), torch.no_grad():
        expected = _new_tokens(generate(llava, batch, max_new_tokens=5), batch)
        out = llava(**batch)
        cache, mask = out.past_key_values, batch["attention_mask"]
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(4):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = llava(input_ids=tokens[-1][:, None], attention_mask=mask, past_key_values=cache)
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(tokens, dim=1), expected)
