"""DOC_ATTENTION on FlashAttention 3's varlen path, run on CPU against a reference kernel registered under FA3's name."""
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import hparams, randomize, small_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
import gpu_doctor  # noqa: E402

BOS = tg.BOS_ID


def segment_loop_attention(q, k, v, boundaries):
    """The reference: each segment [a, b) of the packed (N, H, D) tensors attends causally to itself alone,
    one SDPA call per segment (no mask: independent of the model's mask code)."""
    out = torch.zeros_like(q)
    edges = boundaries.tolist()
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
            out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True).transpose(0, 1)
    return out


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
    """flash_attn_varlen_func's signature; checks the contract FA3 relies on before computing."""
    assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    lengths = cu_seqlens_q.diff()
    assert cu_seqlens_q[0] == 0 and cu_seqlens_q[-1] == q.size(0) and (lengths >= 0).all()
    assert max_seqlen_q == max_seqlen_k and lengths.max() <= max_seqlen_q
    return segment_loop_attention(q, k, v, cu_seqlens_q)


def old_build_varlen(*args, **kwargs):
    """Builds from before mid-2025 return (out, softmax_lse)."""
    return reference_varlen(*args, **kwargs), None


# The reference as opaque custom ops with fake kernels, as FA3 ships its kernels, so that torch.compile
# traces the call with an unbacked cu_seqlens length. The backward's extra output is sized like FA3's
# softmax_d, (heads, round_up(total + segments * 128, 128)): a shape that follows the segment count.
@torch.library.custom_op("varlen_test::attn", mutates_args=())
def varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    return reference_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)


@varlen_op.register_fake
def _(q, k, v, cu, max_seqlen):
    return torch.empty_like(q)


@torch.library.custom_op("varlen_test::attn_backward", mutates_args=())
def varlen_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    edges = cu.tolist()
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            dq[a:b], dk[a:b], dv[a:b] = causal_attention_backward(grad[a:b], q[a:b], k[a:b], v[a:b])
    return dq, dk, dv, q.new_zeros(q.size(1), workspace_rows(q.size(0), cu.size(0) - 1))


def causal_attention_backward(grad, q, k, v):
    """Softmax attention's gradients written out (autograd does not run inside a custom op): (T, H, D) each,
    k/v with grouped heads, summed back over each group."""
    groups = q.size(1) // k.size(1)
    kh, vh = (x.repeat_interleave(groups, dim=1).transpose(0, 1) for x in (k, v))
    qh, gh = q.transpose(0, 1), grad.transpose(0, 1)
    scale = q.size(-1) ** -0.5
    causal = torch.ones(q.size(0), q.size(0), dtype=torch.bool).tril()
    p = torch.softmax((qh @ kh.transpose(1, 2) * scale).masked_fill(~causal, float("-inf")), dim=-1)
    dp = gh @ vh.transpose(1, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq, dk, dv = ds @ kh * scale, ds.transpose(1, 2) @ qh * scale, p.transpose(1, 2) @ gh

    def fold(x):
        return x.view(k.size(1), groups, *x.shape[1:]).sum(1).transpose(0, 1)
    return dq.transpose(0, 1), fold(dk), fold(dv)


def workspace_rows(total: int, segments: int) -> int:
    return (total + segments * 128 + 127) // 128 * 128


@varlen_backward_op.register_fake
def _(grad, q, k, v, cu):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(q.size(1), workspace_rows(q.size(0), cu.size(0) - 1)))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])


def _backward(ctx, grad):
    dq, dk, dv, _ = varlen_backward_op(grad, *ctx.saved_tensors)
    return dq, dk, dv, None, None


varlen_op.register_autograd(_backward, setup_context=_setup)


def compilable_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
    assert causal
    return varlen_op(q, k, v, cu_seqlens_q, max_seqlen_q)


def documents(*lengths: int, fragment: int = 0, seed: int = 0) -> torch.Tensor:
    """A row: an optional leading fragment without BOS, then documents [BOS, tokens...] of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    pieces = [torch.randint(2, 512, (fragment,), generator=g)] if fragment else []
    pieces += [torch.cat((torch.tensor([BOS]), torch.randint(2, 512, (n - 1,), generator=g))) for n in lengths]
    return torch.cat(pieces)


# Rows of 16 tokens: many short documents (lone BOS ones too), a fragment then documents, no BOS at all.
ROWS = torch.stack([documents(1, 2, 1, 3, 1, 4, 2, 1, 1, seed=1), documents(5, 4, fragment=7, seed=2),
                    torch.randint(2, 512, (16,), generator=torch.Generator().manual_seed(3))])


def paired_models(**overrides) -> tuple[tg.GPT, tg.GPT]:
    """The same weights on the FA3 path and on SDPA with the boolean document mask."""
    sdpa = small_model(**overrides)
    randomize(sdpa)
    fa3 = tg.GPT(sdpa.hp, "flash_attn_3")
    fa3.load_state_dict(sdpa.state_dict())
    return fa3, sdpa


def test_boundaries_are_every_segment_start_of_the_flattened_rows_then_the_total():
    ids = torch.tensor([[7, 8, BOS, 9, 9, BOS, BOS, 5], [BOS, 3, 4, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9, 9]])
    cu = tg.varlen_boundaries(tg.segment_starts(ids))
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 2, 5, 6, 8, 16, 24]  # row starts 8 and 16 are boundaries with or without a BOS
    layout = tg.attention_layout(ids, *tg.rotary_tables(4, 10000.0, 8), per_document=True, backend="flash_attn_3")
    assert torch.equal(layout.mask, cu)


@pytest.mark.parametrize("kernel", [reference_varlen, old_build_varlen])
def test_fa3_varlen_logits_equal_the_sdpa_document_mask(monkeypatch, kernel):
    monkeypatch.setattr(tg, "FLASH_ATTN_3_VARLEN", kernel)
    fa3, sdpa = paired_models()
    with torch.no_grad():
        for loops in (0, 2):
            with fa3.looping(loops), sdpa.looping(loops):
                assert torch.allclose(fa3.forward_logits(ROWS), sdpa.forward_logits(ROWS), atol=1e-5, rtol=1e-5)


def test_fa3_varlen_gradients_equal_the_sdpa_document_mask(monkeypatch):
    monkeypatch.setattr(tg, "FLASH_ATTN_3_VARLEN", compilable_varlen)  # the custom op's backward, eagerly
    fa3, sdpa = paired_models()
    for model in (fa3, sdpa):
        model(ROWS[:, :-1], ROWS[:, 1:]).backward()
    for (name, a), b in zip(fa3.named_parameters(), sdpa.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_the_varlen_path_is_chosen_only_when_fa3_has_it(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    on, off = hparams(), hparams(DOC_ATTENTION=0)
    monkeypatch.setattr(tg, "load_flash_attn_3_varlen", lambda: reference_varlen)
    assert tg.document_attention_backend(on, "flash_attn_3", cuda) == "flash_attn_3"
    assert tg.FLASH_ATTN_3_VARLEN is reference_varlen
    assert tg.document_attention_backend(on, "sdpa", cpu) == "sdpa"
    assert tg.document_attention_backend(off, "flash_attn_3", cuda) == "flash_attn_3"
    monkeypatch.setattr(tg, "load_flash_attn_3_varlen", lambda: None)  # a build without flash_attn_varlen_func
    assert tg.document_attention_backend(on, "flash_attn_3", cuda) == "flex"


def test_a_build_without_varlen_is_logged(monkeypatch):
    lines = []
    monkeypatch.setattr(tg, "FLASH_ATTN_3", object())
    monkeypatch.setattr(tg, "FLASH_ATTN_3_VARLEN", None)
    rt = tg.Runtime(0, 0, 1, torch.device("cpu"), False, "flex", False, torch.float32)
    tg.log_configuration(hparams(), rt, lines.append)
    assert any("no flash_attn_varlen_func" in line for line in lines)
    lines.clear()
    tg.log_configuration(hparams(DOC_ATTENTION=0), rt, lines.append)
    assert not any("varlen" in line for line in lines)


@pytest.mark.slow
def test_compiled_varlen_has_no_graph_break_and_no_recompile_for_a_new_document_count(monkeypatch):
    """fullgraph=True (a graph break raises), then recompiles forbidden while the segment count changes."""
    monkeypatch.setattr(tg, "FLASH_ATTN_3_VARLEN", compilable_varlen)
    fa3, sdpa = paired_models(NUM_LAYERS=2, XSA_LAST_N=1, PARALLEL_START_LAYER=1, NUM_LOOPS=0, LOOP_START=0,
                              LOOP_END=0)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        net = torch.compile(fa3, dynamic=False, fullgraph=True)
        batches = [ROWS, ROWS.roll(1, dims=0), torch.stack([documents(16, seed=s) for s in (4, 5, 6)]),
                   torch.full((3, 16), BOS)]
        for i, rows in enumerate(batches):
            with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
                loss = net(rows[:, :-1], rows[:, 1:])
            loss.backward()
            assert loss.item() == pytest.approx(sdpa(rows[:, :-1], rows[:, 1:]).item(), abs=1e-5)


def stand_in_fa3(monkeypatch, **functions) -> None:
    """A flash_attn_interface module holding `functions`, for the GPU doctor's checks on CPU."""
    module = types.ModuleType("flash_attn_interface")
    module.__dict__.update(functions)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    monkeypatch.setattr(tg, "FLASH_ATTN_3_VARLEN", None)


def doctor_qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(2, 256, 4, 16), torch.randn(2, 256, 2, 16), torch.randn(2, 256, 2, 16)


def test_the_doctor_fails_a_build_without_varlen(monkeypatch):
    stand_in_fa3(monkeypatch)
    checks = gpu_doctor.fa3_varlen_checks(*doctor_qkv())
    assert [(c.name, c.status) for c in checks] == [
        ("varlen", "FAIL"), ("varlen_matches_sdpa", "SKIP"), ("varlen_compiles", "SKIP")]
    assert "flex_attention" in checks[0].reason


def test_the_doctor_compares_varlen_with_the_sdpa_document_mask(monkeypatch):
    stand_in_fa3(monkeypatch, flash_attn_varlen_func=reference_varlen)
    monkeypatch.setattr(gpu_doctor, "fa3_varlen_compile_check", lambda *args: gpu_doctor.Check("varlen_compiles", "SKIP", ""))
    assert [c.status for c in gpu_doctor.fa3_varlen_checks(*doctor_qkv())] == ["PASS", "PASS", "SKIP"]

    def crossing(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):  # ignores the boundaries: dense causal
        return tg.causal_attention(q[None], k[None], v[None], "sdpa")[0]
    stand_in_fa3(monkeypatch, flash_attn_varlen_func=crossing)
    assert [c.status for c in gpu_doctor.fa3_varlen_checks(*doctor_qkv())][:2] == ["PASS", "FAIL"]


@pytest.mark.slow
def test_the_doctor_compiles_varlen_forward_and_backward_without_recompiling(monkeypatch):
    stand_in_fa3(monkeypatch, flash_attn_varlen_func=compilable_varlen)
    torch._dynamo.reset()
    check = gpu_doctor.fa3_varlen_checks(*doctor_qkv())[-1]
    assert (check.name, check.status) == ("varlen_compiles", "PASS"), check.reason
