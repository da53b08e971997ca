"""Per-document attention (DOC_ATTENTION): segments, rotary restarts, masks, every forward path, seeded data order."""
import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import every_path, hparams, randomize, small_model

BOS = tg.BOS_ID


def documents(*lengths: int, fragment: int = 0, seed: int = 0) -> list[torch.Tensor]:
    """A row's pieces: an optional leading fragment without BOS (a document the row start cut), then
    documents [BOS, tokens...] of the given lengths; no token but the first of a document is BOS."""
    g = torch.Generator().manual_seed(seed)
    pieces = [torch.randint(2, 512, (fragment,), generator=g)] if fragment else []
    for n in lengths:
        pieces.append(torch.cat((torch.tensor([BOS]), torch.randint(2, 512, (n - 1,), generator=g))))
    return pieces


def logits(model: tg.GPT, row: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_logits(row[None])[0]


def test_segments_start_at_bos_or_the_row_start_and_positions_restart():
    ids = torch.tensor([[7, 8, BOS, 9, 9, BOS, BOS, 5], [BOS, 3, 4, 5, 6, 7, 8, 9]])
    starts = tg.segment_starts(ids)
    assert starts.tolist() == [[0, 0, 2, 2, 2, 5, 6, 6], [0] * 8]
    mask = tg.document_mask(starts)[:, 0]
    assert mask[0, 4].tolist() == [False, False, True, True, True, False, False, False]
    assert mask[0, 6].tolist() == [False] * 6 + [True, False]  # a lone BOS attends only to itself
    assert torch.equal(mask[1], torch.ones(8, 8, dtype=torch.bool).tril())
    cos, sin = tg.rotary_tables(4, 10000.0, 8)
    layout = tg.attention_layout(ids, cos, sin, per_document=True, backend="sdpa")
    assert torch.equal(layout.cos[0], cos[[0, 1, 0, 1, 2, 0, 0, 1]]) and torch.equal(layout.sin[1], sin)
    dense = tg.attention_layout(ids, cos, sin, per_document=False, backend="sdpa")
    assert dense.mask is None and torch.equal(dense.cos, cos)


@pytest.mark.parametrize("loops", [0, 2])
def test_a_packed_row_computes_what_each_document_computes_alone(loops):
    """SMALL has looping, two lanes from layer 3, SparseAttnGate and SmearGate on; fp32 on CPU."""
    model = small_model()
    randomize(model)
    rows = [documents(5, 7, fragment=4, seed=1), documents(3, 6, 7, seed=2)]
    with model.looping(loops):
        packed = [logits(model, torch.cat(row)) for row in rows]
        with torch.no_grad():
            batched = model.forward_logits(torch.stack([torch.cat(row) for row in rows]))
        for row, got, in_batch in zip(rows, packed, batched):
            assert torch.allclose(in_batch, got, atol=1e-5)  # rows of one batch never see each other
            start = 0
            for doc in row:
                alone = logits(model, doc)
                assert torch.allclose(got[start:start + len(doc)], alone, atol=1e-5, rtol=1e-5)
                start += len(doc)


def test_changing_one_document_changes_no_output_of_another_in_the_row():
    model = small_model()
    randomize(model)
    a, b = documents(7, 9, seed=3)
    a2 = a.clone()
    a2[1:] = torch.randint(2, 512, (len(a) - 1,), generator=torch.Generator().manual_seed(4))
    before, after = logits(model, torch.cat((a, b))), logits(model, torch.cat((a2, b)))
    assert not torch.allclose(before[:len(a)], after[:len(a)], atol=1e-3)
    assert torch.equal(before[len(a):], after[len(a):])
    dense = small_model(DOC_ATTENTION=0)  # the same weights: DOC_ATTENTION adds no parameter
    dense.load_state_dict(model.state_dict())
    before, after = logits(dense, torch.cat((a, b))), logits(dense, torch.cat((a2, b)))
    assert not torch.allclose(before[len(a):], after[len(a):], atol=1e-3)  # dense attention crosses the BOS


def test_a_row_without_bos_is_the_dense_model():
    model, dense = small_model(), small_model(DOC_ATTENTION=0)
    randomize(model)
    dense.load_state_dict(model.state_dict())
    ids = torch.randint(2, 512, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model.forward_logits(ids), dense.forward_logits(ids), atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_attends_like_the_sdpa_mask():
    """The CUDA path's BlockMask, run by flex_attention's eager (forward-only) CPU path, against SDPA's mask."""
    torch.manual_seed(0)
    ids = torch.cat([torch.cat(documents(40, 100, fragment=10, seed=5)), torch.cat(documents(150, seed=6))]).view(2, 150)
    starts = tg.segment_starts(ids)
    q, k, v = torch.randn(2, 150, 4, 8), torch.randn(2, 150, 2, 8), torch.randn(2, 150, 2, 8)
    sdpa = tg.causal_attention(q, k, v, "sdpa", tg.document_mask(starts))
    flex = tg.causal_attention(q, k, v, "flex", tg.document_block_mask(starts))
    assert torch.allclose(flex, sdpa, atol=1e-5)
    model = small_model()
    randomize(model)
    flex_model = tg.GPT(model.hp, "flex")
    flex_model.load_state_dict(model.state_dict())
    row = torch.cat(documents(6, 10, seed=7))[None]
    with torch.no_grad():
        assert torch.allclose(flex_model.forward_logits(row), model.forward_logits(row), atol=1e-5)


def test_the_attention_path_is_chosen_once_from_the_device():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    on, off, sdpa = hparams(), hparams(DOC_ATTENTION=0), hparams(ATTN_BACKEND="sdpa")
    assert tg.document_attention_backend(on, "sdpa", cuda) == "flex"
    assert tg.document_attention_backend(sdpa, "sdpa", cuda) == "sdpa"
    assert tg.document_attention_backend(on, "sdpa", cpu) == "sdpa"  # flex_attention has no CPU backward
    assert tg.document_attention_backend(off, "flash_attn_3", cuda) == "flash_attn_3"


def test_every_forward_path_sees_document_attention(tiny_data):
    """Plain evaluation, sliding windows, TTT scoring and GPTQ calibration all move with DOC_ATTENTION."""
    results = {}
    for doc in (1, 0):
        hp = hparams(DATA_DIR=tiny_data["root"], VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2,
                     NUM_KV_HEADS=1, ROPE_DIMS=4, XSA_LAST_N=2, NUM_LOOPS=1, LOOP_START=0, LOOP_END=0,
                     EVAL_SEQ_LEN=64, TRAIN_SEQ_LEN=64, VAL_BATCH_TOKENS=8 * 64 * 4, EVAL_STRIDE=64,
                     TTT_CHUNK_TOKENS=1024, DOC_ATTENTION=doc)
        torch.manual_seed(0)
        model = tg.GPT(hp)
        randomize(model)
        tokens = tg.load_validation_tokens(hp)
        tokens = tokens[:(len(tokens) - 1) // 64 * 64 + 1]  # whole windows: plain and sliding score the same targets
        assert (tokens == BOS).sum() > 1, "the stream should be packed with several documents"
        val = tg.Validation(tokens, tg.byte_counts(tiny_data["sp"]))
        plain, sliding, ttt, hessian = every_path(model, val, hp)
        assert sliding == pytest.approx(plain, rel=1e-6) and ttt == sliding
        batch = torch.from_numpy(tokens[:4 * 64].astype(np.int64)).view(4, 64)
        with torch.no_grad():
            h = model.hidden_states(batch).flatten(0, 1)
        assert torch.allclose(hessian, h.T @ h, rtol=1e-4, atol=1e-6)
        results[doc] = plain, hessian
    assert abs(results[1][0] - results[0][0]) > 1e-4  # float noise here is ~1e-7
    assert not torch.allclose(results[1][1], results[0][1], rtol=1e-3)


def test_the_data_order_depends_on_the_seed_and_only_on_it(tiny_data):
    files = sorted(tiny_data["shards"].glob("fineweb_train_*.bin"))

    def first_batches(seed: int) -> torch.Tensor:
        loader = tg.TrainLoader(files, 16, 512, seed=seed, rank=0, world_size=1, device=torch.device("cpu"))
        return torch.cat([loader.next_batch(4)[0] for _ in range(3)])

    assert torch.equal(first_batches(3), first_batches(3))
    assert not torch.equal(first_batches(3), first_batches(4))
