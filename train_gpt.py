"""Parameter Golf training script: a depth-recurrent U-Net transformer trained under a wall-clock cap.

Run on 8 GPUs with `torchrun --standalone --nproc_per_node=8 train_gpt.py`, on one CPU process with
`python train_gpt.py`, or with `torchrun --nproc_per_node=N` on CPU (gloo). Every knob is an environment
variable (see `Hyperparameters`); each run writes `logs/{RUN_ID}.txt` and `logs/{RUN_ID}.json`.

The file reads in the order data flows: configuration -> runtime & logging -> data -> model ->
optimizers -> scoring -> training loop -> quantization & artifact -> evaluation of the artifact -> main().
"""

import base64
import contextlib
import copy
import dataclasses
import functools
import glob
import hashlib
import importlib
import itertools
import json
import lzma
import math
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

import brotli
import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------------------------
# Configuration: every knob is read once, here, from an environment variable of the same name
# (upper-cased). Defaults reproduce the public 2026-04-09 record stack plus our additions.
# -----------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A knob has a value the run cannot use; the message names the variable."""


# Loop counts are in NUM_LOOPS's unit: extra passes of the band (0 = the band runs once).
LoopCounts = tuple[int, ...]
# A training-context schedule: (sequence length, last training fraction it serves), fractions increasing to 1.
SeqSchedule = tuple[tuple[int, float], ...]

# The challenge's hardware. The global batch is defined for it: a run on fewer GPUs accumulates
# gradients over REFERENCE_GPUS // WORLD_SIZE micro-batches, so it optimizes the same objective.
REFERENCE_GPUS = 8
CHALLENGE_SECONDS = 600.0  # training (with GPTQ) and evaluation each get this much on REFERENCE_GPUS H100s
SUBMISSION_LIMIT_BYTES = 16_000_000  # code + compressed model

COMPRESSORS = ("brotli", "lzma", "pergroup")  # artifact coders (see the quantization & artifact section)
FIT_METHODS = ("clip", "prune")  # how the budget fitter shrinks an artifact (same section)
FILL_LEVERS = ("clip", "lqer", "awq")  # what the budget filler may spend spare bytes on (same section)
COMPRESSOR_PACKAGES = {"pergroup": "constriction"}  # coders that need an optional pip package
TTT_MODES = ("full", "phased")  # what TTT_ENABLED runs (see the evaluation section)
LORA_SITES = ("q", "k", "v", "o", "mlp", "head")  # where TTT_MASK may attach adapters (see BatchedLora)


def pip_package_missing(package: str) -> Optional[str]:
    """None if the pip package imports, else what to install (optional coders are checked before a run)."""
    try:
        importlib.import_module(package)
    except ImportError:
        return f"needs the pip package {package} (pip install {package})"
    return None

# Newton–Schulz schedules, named by MUON_NS_COEFFS and run in the optimizers section: iteration k
# computes X ← a·X + (b·A + c·A²)·X, A = X·Xᵀ, with its own (a, b, c).
NS_COEFFICIENTS = {
    # Polar Express (Amsel et al. 2025): each quintic is minimax-optimal for the singular values the
    # previous iterations leave, so 5 iterations land closer to 1 than 5 of the fixed quintic.
    "polar_express": ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)),
    # Muon's classic quintic, the same at every iteration (the 04-09 record).
    "quintic": ((3.4445, -4.7750, 2.0315),),
}


def knob(default, doc: str):
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    # run / data
    data_dir: str = knob("./data/", "root holding datasets/fineweb10B_sp{VOCAB_SIZE}/ and tokenizers/")
    vocab_size: int = knob(8192, "tokenizer vocabulary size; selects the dataset variant")
    caseops_enabled: bool = knob(False, "read the CaseOps dataset and tokenizer; bits per byte from its byte sidecar")
    max_train_val_overlap: float = knob(0.0, "largest fraction of val documents that may also be training documents "
                                        "(else the run stops; 1 = exploratory run on any data)")
    seed: int = knob(1337, "seed for init and data order")
    run_id: str = knob("", "name of logs/{RUN_ID}.txt and .json (a random UUID if unset)")
    # shape
    num_layers: int = knob(11, "physical transformer blocks")
    model_dim: int = knob(512, "residual stream width")
    embedding_dim: Optional[int] = knob(None, "accepted for the records' scripts; must equal MODEL_DIM when set "
                                              "(a factored embedding is not supported)")
    num_heads: int = knob(8, "query heads")
    num_kv_heads: int = knob(4, "key/value heads (grouped-query attention)")
    mlp_mult: float = knob(4.0, "MLP hidden width = MLP_MULT × MODEL_DIM")
    tie_embeddings: bool = knob(True, "output head shares the token embedding")
    logit_softcap: float = knob(30.0, "logits = c·tanh(z/c)")
    asym_logit_rescale: bool = knob(True, "logits = c·tanh(z/c) with c a trained cap for z ≥ 0 and another for "
                                          "z < 0, both initialized at LOGIT_SOFTCAP (0: the fixed symmetric cap)")
    loss_chunk_tokens: int = knob(8192, "the training loss computes the logits of this many tokens at a time and "
                                        "recomputes them in the backward (0 = whole micro-batch at once)")
    rope_base: float = knob(10000.0, "rotary base frequency")
    rope_dims: int = knob(16, "rotary dims per head (0 = whole head)")
    ln_scale: bool = knob(True, "multiply sublayer norms by 1/√(layer+1)")
    xsa_last_n: int = knob(11, "last N layers remove each head's own-value component")
    parallel_residual_start: int = knob(-1, "04-09's GPT-J parallel residual: layers ≥ this read one input for "
                                            "attention and MLP (< 0: none; needs PARALLEL_START_LAYER=-1)")
    parallel_start_layer: int = knob(8, "two-lane parallel decoder from this physical layer on: attention reads "
                                        "lane 0, the MLP lane 1, both write both lanes (< 0: none)")
    skip_gates_enabled: bool = knob(True, "sigmoid-gated U-Net skips (else additive)")
    qk_gain_init: float = knob(5.25, "initial per-head query gain")
    doc_attention: bool = knob(True, "attention never crosses a BOS (each document, and a row's leading fragment, "
                                     "attends only to itself) and rotary positions restart at each document "
                                     "(0: dense causal attention over the whole row)")
    # gates (see SparseAttnGate and SmearGate in the model section)
    sparse_attn_gate_enabled: bool = knob(True, "per-head sigmoid gate on the attention output, read from the first "
                                                "GATE_WINDOW channels of the block's normalized input")
    sparse_attn_gate_scale: float = knob(0.5, "the sparse attention gate is sigmoid(scale · W·x[:GATE_WINDOW])")
    gate_window: int = knob(12, "leading channels the sparse attention gate and the SmearGate read")
    smear_gate_enabled: bool = knob(True, "add a content-gated share of the previous token's embedding to each "
                                          "token's (never into a BOS token, so never across documents)")
    # depth recurrence
    num_loops: int = knob(2, "extra passes of the band LOOP_START..LOOP_END (0 = no recurrence)")
    loop_start: int = knob(3, "first physical layer of the looped band")
    loop_end: int = knob(5, "last physical layer of the looped band (inclusive)")
    enable_looping_at: float = knob(0.35, "fraction of the training budget after which looping turns on")
    enable_looping_at_step: Optional[int] = knob(None, "if set, looping turns on at this step instead (comparable across machines)")
    loop_sample: LoopCounts = knob((), "once looping is on, each step draws its loop count from this set, e.g. 1,2,3 (empty: NUM_LOOPS)")
    share_loop_params: bool = knob(False, "every pass of the band uses its layers' first-pass parameters")
    # our additions
    birkhoff_mix: bool = knob(True, "layer input = a·x + (1−a)·x0 per virtual layer (else the free 2-vector mix)")
    birkhoff_init: float = knob(0.98, "initial a of the Birkhoff mix, in (0, 1)")
    output_ln: bool = knob(True, "the MLP normalizes its output instead of its input")
    timestep_scale: bool = knob(True, "per-virtual-layer attention/MLP output scales")
    timestep_cap: Optional[float] = knob(4.0, "clamp of the timestep scales to [−cap, cap] (none: no clamp)")
    # schedule
    iterations: int = knob(20000, "maximum optimizer steps")
    max_wallclock_seconds: float = knob(600.0, "training-time cap (0 = none; the schedule is then step-based)")
    gptq_reserve_seconds: Optional[float] = knob(None, "seconds of the cap reserved for Hessians + GPTQ (they count as "
                                                       "training time); unset: measured before training, see next")
    gptq_reserve_margin: float = knob(1.5, "unset GPTQ_RESERVE_SECONDS = this x the Hessian + GPTQ time measured on one "
                                           "calibration batch and one matrix of each shape")
    warmup_steps: int = knob(20, "compile warm-up steps, rolled back before training")
    warmdown_frac: float = knob(0.85, "final fraction of the budget with linearly decaying LR")
    min_lr: float = knob(0.1, "LR multiplier at the end of the warm-down")
    train_batch_tokens: int = knob(786432, "global tokens per optimizer step")
    train_seq_len: int = knob(2048, "training sequence length")
    train_seq_schedule: SeqSchedule = knob((), "progressive training context, e.g. 1024@0.1,2048@0.7,3072@1.0: "
                                               "length L while the training fraction is <= F (empty: TRAIN_SEQ_LEN)")
    val_loss_every: int = knob(4000, "validate every N steps (0 = only at the end)")
    val_batch_tokens: int = knob(524288, "validation tokens per forward, summed over ranks and accumulation")
    eval_seq_len: int = knob(2560, "evaluation sequence length (validation, sliding windows, TTT); past "
                                   "TRAIN_SEQ_LEN the rotary angles extrapolate, unscaled, as in the records")
    train_log_every: int = knob(500, "log train loss every N steps (and the first 5)")
    # optimizers
    matrix_lr: float = knob(0.028, "Muon LR for block matrices")
    scalar_lr: float = knob(0.02, "AdamW LR for vectors, scalars and control tensors")
    tied_embed_lr: float = knob(0.03, "AdamW LR for the tied embedding")
    tied_embed_init_std: float = knob(0.005, "init std of the tied embedding")
    embed_lr: float = knob(0.6, "AdamW LR for an untied input embedding (TIE_EMBEDDINGS=0)")
    head_lr: float = knob(0.008, "Adam LR for an untied output head (TIE_EMBEDDINGS=0)")
    muon_momentum: float = knob(0.97, "Muon momentum after warm-up")
    muon_momentum_warmup_start: float = knob(0.92, "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = knob(1500, "steps of linear Muon momentum warm-up")
    muon_backend_steps: int = knob(5, "Newton–Schulz iterations")
    muon_ns_coeffs: str = knob("polar_express", "Newton–Schulz coefficients: polar_express (one tuple per iteration; "
                                                "past the 5th the last repeats) or quintic (Muon's fixed one)")
    muon_row_normalize: bool = knob(True, "normalize gradient rows before orthogonalizing")
    muon_update_dtype: str = knob("bf16", "precision of Muon's orthogonalized update when it is applied, bf16 (as the "
                                          "records on CUDA) or fp32, on every device; Newton–Schulz itself runs in "
                                          "bf16 on CUDA and fp32 on CPU")
    muon_wd: float = knob(0.095, "decoupled weight decay of Muon matrices")
    embed_wd: float = knob(0.085, "AdamW weight decay of the embedding")
    adam_wd: float = knob(0.02, "AdamW weight decay of scalar/control tensors")
    beta1: float = knob(0.9, "Adam β1")
    beta2: float = knob(0.99, "Adam β2")
    adam_eps: float = knob(1e-8, "Adam ε")
    grad_clip_norm: float = knob(0.3, "global gradient-norm clip (0 = off)")
    ema_decay: float = knob(0.9965, "EMA decay of the weights, applied at the end (0 = off)")
    # quantization & artifact
    gptq_calibration_batches: int = knob(64, "training micro-batches per rank for the GPTQ Hessians (0 = round to nearest)")
    matrix_bits: int = knob(6, "bits of the block matrices")
    matrix_clip_sigmas: float = knob(12.85, "block matrices in neither clip group below: row step = k·std(row)/(2^(bits−1)−1)")
    mlp_clip_sigmas: float = knob(11.5, "clip sigmas k of the MLP matrices (mlp.fc, mlp.proj)")
    attn_clip_sigmas: float = knob(13.0, "clip sigmas k of the attention matrices (attn.c_q, c_k, c_v, proj)")
    embed_bits: int = knob(7, "bits of the embedding")
    embed_clip_sigmas: float = knob(14.0, "embedding: row step = k·std(row)/(2^(bits−1)−1)")
    gated_attn_quant_gate: bool = knob(True, "store the gate tensors (attn_gate_w, smear_gate_w) as int8 rows, step max|row|/127, not fp16")
    lqer_enabled: bool = knob(True, "after GPTQ, add a low-rank correction of the quantization error to the LQER_TOP_K "
                                    "matrices where it removes the most Hessian-weighted output error per stored byte; "
                                    "folded into the weights at load (needs Hessians: GPTQ_CALIBRATION_BATCHES > 0)")
    lqer_rank: int = knob(4, "rank of each LQER correction: left factor rows × rank int2 (one scale), right factor rank × cols int4")
    lqer_top_k: int = knob(3, "how many matrices get an LQER correction")
    lqer_asym_group: int = knob(32, "elements of the flattened int4 right LQER factor per fp16 scale")
    awq_lite_enabled: bool = knob(False, "AWQ-lite: the most salient input-column groups (activation RMS × mean |weight|, "
                                         "over all GPTQ matrices) get AWQ_LITE_BITS codes with their own row scales "
                                         "inside the same GPTQ solve (needs Hessians)")
    awq_lite_bits: int = knob(8, "bits of the AWQ-lite columns (only matrices with fewer bits are candidates)")
    awq_lite_group_top_k: int = knob(1, "how many column groups get AWQ-lite codes, chosen globally (0: only "
                                      "BUDGET_FILL's awq lever adds any)")
    awq_lite_group_size: int = knob(64, "consecutive input columns per AWQ-lite group")
    compressor: str = knob("pergroup", "pergroup (codes and row scales ANS-coded per tensor role, codes with row/column "
                                    "classes where they pay; pip package constriction), brotli (quality 11) or lzma")
    allow_over_budget: bool = knob(False, "exploratory run: an artifact over the limit is not an error (nor shrunk)")
    artifact_limit_bytes: int = knob(16_000_000, "limit on model + code bytes (lower it for tests and small CPU runs)")
    budget_margin_bytes: int = knob(4000, "model + code over limit - this is shrunk (room for a CRLF checkout of the code)")
    budget_fit_method: str = knob("clip", "how an artifact over budget is shrunk: clip (coarser SDClip steps) or prune (±1 codes)")
    budget_fill: bool = knob(False, "grow an artifact under limit - margin: spend the spare bytes greedily on the step that "
                                    "removes the most Hessian-weighted error per byte (see BUDGET_FILL_LEVERS)")
    budget_fill_levers: str = knob("clip,lqer,awq", "what BUDGET_FILL may spend bytes on: clip (one clip group a notch "
                                   "tighter), lqer (one more LQER rank on one matrix; only with LQER_ENABLED=1), awq "
                                   "(one more AWQ-lite column group; only with AWQ_LITE_ENABLED=1, so off by default: "
                                   "AWQ_LITE_GROUP_TOP_K=0 leaves AWQ-lite to the filler alone)")
    budget_fill_slack_bytes: int = knob(2000, "BUDGET_FILL stops once model + code are within this many bytes under limit - margin")
    budget_fill_tries: int = knob(4, "most exact compressions BUDGET_FILL spends (brotli-11 of a full-size artifact: "
                                     "~100 s on one CPU core; pergroup ~4-8 s)")
    # post-quantization evaluation
    sliding_window_enabled: bool = knob(False, "also score the artifact with overlapping windows")
    eval_stride: int = knob(64, "sliding-window step; each window scores its last EVAL_STRIDE tokens")
    ttt_enabled: bool = knob(True, "score-first test-time training on the validation stream")
    ttt_lr: float = knob(0.005, "TTT SGD learning rate (cosine-decayed across chunks)")
    ttt_epochs: int = knob(3, "TTT passes over each scored chunk")
    ttt_momentum: float = knob(0.9, "TTT SGD momentum")
    ttt_chunk_tokens: int = knob(32768, "TTT chunk: scored first, then trained on")
    ttt_grad_clip: float = knob(1.0, "TTT gradient-norm clip (0 = off)")
    ttt_mode: str = knob("phased", "what TTT_ENABLED runs: full (SGD of all weights on sliding-window chunks: TTT_LR, "
                                 "TTT_EPOCHS, TTT_CHUNK_TOKENS) or phased (per-document LoRA adapters and global SGD "
                                 "phases: the TTT_LORA_*, PHASED_TTT_* and GLOBAL_TTT_* knobs)")
    ttt_batch_size: int = knob(64, "phased TTT: documents per batch, one per row, batched by length")
    ttt_chunk_size: int = knob(48, "phased TTT: a document's targets are scored, then trained on, this many at a time")
    ttt_eval_seq_len: Optional[int] = knob(None, "phased TTT: context of a chunk, the document's tokens ending at the "
                                                 "chunk's end; also the row length of the global SGD phases (unset: "
                                                 "EVAL_SEQ_LEN)")
    ttt_width_growth: float = knob(2.0, "phased TTT: chunk windows are padded to widths TTT_CHUNK_SIZE, then each "
                                        "about this factor wider (in whole chunks), up to TTT_EVAL_SEQ_LEN: one "
                                        "compiled graph per width; smaller = less padding, more graphs to warm up")
    ttt_lora_rank: int = knob(80, "phased TTT: rank r of each per-document adapter")
    ttt_lora_alpha: float = knob(144.0, "phased TTT: adapter output scale alpha/r")
    ttt_mask: str = knob("q,v,o,mlp,head", "phased TTT: adapted sites, from q, k, v (attention projections), o "
                                           "(attention input to output), mlp (normalized MLP input to its output), head "
                                           "(logits); one adapter per virtual layer (default: #2135's, K off)")
    ttt_lora_lr: float = knob(8e-5, "phased TTT: AdamW LR of the adapters")
    ttt_beta1: float = knob(0.0, "phased TTT: AdamW beta1 of the adapters")
    ttt_beta2: float = knob(0.99, "phased TTT: AdamW beta2 of the adapters")
    ttt_weight_decay: float = knob(2.0, "phased TTT: AdamW decoupled weight decay of the adapters")
    phased_ttt_prefix_docs: int = knob(2500, "phased TTT: the base weights train on the first this many scored "
                                             "documents (0 = never)")
    phased_ttt_num_phases: int = knob(1, "phased TTT: global SGD phases, on cumulative prefixes of "
                                         "PHASED_TTT_PREFIX_DOCS·k/N documents")
    global_ttt_lr: float = knob(1e-3, "phased TTT: SGD LR of the global phases (cosine-decayed across steps)")
    global_ttt_momentum: float = knob(0.9, "phased TTT: SGD momentum of the global phases")
    global_ttt_chunk_tokens: int = knob(32768, "phased TTT: targets per global SGD step (all ranks together)")
    ttt_deadline_seconds: float = knob(450.0, "phased TTT: a rank past this many seconds of the timed evaluation (from "
                                              "the artifact load) scores its remaining documents without adapting, and "
                                              "global phases not yet run are skipped on every rank (0 = off)")
    ngram_tilt: bool = knob(True, "causal n-gram tilt of the sliding-window and TTT scores: boost the token that the "
                                   "already-scored validation prefix predicts, then renormalize")
    ngram_tilt_order: int = knob(16, "n-gram order of the tilt: the hint's context is the previous ORDER-1 tokens")
    ngram_tilt_boost: float = knob(2.625, "β added to the hinted token's logit (0 = scores as without the tilt)")
    ngram_tilt_threshold: float = knob(0.8, "a hint fires when its token followed at least this fraction of the "
                                            "context's earlier occurrences")
    eval_loops: LoopCounts = knob((), "after the round trip, also score the artifact at these loop counts, e.g. 0,1,2,4")
    eval_artifact: str = knob("", "eval-only run: skip training and GPTQ and score this artifact file (e.g. an "
                                   "earlier run's final_model.int6.ptz) with the evaluation knobs (empty: train)")
    # runtime
    attn_backend: str = knob("auto", "auto, fa3 or sdpa (auto: FlashAttention 3 when importable on CUDA)")
    compile: str = knob("auto", "auto, 1 or 0 (auto: torch.compile on CUDA only)")

    @classmethod
    def from_env(cls, environ) -> "Hyperparameters":
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.name.upper())
            values[f.name] = f.default if raw is None else parse_knob(f.name.upper(), raw, f.type)
        if not values["run_id"]:
            values["run_id"] = str(uuid.uuid4())
        if values["ttt_eval_seq_len"] is None:  # a small EVAL_SEQ_LEN brings the phased context down with it
            values["ttt_eval_seq_len"] = values["eval_seq_len"]
        return cls(**values)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_knob(name: str, raw: str, kind):
    text = raw.strip()
    optional = kind in (Optional[int], Optional[float])
    if optional and text.lower() in ("", "none"):
        return None
    base = {Optional[int]: int, Optional[float]: float}.get(kind, kind)
    try:
        if base == LoopCounts:
            return tuple(sorted({int(item) for item in text.split(",") if item.strip()}))
        if base == SeqSchedule:
            return parse_seq_schedule(text)
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return base(text)
    except ValueError:
        expected = {bool: "0 or 1", int: "an integer", float: "a number", str: "a string",
                    LoopCounts: "comma-separated integers, e.g. 1,2,3",
                    SeqSchedule: "comma-separated LENGTH@FRACTION pairs, e.g. 1024@0.1,2048@1.0"}[base]
        suffix = " or 'none'" if optional else ""
        raise ConfigError(f"{name}={raw!r}: expected {expected}{suffix}") from None


def parse_seq_schedule(text: str) -> SeqSchedule:
    """'1024@0.1,2048@1.0' -> ((1024, 0.1), (2048, 1.0)); a malformed pair raises ValueError."""
    stages = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        length, at, fraction = item.partition("@")
        if not at:
            raise ValueError(item)
        stages.append((int(length), float(fraction)))
    return tuple(stages)


def need(hp: Hyperparameters, ok: bool, name: str, what: str) -> None:
    """Stop with a ConfigError naming the variable NAME, its value and what it must be."""
    if not ok:
        raise ConfigError(f"{name}={getattr(hp, name.lower(), None)!r}: {what}")


def check_config(hp: Hyperparameters, world_size: int) -> None:
    """Reject values the run cannot use, before anything is built, naming the variable."""
    if world_size < 1 or REFERENCE_GPUS % world_size != 0:
        raise ConfigError(f"WORLD_SIZE={world_size}: must divide {REFERENCE_GPUS} "
                          f"(gradient accumulation is {REFERENCE_GPUS} // WORLD_SIZE)")
    for name in ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "TRAIN_SEQ_LEN",
                 "EVAL_SEQ_LEN", "TRAIN_BATCH_TOKENS", "VAL_BATCH_TOKENS", "MUON_BACKEND_STEPS"):
        need(hp, getattr(hp, name.lower()) > 0, name, "must be positive")
    for name in ("ITERATIONS", "WARMUP_STEPS", "VAL_LOSS_EVERY", "TRAIN_LOG_EVERY", "NUM_LOOPS",
                 "XSA_LAST_N", "MUON_MOMENTUM_WARMUP_STEPS", "ROPE_DIMS"):
        need(hp, getattr(hp, name.lower()) >= 0, name, "must be >= 0")
    for check in (check_model_config, check_loop_config, check_lane_config, check_gate_config, check_training_config,
                  check_seq_schedule_config, check_artifact_config, check_evaluation_config):
        check(hp)
    need(hp, hp.attn_backend in ("auto", "fa3", "sdpa"), "ATTN_BACKEND", "must be auto, fa3 or sdpa")
    need(hp, hp.compile in ("auto", "0", "1"), "COMPILE", "must be auto, 0 or 1")
    need(hp, 0.0 <= hp.max_train_val_overlap <= 1.0, "MAX_TRAIN_VAL_OVERLAP", "must be a fraction in [0, 1]")


def check_model_config(hp: Hyperparameters) -> None:
    need(hp, hp.vocab_size <= 65536, "VOCAB_SIZE", "shards store uint16 tokens, so at most 65536")
    need(hp, hp.model_dim % hp.num_heads == 0, "MODEL_DIM", f"must be divisible by NUM_HEADS={hp.num_heads}")
    need(hp, hp.num_heads % hp.num_kv_heads == 0, "NUM_HEADS", f"must be divisible by NUM_KV_HEADS={hp.num_kv_heads}")
    head_dim = hp.model_dim // hp.num_heads
    need(hp, head_dim % 2 == 0, "MODEL_DIM", f"head dim MODEL_DIM/NUM_HEADS={head_dim} must be even for rotary")
    need(hp, hp.rope_dims % 2 == 0 and hp.rope_dims <= head_dim, "ROPE_DIMS", f"must be even and <= head dim {head_dim}")
    need(hp, hp.mlp_mult > 0, "MLP_MULT", "must be positive")
    need(hp, hp.logit_softcap > 0, "LOGIT_SOFTCAP", "must be positive")
    need(hp, hp.loss_chunk_tokens >= 0, "LOSS_CHUNK_TOKENS", "must be >= 0 (0 = no chunking)")
    need(hp, hp.xsa_last_n <= hp.num_layers, "XSA_LAST_N", f"must be <= NUM_LAYERS={hp.num_layers}")
    need(hp, 0.0 < hp.birkhoff_init < 1.0, "BIRKHOFF_INIT", "must lie strictly between 0 and 1")
    if hp.timestep_cap is not None:
        need(hp, hp.timestep_cap > 0, "TIMESTEP_CAP", "must be positive, or 'none' for no clamp")
    need(hp, hp.embedding_dim in (None, hp.model_dim), "EMBEDDING_DIM",
         f"a factored embedding is not supported; unset it or make it equal MODEL_DIM={hp.model_dim}")


def check_loop_config(hp: Hyperparameters) -> None:
    for name in ("LOOP_SAMPLE", "EVAL_LOOPS"):
        need(hp, all(n >= 0 for n in getattr(hp, name.lower())), name, "loop counts must be >= 0")
    need(hp, not hp.loop_sample or hp.num_loops > 0, "LOOP_SAMPLE", "needs NUM_LOOPS > 0 (else looping never turns on)")
    if hp.num_loops > 0 or hp.eval_loops:
        band = f"loop band must lie in 0..NUM_LAYERS-1={hp.num_layers - 1}"
        need(hp, 0 <= hp.loop_start < hp.num_layers, "LOOP_START", band)
        need(hp, hp.loop_start <= hp.loop_end, "LOOP_END", f"must be >= LOOP_START={hp.loop_start}")
        need(hp, hp.loop_end < hp.num_layers, "LOOP_END", band)
    need(hp, 0.0 <= hp.enable_looping_at <= 1.0, "ENABLE_LOOPING_AT", "must be a fraction in [0, 1]")
    if hp.enable_looping_at_step is not None:
        need(hp, hp.enable_looping_at_step >= 0, "ENABLE_LOOPING_AT_STEP", "must be >= 0")


def check_lane_config(hp: Hyperparameters) -> None:
    """The lanes must be a suffix of the decoder that no loop revisits (GPT.run_decoder forks once, never joins).
    A start < 0 or >= NUM_LAYERS has no lane layer (small test models keep the default 8)."""
    if not 0 <= hp.parallel_start_layer < hp.num_layers:
        return
    need(hp, hp.parallel_residual_start < 0, "PARALLEL_RESIDUAL_START", "the 04-09 GPT-J parallel residual and the "
         "two-lane decoder exclude each other; set PARALLEL_START_LAYER=-1 to use it")
    need(hp, hp.parallel_start_layer >= hp.num_layers // 2, "PARALLEL_START_LAYER",
         f"must be a decoder layer, >= NUM_LAYERS//2 = {hp.num_layers // 2} (< 0: no lanes)")
    if hp.num_loops > 0 or hp.eval_loops:
        need(hp, hp.loop_end < hp.parallel_start_layer, "PARALLEL_START_LAYER", f"a looped layer (LOOP_END={hp.loop_end}) "
             "is at or past the start layer: the lanes' scalars would be shared across passes")


def check_gate_config(hp: Hyperparameters) -> None:
    """The gates read the first GATE_WINDOW channels of a MODEL_DIM-wide vector."""
    if hp.sparse_attn_gate_enabled or hp.smear_gate_enabled:
        need(hp, 0 < hp.gate_window <= hp.model_dim, "GATE_WINDOW", f"must be in 1..MODEL_DIM={hp.model_dim} "
             "(or turn off SPARSE_ATTN_GATE_ENABLED and SMEAR_GATE_ENABLED)")


def check_training_config(hp: Hyperparameters) -> None:
    need(hp, hp.muon_ns_coeffs in NS_COEFFICIENTS, "MUON_NS_COEFFS", f"must be one of {', '.join(NS_COEFFICIENTS)}")
    need(hp, hp.muon_update_dtype in ("bf16", "fp32"), "MUON_UPDATE_DTYPE", "must be bf16 or fp32")
    need(hp, 0.0 <= hp.warmdown_frac <= 1.0, "WARMDOWN_FRAC", "must be a fraction in [0, 1]")
    need(hp, 0.0 <= hp.min_lr <= 1.0, "MIN_LR", "must be a multiplier in [0, 1]")
    need(hp, 0.0 <= hp.ema_decay < 1.0, "EMA_DECAY", "must lie in [0, 1)")
    need(hp, hp.max_wallclock_seconds >= 0, "MAX_WALLCLOCK_SECONDS", "must be >= 0")
    need(hp, hp.gptq_reserve_margin >= 1.0, "GPTQ_RESERVE_MARGIN", "must be >= 1 (the estimate is a measurement)")
    if hp.gptq_reserve_seconds is not None:
        need(hp, hp.gptq_reserve_seconds >= 0, "GPTQ_RESERVE_SECONDS", "must be >= 0, or unset to measure it")
        if hp.max_wallclock_seconds > 0:
            need(hp, hp.gptq_reserve_seconds < hp.max_wallclock_seconds, "GPTQ_RESERVE_SECONDS",
                 f"must leave training time inside MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds}")
    micro_tokens = REFERENCE_GPUS * hp.train_seq_len
    need(hp, hp.train_batch_tokens % micro_tokens == 0, "TRAIN_BATCH_TOKENS",
         f"must be a multiple of {REFERENCE_GPUS} micro-batches x TRAIN_SEQ_LEN={hp.train_seq_len} = {micro_tokens}")


def check_seq_schedule_config(hp: Hyperparameters) -> None:
    """Every scheduled length must fit the rotary table and split the global batch like TRAIN_SEQ_LEN does."""
    stages = hp.train_seq_schedule
    if not stages:
        return
    lengths, fractions = [length for length, _ in stages], [fraction for _, fraction in stages]
    need(hp, all(length > 0 for length in lengths), "TRAIN_SEQ_SCHEDULE", "lengths must be positive")
    need(hp, all(a < b for a, b in zip([0.0, *fractions], fractions)), "TRAIN_SEQ_SCHEDULE",
         "fractions must be positive and increasing")
    need(hp, fractions[-1] == 1.0, "TRAIN_SEQ_SCHEDULE", "the last fraction must be 1.0 (the end of training)")
    rotary = max(hp.train_seq_len, hp.eval_seq_len)
    need(hp, max(lengths) <= rotary, "TRAIN_SEQ_SCHEDULE",
         f"lengths must be <= the rotary table, max(TRAIN_SEQ_LEN, EVAL_SEQ_LEN)={rotary}")
    for length in lengths:
        need(hp, hp.train_batch_tokens % (REFERENCE_GPUS * length) == 0, "TRAIN_SEQ_SCHEDULE",
             f"length {length}: TRAIN_BATCH_TOKENS={hp.train_batch_tokens} must be a multiple of "
             f"{REFERENCE_GPUS} micro-batches x {length} = {REFERENCE_GPUS * length}")


def fill_lever_names(hp: Hyperparameters) -> tuple[str, ...]:
    return tuple(name.strip() for name in hp.budget_fill_levers.split(",") if name.strip())


def check_artifact_config(hp: Hyperparameters) -> None:
    need(hp, hp.gptq_calibration_batches >= 0, "GPTQ_CALIBRATION_BATCHES", "must be >= 0")
    need(hp, 2 <= hp.matrix_bits <= 8, "MATRIX_BITS", "must be in 2..8 (codes are stored as int8)")
    need(hp, 2 <= hp.embed_bits <= 8, "EMBED_BITS", "must be in 2..8 (codes are stored as int8)")
    need(hp, hp.matrix_clip_sigmas > 0, "MATRIX_CLIP_SIGMAS", "must be positive")
    need(hp, hp.embed_clip_sigmas > 0, "EMBED_CLIP_SIGMAS", "must be positive")
    need(hp, hp.mlp_clip_sigmas > 0, "MLP_CLIP_SIGMAS", "must be positive")
    need(hp, hp.attn_clip_sigmas > 0, "ATTN_CLIP_SIGMAS", "must be positive")
    need(hp, hp.lqer_rank >= 1, "LQER_RANK", "must be >= 1")
    need(hp, hp.lqer_top_k >= 0, "LQER_TOP_K", "must be >= 0")
    need(hp, hp.lqer_asym_group >= 1, "LQER_ASYM_GROUP", "must be >= 1")
    need(hp, 2 <= hp.awq_lite_bits <= 8, "AWQ_LITE_BITS", "must be in 2..8 (codes are stored as int8)")
    need(hp, hp.awq_lite_group_top_k >= 0, "AWQ_LITE_GROUP_TOP_K", "must be >= 0")
    need(hp, hp.awq_lite_group_size >= 1, "AWQ_LITE_GROUP_SIZE", "must be >= 1")
    need(hp, hp.compressor in COMPRESSORS, "COMPRESSOR", f"must be one of {', '.join(COMPRESSORS)}")
    missing = pip_package_missing(COMPRESSOR_PACKAGES[hp.compressor]) if hp.compressor in COMPRESSOR_PACKAGES else None
    need(hp, missing is None, "COMPRESSOR", f"{hp.compressor} {missing}")
    need(hp, 0 < hp.artifact_limit_bytes <= SUBMISSION_LIMIT_BYTES, "ARTIFACT_LIMIT_BYTES",
         f"must be in 1..{SUBMISSION_LIMIT_BYTES} (the challenge's limit)")
    need(hp, 0 <= hp.budget_margin_bytes < hp.artifact_limit_bytes, "BUDGET_MARGIN_BYTES",
         f"must be >= 0 and below ARTIFACT_LIMIT_BYTES={hp.artifact_limit_bytes}")
    need(hp, hp.budget_fit_method in FIT_METHODS, "BUDGET_FIT_METHOD", f"must be one of {', '.join(FIT_METHODS)}")
    need(hp, 0 <= hp.budget_fill_slack_bytes < hp.artifact_limit_bytes - hp.budget_margin_bytes, "BUDGET_FILL_SLACK_BYTES",
         "must be >= 0 and below ARTIFACT_LIMIT_BYTES - BUDGET_MARGIN_BYTES")
    need(hp, hp.budget_fill_tries >= 1, "BUDGET_FILL_TRIES", "must be >= 1")
    levers = fill_lever_names(hp)
    need(hp, bool(levers) and set(levers) <= set(FILL_LEVERS) and len(set(levers)) == len(levers), "BUDGET_FILL_LEVERS",
         f"must be distinct comma-separated levers from {','.join(FILL_LEVERS)}")


def check_evaluation_config(hp: Hyperparameters) -> None:
    need(hp, hp.val_batch_tokens >= REFERENCE_GPUS * hp.eval_seq_len, "VAL_BATCH_TOKENS",
         f"must hold at least one EVAL_SEQ_LEN={hp.eval_seq_len} sequence per rank and micro-batch "
         f"({REFERENCE_GPUS} in all)")
    if hp.sliding_window_enabled:
        need(hp, 0 < hp.eval_stride <= hp.eval_seq_len, "EVAL_STRIDE", f"must be in 1..EVAL_SEQ_LEN={hp.eval_seq_len}")
    need(hp, hp.ttt_epochs >= 0, "TTT_EPOCHS", "must be >= 0")
    need(hp, hp.ttt_chunk_tokens > 0, "TTT_CHUNK_TOKENS", "must be positive")
    need(hp, hp.ttt_lr >= 0 and hp.ttt_grad_clip >= 0, "TTT_LR", "TTT_LR and TTT_GRAD_CLIP must be >= 0")
    need(hp, not hp.ttt_enabled or hp.ttt_mode != "full" or hp.sliding_window_enabled, "TTT_ENABLED",
         "score-first TTT scores with sliding windows: set SLIDING_WINDOW_ENABLED=1")
    need(hp, hp.ngram_tilt_order >= 2, "NGRAM_TILT_ORDER", "must be >= 2 (a context of at least one token)")
    need(hp, math.isfinite(hp.ngram_tilt_boost) and hp.ngram_tilt_boost >= 0, "NGRAM_TILT_BOOST",
         "must be finite and >= 0")
    need(hp, 0.0 < hp.ngram_tilt_threshold <= 1.0, "NGRAM_TILT_THRESHOLD", "must be a fraction in (0, 1]")
    need(hp, not hp.ngram_tilt or hp.sliding_window_enabled or (hp.ttt_enabled and hp.ttt_mode == "phased"),
         "NGRAM_TILT", "the tilt applies to sliding-window and TTT scores: set SLIDING_WINDOW_ENABLED=1, "
         "TTT_ENABLED=1 TTT_MODE=phased, or NGRAM_TILT=0")
    need(hp, not hp.eval_artifact or Path(hp.eval_artifact).is_file(), "EVAL_ARTIFACT",
         "must be an existing artifact file, e.g. a finished run's final_model.int6.ptz")
    check_phased_ttt_config(hp)


def ttt_sites(hp: Hyperparameters) -> tuple[str, ...]:
    return tuple(site.strip() for site in hp.ttt_mask.split(",") if site.strip())


def check_phased_ttt_config(hp: Hyperparameters) -> None:
    need(hp, hp.ttt_mode in TTT_MODES, "TTT_MODE", f"must be one of {', '.join(TTT_MODES)}")
    for name in ("TTT_BATCH_SIZE", "TTT_CHUNK_SIZE", "TTT_LORA_RANK", "PHASED_TTT_NUM_PHASES", "GLOBAL_TTT_CHUNK_TOKENS"):
        need(hp, getattr(hp, name.lower()) > 0, name, "must be positive")
    phased, rotary = hp.ttt_enabled and hp.ttt_mode == "phased", max(hp.train_seq_len, hp.eval_seq_len)
    need(hp, not phased or hp.ttt_chunk_size <= hp.ttt_eval_seq_len, "TTT_EVAL_SEQ_LEN",
         f"phased TTT: must be >= TTT_CHUNK_SIZE={hp.ttt_chunk_size} (unset, it is EVAL_SEQ_LEN; or lower TTT_CHUNK_SIZE)")
    need(hp, not phased or hp.ttt_eval_seq_len <= rotary, "TTT_EVAL_SEQ_LEN",
         f"phased TTT: must be <= the rotary table, max(TRAIN_SEQ_LEN, EVAL_SEQ_LEN)={rotary}")
    need(hp, math.isfinite(hp.ttt_lora_alpha) and hp.ttt_lora_alpha > 0, "TTT_LORA_ALPHA", "must be positive")
    need(hp, math.isfinite(hp.ttt_width_growth) and hp.ttt_width_growth > 1, "TTT_WIDTH_GROWTH", "must be > 1")
    sites = ttt_sites(hp)
    need(hp, bool(sites) and set(sites) <= set(LORA_SITES) and len(set(sites)) == len(sites), "TTT_MASK",
         f"must be distinct comma-separated sites from {','.join(LORA_SITES)}")
    need(hp, math.isfinite(hp.ttt_deadline_seconds) and hp.ttt_deadline_seconds >= 0, "TTT_DEADLINE_SECONDS",
         "must be >= 0 seconds (0 = no deadline)")
    for name in ("TTT_LORA_LR", "TTT_WEIGHT_DECAY", "GLOBAL_TTT_LR", "PHASED_TTT_PREFIX_DOCS"):
        need(hp, getattr(hp, name.lower()) >= 0, name, "must be >= 0")
    for name in ("TTT_BETA1", "TTT_BETA2", "GLOBAL_TTT_MOMENTUM"):
        need(hp, 0.0 <= getattr(hp, name.lower()) < 1.0, name, "must be in [0, 1)")


def micro_batch_seqs(global_tokens: int, seq_len: int) -> int:
    """Sequences in one rank's micro-batch when a global batch is split into REFERENCE_GPUS micro-batches."""
    return global_tokens // (REFERENCE_GPUS * seq_len)


# -----------------------------------------------------------------------------------------------
# Runtime & logging: device, process group, attention path, and the run's text and JSON logs.
# -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    distributed: bool
    attn_backend: str  # "flash_attn_3", "flex" (document masks on CUDA) or "sdpa"
    compile: bool
    activation_dtype: torch.dtype

    @property
    def grad_accum_steps(self) -> int:
        return REFERENCE_GPUS // self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(environ) -> tuple[int, int, int, bool]:
    distributed = "RANK" in environ and "WORLD_SIZE" in environ
    try:
        rank = int(environ.get("RANK", "0"))
        world_size = int(environ.get("WORLD_SIZE", "1"))
        local_rank = int(environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    return rank, local_rank, world_size, distributed


def load_flash_attn_3():
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


FLASH_ATTN_3 = None  # set by choose_attention when FlashAttention 3 is the chosen path
FLASH_ATTN_3_VARLEN = None  # set by document_attention_backend when FA3's varlen path runs DOC_ATTENTION


def load_flash_attn_3_varlen():
    """FA3's packed-sequence entry point, or None when the installed build lacks it."""
    try:
        from flash_attn_interface import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def choose_attention(hp: Hyperparameters, device: torch.device) -> str:
    global FLASH_ATTN_3
    if hp.attn_backend == "sdpa" or device.type != "cuda":
        if hp.attn_backend == "fa3":
            raise ConfigError("ATTN_BACKEND='fa3': FlashAttention 3 needs a CUDA device")
        return "sdpa"
    FLASH_ATTN_3 = load_flash_attn_3()
    if FLASH_ATTN_3 is None:
        if hp.attn_backend == "fa3":
            raise ConfigError("ATTN_BACKEND='fa3': flash_attn_interface is not importable; install FlashAttention 3")
        return "sdpa"
    return "flash_attn_3"


def document_attention_backend(hp: Hyperparameters, dense: str, device: torch.device) -> str:
    """The attention path under DOC_ATTENTION=1, given the dense path `dense` that choose_attention picked.

    A document mask needs a kernel that takes one. When FlashAttention 3 was chosen: its varlen path, fed
    the segment boundaries of the flattened batch (see varlen_boundaries); a build without
    flash_attn_varlen_func falls back to flex_attention (log_configuration says so). Other CUDA runs:
    flex_attention with a BlockMask (whose shape is fixed by the batch shape, so torch.compile never
    recompiles for a new set of documents); ATTN_BACKEND=sdpa keeps SDPA with a boolean mask. On CPU SDPA
    with a boolean mask: flex_attention has no backward on CPU in torch 2.13.
    """
    global FLASH_ATTN_3_VARLEN
    if not hp.doc_attention:
        return dense
    if dense == "flash_attn_3":
        FLASH_ATTN_3_VARLEN = load_flash_attn_3_varlen()
        if FLASH_ATTN_3_VARLEN is not None:
            return "flash_attn_3"
    return "flex" if device.type == "cuda" and hp.attn_backend != "sdpa" else "sdpa"


def init_runtime(hp: Hyperparameters, environ) -> Runtime:
    rank, local_rank, world_size, distributed = world_from_env(environ)
    check_config(hp, world_size)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    use_compile = hp.compile == "1" or (hp.compile == "auto" and device.type == "cuda")
    if use_compile:
        torch._dynamo.config.optimize_ddp = False  # DDP around a fullgraph-compiled module
        torch._dynamo.config.cache_size_limit = 32
        torch._dynamo.config.capture_dynamic_output_shape_ops = True  # varlen_boundaries' nonzero, in the graph
    # bf16 activations on GPUs (tensor cores). On CPU fp32: see BENCHMARKS.md, bf16 autocast was slower there.
    activation_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Runtime(rank, local_rank, world_size, device, distributed,
                   document_attention_backend(hp, choose_attention(hp, device), device), use_compile, activation_dtype)


class RunLog:
    """Rank 0 writes human log lines to stdout and logs/{RUN_ID}.txt, and the result to logs/{RUN_ID}.json."""

    def __init__(self, hp: Hyperparameters, rt: Runtime, code: str):
        self.enabled = rt.is_main
        self.text_path = Path("logs") / f"{hp.run_id}.txt"
        self.json_path = Path("logs") / f"{hp.run_id}.json"
        self.result = {
            "run_id": hp.run_id,
            "status": "running",
            "code_sha256": hashlib.sha256(code.encode()).hexdigest(),
            "source_bytes": len(code.encode()),
            "hyperparameters": hp.as_dict(),
            "world_size": rt.world_size,
            "grad_accum_steps": rt.grad_accum_steps,
            "device": device_name(rt.device),
            "attention_backend": rt.attn_backend,
            "compile": rt.compile,
            "activation_dtype": str(rt.activation_dtype).removeprefix("torch."),
            "torch_version": torch.__version__,
            "val_curve": [],
            "metrics": {},
        }
        if self.enabled:
            self.text_path.parent.mkdir(parents=True, exist_ok=True)
            self.save()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)
            with self.text_path.open("a", encoding="utf-8") as f:
                f.write(message + "\n")

    def update(self, **fields) -> None:
        self.result.update(fields)
        self.save()

    def metric(self, **values) -> None:
        self.result["metrics"].update(values)
        self.save()

    def save(self) -> None:
        if self.enabled:
            tmp = self.json_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.result, indent=1, default=str))
            tmp.replace(self.json_path)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads/process)"


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(rt: Runtime):
    return torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.activation_dtype == torch.bfloat16)


# -----------------------------------------------------------------------------------------------
# Data: the challenge's shard format, a random-sequence training loader, the validation split, and
# the per-token byte counts that turn a loss in nats/token into bits per UTF-8 byte.
# -----------------------------------------------------------------------------------------------

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4


class DataError(ValueError):
    """A dataset or tokenizer file is missing or malformed; the message names it."""


CASEOPS_SUFFIX = "_lossless_caps_caseops_v1_reserved"  # the public CaseOps dataset's names (data/caseops.py)


def variant_suffix(hp: Hyperparameters) -> str:
    return CASEOPS_SUFFIX if hp.caseops_enabled else ""


def dataset_dir(hp: Hyperparameters) -> Path:
    return Path(hp.data_dir) / "datasets" / f"fineweb10B_sp{hp.vocab_size}{variant_suffix(hp)}"


def tokenizer_path(hp: Hyperparameters) -> Path:
    return Path(hp.data_dir) / "tokenizers" / f"fineweb_{hp.vocab_size}_bpe{variant_suffix(hp)}.model"


def find_shards(hp: Hyperparameters, split: str) -> list[Path]:
    directory = dataset_dir(hp)
    if not directory.is_dir():
        raise DataError(f"dataset directory {directory} does not exist (DATA_DIR={hp.data_dir!r}, "
                        f"VOCAB_SIZE={hp.vocab_size}); download it with data/cached_challenge_fineweb.py")
    files = sorted(Path(p) for p in glob.glob(str(directory / f"fineweb_{split}_[0-9]*.bin")))  # not val_bytes_
    if not files:
        raise DataError(f"no {split} shards matching {directory}/fineweb_{split}_*.bin")
    return files


def shard_token_count(path: Path) -> int:
    """Validate a shard's header and size; return its token count."""
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header.size != SHARD_HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise DataError(f"{path}: bad shard header (want {SHARD_HEADER_INTS} int32 with magic {SHARD_MAGIC}, "
                        f"version {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * num_tokens
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(f"{path}: file is {actual} bytes but its header promises {num_tokens} tokens "
                        f"({expected} bytes)")
    return num_tokens


def open_shard(path: Path) -> np.memmap:
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(shard_token_count(path),))


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(f"{where}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}; "
                        f"the data was made with another tokenizer")


class TrainLoader:
    """Random sequences of TRAIN_SEQ_LEN+1 tokens; each rank owns a disjoint share of each epoch.

    An epoch cuts every shard into sequences at a random phase (shared by all ranks), deals the
    sequences to ranks round-robin, and each rank visits its share in its own random order.

    Under TRAIN_SEQ_SCHEDULE the epoch is cut into slots of the longest scheduled length (`slot_len`)
    and a shorter length takes as many whole sequences from each slot as fit: a switch of length then
    never re-serves tokens of the epoch (a 2048 from a 3072 slot skips the last 1024).
    """

    def __init__(self, files: list[Path], seq_len: int, vocab_size: int, seed: int, rank: int,
                 world_size: int, device: torch.device, slot_len: Optional[int] = None):
        self.files, self.seq_len, self.vocab_size = files, seq_len, vocab_size
        self.slot_len = slot_len or seq_len
        self.piece = 0  # sequences already taken from the current slot
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.shards = [open_shard(f) for f in files]
        self.epoch = -1
        self.order = np.empty((0, 2), dtype=np.int64)
        self.cursor = 0

    def start_epoch(self) -> None:
        self.epoch += 1
        shared = np.random.default_rng([self.seed, self.epoch])
        slots = []
        for shard_id, shard in enumerate(self.shards):
            phase = int(shared.integers(self.slot_len))
            count = max(0, (len(shard) - 1 - phase) // self.slot_len)
            starts = phase + self.slot_len * np.arange(count, dtype=np.int64)
            slots.append(np.stack([np.full(count, shard_id, dtype=np.int64), starts], axis=1))
        everything = np.concatenate(slots)
        mine = everything[self.rank::self.world_size]
        if len(mine) == 0:
            raise DataError(f"training shards hold too few tokens for one sequence of {self.slot_len} tokens "
                            f"(TRAIN_SEQ_LEN, or TRAIN_SEQ_SCHEDULE's longest length) "
                            f"per rank ({len(everything)} sequences for {self.world_size} ranks)")
        own = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        self.order = mine[own.permutation(len(mine))]
        self.cursor = 0

    def next_batch(self, num_seqs: int) -> tuple[Tensor, Tensor]:
        rows = []
        for _ in range(num_seqs):
            if self.cursor >= len(self.order):
                self.start_epoch()
            shard_id, start = self.order[self.cursor]
            start += self.piece * self.seq_len
            rows.append(self.shards[shard_id][start:start + self.seq_len + 1])
            self.piece += 1
            if (self.piece + 1) * self.seq_len > self.slot_len:
                self.cursor, self.piece = self.cursor + 1, 0
        batch = np.stack(rows).astype(np.int64)
        check_token_range(batch, self.vocab_size, f"training shard(s) {[str(f) for f in self.files]}")
        tokens = torch.from_numpy(batch)
        if self.device.type == "cuda":
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:]


    def set_seq_len(self, seq_len: int) -> None:
        """Serve sequences of `seq_len` tokens from now on, starting at the next untouched slot."""
        if seq_len > self.slot_len:
            raise ValueError(f"sequence length {seq_len} exceeds the loader's slots of {self.slot_len}")
        if self.piece:
            self.cursor, self.piece = self.cursor + 1, 0
        self.seq_len = seq_len


def load_validation_tokens(hp: Hyperparameters) -> np.ndarray:
    """The whole validation split, trimmed to whole EVAL_SEQ_LEN sequences plus one target token."""
    files = find_shards(hp, "val")
    tokens = np.concatenate([np.asarray(open_shard(f)) for f in files])
    check_token_range(tokens, hp.vocab_size, f"validation shard(s) {[str(f) for f in files]}")
    usable = (len(tokens) - 1) // hp.eval_seq_len * hp.eval_seq_len
    if usable <= 0:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than EVAL_SEQ_LEN+1={hp.eval_seq_len + 1}")
    return tokens[:usable + 1]


@dataclasses.dataclass
class ByteCounts:
    """Per-token UTF-8 byte counts of a SentencePiece vocabulary, for bits-per-byte, or the dataset's sidecar."""

    base_bytes: Tensor  # bytes of the piece without its leading "▁" (byte-fallback tokens: 1)
    leading_space: Tensor  # the piece starts with "▁", which decodes to one space byte...
    is_boundary: Tensor  # ...unless the previous token is a control/unknown token such as BOS
    sidecar: Optional[Tensor] = None  # if set, sidecar[i] = original bytes of target tokens[i+1]; replaces the table

    def count(self, prev_ids: Tensor, target_ids: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        """Bytes of each target; `positions` (index of its input token) is needed when there is a sidecar."""
        if self.sidecar is not None:
            if positions is None:
                raise ValueError("ByteCounts.count: a byte sidecar is indexed by target position; pass positions")
            return self.sidecar[positions].to(torch.float64)
        space = self.leading_space[target_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[target_ids].to(torch.float64) + space.to(torch.float64)

    def to(self, device: torch.device) -> "ByteCounts":
        moved = (getattr(self, f.name) for f in dataclasses.fields(self))
        return ByteCounts(*(t if t is None else t.to(device) for t in moved))


def load_tokenizer(hp: Hyperparameters) -> spm.SentencePieceProcessor:
    path = tokenizer_path(hp)
    if not path.is_file():
        raise DataError(f"tokenizer {path} does not exist (DATA_DIR={hp.data_dir!r}, VOCAB_SIZE={hp.vocab_size})")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if sp.vocab_size() != hp.vocab_size:
        raise DataError(f"tokenizer {path} has {sp.vocab_size()} pieces but VOCAB_SIZE={hp.vocab_size}")
    return sp


def byte_counts(sp: spm.SentencePieceProcessor) -> ByteCounts:
    n = sp.vocab_size()
    base = np.zeros(n, dtype=np.int16)
    space = np.zeros(n, dtype=bool)
    boundary = np.zeros(n, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            space[i] = piece.startswith("\u2581")
            base[i] = len(piece.removeprefix("\u2581").encode("utf-8"))
    return ByteCounts(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary))


def load_byte_sidecar(hp: Hyperparameters) -> tuple[Optional[np.ndarray], list[Path]]:
    """The CaseOps byte sidecar: fineweb_val_bytes_N.bin beside each fineweb_val_N.bin, in the shard format,
    holding each validation token's bytes in the original text. (None, []) when the dataset has none."""
    directory = dataset_dir(hp)
    sidecars = sorted(directory.glob("fineweb_val_bytes_*.bin"))
    if not sidecars:
        if hp.caseops_enabled:
            raise DataError(f"no byte sidecar {directory}/fineweb_val_bytes_*.bin: CASEOPS_ENABLED=1 scores bytes of "
                            f"the original text, which only the sidecar knows; download or build it again")
        return None, []
    shards = find_shards(hp, "val")
    expected = [s.with_name(s.name.replace("fineweb_val_", "fineweb_val_bytes_")) for s in shards]
    if sidecars != expected:
        raise DataError(f"byte sidecars {[p.name for p in sidecars]} do not pair with the validation shards "
                        f"{[p.name for p in shards]} (want one fineweb_val_bytes_N.bin per fineweb_val_N.bin)")
    for shard, sidecar in zip(shards, sidecars):
        if shard_token_count(sidecar) != shard_token_count(shard):
            raise DataError(f"{sidecar}: holds {shard_token_count(sidecar)} byte counts but {shard.name} has "
                            f"{shard_token_count(shard)} tokens")
    return np.concatenate([np.asarray(open_shard(f)) for f in sidecars]), sidecars


@dataclasses.dataclass
class Validation:
    """The validation split and the byte counts that turn its nats into bits per byte."""

    tokens: np.ndarray
    bytes: ByteCounts


def load_validation(hp: Hyperparameters, sp: spm.SentencePieceProcessor, log) -> Validation:
    """Validation tokens and their byte counts: the sidecar when the dataset has one, else the tokenizer's table."""
    tokens = load_validation_tokens(hp)
    counts = byte_counts(sp)
    sidecar, files = load_byte_sidecar(hp)
    if sidecar is not None:
        counts.sidecar = torch.from_numpy(sidecar[1:len(tokens)].astype(np.int32))
    source = f"sidecar {','.join(str(f) for f in files)}" if files else "tokenizer table"
    log(f"bytes: {source}")
    log.update(bytes_source=source)
    return Validation(tokens, counts)


# -----------------------------------------------------------------------------------------------
# Data check: no validation document may also be a training document. The public record #2127's
# data script put 80% of the validation documents into training, and two submissions were
# disqualified for it. Every BOS-delimited document gets a 64-bit key; the val keys are held in
# memory, the train shards stream past them in bounded pieces, and every key match is confirmed
# token by token. The verdict is cached beside the shards, so each dataset is checked once.
# -----------------------------------------------------------------------------------------------

BOS_ID = 1
OVERLAP_CHECK_VERSION = 1  # bump when the check's definition changes: cached verdicts then expire
OVERLAP_CACHE_NAME = "train_val_overlap.json"
OVERLAP_CHUNK_TOKENS = 1 << 18  # fastest measured (fits in cache); about 10 MiB of arrays
MAX_DOCUMENT_TOKENS = 1 << 26  # longer "documents" mean missing BOS tokens, not text
OVERLAP_EXAMPLES = 5
HASH_MODULUS = 1 << 64
HASH_BASE = 0x9E3779B97F4A7C15  # odd, hence a unit modulo 2^64
LENGTH_SALT = 0xC2B2AE3D27D4EB4F

# What the verdict relies on (keys are sums modulo 2^64; numpy's uint64 arithmetic wraps, i.e. is exact
# in Z/2^64):
# - No copy is missed. A document t_0..t_{n-1} lying at s..s+n-1 of a piece gets
#   (P[s+n] - P[s]) * B^-s = sum_j t_j B^j + n * SALT (mod 2^64), where P are the prefix sums of t_i B^i:
#   B is odd, so B^-s exists and the key does not depend on where the document lies. A verbatim copy
#   therefore always has the val document's key and is always a candidate.
# - Nothing else is counted. A candidate counts only once its tokens equal the val document's. Hash quality
#   only sets how many candidates need that comparison: a polynomial hash modulo 2^64 can be made to collide
#   on purpose (Thue-Morse sequences), which is why it is not trusted alone; on natural text keys behave
#   as random, about train_docs * val_docs / 2^64 ~ 2e-8 spurious candidates on the challenge's data.


@functools.lru_cache(maxsize=2)
def hash_powers(capacity: int) -> np.ndarray:
    """B^j modulo 2^64 for j < capacity, by doubling the table in place."""
    table = np.ones(capacity, dtype=np.uint64)
    filled = 1
    while filled < capacity:
        step = min(filled, capacity - filled)
        np.multiply(table[:step], np.uint64(pow(HASH_BASE, filled, HASH_MODULUS)), out=table[filled:filled + step])
        filled += step
    return table


def inverse_hash_powers(exponents: np.ndarray) -> np.ndarray:
    """B^-e modulo 2^64 for each e, by square-and-multiply over the exponents' bits."""
    result = np.ones(len(exponents), dtype=np.uint64)
    square = pow(HASH_BASE, -1, HASH_MODULUS)
    for bit in range(int(exponents.max(initial=0)).bit_length()):
        odd = (exponents >> bit) & 1 == 1
        result[odd] *= np.uint64(square)
        square = square * square % HASH_MODULUS
    return result


def document_keys(tokens: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The key of each document tokens[starts[i]:starts[i+1]] (the last one runs to the end of tokens)."""
    n = len(tokens)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.multiply(tokens, hash_powers(1 << max(n - 1, 1).bit_length())[:n], out=prefix[1:])
    np.cumsum(prefix, out=prefix)
    ends = np.append(starts[1:], n)
    lengths = (ends - starts).astype(np.uint64)
    return (prefix[ends] - prefix[starts]) * inverse_hash_powers(starts) + lengths * np.uint64(LENGTH_SALT)


@dataclasses.dataclass
class Piece:
    tokens: np.ndarray  # whole documents; the stream's leading tokens before its first BOS count as one
    starts: np.ndarray  # where each document starts in tokens
    offset: int  # where tokens[0] lies in the split's token stream (its shards concatenated)


def document_starts(tokens: np.ndarray) -> np.ndarray:
    starts = np.flatnonzero(tokens == BOS_ID)
    return starts if len(starts) and starts[0] == 0 else np.concatenate(([0], starts)).astype(starts.dtype)


def single_document(tokens: np.ndarray, offset: int) -> Piece:
    return Piece(tokens, np.zeros(1, dtype=np.int64), offset)


def document_pieces(files: list[Path], chunk_tokens: int, halves: bool = False) -> Iterator[Piece]:
    """A split's shards as one token stream, cut into pieces of whole documents.

    Each chunk is cut just before its last BOS and the rest carried into the next piece, so a document
    straddling a chunk edge or a shard boundary is hashed whole. With `halves`, a document cut by a shard
    boundary (the next shard starts without BOS) is also yielded as its two halves, each a document: the
    shard's leading partial, and what ends the previous shard (where a copy appended to a shard lies).
    Memory: a chunk plus the longest document.
    """
    carry, offset = np.empty(0, dtype=np.uint16), 0
    for path in files:
        shard = open_shard(path)
        joined = len(carry) if halves and len(carry) and len(shard) and shard[0] != BOS_ID else 0
        if joined:
            yield single_document(carry, offset)
        for lo in range(0, len(shard), chunk_tokens):
            tokens = np.concatenate((carry, shard[lo:lo + chunk_tokens]))
            starts = document_starts(tokens)
            if len(starts) == 1:  # no document ends in this chunk
                if len(tokens) > MAX_DOCUMENT_TOKENS:
                    raise DataError(f"{path}: over {MAX_DOCUMENT_TOKENS} tokens without a BOS (id {BOS_ID}); "
                                    "every document must start with BOS")
                carry = tokens
                continue
            if joined:
                yield single_document(tokens[joined:starts[1]], offset + joined)
                joined = 0
            cut = int(starts[-1])
            yield Piece(tokens[:cut], starts[:-1], offset)
            carry, offset = tokens[cut:], offset + cut
    if joined:
        yield single_document(carry[joined:], offset + joined)
    if len(carry):
        yield Piece(carry, document_starts(carry), offset)


class TokenStream:
    """A split's shards read as one token stream; a position names a shard and an offset in it."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.shards = [open_shard(f) for f in files]
        self.bounds = np.cumsum([0] + [len(s) for s in self.shards])

    def locate(self, position: int) -> str:
        i = int(np.searchsorted(self.bounds, position, side="right")) - 1
        return f"{self.files[i].name}:{position - int(self.bounds[i])}"

    def read(self, position: int, length: int) -> np.ndarray:
        parts = [shard[max(position - lo, 0):max(position + length - lo, 0)]
                 for shard, lo in zip(self.shards, self.bounds.tolist())]
        return np.concatenate(parts)


@dataclasses.dataclass
class ValDocuments:
    """Every val document's key, stream position and length, sorted by key."""
    keys: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    @classmethod
    def index(cls, files: list[Path], chunk_tokens: int) -> "ValDocuments":
        keys, starts, lengths = [], [], []
        for piece in document_pieces(files, chunk_tokens):
            keys.append(document_keys(piece.tokens, piece.starts))
            starts.append(piece.starts + piece.offset)
            lengths.append(np.diff(np.append(piece.starts, len(piece.tokens))))
        if not keys:
            raise DataError(f"validation shard(s) {[str(f) for f in files]} hold no tokens")
        keys, starts, lengths = np.concatenate(keys), np.concatenate(starts), np.concatenate(lengths)
        order = np.argsort(keys, kind="stable")
        return cls(keys[order], starts[order], lengths[order])

    def copies_of(self, document: np.ndarray, key: int, stream: TokenStream, found: np.ndarray) -> list[int]:
        """Val documents not found before whose tokens equal `document` (all share its key)."""
        lo, hi = np.searchsorted(self.keys, key, "left"), np.searchsorted(self.keys, key, "right")
        return [j for j in range(lo, hi) if not found[j] and self.lengths[j] == len(document)
                and np.array_equal(stream.read(int(self.starts[j]), len(document)), document)]


def train_val_overlap(train_files: list[Path], val_files: list[Path], chunk_tokens: int = OVERLAP_CHUNK_TOKENS) -> dict:
    """Which validation documents also appear, verbatim, as documents of the training shards."""
    t0 = time.perf_counter()
    val_stream, train_stream = TokenStream(val_files), TokenStream(train_files)
    val = ValDocuments.index(val_files, chunk_tokens)
    found = np.zeros(len(val.keys), dtype=bool)
    examples, train_docs = [], 0
    for piece in document_pieces(train_files, chunk_tokens, halves=True):
        keys = document_keys(piece.tokens, piece.starts)
        train_docs += len(keys)
        nearest = np.minimum(np.searchsorted(val.keys, keys), len(val.keys) - 1)
        for d in np.flatnonzero(val.keys[nearest] == keys).tolist():
            start, end = int(piece.starts[d]), int(piece.starts[d + 1]) if d + 1 < len(keys) else len(piece.tokens)
            for j in val.copies_of(piece.tokens[start:end], keys[d], val_stream, found):
                found[j] = True
                if len(examples) < OVERLAP_EXAMPLES:
                    examples.append({"val": val_stream.locate(int(val.starts[j])),
                                     "train": train_stream.locate(piece.offset + start), "tokens": end - start})
    seconds = time.perf_counter() - t0
    tokens = int(train_stream.bounds[-1] + val_stream.bounds[-1])
    return {"overlap_docs": int(found.sum()), "val_docs": len(val.keys), "overlap_fraction": float(found.mean()),
            "train_docs": train_docs, "train_tokens": int(train_stream.bounds[-1]),
            "val_tokens": int(val_stream.bounds[-1]), "examples": examples, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / max(seconds, 1e-9))}


def shard_fingerprint(files: list[Path]) -> list[dict]:
    return [{"name": f.name, "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]


def read_overlap_cache(path: Path) -> Optional[dict]:
    """The cached verdict, or None if there is none or it is unreadable (then it is computed again)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_overlap_cache(path: Path, content: dict) -> Optional[str]:
    """Store the verdict; on failure say why (a read-only dataset directory is normal)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(content, indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return f"{type(exc).__name__}: {exc}"
    return None


def overlap_verdict(hp: Hyperparameters, chunk_tokens: int = OVERLAP_CHUNK_TOKENS) -> dict:
    """The dataset's train/val overlap, read from the cache beside the shards when it was computed over
    these very shards (names, sizes, mtimes) by this version of the check, else computed and cached."""
    train, val = find_shards(hp, "train"), find_shards(hp, "val")
    inputs = {"check_version": OVERLAP_CHECK_VERSION, "train_shards": shard_fingerprint(train),
              "val_shards": shard_fingerprint(val)}
    path = train[0].parent / OVERLAP_CACHE_NAME
    cached = read_overlap_cache(path)
    if isinstance(cached, dict) and cached.get("inputs") == inputs and isinstance(cached.get("result"), dict):
        return dict(cached["result"], cached=True, cache=str(path), not_cached=None)
    result = train_val_overlap(train, val, chunk_tokens)
    why_not = write_overlap_cache(path, {"inputs": inputs, "result": result})
    return dict(result, cached=False, cache=str(path), not_cached=why_not)


def describe_overlap(verdict: dict) -> list[str]:
    how = "cached"
    if not verdict["cached"]:
        how = f"computed in {verdict['seconds']:.1f}s, {verdict['tokens_per_s'] / 1e6:.1f}M tokens/s"
        how += f"; not cached: {verdict['not_cached']}" if verdict["not_cached"] else "; cached"
    lines = [f"data_check: train/val overlap {verdict['overlap_docs']} of {verdict['val_docs']} val documents ({how})"]
    lines += [f"data_check: val {e['val']} = train {e['train']} ({e['tokens']} tokens)" for e in verdict["examples"]]
    return lines


def check_train_val_overlap(hp: Hyperparameters, rt: Runtime, log: RunLog) -> None:
    """Rank 0 finds (or reads) the verdict and every rank receives it, so all stop alike if it fails."""
    verdict = None
    if rt.is_main:
        try:
            verdict = overlap_verdict(hp)
        except DataError as exc:
            verdict = {"error": str(exc)}
    if rt.distributed:
        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    if "error" in verdict:
        raise DataError(verdict["error"])
    for line in describe_overlap(verdict):
        log(line)
    log.update(data_check=verdict)
    if verdict["overlap_fraction"] > hp.max_train_val_overlap:
        raise DataError(
            f"{verdict['overlap_docs']} of {verdict['val_docs']} validation documents "
            f"({verdict['overlap_fraction']:.2%}) also appear verbatim in the training shards beside "
            f"{verdict['cache']}; a model trained on them is scored on text it has seen (the public record #2127's "
            "data script put 80% of the val documents into training, and two submissions were disqualified). "
            "Rebuild the training shards without the val documents, or for an exploratory run allow it with "
            f"MAX_TRAIN_VAL_OVERLAP=1 (now {hp.max_train_val_overlap})")


# -----------------------------------------------------------------------------------------------
# Model: a U-Net transformer whose middle band of physical layers can be run several times.
#
# A *virtual layer* is one application of a physical block. Each virtual layer uses a *slot* of
# per-pass parameters (Birkhoff mix logits, timestep scales): pass 0 of physical layer i is slot i,
# and pass p >= 1 of a band layer gets a slot after the physical ones, so each pass can behave
# differently. A model run at a loop count other than the trained ones (EVAL_LOOPS) reuses the last
# trained pass's slots for the passes beyond it; with SHARE_LOOP_PARAMS every pass uses slot i.
# The U-Net pairing is recomputed for every sequence (see GPT.hidden_states for the skips).
#
# Two gates (on by default): SparseAttnGate scales each head's attention output by a sigmoid of
# the block input's first GATE_WINDOW channels; SmearGate adds a gated share of the previous
# token's raw embedding, never into a BOS. Both live inside Attention / GPT.embeddings, which every
# forward (training, evaluation, GPTQ calibration, sliding windows, TTT) goes through.
#
# The two-lane decoder (PARALLEL_START_LAYER) lives in GPT.run_decoder, inside GPT.hidden_states, which
# every one of those forwards calls: the lanes are a suffix of the decoder that no loop revisits.
# -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoopPlan:
    """Which physical layer, with which slot, every virtual layer runs, for any loop count.

    Built once from the hyperparameters and held by the model. Passes up to the largest trained
    count own their slots; passes beyond it (EVAL_LOOPS) reuse the last trained pass's slots, and
    with SHARE_LOOP_PARAMS every pass uses its layer's slot.
    """

    num_layers: int
    band: range  # physical layers of the looped band
    trained_counts: LoopCounts  # 0 before looping turns on, then NUM_LOOPS or the LOOP_SAMPLE set
    owned_passes: int  # extra passes of the band that have their own slots
    slot0_recurs: bool  # shared parameters make later passes of a band starting at layer 0 use slot 0

    @classmethod
    def from_hyperparameters(cls, hp: Hyperparameters) -> "LoopPlan":
        trained = tuple(sorted({0, *(hp.loop_sample or (hp.num_loops,))}))
        owned = 0 if hp.share_loop_params else max(trained)
        slot0_recurs = hp.share_loop_params and hp.loop_start == 0 and max(trained) > 0
        return cls(hp.num_layers, range(hp.loop_start, hp.loop_end + 1), trained, owned, slot0_recurs)

    @property
    def num_slots(self) -> int:
        return self.num_layers + self.owned_passes * len(self.band)

    @property
    def mixed_slots(self) -> list[int]:
        """Slots that get a Birkhoff logit. Slot 0's only user is usually the first virtual layer, where
        x == x0 and the mix is the identity (its logit would never get a gradient): it has none, unless
        shared parameters make later passes of the band use it too."""
        return list(range(0 if self.slot0_recurs else 1, self.num_slots))

    def slot(self, layer: int, extra_pass: int) -> int:
        p = min(extra_pass, self.owned_passes)
        return layer if p == 0 else self.num_layers + (p - 1) * len(self.band) + layer - self.band.start

    def virtual_layers(self, loops: int) -> list[tuple[int, int]]:
        """The (layer, slot) sequence the forward pass runs with the band repeated `loops` extra times."""
        if loops == 0:
            return [(i, i) for i in range(self.num_layers)]
        return ([(i, i) for i in range(self.band.start)]
                + [(i, self.slot(i, p)) for p in range(loops + 1) for i in self.band]
                + [(i, i) for i in range(self.band.stop, self.num_layers)])

    def unet(self, loops: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The virtual layers split into encoder (first half, rounded down) and decoder."""
        seq = self.virtual_layers(loops)
        return seq[:len(seq) // 2], seq[len(seq) // 2:]

    @property
    def num_skips(self) -> int:
        """U-Net skip weights, sized by the trained sequences only so EVAL_LOOPS never changes the tensors."""
        return max(min(len(enc), len(dec)) for enc, dec in map(self.unet, self.trained_counts))

    def describe(self, loops: int) -> str:
        encoder, decoder = self.unet(loops)
        return f"encoder:{[layer for layer, _ in encoder]} decoder:{[layer for layer, _ in decoder]}"


def rms_norm(x: Tensor) -> Tensor:
    """Parameter-free RMSNorm over the last dim that keeps x's dtype (autocast may upcast norms)."""
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


def rotary_tables(rope_dims: int, base: float, max_len: int) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.size(-1)*2 dims of each head of x (B, T, H, D); pass the rest through.
    cos/sin are (T, R) for positions shared by every row, or (B, T, R) for per-token positions."""
    r = 2 * cos.size(-1)
    x1, x2, rest = x[..., :r // 2], x[..., r // 2:r], x[..., r:]
    cos, sin = cos[..., None, :].to(x.dtype), sin[..., None, :].to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, boundaries: Tensor) -> Tensor:
    """FA3's varlen path over the batch flattened to one packed sequence of B*T tokens, each segment causal
    and alone. max_seqlen is the row length T, a constant: every segment lies inside one row, and the
    real per-batch maximum would be one more data-dependent number (a recompile per value)."""
    b, t = q.shape[:2]
    out = FLASH_ATTN_3_VARLEN(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), boundaries, boundaries, t, t,
                              causal=True)
    return (out[0] if isinstance(out, tuple) else out).view(b, t, *q.shape[2:])


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str, mask=None) -> Tensor:
    """q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D); query head h reads kv head h // (H/Hkv).
    `mask` (see AttentionLayout): None is dense causal attention; a BlockMask for backend "flex", or a
    boolean (B, 1, T, T) mask for SDPA, already holds causality; for FA3, varlen_boundaries' tensor."""
    if backend == "flash_attn_3" and mask is not None:
        return varlen_attention(q, k, v, mask)
    if backend == "flash_attn_3":
        out = FLASH_ATTN_3(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if backend == "flex":
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=True).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    return y.transpose(1, 2)


# --- Per-document attention (DOC_ATTENTION): what attention may read, built once per forward -------
#
# A row's *segments* are its maximal runs that start at a BOS or at the row start: a document, or the
# fragment of one that the row cut. Attention never crosses a segment boundary and rotary positions
# restart at each segment, so a packed row computes what its documents would compute alone. The row
# length (TRAIN_SEQ_LEN, EVAL_SEQ_LEN) is the segment cap: pieces of a longer document in different rows
# never attend to each other. Everything is computed from the input ids inside the forward, so every
# forward path (training, validation, GPTQ calibration, sliding windows, TTT) gets it; shapes are fixed by
# the batch shape except FA3's boundary tensor (see varlen_boundaries).


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """What every attention layer of one forward reads: rotary tables at each token's position, (T, R) or
    (B, T, R), and the mask in the backend's form (None: dense causal; see causal_attention)."""

    cos: Tensor
    sin: Tensor
    mask: Optional[object] = None


def segment_starts(input_ids: Tensor) -> Tensor:
    """(B, T): the index of the first token of each token's segment (its last BOS at or before it, else 0)."""
    index = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
    return torch.cummax(torch.where(input_ids == BOS_ID, index, 0), dim=1).values


def document_mask(starts: Tensor) -> Tensor:
    """SDPA's boolean mask (B, 1, T, T): query t reads key s iff s <= t in the same segment."""
    t = starts.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=starts.device).tril()
    return ((starts[:, :, None] == starts[:, None, :]) & causal)[:, None]


def document_block_mask(starts: Tensor) -> BlockMask:
    """The same mask as a flex_attention BlockMask: blocks wholly outside every segment are skipped."""
    def same_segment(b, h, q, kv):
        return (starts[b, q] == starts[b, kv]) & (kv <= q)
    b, t = starts.shape
    return create_block_mask(same_segment, b, None, t, t, device=starts.device)


def varlen_boundaries(starts: Tensor) -> Tensor:
    """FA3 varlen's cu_seqlens for the batch flattened to B*T tokens: the int32 offset of every segment start,
    then B*T. A token starts a segment iff its segment start is itself, so every row start is a boundary.

    Its length (segments + 1) depends on the data. It is built inside the compiled forward as an unbacked
    size (torch.compile with capture_dynamic_output_shape_ops; FA3's ops carry fake kernels whose shapes
    follow cu_seqlens symbolically), so there are no buckets to warm up and no recompile for a new count.
    Rejected: a static length (torch.nonzero_static) needs B*T + 1 entries to be provably enough, and FA3's
    backward allocates (segments x 128) padded rows per head for dq: ~26 GB per layer at 48 x 2048 tokens;
    the records' buckets (a length chosen outside the graph) would move the compile boundary of every
    caller. The cost: nonzero syncs the host with the device once per forward.
    """
    index = torch.arange(starts.size(1), device=starts.device)
    first = (starts == index).flatten()
    offsets = torch.nonzero(first).flatten()
    return torch.cat((offsets, offsets.new_full((1,), first.numel()))).to(torch.int32)


def backend_document_mask(starts: Tensor, backend: str):
    """The document mask in the form `backend` takes (see causal_attention)."""
    if backend == "flex":
        return document_block_mask(starts)
    if backend == "flash_attn_3":
        return varlen_boundaries(starts)
    return document_mask(starts)


def attention_layout(input_ids: Tensor, cos: Tensor, sin: Tensor, per_document: bool, backend: str) -> AttentionLayout:
    """The layout of a batch from full rotary tables cos/sin (max_len, R). Dense: positions 0..T-1 of the
    row, the same tensors as before DOC_ATTENTION existed. Per document: positions restart at each segment."""
    t = input_ids.size(1)
    if not per_document:
        return AttentionLayout(cos[:t], sin[:t])
    starts = segment_starts(input_ids)
    positions = torch.arange(t, device=input_ids.device) - starts
    mask = backend_document_mask(starts, backend)
    return AttentionLayout(cos[positions], sin[positions], mask)


def remove_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: drop from each head's output its component along its own position's normalized value."""
    b, t, h, d = y.shape
    groups = y.reshape(b, t, v.size(2), h // v.size(2), d)  # y may be a transposed (non-contiguous) SDPA output
    direction = F.normalize(v, dim=-1).unsqueeze(3)
    return (groups - (groups * direction).sum(-1, keepdim=True) * direction).reshape(b, t, h, d)


def sparse_attn_gate(y: Tensor, x: Tensor, weight: Tensor, scale: float) -> Tensor:
    """SparseAttnGate: head h's output y[..., h, :] times sigmoid(scale · weight[h] · x[..., :GATE_WINDOW]).

    x is the attention's (normalized) input, so the gate lets each token switch heads off from its own
    content, at NUM_HEADS x GATE_WINDOW parameters a layer. Zero-init weight makes every gate 0.5: not the identity, but a
    fresh model computes today's function because attn.proj starts at zero (its gradient is halved).
    """
    gate = torch.sigmoid(scale * F.linear(x[..., :weight.size(1)], weight.to(x.dtype)))
    return y * gate.unsqueeze(-1).to(y.dtype)


# --- Per-document LoRA adapters (TTT_MODE=phased; the evaluation section builds and trains them) ---
# In phased TTT each row of a batch is one document with adapters of its own. They act inside the one
# model code path: `with model.adapted(lora):` makes the model's ActiveAdapters (one object, shared by
# every block) hold them, the model tells it which slot (virtual layer) runs, and each adaptable site
# adds `adapters.add(site, y, x)`: y itself when no adapters are active or the site is not adapted, so
# training and every other forward are unchanged. Sites: q, k, v add to the projections of attention's
# normed input; o is a bypass from that input to attention's output, mlp one from the normalized MLP
# input to the MLP branch (both before the branch scale), head adds to the logits before the soft cap.


class BatchedLora(nn.Module):
    """Δ(x) = (alpha/rank)·(x Aᵀ)Bᵀ with its own A (rank, in) and B (out, rank) per document and per slot.

    `shapes[site] = (slots, in, out)`: A (slots, docs, rank, in) ~ U(±1/√in), B (slots, docs, out, rank) = 0,
    so a fresh set changes nothing. x (docs, T, in) -> (docs, T, out).
    """

    def __init__(self, shapes: dict[str, tuple[int, int, int]], docs: int, rank: int, alpha: float,
                 generator: torch.Generator):
        super().__init__()
        self.scale = alpha / rank
        self.a = nn.ParameterDict({site: nn.Parameter(torch.empty(n, docs, rank, i)) for site, (n, i, _) in shapes.items()})
        self.b = nn.ParameterDict({site: nn.Parameter(torch.zeros(n, docs, o, rank)) for site, (n, _, o) in shapes.items()})
        with torch.no_grad():
            for a in self.a.values():
                bound = 1.0 / math.sqrt(a.size(-1))
                a.copy_(torch.rand(a.shape, generator=generator) * (2 * bound) - bound)

    def delta(self, site: str, slot: int, x: Tensor) -> Tensor:
        a, b = self.a[site][slot].to(x.dtype), self.b[site][slot].to(x.dtype)
        return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * self.scale


class ActiveAdapters:
    """The adapters the forward adds (None: none) and the slot of the virtual layer running."""

    def __init__(self):
        self.lora: Optional[BatchedLora] = None
        self.slot = 0

    def add(self, site: str, y: Tensor, x: Tensor) -> Tensor:
        """y + Δ(x) of the active adapters at `site` (reshaped to y's shape; the head has one slot), else y."""
        if self.lora is None or site not in self.lora.a:
            return y
        return y + self.lora.delta(site, 0 if site == "head" else self.slot, x).view_as(y)


class Attention(nn.Module):
    """Causal GQA attention with QK-norm, partial rotary, per-head query gain, optional XSA and
    SparseAttnGate. Its parameters, the gate's `attn_gate_w` included, belong to the physical layer:
    every looped pass of the layer uses them, like its Q/K/V/O matrices (per-pass behaviour comes
    from the slots' Birkhoff mix and timestep scales, see LoopPlan)."""

    def __init__(self, hp: Hyperparameters, use_xsa: bool, backend: str):
        super().__init__()
        self.num_heads, self.num_kv_heads = hp.num_heads, hp.num_kv_heads
        self.head_dim = hp.model_dim // hp.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = nn.Linear(hp.model_dim, hp.model_dim, bias=False)
        self.c_k = nn.Linear(hp.model_dim, kv_dim, bias=False)
        self.c_v = nn.Linear(hp.model_dim, kv_dim, bias=False)
        self.proj = nn.Linear(hp.model_dim, hp.model_dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((hp.num_heads,), hp.qk_gain_init))
        self.use_xsa, self.backend = use_xsa, backend
        gated = hp.sparse_attn_gate_enabled
        self.attn_gate_w = nn.Parameter(torch.zeros(hp.num_heads, hp.gate_window)) if gated else None
        self.gate_scale = hp.sparse_attn_gate_scale
        self.adapters = ActiveAdapters()  # the model's shared one replaces it

    def forward(self, x: Tensor, layout: AttentionLayout) -> Tensor:
        b, t, _ = x.shape
        q = self.c_q(x).view(b, t, self.num_heads, self.head_dim)
        k = self.c_k(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(b, t, self.num_kv_heads, self.head_dim)
        q, k, v = self.adapters.add("q", q, x), self.adapters.add("k", k, x), self.adapters.add("v", v, x)
        q = apply_rotary(rms_norm(q), layout.cos, layout.sin)
        k = apply_rotary(rms_norm(k), layout.cos, layout.sin)
        q = q * self.q_gain.to(q.dtype)[:, None]
        y = causal_attention(q.to(v.dtype), k.to(v.dtype), v, self.backend, layout.mask)
        if self.use_xsa:
            y = remove_self_value(y, v)
        if self.attn_gate_w is not None:
            y = sparse_attn_gate(y, x, self.attn_gate_w, self.gate_scale)
        return self.adapters.add("o", self.proj(y.reshape(b, t, -1)), x)


class MLP(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        hidden = int(hp.mlp_mult * hp.model_dim)
        self.fc = nn.Linear(hp.model_dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, hp.model_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), negative_slope=0.5).square())


class Block(nn.Module):
    """One physical layer: attention and MLP sublayers with per-channel output scales.

    Norm placement: attention always normalizes its input. With OUTPUT_LN the MLP reads the raw
    stream and a parameter-free RMSNorm is put on its output instead. The 1/sqrt(layer+1) factor
    (LN_SCALE) multiplies whichever norm the sublayer has, so under OUTPUT_LN it scales the MLP's
    normalized output and keeps its job of shrinking deep layers' writes to the stream. Parallel
    layers feed attention and MLP the same x; sequential ones feed the MLP x + attention output.
    """

    def __init__(self, hp: Hyperparameters, layer: int, backend: str):
        super().__init__()
        self.attn = Attention(hp, use_xsa=layer >= hp.num_layers - hp.xsa_last_n, backend=backend)
        self.mlp = MLP(hp)
        self.attn_scale = nn.Parameter(torch.ones(hp.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(hp.model_dim))
        self.norm_factor = 1.0 / math.sqrt(layer + 1) if hp.ln_scale else 1.0
        self.parallel = 0 <= hp.parallel_residual_start <= layer
        self.output_ln = hp.output_ln
        self.adapters = self.attn.adapters

    def mlp_branch(self, x: Tensor) -> Tensor:
        if self.output_ln:
            return rms_norm(self.mlp(x)) * self.norm_factor
        return self.mlp(rms_norm(x) * self.norm_factor)

    def attn_output(self, x: Tensor, layout: AttentionLayout, gain: Optional[Tensor]) -> Tensor:
        return self.attn(rms_norm(x) * self.norm_factor, layout) * branch_scale(self.attn_scale, gain, x.dtype)

    def mlp_output(self, x: Tensor, gain: Optional[Tensor]) -> Tensor:
        return self.adapters.add("mlp", self.mlp_branch(x), rms_norm(x)) * branch_scale(self.mlp_scale, gain, x.dtype)

    def forward(self, x: Tensor, layout: AttentionLayout, attn_gain: Optional[Tensor],
                mlp_gain: Optional[Tensor]) -> Tensor:
        attn_out = self.attn_output(x, layout, attn_gain)
        mlp_in = x if self.parallel else x + attn_out
        return x + attn_out + self.mlp_output(mlp_in, mlp_gain)


def branch_scale(scale: Tensor, gain: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    return (scale if gain is None else scale * gain).to(dtype)


def smear_embeddings(e: Tensor, input_ids: Tensor, weight: Tensor, lam: Tensor) -> Tensor:
    """SmearGate: e_t + lam · sigmoid(weight · e_t[:GATE_WINDOW]) · e_{t-1} for t >= 1, on raw embeddings (B, T, D).

    The gate reads the current token's embedding, so how much of the previous token to blend in depends
    on content. Where token t is BOS it is 0: in a packed row the last token of one document never
    leaks into the next one's BOS (and through it into that document). The token after BOS does get
    BOS's embedding: that is inside its own document. Position 0 of a row has no predecessor.
    """
    gate = lam.to(e.dtype) * torch.sigmoid(F.linear(e[:, 1:, :weight.size(1)], weight.to(e.dtype)))
    gate = gate * (input_ids[:, 1:, None] != BOS_ID).to(e.dtype)
    return torch.cat((e[:, :1], e[:, 1:] + gate * e[:, :-1]), dim=1)


def birkhoff_coefficients(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Weights (a, 1-a) of the stream mix; [[a, 1-a], [1-a, a]] is doubly stochastic, so its spectral norm <= 1."""
    a = torch.sigmoid(logits)
    return a, 1.0 - a


class GPT(nn.Module):
    def __init__(self, hp: Hyperparameters, attn_backend: str = "sdpa",
                 activation_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.hp, self.activation_dtype = hp, activation_dtype
        self.tok_emb = nn.Embedding(hp.vocab_size, hp.model_dim)
        self.lm_head = None if hp.tie_embeddings else nn.Linear(hp.model_dim, hp.vocab_size, bias=False)
        self.blocks = nn.ModuleList(Block(hp, i, attn_backend) for i in range(hp.num_layers))
        self.attn_backend = attn_backend
        self.plan = LoopPlan.from_hyperparameters(hp)
        # Sequences are looked up, not built, inside the forward: torch.compile then sees one graph
        # per loop count, guarded on self.loops (see `looping`).
        self.sequences = {n: self.plan.unet(n) for n in {*self.plan.trained_counts, hp.num_loops, *hp.eval_loops}}
        self.loops = hp.num_loops  # extra passes of the band; changed only inside `looping`
        slots = self.plan.num_slots
        if hp.birkhoff_mix:
            logit = math.log(hp.birkhoff_init / (1.0 - hp.birkhoff_init))
            self.mix_row = {slot: row for row, slot in enumerate(self.plan.mixed_slots)}
            self.mix_logits = nn.Parameter(torch.full((len(self.mix_row), hp.model_dim), logit))
        else:
            self.resid_mix = nn.Parameter(torch.stack([torch.ones(hp.num_layers, hp.model_dim),
                                                       torch.zeros(hp.num_layers, hp.model_dim)], dim=1))
        if hp.timestep_scale:
            self.attn_step_scales = nn.Parameter(torch.ones(slots, hp.model_dim))
            self.mlp_step_scales = nn.Parameter(torch.ones(slots, hp.model_dim))
        skips = self.plan.num_skips
        self.skip_weights = nn.Parameter(torch.ones(skips, hp.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(skips, hp.model_dim)) if hp.skip_gates_enabled else None
        # SmearGate: zero-init weight and lambda make it the identity at init (lambda learns first).
        smear = hp.smear_gate_enabled
        self.smear_gate_w = nn.Parameter(torch.zeros(1, hp.gate_window)) if smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if smear else None
        if hp.asym_logit_rescale:
            self.softcap_pos = nn.Parameter(torch.tensor(float(hp.logit_softcap)))
            self.softcap_neg = nn.Parameter(torch.tensor(float(hp.logit_softcap)))
        rope_dims = hp.rope_dims or hp.model_dim // hp.num_heads
        # One table for the longest sequence any path runs. Positions past TRAIN_SEQ_LEN (EVAL_SEQ_LEN 2560 after
        # training at 2048, as #1953/#2135) get the same frequencies, extrapolated, with no YaRN/NTK rescaling:
        # only ROPE_DIMS of each head rotate, q and k are RMS-normed, and at the defaults (16 dims, base 1e4)
        # the slowest pair turns 0.65 rad over 2048 tokens and 0.81 over 2560, far from the full turn that would
        # alias a long distance with a short one. The tables are derived, not stored in the artifact, so any
        # EVAL_SEQ_LEN can score it. Whether 2560 beats 2048 here is a GPU measurement (not made yet).
        cos, sin = rotary_tables(rope_dims, hp.rope_base, max(hp.train_seq_len, hp.eval_seq_len))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_lanes(hp)
        self.adapters = ActiveAdapters()  # per-document adapters, see `adapted`
        for block in self.blocks:
            block.adapters = block.attn.adapters = self.adapters
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.tok_emb.weight, std=self.hp.tied_embed_init_std)
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            # Zero-init output projections so each block starts as the identity; not the MLP's under
            # OUTPUT_LN, whose RMSNorm has no direction to normalize at zero.
            zero = name.endswith("attn.proj") or name == "lm_head" or (name.endswith("mlp.proj") and not self.hp.output_ln)
            if zero:
                nn.init.zeros_(module.weight)
            elif min(module.weight.shape) >= 64:
                nn.init.orthogonal_(module.weight)

    @contextlib.contextmanager
    def looping(self, loops: int):
        """Run the band `loops` extra times in the forwards inside this block; the count is restored on exit."""
        if loops not in self.sequences:
            self.sequences[loops] = self.plan.unet(loops)
        previous, self.loops = self.loops, loops
        try:
            yield self
        finally:
            self.loops = previous

    @contextlib.contextmanager
    def adapted(self, lora: BatchedLora):
        """Add the per-document adapters `lora` in the forwards inside this block (row i: document i)."""
        previous, self.adapters.lora = self.adapters.lora, lora
        try:
            yield self
        finally:
            self.adapters.lora = previous

    def stream_mix(self, x: Tensor, x0: Tensor, layer: int, slot: int) -> Tensor:
        if self.hp.birkhoff_mix:
            if slot not in self.mix_row:
                return x
            a, b = birkhoff_coefficients(self.mix_logits[self.mix_row[slot]])
            return a.to(x.dtype) * x + b.to(x.dtype) * x0
        m = self.resid_mix[layer].to(x.dtype)
        return m[0] * x + m[1] * x0

    def step_gains(self, slot: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        if not self.hp.timestep_scale:
            return None, None
        cap = self.hp.timestep_cap
        attn, mlp = self.attn_step_scales[slot], self.mlp_step_scales[slot]
        if cap is None:
            return attn, mlp
        return attn.clamp(-cap, cap), mlp.clamp(-cap, cap)

    def run_layer(self, x: Tensor, x0: Tensor, layer: int, slot: int, layout: AttentionLayout) -> Tensor:
        self.adapters.slot = slot
        return self.blocks[layer](self.stream_mix(x, x0, layer, slot), layout, *self.step_gains(slot))

    def merge_skip(self, index: int, x: Tensor, skip: Tensor) -> Tensor:
        scaled = self.skip_weights[index].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[index]).to(x.dtype))

    # --- the two-lane parallel decoder (PARALLEL_START_LAYER; see the model section of the README) ---

    def init_lanes(self, hp: Hyperparameters) -> None:
        """One row of lane scalars per lane layer: post[l, source, lane] routes attention (source 0) and MLP
        (source 1) into each lane (init 1), resid[l, lane] scales the lane itself (init 1.1, as the records)."""
        self.lane_start = hp.parallel_start_layer if 0 <= hp.parallel_start_layer < hp.num_layers else None
        if self.lane_start is not None:
            lanes = hp.num_layers - self.lane_start
            self.parallel_post_lambdas = nn.Parameter(torch.ones(lanes, 2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((lanes, 2), 1.1))

    def run_lane_layer(self, lane0: Tensor, lane1: Tensor, x0: Tensor, layer: int, slot: int,
                       layout: AttentionLayout) -> tuple[Tensor, Tensor]:
        """Attention reads lane 0 mixed with x0 (the slot's Birkhoff mix), the MLP reads raw lane 1, in parallel;
        each output, with its timestep scale, is written into both lanes through learned scalars. The mix only
        feeds attention: lane 0 itself carries on unmixed, as in the records."""
        block, row = self.blocks[layer], layer - self.lane_start
        self.adapters.slot = slot
        attn_gain, mlp_gain = self.step_gains(slot)
        a = block.attn_output(self.stream_mix(lane0, x0, layer, slot), layout, attn_gain)
        m = block.mlp_output(lane1, mlp_gain)
        post = self.parallel_post_lambdas[row].to(lane0.dtype)
        resid = self.parallel_resid_lambdas[row].to(lane0.dtype)
        return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
                resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)

    def run_decoder(self, x: Tensor, x0: Tensor, skips: list[Tensor], decoder: list[tuple[int, int]],
                    layout: AttentionLayout) -> Tensor:
        """The decoder half; at the first lane layer x forks into lane 0 (x itself, which keeps taking the U-Net
        skips) and lane 1 (x as it was before that layer's skip). Returns the lanes' mean, or x without lanes.
        check_lane_config makes the lane layers a suffix of every sequence, so no sequential layer follows them."""
        lane1 = None
        for index, (layer, slot) in enumerate(decoder):
            if lane1 is None and self.lane_start is not None and layer >= self.lane_start:
                lane1 = x
            if index < len(self.skip_weights) and skips:
                x = self.merge_skip(index, x, skips.pop())
            if lane1 is None:
                x = self.run_layer(x, x0, layer, slot, layout)
            else:
                x, lane1 = self.run_lane_layer(x, lane1, x0, layer, slot, layout)
        return x if lane1 is None else (x + lane1) / 2

    def embeddings(self, input_ids: Tensor) -> Tensor:
        """Raw token embeddings, smeared by the SmearGate when it is on (before the input RMSNorm)."""
        e = self.tok_emb(input_ids).to(self.activation_dtype)
        if self.smear_gate_w is None:
            return e
        return smear_embeddings(e, input_ids, self.smear_gate_w, self.smear_lambda)

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        x = rms_norm(self.embeddings(input_ids))
        x0 = x
        layout = self.attention_layout(input_ids)
        encoder, decoder = self.sequences[self.loops]
        # Skips pair the innermost encoder output with the first decoder layer, outwards; pair k
        # uses skip weight k, and pairs beyond the trained count get no skip (as in the record,
        # whose shorter unlooped sequence uses only the inner weights).
        skips = []
        for layer, slot in encoder:
            x = self.run_layer(x, x0, layer, slot, layout)
            skips.append(x)
        return rms_norm(self.run_decoder(x, x0, skips, decoder, layout))

    def attention_layout(self, input_ids: Tensor) -> AttentionLayout:
        """Built once per forward and read by every attention layer (DOC_ATTENTION: see attention_layout)."""
        return attention_layout(input_ids, self.rope_cos, self.rope_sin, self.hp.doc_attention, self.attn_backend)

    def head_logits(self, h: Tensor) -> Tensor:
        """Soft-capped fp32 logits of final hidden states: the one head every loss and score goes through."""
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        z = self.adapters.add("head", F.linear(h, weight.to(h.dtype)).float(), h)
        if self.hp.asym_logit_rescale:
            return asymmetric_softcap(z, self.softcap_pos, self.softcap_neg)
        cap = self.hp.logit_softcap
        return cap * torch.tanh(z / cap)

    def forward_logits(self, input_ids: Tensor) -> Tensor:
        return self.head_logits(self.hidden_states(input_ids))

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats, computed in fp32 (LOSS_CHUNK_TOKENS tokens' logits at a time)."""
        h, targets = self.hidden_states(input_ids).flatten(0, 1), target_ids.flatten()
        if self.hp.loss_chunk_tokens > 0:
            return chunked_cross_entropy(self.head_logits, h, targets, self.hp.loss_chunk_tokens)
        return F.cross_entropy(self.head_logits(h), targets)


# --- The loss head: asymmetric soft cap and the chunked cross-entropy ------------------------------


def asymmetric_softcap(z: Tensor, cap_pos: Tensor, cap_neg: Tensor) -> Tensor:
    """c·tanh(z/c) with c = cap_pos where z ≥ 0 and cap_neg below; equal caps give the symmetric cap exactly.

    How far a likely token may rise and how far an unlikely one may sink are separate questions, so each
    side gets its own trained cap (AsymLogit). Unlike the public versions, the caps sit in the scalar
    optimizer and in every forward (this head is the only one), so they actually train.
    """
    cap = torch.where(z >= 0, cap_pos.float(), cap_neg.float())
    return cap * torch.tanh(z / cap)


def chunk_nll_sum(head: Callable[[Tensor], Tensor], h: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(head(h), targets, reduction="sum")


def chunked_cross_entropy(head: Callable[[Tensor], Tensor], h: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor:
    """F.cross_entropy(head(h), targets), holding the [tokens, vocab] tensors of one chunk at a time.

    The plain loss keeps the fp32 logits, their capped copy and the log-softmax of the whole micro-batch
    for the backward (98,304 tokens x 8,192 vocab = 3.2 GB each). Here each chunk's loss is checkpointed:
    its logits are dropped after the forward and recomputed in the backward, which costs one more head
    matmul. Non-reentrant checkpointing traces under torch.compile(fullgraph=True), and its recompute
    replays the forward's autocast state, so bf16 runs recompute the same numbers.
    """
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.size(0), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(chunk_nll_sum, head, h[start:end], targets[start:end], use_reentrant=False)
    return total / targets.numel()


# -----------------------------------------------------------------------------------------------
# Optimizers: Muon for the block matrices, AdamW for the embedding and every small tensor.
# -----------------------------------------------------------------------------------------------


def param_groups(model: GPT) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter in exactly one group: 'matrix' (Muon), 'embed', 'head', 'scalar' (AdamW)."""
    matrices = {id(m.weight) for m in model.blocks.modules() if isinstance(m, nn.Linear)}
    groups = {"matrix": [], "embed": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():
        if name == "tok_emb.weight":
            groups["embed"].append((name, p))
        elif name == "lm_head.weight":
            groups["head"].append((name, p))
        elif id(p) in matrices:
            groups["matrix"].append((name, p))
        else:
            groups["scalar"].append((name, p))
    return groups


def ns_schedule(name: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each of `steps` iterations: the schedule's tuples in order, a prefix for fewer steps.

    Past the end of the schedule its last tuple repeats (the Polar Express paper's rule; the records instead
    stop at 5 whatever MUON_BACKEND_STEPS says). The last Polar Express quintic maps singular values in
    [0.8, 1.2] into [0.91, 1.14] and has a stable fixed point at 1.035, so extra iterations keep them there.
    """
    table = NS_COEFFICIENTS[name]
    return table[:steps] + (table[-1],) * max(0, steps - len(table))


def newton_schulz(g: Tensor, steps: int, schedule: str = "polar_express", eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalize g: `steps` Newton-Schulz iterations with the coefficients of `schedule`."""
    x = g / (g.norm() + eps)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.mT
    for a, b, c in ns_schedule(schedule, steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


@dataclasses.dataclass(frozen=True)
class MuonPrecision:
    """Dtypes of Muon's update: Newton–Schulz runs in `iterate`, the update is rounded to `update` before
    it is applied, and ranks exchange it in `exchange`. The rounding is what training sees, so it is the
    same on every device (a CPU run then predicts a GPU run's quantization gap); the other two are speed."""

    iterate: torch.dtype = torch.float32
    update: torch.dtype = torch.float32
    exchange: torch.dtype = torch.float32


def muon_precision(hp: Hyperparameters, device: torch.device) -> MuonPrecision:
    update = torch.bfloat16 if hp.muon_update_dtype == "bf16" else torch.float32
    if device.type == "cuda":
        return MuonPrecision(iterate=update, update=update, exchange=update)
    # bf16 matmuls are slow on CPU, and gloo reduces fp32 everywhere: only the rounding is bf16 here.
    return MuonPrecision(iterate=torch.float32, update=update, exchange=torch.float32)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then an orthogonalized update; ranks split the matrices and share results."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 row_normalize: bool, rank: int, world_size: int, orthogonalize=newton_schulz,
                 precision: MuonPrecision = MuonPrecision()):
        super().__init__(params, dict(lr=lr, base_lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.backend_steps, self.row_normalize = backend_steps, row_normalize
        self.rank, self.world_size = rank, world_size
        self.orthogonalize, self.precision = orthogonalize, precision

    def own_update(self, p: Tensor, momentum: float) -> Tensor:
        buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        buf.mul_(momentum).add_(p.grad)
        g = p.grad.add(buf, alpha=momentum)
        if self.row_normalize:
            g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-7)
        u = self.orthogonalize(g.to(self.precision.iterate), self.backend_steps)
        return (u * max(1.0, p.size(0) / p.size(1)) ** 0.5).to(self.precision.update)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), dtype=self.precision.exchange, device=params[0].device)
            offset = 0
            for i, p in enumerate(params):
                if i % self.world_size == self.rank:
                    flat[offset:offset + p.numel()] = self.own_update(p, group["momentum"]).flatten()
                offset += p.numel()
            if self.world_size > 1:
                dist.all_reduce(flat)
            offset = 0
            for p in params:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


# Scalars AdamW trains without weight decay: decay would pull the logit caps towards 0, i.e. tighten
# them whatever the data says.
UNDECAYED_PARAMETERS = ("softcap_pos", "softcap_neg")


def adamw(params, lr: float, weight_decay: float, hp: Hyperparameters, device: torch.device, undecayed=()):
    groups = [dict(params=params, lr=lr, base_lr=lr)]
    if undecayed:
        groups.append(dict(params=list(undecayed), lr=lr, base_lr=lr, weight_decay=0.0))
    return torch.optim.AdamW(groups, betas=(hp.beta1, hp.beta2),
                             eps=hp.adam_eps, weight_decay=weight_decay, fused=device.type == "cuda")


def build_optimizers(model: GPT, hp: Hyperparameters, rt: Runtime) -> list[torch.optim.Optimizer]:
    named = param_groups(model)
    groups = {k: [p for n, p in v if n not in UNDECAYED_PARAMETERS] for k, v in named.items()}
    undecayed = [p for n, p in named["scalar"] if n in UNDECAYED_PARAMETERS]
    orthogonalize = functools.partial(newton_schulz, schedule=hp.muon_ns_coeffs)
    orthogonalize = torch.compile(orthogonalize) if rt.compile else orthogonalize
    optimizers = [
        Muon(groups["matrix"], hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps, hp.muon_wd,
             hp.muon_row_normalize, rt.rank, rt.world_size, orthogonalize, muon_precision(hp, rt.device)),
        adamw(groups["embed"], hp.tied_embed_lr if hp.tie_embeddings else hp.embed_lr, hp.embed_wd, hp, rt.device),
        adamw(groups["scalar"], hp.scalar_lr, hp.adam_wd, hp, rt.device, undecayed),
    ]
    if groups["head"]:
        optimizers.append(adamw(groups["head"], hp.head_lr, 0.0, hp, rt.device))
    return optimizers


# -----------------------------------------------------------------------------------------------
# Scoring: mean NLL over the whole validation split, in nats/token and bits/byte. Training uses it
# for its validation curve; the evaluations of the artifact at the end build on it.
# -----------------------------------------------------------------------------------------------


def evaluate(net: nn.Module, val: Validation, hp: Hyperparameters, rt: Runtime) -> tuple[float, float]:
    """Each rank scores a contiguous share of the EVAL_SEQ_LEN sequences; sums are all-reduced."""
    seq_len = hp.eval_seq_len
    total_seqs = (len(val.tokens) - 1) // seq_len
    first, end = total_seqs * rt.rank // rt.world_size, total_seqs * (rt.rank + 1) // rt.world_size
    batch_seqs = max(1, micro_batch_seqs(hp.val_batch_tokens, seq_len))
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # nll, tokens, bytes
    counts = val.bytes.to(rt.device)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for s in range(first, end, batch_seqs):
            e = min(s + batch_seqs, end)
            chunk = torch.from_numpy(val.tokens[s * seq_len:e * seq_len + 1].astype(np.int64)).to(rt.device)
            x, y = chunk[:-1].view(-1, seq_len), chunk[1:].view(-1, seq_len)
            with autocast(rt):
                loss = net(x, y)
            sums[0] += loss.double() * y.numel()
            sums[1] += y.numel()
            positions = torch.arange(s * seq_len, e * seq_len, device=rt.device)
            sums[2] += counts.count(x.flatten(), y.flatten(), positions).sum()
    net.train(was_training)
    if rt.distributed:
        dist.all_reduce(sums)
    return nats_and_bpb(sums[0].item(), sums[1].item(), sums[2].item())


def nats_and_bpb(nll_sum: float, tokens: float, num_bytes: float) -> tuple[float, float]:
    loss = nll_sum / tokens
    return loss, nll_sum / math.log(2.0) / num_bytes


# -----------------------------------------------------------------------------------------------
# Training loop: gradient accumulation to the REFERENCE_GPUS global batch, a wall-clock budget
# shared by all ranks, LR warm-down, looping switched on part-way, EMA of the weights.
# -----------------------------------------------------------------------------------------------


def lr_multiplier(frac: float, hp: Hyperparameters) -> float:
    """1 until the last WARMDOWN_FRAC of the budget, then linearly down to MIN_LR at frac = 1."""
    if hp.warmdown_frac <= 0 or frac < 1.0 - hp.warmdown_frac:
        return 1.0
    progress = min(max((1.0 - frac) / hp.warmdown_frac, 0.0), 1.0)
    return hp.min_lr + (1.0 - hp.min_lr) * progress


def seq_len_at(frac: float, hp: Hyperparameters) -> int:
    """The training sequence length at this training fraction: the first stage whose fraction is >= frac."""
    for length, fraction in hp.train_seq_schedule:
        if frac <= fraction:
            return length
    return hp.train_seq_schedule[-1][0] if hp.train_seq_schedule else hp.train_seq_len


def train_seq_lens(hp: Hyperparameters) -> list[int]:
    """Every sequence length training uses, in schedule order."""
    return list(dict.fromkeys(length for length, _ in hp.train_seq_schedule)) or [hp.train_seq_len]


def muon_momentum_at(step: int, hp: Hyperparameters) -> float:
    if hp.muon_momentum_warmup_steps <= 0:
        return hp.muon_momentum
    t = min(step / hp.muon_momentum_warmup_steps, 1.0)
    return (1 - t) * hp.muon_momentum_warmup_start + t * hp.muon_momentum


def looping_due(step: int, frac: float, hp: Hyperparameters) -> bool:
    if hp.num_loops == 0:
        return False
    if hp.enable_looping_at_step is not None:
        return step >= hp.enable_looping_at_step
    return frac >= hp.enable_looping_at


def loop_count_at(step: int, hp: Hyperparameters) -> int:
    """A looped step's loop count: NUM_LOOPS, or a draw from LOOP_SAMPLE seeded by SEED and the step,
    so every rank draws the same count without communicating."""
    if not hp.loop_sample:
        return hp.num_loops
    return hp.loop_sample[int(np.random.default_rng([hp.seed, step]).integers(len(hp.loop_sample)))]


class EMA:
    """An fp32 exponential moving average of the weights, copied into the model when training ends."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.average = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(self.average, [p.detach().float() for p in model.parameters()], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for p, avg in zip(model.parameters(), self.average):
            p.copy_(avg)


class PausableClock:
    """Training time, excluding the pauses taken for validation."""

    def __init__(self, device: torch.device):
        self.device, self.banked_ms, self.started = device, 0.0, None

    def resume(self) -> None:
        synchronize(self.device)
        self.started = time.perf_counter()

    def pause(self) -> None:
        self.banked_ms = self.read_ms()
        self.started = None

    def read_ms(self) -> float:
        synchronize(self.device)
        return self.banked_ms + 1000.0 * (time.perf_counter() - self.started)


def compiled_graph_count() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@dataclasses.dataclass
class TrainingRecord:
    """What the training loop did, for the end-of-run report."""

    steps: int = 0
    elapsed_ms: float = 0.0  # the slowest rank's training time after the last step
    looping_step: Optional[int] = None
    draws: list[int] = dataclasses.field(default_factory=list)  # the loop count of every looped step
    recompiles: int = 0  # graphs compiled inside the timed steps
    seq_switches: list[dict] = dataclasses.field(default_factory=list)  # TRAIN_SEQ_SCHEDULE's switches


class Trainer:
    """Owns the model, its compiled/DDP wrapper, its optimizers and its data loader for one run."""

    def __init__(self, hp: Hyperparameters, rt: Runtime, log: RunLog):
        self.hp, self.rt, self.log = hp, rt, log
        torch.manual_seed(hp.seed)
        self.model = GPT(hp, rt.attn_backend, rt.activation_dtype).to(rt.device)
        net = torch.compile(self.model, dynamic=False, fullgraph=True) if rt.compile else self.model
        self.net = DDP(net, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                       broadcast_buffers=False) if rt.distributed else net
        self.optimizers = build_optimizers(self.model, hp, rt)
        self.train_files = find_shards(hp, "train")
        self.loader = self.new_loader()
        self.seqs_per_micro = micro_batch_seqs(hp.train_batch_tokens, self.loader.seq_len)

    def new_loader(self) -> TrainLoader:
        return TrainLoader(self.train_files, seq_len_at(0.0, self.hp), self.hp.vocab_size, self.hp.seed,
                           self.rt.rank, self.rt.world_size, self.rt.device, slot_len=max(train_seq_lens(self.hp)))

    def use_seq_len(self, seq_len: int) -> None:
        """Train on sequences of `seq_len` tokens; the global batch stays TRAIN_BATCH_TOKENS tokens."""
        self.loader.set_seq_len(seq_len)
        self.seqs_per_micro = micro_batch_seqs(self.hp.train_batch_tokens, seq_len)

    def calibration_batches(self, count: int) -> Iterator[Tensor]:
        """The next `count` training micro-batches' inputs (GPTQ's calibration data)."""
        return (self.loader.next_batch(self.seqs_per_micro)[0] for _ in range(count))

    def step(self, step: int, lr_scale: float) -> Tensor:
        """One optimizer step over GRAD_ACCUM_STEPS micro-batches; returns the mean train loss."""
        total = torch.zeros((), device=self.rt.device)
        accum = self.rt.grad_accum_steps
        for micro in range(accum):
            x, y = self.loader.next_batch(self.seqs_per_micro)
            sync_now = micro == accum - 1 or not self.rt.distributed
            with contextlib.nullcontext() if sync_now else self.net.no_sync():
                with autocast(self.rt):
                    loss = self.net(x, y)
                (loss / accum).backward()
            total += loss.detach()
        momentum = muon_momentum_at(step, self.hp)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
                if isinstance(opt, Muon):
                    group["momentum"] = momentum
        if self.hp.grad_clip_norm > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.hp.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return total / accum

    def warm_up(self) -> None:
        """Run WARMUP_STEPS steps at every (sequence length, loop count) pair training may use, to
        compile each graph before the clock starts, then undo them."""
        if self.hp.warmup_steps == 0:
            return
        model_state = copy.deepcopy(self.model.state_dict())
        optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        for seq_len, loops in itertools.product(train_seq_lens(self.hp), self.model.plan.trained_counts):
            t0 = time.perf_counter()
            self.use_seq_len(seq_len)
            with self.model.looping(loops):
                for i in range(self.hp.warmup_steps):
                    self.step(i, 1.0)
            synchronize(self.rt.device)
            self.log(f"warmup: {self.hp.warmup_steps} steps loops:{loops} done in {time.perf_counter() - t0:.1f}s "
                     f"(seq_len {seq_len})")
        self.model.load_state_dict(model_state)
        for opt, state in zip(self.optimizers, optimizer_states):
            opt.load_state_dict(state)
        self.loader = self.new_loader()
        self.use_seq_len(self.loader.seq_len)
        synchronize(self.rt.device)

    def synced_ms(self, elapsed_ms: float) -> float:
        """The slowest rank's clock, so all ranks stop, loop and schedule LR at the same step."""
        if not self.rt.distributed:
            return elapsed_ms
        t = torch.tensor([elapsed_ms], dtype=torch.float64, device=self.rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def val_score(self, val: Validation) -> tuple[float, float]:
        """(nats/token, bits/byte) of the model as it is now, at the evaluated loop count."""
        with self.model.looping(self.hp.num_loops):
            return evaluate(self.net, val, self.hp, self.rt)

    def log_validation(self, val: Validation, record: TrainingRecord) -> None:
        val_loss, val_bpb = self.val_score(val)
        self.log(f"{record.steps}/{self.hp.iterations} val_loss: {val_loss:.4f} val_bpb: {val_bpb:.4f}")
        self.log.result["val_curve"].append(dict(step=record.steps, train_time_ms=round(record.elapsed_ms),
                                                 val_loss=val_loss, val_bpb=val_bpb))
        self.log.save()

    def check_draws_agree(self, draws: list[int]) -> None:
        """Fail loudly if ranks ran different loop counts (DDP would not notice: the parameters match)."""
        if not self.rt.distributed or not draws:
            return
        high = torch.tensor(draws, dtype=torch.int64, device=self.rt.device)
        low = high.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if not torch.equal(high, low):
            raise RuntimeError("LOOP_SAMPLE: ranks drew different loop counts")
        self.log(f"loop_counts: the {len(draws)} looped steps agree on all {self.rt.world_size} ranks")

    def train(self, val: Validation, gptq_reserve_s: float) -> None:
        """Train until ITERATIONS or until MAX_WALLCLOCK_SECONDS minus the GPTQ reserve; call warm_up first."""
        hp, log = self.hp, self.log
        ema = EMA(self.model, hp.ema_decay) if hp.ema_decay > 0 else None
        budget_ms = 1000.0 * (hp.max_wallclock_seconds - gptq_reserve_s) if hp.max_wallclock_seconds > 0 else None
        if budget_ms is not None:
            if budget_ms <= 0:
                raise ConfigError(f"MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds:g}: leaves no training time after "
                                  f"the GPTQ reserve of {gptq_reserve_s:.1f}s (set GPTQ_RESERVE_SECONDS)")
            log(f"train_budget: {budget_ms:.0f}ms (MAX_WALLCLOCK_SECONDS minus the GPTQ reserve {gptq_reserve_s:.1f}s)")
        clock, record, stop = PausableClock(self.rt.device), TrainingRecord(), False
        # record.elapsed_ms is the slowest rank's training time after the previous step: every decision
        # below (looping, LR, stopping) reads it, so all ranks make the same decision at the same step.
        clock.resume()
        while True:
            last = record.steps >= hp.iterations or stop
            if last or (hp.val_loss_every > 0 and record.steps % hp.val_loss_every == 0):
                clock.pause()
                self.log_validation(val, record)
                clock.resume()
            if last:
                break
            frac = record.elapsed_ms / budget_ms if budget_ms is not None else record.steps / max(hp.iterations, 1)
            loss = self.timed_step(record, frac)
            if ema is not None:
                ema.update(self.model)
            record.steps += 1
            record.elapsed_ms = self.synced_ms(clock.read_ms())
            stop = budget_ms is not None and record.elapsed_ms >= budget_ms
            self.log_step(record, loss, stop)
        self.check_draws_agree(record.draws)
        report_training(record, hp, self.rt, log)
        if ema is not None:
            ema.copy_to(self.model)
            log("ema: applied EMA weights")

    def timed_step(self, record: TrainingRecord, frac: float) -> Tensor:
        """One optimizer step at the loop count the schedule gives it, counting graphs compiled during it."""
        hp, step = self.hp, record.steps
        if record.looping_step is None and looping_due(step, frac, hp):
            record.looping_step = step
            sample = f" loop_sample:{','.join(map(str, hp.loop_sample))}" if hp.loop_sample else ""
            self.log(f"layer_loop:enabled step:{step} frac:{frac:.3f} {self.model.plan.describe(hp.num_loops)}{sample}")
        loops = 0
        if record.looping_step is not None:
            loops = loop_count_at(step, hp)
            record.draws.append(loops)
        self.follow_seq_schedule(record, frac)
        graphs = compiled_graph_count()
        with self.model.looping(loops):
            loss = self.step(step, lr_multiplier(frac, hp))
        record.recompiles += compiled_graph_count() - graphs
        return loss

    def follow_seq_schedule(self, record: TrainingRecord, frac: float) -> None:
        """Switch to TRAIN_SEQ_SCHEDULE's length for this training fraction when it changes, and log it."""
        seq_len = seq_len_at(frac, self.hp)
        if seq_len == self.loader.seq_len:
            return
        self.log(f"seq_len: {self.loader.seq_len} -> {seq_len} at step {record.steps} frac {frac:.3f}")
        record.seq_switches.append(dict(step=record.steps, frac=round(frac, 4), seq_len=seq_len))
        self.use_seq_len(seq_len)

    def log_step(self, record: TrainingRecord, loss: Tensor, stop: bool) -> None:
        hp, step, elapsed = self.hp, record.steps, record.elapsed_ms
        if hp.train_log_every > 0 and (step <= 5 or step % hp.train_log_every == 0 or stop):
            tok_s = step * hp.train_batch_tokens / (elapsed / 1000.0)
            self.log(f"{step}/{hp.iterations} train_loss: {loss.item():.4f} train_time: {elapsed / 60000:.1f}m tok/s: {tok_s:.0f}")
        if stop:
            self.log(f"stopping_early: wallclock_cap train_time: {elapsed:.0f}ms step: {step}/{hp.iterations}")


def report_training(record: TrainingRecord, hp: Hyperparameters, rt: Runtime, log: RunLog) -> None:
    """The end-of-training log lines and JSON fields: steps, time, loop counts, memory, recompiles."""
    log(f"peak_memory: {peak_memory_mib(rt.device):.0f} MiB")
    if rt.compile:
        log(f"compile: {record.recompiles} graph(s) compiled inside the timed training steps")
    log.update(steps=record.steps, train_time_ms=round(record.elapsed_ms), looping_enabled_step=record.looping_step,
               steps_per_loop_count={n: record.draws.count(n) for n in sorted(set(record.draws))},
               tokens_per_s=record.steps * hp.train_batch_tokens / max(record.elapsed_ms / 1000.0, 1e-9),
               peak_memory_mib=round(peak_memory_mib(rt.device), 1),
               graphs_compiled_in_timed_steps=record.recompiles if rt.compile else None,
               seq_len_switches=record.seq_switches)


# -----------------------------------------------------------------------------------------------
# Quantization & artifact: full-Hessian GPTQ with standard-deviation clipping, a self-describing
# byte format, compression, and the 16,000,000-byte budget.
# -----------------------------------------------------------------------------------------------

PASSTHROUGH_MAX_NUMEL = 65_536  # tensors this small (and every non-matrix) are stored as fp16
ARTIFACT_MAGIC = b"PGQ1"
ARTIFACT_PATH = "final_model.int6.ptz"
# Knobs that change the model's tensors or its forward pass: an artifact only loads into a model
# built with the same values. (Sequence lengths are not among them: the rotary tables are derived.)
ARCHITECTURE_KNOBS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
                      "tie_embeddings", "logit_softcap", "rope_base", "rope_dims", "ln_scale", "xsa_last_n",
                      "parallel_residual_start", "parallel_start_layer", "skip_gates_enabled", "num_loops", "loop_start", "loop_end",
                      "loop_sample", "share_loop_params", "birkhoff_mix", "output_ln", "timestep_scale", "timestep_cap",
                      "sparse_attn_gate_enabled", "sparse_attn_gate_scale", "gate_window", "smear_gate_enabled",
                      "asym_logit_rescale")


class ArtifactError(ValueError):
    """The artifact file is truncated, corrupted, or made for another model."""


def is_quantized(t: Tensor) -> bool:
    return t.is_floating_point() and t.ndim == 2 and t.numel() > PASSTHROUGH_MAX_NUMEL


def quant_settings(name: str, hp: Hyperparameters) -> tuple[int, float]:
    """(bits, clip sigmas): the embedding (or untied head) gets its own, block matrices MATRIX_BITS and their group's clip."""
    if name in ("tok_emb.weight", "lm_head.weight"):
        return hp.embed_bits, hp.embed_clip_sigmas
    return hp.matrix_bits, getattr(hp, clip_group(name))


# --- Per-group clips and int8 gate rows (issue 14). The records clip MLP matrices tighter than attention
# ones (#1586, #1769, #1855): one SDClip k per matrix role, MATRIX_CLIP_SIGMAS for any other matrix.
MLP_MATRICES = ("mlp.fc.weight", "mlp.proj.weight")
ATTN_MATRICES = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight")
CLIP_KNOBS = ("matrix_clip_sigmas", "mlp_clip_sigmas", "attn_clip_sigmas", "embed_clip_sigmas")
GATE_ROW_QMAX = 127


def clip_group(name: str) -> str:
    """The Hyperparameters field holding a block matrix's clip sigmas, chosen by its role."""
    role = code_role(name)
    return ("mlp_clip_sigmas" if role in MLP_MATRICES else "attn_clip_sigmas" if role in ATTN_MATRICES
            else "matrix_clip_sigmas")


def scaled_clips(hp: Hyperparameters, factor: float) -> Hyperparameters:
    """hp with every clip sigma (each group's and the embedding's) times factor."""
    return dataclasses.replace(hp, **{k: getattr(hp, k) * factor for k in CLIP_KNOBS})


def is_gate_tensor(name: str) -> bool:
    return name.endswith(".attn_gate_w") or name == "smear_gate_w"


def quantize_gate_rows(t: Tensor) -> dict:
    """Symmetric int8 per row with an fp16 step max|row|/127 (GATED_ATTN_QUANT_GATE, #1736).

    A gate is tiny (heads × GATE_WINDOW values), so a rounding error of half a step at most
    is cheap; no Hessian. The step's floor keeps an all-zero row (the gates' init) finite.
    """
    w = t.detach().float()
    scale = (w.abs().amax(dim=1) / GATE_ROW_QMAX).clamp_min(2.0 ** -24).half()
    codes = torch.clamp(torch.round(w / scale.float()[:, None]), -GATE_ROW_QMAX, GATE_ROW_QMAX).to(torch.int8)
    return dict(codes=codes.cpu(), scale=scale.cpu(), bits=8)


def collect_hessians(model: GPT, batches, rt: Runtime) -> dict[str, Tensor]:
    """H = E[x xᵀ] of the input of every quantized matrix, over calibration batches and all ranks.

    Hooks fire on every call, so a looped layer accumulates over all of its passes. The tied
    embedding's (or untied head's) input is the final hidden state.
    """
    targets = {f"{name}.weight": m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and is_quantized(m.weight)}
    hessians = {name: torch.zeros(m.in_features, m.in_features, device=rt.device) for name, m in targets.items()}
    head = "tok_emb.weight" if model.lm_head is None else "lm_head.weight"
    hessians[head] = torch.zeros(model.hp.model_dim, model.hp.model_dim, device=rt.device)

    def accumulate(name: str, x: Tensor) -> None:
        x = x.detach().flatten(0, -2).float()
        hessians[name].addmm_(x.T, x)

    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: accumulate(name, inp[0]))
             for name, m in targets.items()]
    model.eval()
    count = 0
    with torch.no_grad(), autocast(rt):
        for x in batches:
            accumulate(head, model.hidden_states(x))
            count += 1
    for hook in hooks:
        hook.remove()
    model.train()
    for h in hessians.values():
        if rt.distributed:
            dist.all_reduce(h)
        h /= max(count * rt.world_size, 1)
    return hessians


def row_scales(w: Tensor, bits: int, clip_sigmas: float) -> Tensor:
    """SDClip: each row's step is k·std(row)/qmax, rounded to fp16 as it is stored."""
    qmax = 2 ** (bits - 1) - 1
    return (clip_sigmas * w.float().std(dim=1) / qmax).clamp_min(1e-8).half().float()


def column_steps(scale: Tensor, bits: int, cols: int, fine: Optional[tuple[Tensor, Tensor, int]]) -> tuple[Tensor, Tensor]:
    """(rows × cols step of every weight, largest code of every column): the row scale everywhere, except in
    the `fine` columns, which take the finer row scales and wider code range that come with them."""
    steps = scale[:, None].expand(-1, cols).clone()
    qmax = torch.full((cols,), 2.0 ** (bits - 1) - 1, device=scale.device)
    if fine is not None:
        mask, fine_scale, fine_bits = fine
        steps[:, mask] = fine_scale.float()[:, None].to(steps.device)
        qmax[mask] = 2.0 ** (fine_bits - 1) - 1
    return steps, qmax


def gptq_quantize(w: Tensor, hessian: Optional[Tensor], bits: int, clip_sigmas: float,
                  block_size: int = 128, damping: float = 0.01, fine: Optional[tuple[Tensor, Tensor, int]] = None,
                  ) -> tuple[Tensor, Tensor]:
    """Quantize w (rows × cols) to signed `bits`-bit codes with per-row scales.

    Columns are visited in order of decreasing Hessian diagonal; each column's rounding error is
    spread over the columns not yet quantized through the inverse-Hessian Cholesky factor, in
    blocks of `block_size` columns. Columns whose input is always zero ("dead") are set to 0.
    Without a Hessian this is round-to-nearest. `fine` = (column mask, row scales, bits): those
    columns get their own, finer codes inside the same solve (AWQ-lite, see quantize_matrix).
    """
    w = w.detach().float()
    scale = row_scales(w, bits, clip_sigmas)
    steps, qmax = column_steps(scale, bits, w.shape[1], fine)
    if hessian is None:
        return torch.clamp(torch.round(w / steps), -qmax, qmax).to(torch.int8), scale.half()
    rows, cols = w.shape
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * h.diagonal().mean())
    order = torch.argsort(h.diagonal(), descending=True)
    work = w.clone()
    work[:, dead] = 0.0
    work, h, steps, qmax = work[:, order], h[order][:, order], steps[:, order], qmax[order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.int8, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = work[:, start:end].clone()
        errors = torch.zeros_like(block)
        for j in range(end - start):
            q = torch.clamp(torch.round(block[:, j] / steps[:, start + j]), -qmax[start + j], qmax[start + j])
            codes[:, start + j] = q.to(torch.int8)
            err = (block[:, j] - q * steps[:, start + j]) / u[start + j, start + j]
            block[:, j:] -= err[:, None] * u[start + j, start + j:end][None, :]
            errors[:, j] = err
        work[:, end:] -= errors @ u[start:end, end:]
    return codes[:, torch.argsort(order)], scale.half()


def dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    return codes.float() * scale.float()[:, None]


# --- AWQ-lite and LQER (issue 14): two corrections of GPTQ's error from the records (#1908, #1797).
# AWQ-lite gives the input-column groups with the largest activations × weights finer codes inside the
# GPTQ solve; LQER then fits a low-rank product to the error left in the few matrices where it removes
# the most output error per stored byte, and the loader adds the product to their dense weights, so
# the evaluated model costs nothing extra.
LQER_A_CODES = (-2, 1)  # left factor: int2, one fp16 scale per matrix
LQER_B_CODES = (-8, 7)  # right factor: int4, one fp16 scale per LQER_ASYM_GROUP elements


def awq_group_saliency(weight: Tensor, hessian: Tensor, hp: Hyperparameters) -> list[tuple[float, int]]:
    """(summed saliency RMS(x_c) · mean_r |W_rc|, first column) of each group of AWQ_LITE_GROUP_SIZE input columns.

    RMS(x_c) ∝ sqrt(H_cc): every Hessian sums x_c² over the same calibration tokens (per batch), except that
    a looped layer's sums over its passes, which weighs its columns by how often the weight is applied.
    """
    saliency = hessian.diagonal().float().clamp_min(0).sqrt().cpu() * weight.detach().float().abs().mean(dim=0).cpu()
    return [(saliency[start:start + hp.awq_lite_group_size].sum().item(), start)
            for start in range(0, len(saliency), hp.awq_lite_group_size)]


def awq_lite_groups(weights: dict[str, Tensor], hessians: dict[str, Tensor], hp: Hyperparameters) -> dict[str, list[int]]:
    """name -> first columns of its AWQ-lite groups: the global top AWQ_LITE_GROUP_TOP_K groups of
    AWQ_LITE_GROUP_SIZE consecutive input columns, by summed saliency (awq_group_saliency)."""
    candidates = []
    for name, h in hessians.items():
        if is_quantized(weights[name]) and quant_settings(name, hp)[0] < hp.awq_lite_bits:
            candidates += [(value, name, start) for value, start in awq_group_saliency(weights[name], h, hp)]
    chosen = {}
    for _, name, start in sorted(candidates, reverse=True)[:hp.awq_lite_group_top_k]:
        chosen.setdefault(name, []).append(start)
    return {name: sorted(starts) for name, starts in chosen.items()}


def awq_lite_mask(cols: int, starts: list[int], size: int) -> Tensor:
    mask = torch.zeros(cols, dtype=torch.bool)
    for start in starts:
        mask[start:start + size] = True
    return mask


def quantize_matrix(name: str, t: Tensor, hessian: Optional[Tensor], hp: Hyperparameters, awq_starts: list[int]) -> dict:
    """GPTQ codes of one matrix; its AWQ-lite columns (if any) at AWQ_LITE_BITS with their own SDClip row scales."""
    bits, sigmas = quant_settings(name, hp)
    if not awq_starts:
        codes, scale = gptq_quantize(t, hessian, bits, sigmas)
        return dict(codes=codes.cpu(), scale=scale.cpu(), bits=bits)
    fine_scale = row_scales(t, hp.awq_lite_bits, sigmas)
    mask = awq_lite_mask(t.shape[1], awq_starts, hp.awq_lite_group_size).to(t.device)
    codes, scale = gptq_quantize(t, hessian, bits, sigmas, fine=(mask, fine_scale, hp.awq_lite_bits))
    awq = dict(starts=awq_starts, size=hp.awq_lite_group_size, bits=hp.awq_lite_bits, scale=fine_scale.half().cpu())
    return dict(codes=codes.cpu(), scale=scale.cpu(), bits=bits, awq=awq)


def in_groups(t: Tensor, group: int) -> Tensor:
    """t flattened and zero-padded to whole groups: (groups × group)."""
    flat = t.flatten()
    return F.pad(flat, (0, -len(flat) % group)).view(-1, group)


def lqer_product(factors: dict) -> Tensor:
    """The dense correction A·B that the stored LQER factors stand for."""
    a = factors["a_codes"].float() * factors["a_scale"].float()
    b_codes = factors["b_codes"]
    b = (in_groups(b_codes.float(), factors["group"]) * factors["b_scale"].float()[:, None]).flatten()
    return a @ b[:b_codes.numel()].view(b_codes.shape)


def dequantize_entry(q: dict) -> Tensor:
    """The dense weight a quantized entry stands for: codes × row scale, the AWQ-lite columns × their own
    scales, plus the LQER correction: this is where the corrections are folded in at load."""
    w = dequantize(q["codes"], q["scale"])
    if "awq" in q:
        mask = awq_lite_mask(w.shape[1], q["awq"]["starts"], q["awq"]["size"])
        w[:, mask] = q["codes"][:, mask].float() * q["awq"]["scale"].float()[:, None]
    if "lqer" in q:
        w += lqer_product(q["lqer"])
    return w


def hessian_factor(hessian: Tensor, damping: float = 0.01) -> Tensor:
    """C with C·Cᵀ = H + damping·mean(diag H)·I (the identity if H is zero), so that tr(E H Eᵀ) ≈ ‖E·C‖²."""
    h = hessian.detach().float()
    ridge = damping * h.diagonal().mean() if h.diagonal().mean() > 0 else torch.tensor(1.0, device=h.device)
    return torch.linalg.cholesky(h + ridge * torch.eye(len(h), device=h.device))


def lqer_fit(error: Tensor, c: Tensor, rank: int, group: int) -> dict:
    """Quantized LQER factors A (rows × rank, int2) and B (rank × cols, int4 in groups) with A·B ≈ error
    in the Hessian norm ‖(E − A·B)·C‖.

    The best rank-r fit in that norm spans the top left singular vectors U_r of E·C. A holds them unit-norm,
    all columns alike, so one int2 scale suits them (the records' A = U·S rounds the weaker columns to 0),
    at a step of std(A), near the MSE-optimal step of a 4-level quantizer. B is then the least-squares fit
    to the *quantized* A, which absorbs A's rounding (given A, the H-weighted optimum does not depend on
    H), and is quantized to int4 with one max|B|/7.5 scale per group of `group` flattened elements.
    """
    u = torch.linalg.svd(error @ c, full_matrices=False)[0][:, :rank]
    a_scale = u.std().clamp_min(1e-8).half()
    a_codes = torch.clamp(torch.round(u / a_scale.float()), *LQER_A_CODES)
    b = torch.linalg.pinv(a_codes * a_scale.float()) @ error
    groups = in_groups(b, group)
    b_scale = (groups.abs().amax(dim=1) / (LQER_B_CODES[1] + 0.5)).clamp_min(2.0 ** -24).half()
    b_codes = torch.clamp(torch.round(groups / b_scale.float()[:, None]), *LQER_B_CODES).flatten()[:b.numel()]
    return dict(a_codes=a_codes.to(torch.int8).cpu(), a_scale=a_scale.view(1).cpu(), group=group,
                b_codes=b_codes.view(b.shape).to(torch.int8).cpu(), b_scale=b_scale.cpu())


def lqer_bytes(rows: int, cols: int, rank: int, group: int) -> int:
    """Information size of one correction: 2 bits per A entry, 4 per B entry, and its fp16 scales."""
    return (2 * rows * rank + 4 * rank * cols) // 8 + 2 * (1 + -(-rank * cols // group))


def lqer_candidates(quantized: dict[str, dict], weights: dict[str, Tensor], hessians: dict[str, Tensor],
                    rank: int, group: int) -> list[dict]:
    """Every Hessian-calibrated matrix's correction: {name, factors, reduction, bytes}, most reduction per byte first.

    reduction = tr(E H Eᵀ) − tr(E' H E'ᵀ), E the error before and E' after the (quantized) correction:
    the layer's output error it removes. Ranking per byte rather than by ‖E‖ (which always picks the
    largest matrix, the embedding) spends the bytes where they buy the most. This is the function a
    budget fitter can call with another (top_k, rank) to grow an artifact into spare bytes.
    """
    out = []
    for name, h in hessians.items():
        if "codes" not in quantized[name]:  # the head's Hessian exists even when the embedding is small enough for fp16
            continue
        q = {k: v for k, v in quantized[name].items() if k != "lqer"}
        c = hessian_factor(h)
        error = weights[name].detach().float() - dequantize_entry(q).to(c.device)
        factors = lqer_fit(error, c, rank, group)
        left = error - lqer_product(factors).to(c.device)
        reduction = ((error @ c) ** 2).sum().item() - ((left @ c) ** 2).sum().item()
        out.append(dict(name=name, factors=factors, reduction=reduction, bytes=lqer_bytes(*error.shape, rank, group)))
    return sorted(out, key=lambda cand: cand["reduction"] / cand["bytes"], reverse=True)


def add_lqer(quantized: dict[str, dict], weights: dict[str, Tensor], hessians: dict[str, Tensor],
             top_k: int, rank: int, group: int) -> dict[str, dict]:
    """`quantized` with rank-`rank` LQER corrections on the top_k candidates (any that removes no error is skipped)."""
    out = {name: {k: v for k, v in q.items() if k != "lqer"} if "lqer" in q else q for name, q in quantized.items()}
    for cand in lqer_candidates(out, weights, hessians, rank, group)[:top_k]:
        if cand["reduction"] > 0:
            out[cand["name"]] = dict(out[cand["name"]], lqer=cand["factors"])
    return out


def describe_corrections(quantized: dict[str, dict]) -> list[str]:
    """Log lines naming the AWQ-lite column groups and the LQER corrections."""
    awq = [f"{name}[{start}:{start + q['awq']['size']}] int{q['awq']['bits']}"
           for name, q in quantized.items() if "awq" in q for start in q["awq"]["starts"]]
    lqer = [f"{name} rank {q['lqer']['a_codes'].shape[1]}" for name, q in quantized.items() if "lqer" in q]
    return ((["quantized: AWQ-lite columns: " + ", ".join(awq)] if awq else [])
            + (["quantized: LQER corrections: " + ", ".join(lqer)] if lqer else []))


def quantize_state(model: GPT, hessians: dict[str, Tensor], hp: Hyperparameters) -> dict[str, dict]:
    """name -> {'codes', 'scale', 'bits'} for quantized matrices (and gates), {'fp16'} for everything else;
    a matrix may also carry 'awq' columns and an 'lqer' correction (see above)."""
    out, state = {}, model.state_dict()
    awq = awq_lite_groups(state, hessians, hp) if hp.awq_lite_enabled else {}
    for name, t in state.items():
        if is_quantized(t):
            out[name] = quantize_matrix(name, t, hessians.get(name), hp, awq.get(name, []))
        elif hp.gated_attn_quant_gate and is_gate_tensor(name):
            out[name] = quantize_gate_rows(t)
        else:
            out[name] = dict(fp16=t.detach().half().cpu())
    if hp.lqer_enabled and hessians:
        out = add_lqer(out, state, hessians, hp.lqer_top_k, hp.lqer_rank, hp.lqer_asym_group)
    return out


def dequantize_state(quantized: dict[str, dict]) -> dict[str, Tensor]:
    return {name: dequantize_entry(q) if "codes" in q else q["fp16"].float()
            for name, q in quantized.items()}


def byte_planes(data: bytes, width: int) -> bytes:
    """Group byte k of every `width`-byte element together: fp16 high bytes compress far better alone."""
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, width).T.tobytes()


def from_byte_planes(data: bytes, width: int) -> bytes:
    return np.frombuffer(data, dtype=np.uint8).reshape(width, -1).T.tobytes()


def compress(raw: bytes, compressor: str) -> bytes:
    if compressor == "pergroup":
        return compress_pergroup(raw)
    if compressor == "brotli":
        return brotli.compress(raw, quality=11)
    return lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)


def decompress(blob: bytes, compressor: str) -> bytes:
    if compressor == "pergroup":
        return decompress_pergroup(blob)
    try:
        return brotli.decompress(blob) if compressor == "brotli" else lzma.decompress(blob)
    except (brotli.error, lzma.LZMAError) as exc:
        raise ArtifactError(f"cannot decompress the artifact ({compressor}): {exc}; the file is truncated or corrupted") from None


# --- Per-group compressor (COMPRESSOR=pergroup). The quantized codes of one tensor role (every layer's c_q, ...)
# are close to independent draws from a few distributions, so a static ANS coder over per-role histograms reaches
# their entropy, which brotli-11 misses by 0.5-1.4% while spending ~100x the time (BENCHMARKS.md, issue 14). They
# are not identically distributed within a role, though: on a trained embedding, each column's codes are shifted
# and shaped differently, and rows differ with their scale. So each role's codes are split into classes, row bucket (the rank of the
# row's fp16 scale within its tensor: free, the decoder reads the scales before the codes) x column bucket (the
# rank of the column's code mean or rms: the ids are stored), one histogram each. The bucket counts are chosen per
# role by what they cost in bytes, histograms and column ids included, so a context that does not pay is not used
# (on the block matrices it usually does not; on a short-trained embedding per-column histograms save ~13%).
# Histograms are stored as one byte per symbol and class, log2-quantized with 1-16 levels per octave (LEVEL_STEPS),
# chosen per role with the buckets: 1 per octave costs the embedding's codes 0.6% but halves what brotli leaves of
# its histograms, so finer classes pay. They are stored symbol-major, so that brotli sees one symbol's levels across
# neighbouring column buckets together. The role's fp16 row scales are ANS-coded too (their top bits, one
# histogram per role; the low `scale_shift` bits stored as they are): 4-7% below brotli-11.
# Layout: u32 len(A) | A | B, where A = brotli(u32 len(T) | T | u32 len(H) | H | the raw container minus its code
# and row-scale bytes), T = JSON {version, groups: [{role, row_classes, col_classes, code_lo, code_width,
# level_steps, scale_shift, scale_words, words}]}, H = for each group, its scales' (lowest top bits: u16, histogram
# length: u16), histogram and low bits, then its classes' histograms (code_width x col_classes x row_classes bytes,
# symbol-major) and its tensors' packed column ids,
# and B = for each group, the ANS words of its scales and then of its codes, in table order.
# Which bytes of the container belong to which group follows from the container's own header, and its payload
# checksum verifies the decoded codes and scales. Row reordering is absent on purpose: a permutation costs more than the
# neighbour contexts it enables gain (BENCHMARKS.md).
PERGROUP_VERSION = 3
ROW_CLASSES_MAX = 16  # row buckets tried: 1, 2, 4, 8, 16 (powers of two, so the coarser ones nest in the finest)
COL_CLASSES_MAX = 512  # column buckets tried: 1, 2, ..., 512 (log2 of it bits per column stored); on a trained
                       # embedding each column has its own histogram, and per-column histograms pay for themselves
COLUMN_KEYS = ("rms", "mean")  # what orders the columns into buckets: the cheaper (the decoder reads the ids)
CLASS_OPTIONS_MEASURED = 8  # how many of the cheapest class options are costed again with brotli'd histograms
LEVEL_STEPS = (1, 2, 4, 8, 16)  # histogram levels per octave tried per role: a count c is stored as
                                # 255 + round(steps·log2(c / max))
SCALE_LEVEL_STEPS = 16  # the row scales' one histogram per role: ≤ 2.2% off, ~0.01% more ANS bytes


def ans_coder():
    missing = pip_package_missing(COMPRESSOR_PACKAGES["pergroup"])
    if missing:
        raise ArtifactError(f"the artifact's compressor pergroup {missing}")
    import constriction
    return constriction


def code_role(name: str) -> str:
    """The tensor's name without its block index: every layer's c_q shares one code histogram."""
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "blocks" and parts[1].isdigit() else name


@dataclasses.dataclass(frozen=True)
class CodeTensor:
    """Where one int tensor's codes and fp16 row scales lie in the raw container."""
    start: int
    rows: int
    cols: int
    role: str
    scale: tuple[int, int]  # (start, length) of the scales' byte planes

    @property
    def length(self) -> int:
        return self.rows * self.cols


def code_tensors(raw: bytes) -> list[CodeTensor]:
    """Every int tensor of the raw container (only its header is read), in file order of the codes."""
    header_len = int.from_bytes(raw[:4], "little")
    try:
        header = json.loads(raw[4:4 + header_len])
        start = 4 + header_len
        entries = [e for e in header.get("tensors", []) if e["kind"] == "int"]
        out = [CodeTensor(start + e["codes"][0], e["shape"][0], e["codes"][1] // max(e["shape"][0], 1),
                          code_role(e["name"]), (start + e["scale"][0], e["scale"][1])) for e in entries]
        if any(t.length != e["codes"][1] or t.scale[1] != 2 * t.rows for t, e in zip(out, entries)):
            raise ValueError  # the row classes need one scale per row, and rows x columns codes
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise ArtifactError("artifact header does not describe its tensors; the file is corrupted") from None
    return sorted(out, key=lambda t: t.start)


def rank_buckets(values: np.ndarray, count: int) -> np.ndarray:
    """Each value's rank bucket 0..count-1, equal-sized (ties by position, so encoder and decoder agree)."""
    return np.argsort(np.argsort(values, kind="stable"), kind="stable") * count // len(values)


def row_buckets(container: bytes, t: CodeTensor, count: int) -> np.ndarray:
    scales = np.frombuffer(from_byte_planes(container[t.scale[0]:t.scale[0] + t.scale[1]], 2), dtype=np.float16)
    return rank_buckets(scales.astype(np.float32), count)


def column_buckets(codes: np.ndarray, count: int, key: str) -> np.ndarray:
    """Column buckets by the rank of the column's code rms or mean (on a trained embedding every column is shifted
    along a shared direction, so its mean orders the columns' histograms better than its rms does)."""
    if key == "rms":
        return rank_buckets((codes.astype(np.float32) ** 2).mean(axis=0, dtype=np.float64), count)
    return rank_buckets(codes.mean(axis=0, dtype=np.float64), count)


def pack_ids(ids: np.ndarray, bits: int) -> bytes:
    return np.packbits(((ids[:, None] >> np.arange(bits)) & 1).astype(np.uint8)).tobytes()


def unpack_ids(data: bytes, count: int, bits: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:count * bits].reshape(count, bits)
    return (flat.astype(np.int64) << np.arange(bits)).sum(axis=1)


def id_bytes(cols: int, classes: int) -> int:
    return -(-cols * (classes.bit_length() - 1) // 8)


def count_octaves(counts: np.ndarray) -> np.ndarray:
    """log2(count / the histogram's largest count) (histograms along the last axis; 0 for a count of 0)."""
    return np.log2(np.maximum(counts, 1) / np.maximum(counts.max(axis=-1, keepdims=True), 1))


def histogram_levels(counts: np.ndarray, steps: int, octaves: Optional[np.ndarray] = None) -> np.ndarray:
    """One byte per count: 0 for a count of 0, else 255 + round(steps·count_octaves), at least 1 (`octaves`: the
    counts' count_octaves where the caller has them already)."""
    ratio = count_octaves(counts) if octaves is None else octaves
    return np.where(counts > 0, np.clip(255 + np.round(steps * ratio), 1, 255), 0).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def level_weights(steps: int) -> np.ndarray:
    """Integer weights of the levels, so encoder and decoder turn a histogram into the same probabilities on any
    machine (a division is exact to the last bit; exp2 of a platform's libm need not be). At least 1: a level at
    the clip still has a symbol behind it."""
    return np.array([0] + [max(1, round(2 ** (24 + (level - 255) / steps))) for level in range(1, 256)], dtype=np.int64)


def level_model(levels: np.ndarray, steps: int):
    weights = level_weights(steps)[levels]
    return ans_coder().stream.model.Categorical(weights / weights.sum(), perfect=False)


def class_histograms(joint: np.ndarray, row_classes: int, col_classes: int) -> np.ndarray:
    """(row_classes · col_classes, symbols) counts, summed from the finest (ROW_CLASSES_MAX, COL_CLASSES_MAX, symbols)."""
    rows, cols, width = joint.shape
    return joint.reshape(row_classes, rows // row_classes, col_classes, cols // col_classes, width).sum(
        axis=(1, 3)).reshape(-1, width)


def code_bits(histograms: np.ndarray, levels: np.ndarray, steps: int) -> float:
    """ANS size in bits of the counted symbols under their stored histogram levels (the cross-entropy)."""
    weights = level_weights(steps)[levels].astype(np.float64)
    seen = histograms > 0
    probabilities = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1)
    return -float((histograms[seen] * np.log2(probabilities[seen])).sum())


def classes_cost(histograms: np.ndarray, id_cost: int, steps: int, octaves: Optional[np.ndarray] = None) -> float:
    """Bytes of a role's codes under these classes: their ANS size, the histograms (one byte per symbol and class,
    costed at the order-0 entropy of those bytes: coarse levels repeat, and brotli shrinks them) and the column ids."""
    levels = histogram_levels(histograms, steps, octaves)
    frequency = np.bincount(levels.ravel(), minlength=256)
    frequency = frequency[frequency > 0] / levels.size
    return code_bits(histograms, levels, steps) / 8 - levels.size * float((frequency * np.log2(frequency)).sum()) / 8 + id_cost


def level_table(levels: np.ndarray, row_classes: int) -> bytes:
    """A role's (classes, symbols) levels as stored: symbol-major, then column bucket, then row bucket, so that brotli
    sees one symbol's levels across neighbouring column buckets (ordered by mean or rms) side by side."""
    return levels.reshape(row_classes, -1, levels.shape[1]).transpose(2, 1, 0).tobytes()


def read_level_table(data: bytes, row_classes: int, col_classes: int, width: int) -> np.ndarray:
    """Inverse of level_table."""
    return np.frombuffer(data, dtype=np.uint8).reshape(width, col_classes, row_classes).transpose(2, 1, 0).reshape(-1, width)


def brotli_classes_cost(histograms: np.ndarray, id_cost: int, steps: int, row_classes: int) -> float:
    """classes_cost with the histograms' bytes as brotli leaves them (they travel in the brotli'd side part)."""
    levels = histogram_levels(histograms, steps)
    return code_bits(histograms, levels, steps) / 8 + len(brotli.compress(level_table(levels, row_classes), quality=11)) + id_cost


def choose_classes(joints: dict[str, np.ndarray], tensors: list[CodeTensor]) -> tuple[str, int, int, int]:
    """(column key, row classes, column classes, level steps) of a role, among the powers of two up to the maxima
    and LEVEL_STEPS: every option costed by classes_cost, the CLASS_OPTIONS_MEASURED cheapest again with their
    histograms brotli-compressed."""
    grid = [(2 ** r, 2 ** c) for r in range(ROW_CLASSES_MAX.bit_length()) for c in range(COL_CLASSES_MAX.bit_length())]
    ids = {cols: sum(id_bytes(t.cols, cols) for t in tensors) for _, cols in grid}
    options = []
    for key, joint in joints.items():
        for rows, cols in grid:
            histograms = class_histograms(joint, rows, cols)
            octaves = count_octaves(histograms)
            options += [(classes_cost(histograms, ids[cols], steps, octaves), key, rows, cols, steps) for steps in LEVEL_STEPS]
    best = min(sorted(options)[:CLASS_OPTIONS_MEASURED], key=lambda o: brotli_classes_cost(
        class_histograms(joints[o[1]], o[2], o[3]), ids[o[3]], o[4], o[2]))
    return best[1:]


class ByteReader:
    """Consecutive slices of a byte string; running past its end is a corrupted artifact."""

    def __init__(self, data: bytes):
        self.data, self.cursor = data, 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.cursor + count > len(self.data):
            raise ArtifactError("the artifact's code histograms are truncated; the file is corrupted")
        self.cursor += count
        return self.data[self.cursor - count:self.cursor]


def encode_classes(symbols: np.ndarray, classes: np.ndarray, count: int, width: int, steps: int) -> tuple[np.ndarray, bytes]:
    """((count, width) histogram levels, the ANS words) of symbols 0..width-1 coded class after class. A class
    whose histogram has one symbol (e.g. a gate at its zero init) or none is not coded: it carries no information."""
    order = np.argsort(classes, kind="stable") if count > 1 else slice(None)  # one class: already in order
    segments = np.split(symbols[order].astype(np.int32), np.cumsum(np.bincount(classes, minlength=count))[:-1])
    levels = np.stack([histogram_levels(np.bincount(segment, minlength=width), steps) for segment in segments])
    coded = (levels > 0).sum(axis=1) > 1
    coder = ans_coder().stream.stack.AnsCoder()
    for segment, level, used in reversed(list(zip(segments, levels, coded))):  # a stack: the last class first
        if used:
            coder.encode_reverse(segment, level_model(level, steps))
    return levels, coder.get_compressed().astype("<u4").tobytes() if coded.any() else b""


def decode_classes(levels: np.ndarray, steps: int, words: bytes, classes: np.ndarray) -> np.ndarray:
    """Inverse of encode_classes: the symbols 0..width-1 in their positions."""
    sizes = np.bincount(classes, minlength=len(levels))
    if len(sizes) != len(levels):
        raise ArtifactError("the artifact's code classes do not match its table; the file is corrupted")
    parts = []
    try:
        coder = ans_coder().stream.stack.AnsCoder(np.frombuffer(words, dtype="<u4").astype(np.uint32))
        for level, size in zip(levels, sizes):
            present = np.flatnonzero(level)
            if size and not len(present):
                raise ValueError("a class without a histogram")
            parts.append(coder.decode(level_model(level, steps), int(size)) if size and len(present) > 1
                         else np.full(size, present[0] if size else 0, dtype=np.int32))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ArtifactError(f"cannot decode the artifact's codes: {exc}; the file is corrupted") from None
    out = np.empty(len(classes), dtype=np.int64)
    out[np.argsort(classes, kind="stable") if len(levels) > 1 else slice(None)] = np.concatenate(parts)
    return out


def tensor_classes(container: bytes, tensors: list[CodeTensor], ids: list[np.ndarray], row_classes: int,
                   col_classes: int) -> np.ndarray:
    """Each code's class, row bucket x column bucket, over a role's tensors in file order."""
    return np.concatenate([(row_buckets(container, t, row_classes)[:, None] * col_classes + k[None, :]).ravel()
                           for t, k in zip(tensors, ids)])


def finest_histograms(container: bytes, tensors: list[CodeTensor], codes: list[np.ndarray], lo: int,
                      width: int, key: str) -> np.ndarray:
    """Counts of (row bucket, column bucket, code - lo) at ROW_CLASSES_MAX x COL_CLASSES_MAX buckets."""
    size = ROW_CLASSES_MAX * COL_CLASSES_MAX * width
    joint = np.zeros(size, dtype=np.int64)
    for t, c in zip(tensors, codes):
        fine = row_buckets(container, t, ROW_CLASSES_MAX)[:, None] * COL_CLASSES_MAX + column_buckets(c, COL_CLASSES_MAX, key)
        joint += np.bincount((fine * width + (c.astype(np.int64) - lo)).ravel(), minlength=size)
    return joint.reshape(ROW_CLASSES_MAX, COL_CLASSES_MAX, width)


def scale_bits(container: bytes, tensors: list[CodeTensor]) -> np.ndarray:
    """The fp16 bit patterns of a role's row scales, tensor after tensor."""
    return np.concatenate([np.frombuffer(from_byte_planes(container[t.scale[0]:t.scale[0] + t.scale[1]], 2),
                                         dtype="<u2") for t in tensors]).astype(np.int64)


def scale_cost(bits: np.ndarray, shift: int) -> float:
    """Bytes of a role's scales with their top 16 - shift bits ANS-coded and the low `shift` bits stored raw;
    infinite where the top bits' histogram would not fit its u16 length."""
    top = bits >> shift
    counts = np.bincount(top - top.min())
    if len(counts) >= 2 ** 16:
        return math.inf
    levels = histogram_levels(counts[None, :], SCALE_LEVEL_STEPS)
    return code_bits(counts[None, :], levels, SCALE_LEVEL_STEPS) / 8 + 4 + len(counts) + len(bits) * shift / 8


def encode_scales(bits: np.ndarray) -> tuple[int, bytes, bytes]:
    """(shift, header + histogram + low bits, ANS words) of a role's scales, at the shift that costs the least."""
    shift = min(range(16), key=lambda k: scale_cost(bits, k))
    top = bits >> shift
    lo = int(top.min())
    levels = histogram_levels(np.bincount(top - lo), SCALE_LEVEL_STEPS)
    words = b""
    if len(levels) > 1:
        coder = ans_coder().stream.stack.AnsCoder()
        coder.encode_reverse((top - lo).astype(np.int32), level_model(levels, SCALE_LEVEL_STEPS))
        words = coder.get_compressed().astype("<u4").tobytes()
    head = np.array([lo, len(levels)], dtype="<u2").tobytes()
    return shift, head + levels.tobytes() + pack_ids(bits & (2 ** shift - 1), shift), words


def decode_scales(shift: int, side: ByteReader, words: bytes, container: bytearray, tensors: list[CodeTensor]) -> None:
    """Inverse of encode_scales: writes the role's scales (as byte planes) into their places in the container."""
    lo, width = np.frombuffer(side.take(4), dtype="<u2").astype(np.int64)
    levels = np.frombuffer(side.take(int(width)), dtype=np.uint8)
    count = sum(t.rows for t in tensors)
    try:
        top = (ans_coder().stream.stack.AnsCoder(np.frombuffer(words, dtype="<u4").astype(np.uint32)).decode(
            level_model(levels, SCALE_LEVEL_STEPS), count) if width > 1 else np.zeros(count, dtype=np.int64)) + lo
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ArtifactError(f"cannot decode the artifact's row scales: {exc}; the file is corrupted") from None
    bits = (top.astype(np.int64) << shift) | unpack_ids(side.take(-(-count * shift // 8)), count, shift)
    offset = 0
    for t in tensors:
        container[t.scale[0]:t.scale[0] + t.scale[1]] = byte_planes(bits[offset:offset + t.rows].astype("<u2").tobytes(), 2)
        offset += t.rows


def encode_role(raw: bytes, tensors: list[CodeTensor]) -> tuple[dict, bytes, bytes]:
    """(table entry, side bytes, ANS words) of one role's scales and codes."""
    codes = [np.frombuffer(raw, dtype=np.int8, count=t.length, offset=t.start).reshape(t.rows, t.cols) for t in tensors]
    lo = min(int(c.min()) for c in codes)
    width = max(int(c.max()) for c in codes) - lo + 1
    key, row_classes, col_classes, steps = choose_classes(
        {key: finest_histograms(raw, tensors, codes, lo, width, key) for key in COLUMN_KEYS}, tensors)
    ids = [column_buckets(c, col_classes, key) for c in codes]
    classes = tensor_classes(raw, tensors, ids, row_classes, col_classes)
    symbols = np.concatenate([c.ravel() for c in codes]).astype(np.int32) - lo
    levels, words = encode_classes(symbols, classes, row_classes * col_classes, width, steps)
    id_data = b"".join(pack_ids(k, col_classes.bit_length() - 1) for k in ids)
    shift, scale_side, scale_words = encode_scales(scale_bits(raw, tensors))
    entry = dict(role=tensors[0].role, row_classes=row_classes, col_classes=col_classes, code_lo=lo, code_width=width,
                 level_steps=steps, scale_shift=shift, scale_words=len(scale_words) // 4, words=len(words) // 4)
    return entry, scale_side + level_table(levels, row_classes) + id_data, scale_words + words


def role_layout(entry: dict, words: int) -> tuple[int, int, int, int, int, int, int]:
    """(row classes, column classes, lowest code, code width, level steps, scale shift, scale words' bytes) of a
    group's table entry, checked against what encode_role can write (`words`: the group's ANS bytes)."""
    try:
        layout = tuple(int(entry[k]) for k in ("row_classes", "col_classes", "code_lo", "code_width", "level_steps",
                                               "scale_shift", "scale_words"))
        row_classes, col_classes, lo, width, steps, shift, scale_words = layout
        valid = (0 <= shift < 16 and 0 <= 4 * scale_words <= words and steps in LEVEL_STEPS
                 and -128 <= lo and 1 <= width and lo + width <= 128
                 and row_classes in (2 ** r for r in range(ROW_CLASSES_MAX.bit_length()))
                 and col_classes in (2 ** c for c in range(COL_CLASSES_MAX.bit_length())))
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise ArtifactError(f"the artifact's code table of {entry.get('role')} is malformed; the file is corrupted")
    return layout[:6] + (4 * layout[6],)


def decode_role(entry: dict, side: ByteReader, container: bytearray, tensors: list[CodeTensor], words: bytes) -> None:
    """Inverse of encode_role: writes the role's scales, then its codes, into their places in the container."""
    row_classes, col_classes, lo, width, steps, shift, scale_words = role_layout(entry, len(words))
    decode_scales(shift, side, words[:scale_words], container, tensors)  # the row classes are read from them
    words = words[scale_words:]
    levels = read_level_table(side.take(width * row_classes * col_classes), row_classes, col_classes, width)
    bits = col_classes.bit_length() - 1
    ids = [unpack_ids(side.take(id_bytes(t.cols, col_classes)), t.cols, bits) for t in tensors]
    if any(len(k) and k.max() >= col_classes for k in ids):
        raise ArtifactError("the artifact's column classes are out of range; the file is corrupted")
    classes = tensor_classes(container, tensors, ids, row_classes, col_classes)
    symbols = (decode_classes(levels, steps, words, classes) + lo).astype(np.int8)
    offset = 0
    for t in tensors:
        container[t.start:t.start + t.length] = symbols[offset:offset + t.length].tobytes()
        offset += t.length


def roles_of(tensors: list[CodeTensor]) -> dict[str, list[CodeTensor]]:
    roles: dict[str, list[CodeTensor]] = {}
    for t in tensors:
        roles.setdefault(t.role, []).append(t)
    return roles


def coded_spans(tensors: list[CodeTensor]) -> list[tuple[int, int]]:
    """(start, length) of every code and row-scale range of the container, in order: what the ANS streams hold."""
    return sorted([(t.start, t.length) for t in tensors] + [t.scale for t in tensors])


def compress_pergroup(raw: bytes) -> bytes:
    tensors = code_tensors(raw)
    rest, cursor = [], 0
    for start, length in coded_spans(tensors):
        rest.append(raw[cursor:start])
        cursor = start + length
    rest.append(raw[cursor:])
    coded = [encode_role(raw, group) for group in roles_of(tensors).values()]
    table = json.dumps(dict(version=PERGROUP_VERSION, groups=[entry for entry, _, _ in coded])).encode()
    histograms = b"".join(side for _, side, _ in coded)
    side = brotli.compress(len(table).to_bytes(4, "little") + table + len(histograms).to_bytes(4, "little")
                           + histograms + b"".join(rest), quality=11)
    return len(side).to_bytes(4, "little") + side + b"".join(words for _, _, words in coded)


def unpack_pergroup(blob: bytes) -> tuple[list[dict], bytes, bytes, bytes]:
    """(group tables, histograms + column ids, the container without its codes, the ANS words) of a pergroup body."""
    side_len = int.from_bytes(blob[:4], "little")
    try:
        side = brotli.decompress(blob[4:4 + side_len])
        table_len = int.from_bytes(side[:4], "little")
        table = json.loads(side[4:4 + table_len])
        version = 1 if isinstance(table, list) else table["version"]
    except (brotli.error, ValueError, KeyError, TypeError):
        raise ArtifactError("cannot decompress the artifact (pergroup); the file is truncated or corrupted") from None
    if version != PERGROUP_VERSION:  # 1: one order-0 histogram per role, its counts in a JSON list; 2: 16 steps
        raise ArtifactError(f"the artifact was written by pergroup format {version!r}, which this script does not read "
                            f"(it writes format {PERGROUP_VERSION}); re-serialize it with the script that wrote it, "
                            "e.g. with COMPRESSOR=brotli")
    try:
        tables = table["groups"]
        coded_bytes = 4 * sum(int(t["scale_words"]) + int(t["words"]) for t in tables)
        hist_end = 8 + table_len + int.from_bytes(side[4 + table_len:8 + table_len], "little")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ArtifactError("cannot decompress the artifact (pergroup); the file is truncated or corrupted") from None
    words = blob[4 + side_len:]
    if coded_bytes != len(words) or hist_end > len(side):
        raise ArtifactError("the artifact's code streams have the wrong length; the file is truncated or corrupted")
    return tables, side[8 + table_len:hist_end], side[hist_end:], words


def decompress_pergroup(blob: bytes) -> bytes:
    tables, histograms, rest, words = unpack_pergroup(blob)
    tensors = code_tensors(rest)  # the header leads the container, so its offsets hold with the codes taken out
    spans = coded_spans(tensors)
    container, cursor, built = bytearray(len(rest) + sum(length for _, length in spans)), 0, 0
    for start, length in spans:
        container[built:start] = rest[cursor:cursor + start - built]
        cursor += start - built
        built = start + length
    container[built:] = rest[cursor:]
    roles = roles_of(tensors)
    if [t.get("role") for t in tables] != list(roles):
        raise ArtifactError("the artifact's code groups do not match its tensors; the file is corrupted")
    side, offset = ByteReader(histograms), 0
    for table in tables:
        size = 4 * (table["scale_words"] + table["words"])
        decode_role(table, side, container, roles[table["role"]], words[offset:offset + size])
        offset += size
    if side.cursor != len(histograms):
        raise ArtifactError("the artifact's code histograms have the wrong length; the file is corrupted")
    return bytes(container)


# The corrections' header fields: AWQ-lite column starts with their fp16 row scales; LQER's int8
# containers of the int2 / int4 factor codes and their fp16 scales (the pergroup coder leaves these to
# brotli with the rest of the container).
def correction_fields(q: dict, add: Callable[[bytes], list[int]]) -> dict:
    """The header fields of an entry's AWQ-lite columns and LQER factors; `add` appends their bytes to the payload."""
    fields = {}
    if "awq" in q:
        awq = q["awq"]
        fields["awq"] = dict(starts=awq["starts"], size=awq["size"], bits=awq["bits"],
                             scale=add(byte_planes(awq["scale"].numpy().tobytes(), 2)))
    if "lqer" in q:
        f = q["lqer"]
        fields["lqer"] = dict(rank=f["a_codes"].shape[1], group=f["group"], a_codes=add(f["a_codes"].numpy().tobytes()),
                              a_scale=add(f["a_scale"].numpy().tobytes()), b_codes=add(f["b_codes"].numpy().tobytes()),
                              b_scale=add(byte_planes(f["b_scale"].numpy().tobytes(), 2)))
    return fields


def read_corrections(e: dict, read: Callable[[list[int]], bytes]) -> dict:
    """Inverse of correction_fields for one header entry; checks that every scale vector has its length."""
    def array(span: list[int], dtype, shape=(-1,), planes: bool = False) -> Tensor:
        data = from_byte_planes(read(span), 2) if planes else read(span)
        return torch.from_numpy(np.frombuffer(data, dtype=dtype).reshape(shape).copy())

    out = {}
    try:
        rows, cols = e["shape"]
        if "awq" in e:
            awq = e["awq"]
            out["awq"] = dict(starts=[int(s) for s in awq["starts"]], size=int(awq["size"]), bits=int(awq["bits"]),
                              scale=array(awq["scale"], np.float16, planes=True))
            if len(out["awq"]["scale"]) != rows:
                raise ValueError
        if "lqer" in e:
            f, rank, group = e["lqer"], int(e["lqer"]["rank"]), int(e["lqer"]["group"])
            out["lqer"] = dict(a_codes=array(f["a_codes"], np.int8, (rows, rank)), a_scale=array(f["a_scale"], np.float16),
                               group=group, b_codes=array(f["b_codes"], np.int8, (rank, cols)),
                               b_scale=array(f["b_scale"], np.float16, planes=True))
            if group < 1 or len(out["lqer"]["a_scale"]) != 1 or len(out["lqer"]["b_scale"]) != -(-rank * cols // group):
                raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"the corrections of {e.get('name')} are malformed; the file is corrupted") from None
    return out


def serialize_artifact(quantized: dict[str, dict], hp: Hyperparameters) -> bytes:
    """MAGIC | compressor name | compressed(header length | JSON header | tensor bytes).

    The header lists every tensor (kind, shape, byte range), the architecture knobs the model was
    built with, and a SHA-256 of the tensor bytes, so a loader can refuse what it cannot use.
    """
    entries, chunks, offset = [], [], 0

    def add(data: bytes) -> list[int]:
        nonlocal offset
        chunks.append(data)
        offset += len(data)
        return [offset - len(data), len(data)]

    for name, q in quantized.items():
        if "codes" in q:
            entries.append(dict(name=name, kind="int", bits=q["bits"], shape=list(q["codes"].shape),
                                codes=add(q["codes"].numpy().tobytes()),
                                scale=add(byte_planes(q["scale"].numpy().tobytes(), 2)), **correction_fields(q, add)))
        else:
            entries.append(dict(name=name, kind="fp16", shape=list(q["fp16"].shape),
                                data=add(byte_planes(q["fp16"].numpy().tobytes(), 2))))
    payload = b"".join(chunks)
    header = json.dumps(dict(format=1, architecture=architecture_of(hp),
                             tensors=entries, payload_sha256=hashlib.sha256(payload).hexdigest())).encode()
    raw = len(header).to_bytes(4, "little") + header + payload
    name = hp.compressor.encode()
    return ARTIFACT_MAGIC + bytes([len(name)]) + name + compress(raw, hp.compressor)


def architecture_of(hp: Hyperparameters) -> dict:
    """The knobs that shape the model, as they read back from the JSON header (tuples become lists)."""
    return json.loads(json.dumps({k: getattr(hp, k) for k in ARCHITECTURE_KNOBS}))


def parse_artifact(blob: bytes, hp: Hyperparameters) -> dict[str, dict]:
    """Inverse of serialize_artifact; every failure is an ArtifactError saying what is wrong."""
    if blob[:4] != ARTIFACT_MAGIC or len(blob) < 6:
        raise ArtifactError(f"not a model artifact (expected magic {ARTIFACT_MAGIC!r})")
    name_len = blob[4]
    compressor = blob[5:5 + name_len].decode(errors="replace")
    if compressor not in COMPRESSORS:
        raise ArtifactError(f"unknown compressor {compressor!r} in the artifact header")
    raw = decompress(blob[5 + name_len:], compressor)
    header_len = int.from_bytes(raw[:4], "little")
    try:
        header = json.loads(raw[4:4 + header_len])
    except ValueError:
        raise ArtifactError("artifact header is not valid JSON; the file is corrupted") from None
    if not isinstance(header, dict) or not {"architecture", "tensors", "payload_sha256"} <= header.keys():
        raise ArtifactError("artifact header lacks its architecture, tensor list or checksum; the file is corrupted")
    payload = raw[4 + header_len:]
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise ArtifactError("artifact payload does not match its checksum; the file is corrupted")
    ours = architecture_of(hp)
    diff = [f"{k.upper()}={header['architecture'].get(k)!r} (this run: {v!r})"
            for k, v in ours.items() if header["architecture"].get(k) != v]
    if diff:
        raise ArtifactError("artifact was made for another model: " + ", ".join(diff))

    def read(span: list[int]) -> bytes:
        return payload[span[0]:span[0] + span[1]]

    out = {}
    for e in header["tensors"]:
        if e["kind"] == "int":
            codes = torch.from_numpy(np.frombuffer(read(e["codes"]), dtype=np.int8).reshape(e["shape"]).copy())
            scale = torch.from_numpy(np.frombuffer(from_byte_planes(read(e["scale"]), 2), dtype=np.float16).copy())
            out[e["name"]] = dict(codes=codes, scale=scale, bits=e["bits"], **read_corrections(e, read))
        else:
            data = np.frombuffer(from_byte_planes(read(e["data"]), 2), dtype=np.float16).reshape(e["shape"])
            out[e["name"]] = dict(fp16=torch.from_numpy(data.copy()))
    return out


def load_artifact(path: Path, hp: Hyperparameters, rt: Runtime) -> GPT:
    """A fresh model with the artifact's dequantized weights, loaded strictly."""
    if not path.is_file():
        raise ArtifactError(f"artifact {path} does not exist")
    state = dequantize_state(parse_artifact(path.read_bytes(), hp))
    model = GPT(hp, rt.attn_backend, rt.activation_dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"artifact tensors do not fit this model: {exc}") from None
    return model.to(rt.device)


def describe_quantization(quantized: dict[str, dict]) -> list[str]:
    """One log line per storage kind: how many tensors and values it holds."""
    tensors, values = {}, {}
    for name, q in quantized.items():
        kind = "fp16 passthrough" if "codes" not in q else "int8 gate rows" if is_gate_tensor(name) else f"int{q['bits']} GPTQ"
        tensors[kind] = tensors.get(kind, 0) + 1
        values[kind] = values.get(kind, 0) + (q["codes"] if "codes" in q else q["fp16"]).numel()
    return [f"quantized: {kind}: {tensors[kind]} tensors, {values[kind]} values" for kind in sorted(tensors)]


# --- Budget fitter: shrink GPTQ's artifact until model + code fit ARTIFACT_LIMIT_BYTES - BUDGET_MARGIN_BYTES.
# A shrinker maps a monotone "amount" (0 = GPTQ's own state) to a quantized state that compresses
# smaller as the amount grows; the search measures exact compressed sizes, guided by a cheap
# entropy estimate, and keeps the smallest amount that fits. (An artifact under budget is grown by
# the budget filler below, with BUDGET_FILL=1.)

FIT_MAX_TRIES = 4  # exact compressions after the first (brotli-11: ~0.4 MB/s of raw bytes on one loaded CPU core)
FIT_OVERSHOOT = 0.01  # aim 1% (+256 bytes) past the needed saving, so that the first try usually fits
FIT_ACCEPT = 0.03  # a fitting try that shaved at most 3% (+1 KB) more than needed ends the search


@dataclasses.dataclass
class Shrinker:
    name: str
    build: Callable[[int], dict[str, dict]]  # amount -> quantized state; build(0) is GPTQ's
    estimate: Callable[[int], float]  # amount -> a fast estimate of the codes' size, in bytes
    max_amount: int
    describe: Callable[[int], str]  # amount -> what it did, for the log


def entropy_bytes(quantized: dict[str, dict]) -> float:
    """Order-0 entropy of every code, in bytes: a fast stand-in for how the codes' compressed size moves."""
    total = 0.0
    for q in quantized.values():
        if "codes" in q:
            counts = torch.bincount(q["codes"].flatten().long() + 128, minlength=256).double()
            counts = counts[counts > 0]
            total -= (counts * (counts / counts.sum()).log2()).sum().item() / 8
    return total


def prune_shrinker(quantized: dict[str, dict], hessians: dict[str, Tensor]) -> Shrinker:
    """Selective ±1 pruning: amount n zeroes the n codes of magnitude 1 whose loss is cheapest.

    Zeroing code q at (row i, column j) moves the weight by scale_i, which raises the layer's
    output error E[(Δw·x)²] by about scale_i²·H_jj; candidates are ranked once by that cost.
    Without a Hessian (round-to-nearest) every column counts alike.
    """
    names, index, cost = [], [], []
    for name, q in quantized.items():
        if "codes" in q and not is_gate_tensor(name):  # no Hessian ranks a gate's codes against the matrices'
            codes = q["codes"]
            flat = (codes.abs() == 1).flatten().nonzero().squeeze(1)
            h = hessians.get(name)
            diag = h.diagonal().float().cpu() if h is not None else torch.ones(codes.shape[1])
            cost.append(q["scale"].float()[flat // codes.shape[1]] ** 2 * diag[flat % codes.shape[1]])
            index.append(flat)
            names.append(name)
    total = sum(len(c) for c in cost)
    # rank of every candidate in the global cheapest-first order, kept per tensor (ascending) with its index
    rank = torch.empty(total, dtype=torch.long)
    rank[torch.argsort(torch.cat(cost), stable=True) if cost else rank] = torch.arange(total)
    ranks, start = [], 0
    for k, flat in enumerate(index):
        mine, order = rank[start:start + len(flat)].sort()
        ranks.append(mine)
        index[k] = flat[order]
        start += len(flat)

    def build(n: int) -> dict[str, dict]:
        out = dict(quantized)
        for name, mine, flat in zip(names, ranks, index):
            count = int(torch.searchsorted(mine, n))  # this tensor's candidates among the n cheapest
            if count:
                codes = quantized[name]["codes"].clone()
                codes.view(-1)[flat[:count]] = 0
                out[name] = dict(quantized[name], codes=codes)
        return out

    return Shrinker("prune", build, lambda n: entropy_bytes(build(n)), total,
                    lambda n: f"zeroed {n} of {total} ±1 codes")


CLIP_STEP = 0.01  # amount n of the clip shrinker multiplies every clip sigma by 1 + n * CLIP_STEP
CLIP_MAX_AMOUNT = 200  # up to 3x the configured clip sigmas


def clip_shrinker(model: GPT, hessians: dict[str, Tensor], quantized: dict[str, dict], hp: Hyperparameters) -> Shrinker:
    """Coarser SDClip steps: amount n re-runs GPTQ with every clip sigma times 1 + n * CLIP_STEP.

    A larger step leaves fewer distinct codes, so the codes compress smaller. The estimate uses
    round-to-nearest codes, whose entropy moves like GPTQ's but costs no GPTQ run per guess.
    """
    def scaled(n: int) -> Hyperparameters:
        return scaled_clips(hp, 1 + n * CLIP_STEP)

    def build(n: int) -> dict[str, dict]:
        return quantized if n == 0 else quantize_state(model, hessians, scaled(n))

    return Shrinker("clip", build, lambda n: entropy_bytes(quantize_state(model, {}, scaled(n))), CLIP_MAX_AMOUNT,
                    lambda n: f"clip sigmas x{1 + n * CLIP_STEP:.2f} ("
                              + ", ".join(f"{k.upper()} {getattr(scaled(n), k):.4g}" for k in CLIP_KNOBS) + ")")


def added_error(before: dict[str, dict], after: dict[str, dict], hessians: dict[str, Tensor]) -> float:
    """Sum of (Δw)²·H_jj over the matrices that changed: the diagonal estimate of the added output error."""
    total = 0.0
    for name, q in after.items():
        if "codes" in q and q is not before[name]:
            delta = dequantize_entry(q) - dequantize_entry(before[name])
            h = hessians.get(name)
            diag = h.diagonal().float().cpu() if h is not None else torch.ones(delta.shape[1])
            total += (delta ** 2 * diag[None, :]).sum().item()
    return total


def amount_for_estimate(shrinker: Shrinker, wanted: float, low: int, high: int) -> int:
    """Smallest amount in (low, high] whose entropy estimate is at most `wanted` (bisection; high if none)."""
    while high - low > 1:
        mid = (low + high) // 2
        if shrinker.estimate(mid) <= wanted:
            high = mid
        else:
            low = mid
    return high


def next_amount(shrinker: Shrinker, lo: dict, hi: Optional[dict], aim: int) -> int:
    """The amount whose entropy estimate should compress to `aim` bytes, judged from the measured points.

    Below the first fitting point the estimate is extrapolated from `lo` with the ratio of real to
    estimated saving seen there; inside a bracket it is interpolated between the two measured ends,
    and kept in the bracket's middle half so that a compressor that is not smooth in the amount
    still halves the bracket every two tries.
    """
    if hi is None:
        ratio = max(lo["saved"] / lo["estimate_saved"], 1e-3) if lo["estimate_saved"] > 0 else 1.0
        wanted = lo["estimate"] - (lo["bytes"] - aim) / ratio
        return amount_for_estimate(shrinker, wanted, lo["amount"], shrinker.max_amount)
    f = (lo["bytes"] - aim) / max(lo["bytes"] - hi["bytes"], 1)
    wanted = lo["estimate"] - f * (lo["estimate"] - hi["estimate"])
    amount = amount_for_estimate(shrinker, wanted, lo["amount"], hi["amount"])
    quarter = (hi["amount"] - lo["amount"]) // 4
    return min(max(amount, lo["amount"] + max(quarter, 1)), hi["amount"] - quarter)


def search_amount(shrinker: Shrinker, hp: Hyperparameters, base_bytes: int, budget: int) -> Optional[dict]:
    """Smallest amount found whose compressed model is at most `budget` bytes, in at most FIT_MAX_TRIES
    exact compressions (+1 for the maximum amount if nothing smaller fitted). None: even the maximum does not fit.

    Aims FIT_OVERSHOOT past the needed saving; stops at a fitting try that shaved at most FIT_ACCEPT
    more than needed, or when the bracket is one amount wide.
    """
    need = base_bytes - budget
    base_estimate = shrinker.estimate(0)
    aim = base_bytes - round(need * (1 + FIT_OVERSHOOT) + 256)
    lo = dict(amount=0, bytes=base_bytes, estimate=base_estimate, saved=0, estimate_saved=0.0)
    hi, tries = None, 0

    def measure(amount: int) -> dict:
        quantized = shrinker.build(amount)
        blob = serialize_artifact(quantized, hp)
        estimate = shrinker.estimate(amount)
        return dict(amount=amount, bytes=len(blob), estimate=estimate, saved=base_bytes - len(blob),
                    estimate_saved=base_estimate - estimate, quantized=quantized, blob=blob)

    while tries < FIT_MAX_TRIES and (hi is None or hi["amount"] - lo["amount"] > 1):
        point = measure(next_amount(shrinker, lo, hi, aim))
        tries += 1
        if point["bytes"] <= budget:
            hi = point
            if point["saved"] <= need * (1 + FIT_ACCEPT) + 1024:
                break
        elif point["amount"] == shrinker.max_amount:
            return None
        else:
            lo = point
    if hi is None:  # out of tries below the maximum: the maximum is the one amount left to try
        hi, tries = measure(shrinker.max_amount), tries + 1
        if hi["bytes"] > budget:
            return None
    return dict(amount=hi["amount"], quantized=hi["quantized"], blob=hi["blob"], tries=tries)


# --- Budget filler (issue 14, BUDGET_FILL=1): grow an artifact that is under the target. The records tune
# their clips by hand and leave 8-100 KB unused; the filler spends those bytes where they buy the most.
# A lever proposes steps; each step knows the entries it replaces, their new values, its predicted bytes
# and its predicted change of GPTQ's objective, the Hessian-weighted output error. The levers
# (BUDGET_FILL_LEVERS): clip (one group's clip sigmas a notch tighter), lqer (one more LQER rank on one
# matrix) and awq (one more AWQ-lite column group on one matrix). Each lever predicts bytes its own way
# (clip, awq: the change of the codes' order-0 entropy; lqer: the factors' information size), so each has
# its own measured-to-predicted ratio, calibrated by the exact sizes of its steps. The filler takes the step that
# removes the most error per byte, measures it with one exact compression, keeps it only if it fits,
# and stops within BUDGET_FILL_SLACK_BYTES of the target or after BUDGET_FILL_TRIES compressions.

FILL_CLIP_NOTCH = 0.02  # one step of the clip lever tightens one group's clip sigmas by at most 2%
FILL_RATIO_RANGE = (0.25, 4.0)  # bounds of a lever's measured-to-predicted byte ratio (brotli is not smooth in small steps)
FILL_AWQ_MATRICES = 4  # the awq lever prices the next group of this many matrices per round (a GPTQ run each)
FILL_LOG_CANDIDATES = 8  # candidates named in a try's log line (the lqer lever has one per calibrated matrix)


@dataclasses.dataclass
class FillStep:
    """One step a lever proposes: what it changes, and what it is predicted to cost and to buy."""
    lever: str
    what: str  # for the log, e.g. "MLP_CLIP_SIGMAS 11.5 -> 11.27"
    before: dict[str, dict]  # the current entries the step replaces; it applies only while they are current
    after: dict[str, dict]
    knobs: dict[str, float]  # the Hyperparameters fields it changes
    bytes: float  # predicted bytes added, in the lever's own measure (see above), before calibration
    error: float  # predicted change of the Hessian-weighted output error (negative: better)
    smaller: Optional[Callable[[float], Optional["FillStep"]]] = None  # the same step at most a fraction of its size
    # (None where no smaller step exists)

    @property
    def gain(self) -> float:
        """Error removed per byte spent: the greedy order."""
        return -self.error / max(self.bytes, 1.0)

    def applies_to(self, quantized: dict[str, dict]) -> bool:
        return all(quantized.get(name) is entry for name, entry in self.before.items())


Lever = Callable[[dict[str, dict], Hyperparameters], list[FillStep]]  # (current state, current knobs) -> its steps


def output_error(weights: dict[str, Tensor], quantized: dict[str, dict], hessians: dict[str, Tensor]) -> float:
    """Σ tr(ΔW·H·ΔWᵀ) over the entries, ΔW = W − Ŵ: the output error the rounding adds on the calibration
    inputs (GPTQ's objective; full H, since GPTQ trades columns' errors against each other). No Hessian: Σ ΔW²."""
    total = 0.0
    for name, q in quantized.items():
        w = weights[name].detach().float()
        delta = w - dequantize_entry(q).to(w.device)
        h = hessians.get(name)
        total += ((delta @ h.float()) * delta).sum().item() if h is not None else delta.square().sum().item()
    return total


def error_change(weights: dict[str, Tensor], before: dict[str, dict], after: dict[str, dict],
                 hessians: dict[str, Tensor]) -> float:
    """What replacing the entries `before` by `after` adds to output_error (negative: it removes error)."""
    return output_error(weights, after, hessians) - output_error(weights, before, hessians)


def clip_knob_of(name: str) -> str:
    """The clip-sigma knob of a quantized tensor: the embedding's (or untied head's), else its group's."""
    return "embed_clip_sigmas" if name in ("tok_emb.weight", "lm_head.weight") else clip_group(name)


def lqer_rank(entry: dict) -> int:
    """The rank of an entry's LQER correction (0: none). Stored per entry, so the filler may raise one matrix's."""
    return entry["lqer"]["a_codes"].shape[1] if "lqer" in entry else 0


def refit_lqer(name: str, entry: dict, weights: dict[str, Tensor], hessians: dict[str, Tensor], rank: int,
               group: int) -> dict:
    """`entry` with a rank-`rank` LQER correction fitted to its codes' error (none if it would remove no error)."""
    return add_lqer({name: entry}, weights, {name: hessians[name]}, 1, rank, group)[name]


def requantize(names: list[str], weights: dict[str, Tensor], hessians: dict[str, Tensor], current: dict[str, dict],
               hp: Hyperparameters, awq_starts: Optional[dict[str, list[int]]] = None) -> dict[str, dict]:
    """GPTQ re-run on `names` under hp's clips, keeping each matrix's corrections: its AWQ-lite columns (or
    those `awq_starts` gives it), and an LQER correction of the same rank refitted to the new codes where it had one."""
    starts = {name: current[name].get("awq", {}).get("starts", []) for name in names} | (awq_starts or {})
    after = {name: quantize_matrix(name, weights[name], hessians.get(name), hp, starts[name]) for name in names}
    return {name: refit_lqer(name, q, weights, hessians, lqer_rank(current[name]), hp.lqer_asym_group)
            if "lqer" in current[name] else q for name, q in after.items()}


def clip_step(model: GPT, hessians: dict[str, Tensor], current: dict[str, dict], hp: Hyperparameters,
              knob: str, names: list[str], fraction: float) -> FillStep:
    """GPTQ re-run on one clip group's matrices with its sigmas `fraction` of a notch tighter."""
    weights = model.state_dict()
    sigmas = getattr(hp, knob) * (1 - FILL_CLIP_NOTCH) ** fraction
    tighter = dataclasses.replace(hp, **{knob: sigmas})
    before = {name: current[name] for name in names}
    after = requantize(names, weights, hessians, current, tighter)
    return FillStep("clip", f"{knob.upper()} {getattr(hp, knob):.4g} -> {sigmas:.4g}", before, after, {knob: sigmas},
                    entropy_bytes(after) - entropy_bytes(before), error_change(weights, before, after, hessians),
                    lambda f: clip_step(model, hessians, current, hp, knob, names, fraction * f))


def clip_lever(model: GPT, hessians: dict[str, Tensor]) -> Lever:
    """One step per clip group present (MLP, attention, other matrices, embedding): that group a notch tighter.
    A group's step is reused while its matrices are unchanged, so a round re-runs GPTQ only on the group that moved."""
    groups: dict[str, list[str]] = {}
    for name, t in model.state_dict().items():
        if is_quantized(t):
            groups.setdefault(clip_knob_of(name), []).append(name)
    steps: dict[str, FillStep] = {}

    def propose(current: dict[str, dict], hp: Hyperparameters) -> list[FillStep]:
        for knob, names in groups.items():
            if knob not in steps or not steps[knob].applies_to(current):
                steps[knob] = clip_step(model, hessians, current, hp, knob, names, 1.0)
        return list(steps.values())

    return propose


def per_matrix_lever(names: Callable[[dict[str, dict], Hyperparameters], list[str]],
                     make: Callable[[dict[str, dict], Hyperparameters, str], Optional[FillStep]]) -> Lever:
    """A lever with at most one step per matrix that `names` lists, made by `make`. A matrix's step (or its lack of
    one) is reused while its entry is unchanged, so a round re-fits only the matrices the last kept step changed."""
    cache: dict[str, tuple[dict, Optional[FillStep]]] = {}

    def propose(current: dict[str, dict], hp: Hyperparameters) -> list[FillStep]:
        steps = []
        for name in names(current, hp):
            if name not in cache or cache[name][0] is not current[name]:
                cache[name] = (current[name], make(current, hp, name))
            steps += [cache[name][1]] if cache[name][1] is not None else []
        return steps

    return propose


def lqer_step(weights: dict[str, Tensor], hessians: dict[str, Tensor], current: dict[str, dict], name: str,
              group: int, more: int) -> Optional[FillStep]:
    """`more` LQER ranks on one matrix (from rank 0: a new correction), refitted to its codes' error; None if that
    removes no error. Scaled down, it adds fewer ranks (None below one). The bytes are lqer_bytes' information size
    of the factors, not an entropy of codes: their int8 containers go to the generic coder (pergroup: brotli)."""
    before, rank = current[name], lqer_rank(current[name])
    rows, cols = before["codes"].shape
    more = min(more, min(rows, cols) - rank)
    if more < 1:
        return None
    after = refit_lqer(name, before, weights, hessians, rank + more, group)
    if lqer_rank(after) != rank + more:  # add_lqer drops a correction that removes no error
        return None

    def added(ranks: int) -> int:
        return lqer_bytes(rows, cols, rank + ranks, group) - (lqer_bytes(rows, cols, rank, group) if rank else 0)

    def smaller(fraction: float) -> Optional[FillStep]:
        fits = [k for k in range(1, more) if added(k) <= fraction * added(more)]
        return lqer_step(weights, hessians, current, name, group, fits[-1]) if fits else None

    return FillStep("lqer", f"{name} LQER rank {rank} -> {rank + more}", {name: before}, {name: after}, {}, added(more),
                    error_change(weights, {name: before}, {name: after}, hessians), smaller)


def lqer_lever(model: GPT, hessians: dict[str, Tensor]) -> Lever:
    """One step per Hessian-calibrated matrix: its LQER correction LQER_RANK ranks higher (a new one at LQER_RANK, as
    quantize_state fits them), or fewer where the bytes left are fewer. Steps of one rank (~0.4 KB measured on a
    4 x 160 model, ±0.3 KB of brotli noise) spent 6 of 20 spare KB in 16 tries: each try costs a compression."""
    weights = model.state_dict()
    return per_matrix_lever(lambda current, hp: [name for name in hessians if "codes" in current[name]],
                            lambda current, hp, name: lqer_step(weights, hessians, current, name, hp.lqer_asym_group,
                                                                hp.lqer_rank))


def awq_step(weights: dict[str, Tensor], hessians: dict[str, Tensor], current: dict[str, dict], hp: Hyperparameters,
             name: str, start: int) -> FillStep:
    """GPTQ re-run on one matrix with one more AWQ-lite group (AWQ_LITE_BITS codes inside the same solve; an LQER
    correction is refitted). Bytes: the codes' entropy change, plus the fp16 fine row scales of a first group."""
    before = {name: current[name]}
    after = requantize([name], weights, hessians, current, hp,
                       {name: sorted(current[name].get("awq", {}).get("starts", []) + [start])})
    scales = 0 if "awq" in current[name] else 2 * current[name]["codes"].shape[0]
    return FillStep("awq", f"{name}[{start}:{start + hp.awq_lite_group_size}] int{hp.awq_lite_bits}", before, after, {},
                    entropy_bytes(after) - entropy_bytes(before) + scales, error_change(weights, before, after, hessians))


def awq_lever(model: GPT, hessians: dict[str, Tensor], hp: Hyperparameters) -> Lever:
    """One step on each of the FILL_AWQ_MATRICES matrices whose most salient group not yet AWQ-lite is the most
    salient (awq_group_saliency, which picks AWQ_LITE_ENABLED's groups too): that group added."""
    weights = model.state_dict()
    ranked = {name: sorted(awq_group_saliency(weights[name], h, hp), reverse=True) for name, h in hessians.items()
              if is_quantized(weights[name]) and quant_settings(name, hp)[0] < hp.awq_lite_bits}

    def next_group(current: dict[str, dict], name: str) -> Optional[tuple[float, int]]:
        taken = current[name].get("awq", {}).get("starts", [])
        return next(((value, start) for value, start in ranked[name] if start not in taken), None)

    def names(current: dict[str, dict], hp: Hyperparameters) -> list[str]:
        best = {name: group for name in ranked if (group := next_group(current, name)) is not None}
        return sorted(best, key=lambda name: best[name][0], reverse=True)[:FILL_AWQ_MATRICES]

    return per_matrix_lever(names, lambda current, hp, name: awq_step(weights, hessians, current, hp, name,
                                                                       next_group(current, name)[1]))


def fill_levers(model: GPT, hessians: dict[str, Tensor], hp: Hyperparameters) -> list[Lever]:
    """The levers BUDGET_FILL_LEVERS names, less lqer without LQER_ENABLED=1 and awq without AWQ_LITE_ENABLED=1: the
    filler grows a correction only where the run has switched it on, so that an ablation's "off" stays off."""
    enabled = dict(clip=True, lqer=hp.lqer_enabled, awq=hp.awq_lite_enabled)
    make = dict(clip=lambda: clip_lever(model, hessians), lqer=lambda: lqer_lever(model, hessians),
                awq=lambda: awq_lever(model, hessians, hp))
    return [make[name]() for name in fill_lever_names(hp) if enabled[name]]


def best_fill_step(levers: list[Lever], current: dict[str, dict], hp: Hyperparameters, aim: float,
                   ratios: dict[str, float]) -> tuple[Optional[FillStep], list[FillStep]]:
    """The step that removes the most error per byte, its predicted bytes times its lever's measured-to-predicted
    ratio, scaled down to `aim` such bytes if larger (one that cannot be scaled that far gives way to the next);
    and every candidate, best first, for the log."""
    candidates = sorted((s for lever in levers for s in lever(current, hp)), key=lambda s: s.gain / ratios[s.lever],
                        reverse=True)
    for step in candidates:
        if step.error >= 0:
            break  # sorted by gain: no later candidate removes error either
        allowance = aim / ratios[step.lever]
        if step.bytes <= allowance:
            return step, candidates
        smaller = step.smaller(allowance / step.bytes) if step.smaller is not None else None
        if smaller is not None:
            return smaller, candidates
    return None, candidates


def describe_fill_try(decisions: list[dict], tries: int, size: int, budget: int, candidates: list[FillStep],
                      ratios: dict[str, float]) -> str:
    """The log line of the latest try: the step, its predictions, the measured size, and every candidate's gain."""
    d = decisions[-1]
    return (f"budget_fill: try {len(decisions)}/{tries}: {d['lever']} {d['step']}: predicted +{d['predicted_bytes']} "
            f"bytes, Hessian-weighted error {d['predicted_error']:+.4g}; measured {d['measured_bytes']:+d} -> {size} of "
            f"{budget} model bytes: {'kept' if d['accepted'] else 'over, dropped'} (error removed per byte by each "
            f"candidate: " + ", ".join(f"{c.what} {c.gain / ratios[c.lever]:.3g}" for c in candidates[:FILL_LOG_CANDIDATES])
            + (f", {len(candidates) - FILL_LOG_CANDIDATES} more" if len(candidates) > FILL_LOG_CANDIDATES else "") + ")")


def fill_budget(model: GPT, quantized: dict[str, dict], hessians: dict[str, Tensor], hp: Hyperparameters,
                blob: bytes, budget: int, log: Callable[[str], None]) -> tuple[dict[str, dict], bytes, dict, list[dict]]:
    """Greedy steps toward `budget` model bytes, each measured by one exact compression and kept only if it fits.
    Returns the state, its bytes, the knobs the kept steps set, and every decision."""
    levers, knobs, decisions, ratios = fill_levers(model, hessians, hp), {}, [], dict.fromkeys(FILL_LEVERS, 1.0)
    sums = {lever: [0.0, 0.0] for lever in FILL_LEVERS}  # measured and predicted bytes of each lever's steps so far
    while len(decisions) < hp.budget_fill_tries and budget - len(blob) > hp.budget_fill_slack_bytes:
        aim = budget - len(blob) - hp.budget_fill_slack_bytes / 2  # aim at the middle of the slack
        step, candidates = best_fill_step(levers, quantized, dataclasses.replace(hp, **knobs), aim, ratios)
        if step is None or step.error >= 0:
            log(f"budget_fill: no step left that removes error within {aim:.0f} bytes; stopping")
            break
        trial = serialize_artifact({**quantized, **step.after}, hp)
        measured = len(trial) - len(blob)
        decisions.append(dict(lever=step.lever, step=step.what, predicted_bytes=round(step.bytes * ratios[step.lever]),
                              predicted_error=step.error, measured_bytes=measured, accepted=len(trial) <= budget))
        log(describe_fill_try(decisions, hp.budget_fill_tries, len(trial), budget, candidates, ratios))
        if step.bytes > 0 and measured > 0:  # the ratio of sums: one small step's size is noisy (brotli: ±0.3 KB)
            sums[step.lever] = [sums[step.lever][0] + measured, sums[step.lever][1] + step.bytes]
            ratio = sums[step.lever][0] / sums[step.lever][1]
            ratios[step.lever] = min(max(ratio, FILL_RATIO_RANGE[0]), FILL_RATIO_RANGE[1])
        if decisions[-1]["accepted"]:
            quantized, blob = {**quantized, **step.after}, trial
            knobs.update(step.knobs)
    return quantized, blob, knobs, decisions


def fill_to_budget(model: GPT, quantized: dict[str, dict], hessians: dict[str, Tensor], hp: Hyperparameters,
                   blob: bytes, code_bytes: int, report: dict, log: Callable[[str], None]) -> tuple[dict[str, dict], bytes, dict]:
    """fit_to_budget for an artifact under the target with BUDGET_FILL=1: grow it, and report what was done."""
    t0 = time.perf_counter()
    filled, blob, knobs, decisions = fill_budget(model, quantized, hessians, hp, blob, report["target"] - code_bytes, log)
    kept = [d for d in decisions if d["accepted"]]
    report.update(method="fill" if kept else "none", after=len(blob) + code_bytes, tries=len(decisions),
                  seconds=round(time.perf_counter() - t0, 2), fill=decisions, hessian_error=sum(d["predicted_error"] for d in kept),
                  knobs={k.upper(): round(v, 6) for k, v in knobs.items()})
    log(f"budget_fill: limit {hp.artifact_limit_bytes} - margin {hp.budget_margin_bytes} = target {report['target']}; "
        f"before {report['before']} after {report['after']} bytes ({report['target'] - report['after']} left, slack "
        f"{hp.budget_fill_slack_bytes}); {len(kept)} of {len(decisions)} steps kept ("
        + (", ".join([f"{k} {v:.4g}" for k, v in report["knobs"].items()]
                     + [f"{d['lever']} {d['step']}" for d in kept if d["lever"] != "clip"]) or "artifact unchanged")
        + f"); predicted Hessian-weighted error {report['hessian_error']:+.4g}; {len(decisions)} compressions in {report['seconds']}s")
    for line in describe_corrections(filled) if kept else []:
        log(f"budget_fill: now {line}")
    return filled, blob, report


def fit_to_budget(model: GPT, quantized: dict[str, dict], hessians: dict[str, Tensor], hp: Hyperparameters,
                  code_bytes: int, log: Callable[[str], None]) -> tuple[dict[str, dict], bytes, dict]:
    """GPTQ's state and its compressed bytes, shrunk by BUDGET_FIT_METHOD if model + code exceed limit - margin.

    Under the target (or with ALLOW_OVER_BUDGET=1) GPTQ's bytes are returned untouched, unless
    BUDGET_FILL=1 grows an artifact under the target (fill_to_budget). If even
    the method's maximum amount does not fit, GPTQ's bytes are returned too and the run's budget
    check reports the overrun. Every rank computes the same result (GPTQ and compression are
    deterministic), and every rank reads back the file rank 0 writes.
    """
    t0 = time.perf_counter()
    blob = serialize_artifact(quantized, hp)
    target = hp.artifact_limit_bytes - hp.budget_margin_bytes
    report = dict(limit=hp.artifact_limit_bytes, margin=hp.budget_margin_bytes, target=target,
                  before=len(blob) + code_bytes, after=len(blob) + code_bytes, method="none", amount=0, tries=0)
    if report["before"] <= target and hp.budget_fill:
        return fill_to_budget(model, quantized, hessians, hp, blob, code_bytes, report, log)
    if report["before"] <= target or hp.allow_over_budget:
        why = "ALLOW_OVER_BUDGET=1" if report["before"] > target else f"<= target {target}"
        log(f"budget_fit: {report['before']} bytes {why} (limit {hp.artifact_limit_bytes} - margin "
            f"{hp.budget_margin_bytes}); artifact unchanged")
        return quantized, blob, report
    shrinker = (clip_shrinker(model, hessians, quantized, hp) if hp.budget_fit_method == "clip"
                else prune_shrinker(quantized, hessians))
    found = search_amount(shrinker, hp, len(blob), target - code_bytes)
    report.update(seconds=round(time.perf_counter() - t0, 2), max_amount=shrinker.max_amount)
    if found is None:
        report.update(method="failed")
        log(f"budget_fit: CANNOT FIT: {report['before']} bytes > target {target}, and the most {shrinker.name} "
            f"can do ({shrinker.describe(shrinker.max_amount)}) does not fit either; artifact unchanged ({report['seconds']}s)")
        return quantized, blob, report
    cost = added_error(quantized, found["quantized"], hessians)
    report.update(method=shrinker.name, amount=found["amount"], tries=found["tries"], after=len(found["blob"]) + code_bytes,
                  hessian_error=cost)
    log(f"budget_fit: limit {hp.artifact_limit_bytes} - margin {hp.budget_margin_bytes} = target {target}; "
        f"before {report['before']} after {report['after']} bytes (shaved {report['before'] - report['after']}); "
        f"method {shrinker.name}: {shrinker.describe(found['amount'])}; predicted cost: "
        f"Hessian-weighted squared error {cost:.4g}; {found['tries']} compressions in {report['seconds']}s")
    return found["quantized"], found["blob"], report


@contextlib.contextmanager
def full_fp32_matmuls():
    """GPTQ's Cholesky factors and error propagation need fp32, not the TF32 that training enables on CUDA."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def quantize_with_gptq(model: GPT, calibration: Iterator[Tensor], hp: Hyperparameters, rt: Runtime,
                       log: RunLog) -> tuple[dict[str, dict], dict[str, Tensor], dict]:
    """Hessians over the calibration batches, then GPTQ: the part of the artifact that counts as training."""
    t0 = time.perf_counter()
    with full_fp32_matmuls(), model.looping(hp.num_loops):  # calibrate the graph that is evaluated
        hessians = collect_hessians(model, calibration, rt) if hp.gptq_calibration_batches else {}
        synchronize(rt.device)
        hessian_s = time.perf_counter() - t0
        log(f"GPTQ:collected {len(hessians)} Hessians in {hessian_s:.1f}s")
        t1 = time.perf_counter()
        quantized = quantize_state(model, hessians, hp)
        synchronize(rt.device)
    quant_s = time.perf_counter() - t1
    log(f"GPTQ:quantized in {quant_s:.1f}s; Hessians + GPTQ took {hessian_s + quant_s:.1f}s")
    for line in describe_quantization(quantized) + describe_corrections(quantized):
        log(line)
    return quantized, hessians, dict(gptq_hessian_s=round(hessian_s, 3), gptq_quantize_s=round(quant_s, 3),
                                     gptq_total_s=round(hessian_s + quant_s, 3))


def build_artifact(model: GPT, calibration: Iterator[Tensor], code_bytes: int, hp: Hyperparameters,
                   rt: Runtime, log: RunLog) -> dict:
    """GPTQ -> bytes fitted to the budget -> file (rank 0); logs sizes and times, returns them."""
    quantized, hessians, times = quantize_with_gptq(model, calibration, hp, rt, log)
    t0 = time.perf_counter()
    with full_fp32_matmuls():  # the `clip` fitter runs GPTQ again
        quantized, blob, budget_fit = fit_to_budget(model, quantized, hessians, hp, code_bytes, log)
    serialize_s = time.perf_counter() - t0
    if rt.is_main:
        Path(ARTIFACT_PATH).write_bytes(blob)
    if rt.distributed:
        dist.barrier()
    sizes = report_sizes(Path(ARTIFACT_PATH).stat().st_size, code_bytes, hp, log)
    return dict(**sizes, **times, serialize_s=round(serialize_s, 3), budget_fit=budget_fit)


def report_sizes(model_bytes: int, code_bytes: int, hp: Hyperparameters, log: RunLog) -> dict:
    """The three size lines of the records' logs, and whether the submission is over the limit."""
    total = model_bytes + code_bytes
    log(f"Serialized model quantized+{hp.compressor}: {model_bytes} bytes")
    log(f"Code size: {code_bytes} bytes")
    log(f"Total submission size quantized+{hp.compressor}: {total} bytes")
    over = total > hp.artifact_limit_bytes
    if over:
        log(f"ERROR: ARTIFACT OVER BUDGET: {total} bytes > {hp.artifact_limit_bytes} "
            f"(by {total - hp.artifact_limit_bytes}); not a valid submission"
            + (" (ALLOW_OVER_BUDGET=1: exploratory run)" if hp.allow_over_budget else ""))
    return dict(artifact_bytes=model_bytes, code_bytes=code_bytes, total_bytes=total, artifact_over_budget=over)


def measure_gptq_reserve(model: GPT, batch: Tensor, hp: Hyperparameters, rt: Runtime) -> dict:
    """The seconds Hessians + GPTQ will take, measured before the clock starts: one calibration batch and
    one matrix of each shape (GPTQ and its LQER fit) are timed and scaled to GPTQ_CALIBRATION_BATCHES batches and every matrix
    (the first call of each also pays one-time costs, so this errs long). The slowest rank's figure."""
    t0 = time.perf_counter()
    with full_fp32_matmuls(), model.looping(hp.num_loops):
        hessians = collect_hessians(model, iter([batch]), rt)
        synchronize(rt.device)
        per_batch = time.perf_counter() - t0
        state, shapes = model.state_dict(), {}
        for name, h in hessians.items():
            shapes.setdefault((tuple(state[name].shape), quant_settings(name, hp)), []).append(name)
        gptq = 0.0
        for (_, (bits, sigmas)), names in shapes.items():
            t1 = time.perf_counter()
            gptq_quantize(state[names[0]], hessians[names[0]], bits, sigmas)
            if hp.lqer_enabled:  # every GPTQ matrix's correction is fitted to rank them; W stands in for its error
                lqer_fit(state[names[0]].float(), hessian_factor(hessians[names[0]]), hp.lqer_rank, hp.lqer_asym_group)
            synchronize(rt.device)
            gptq += (time.perf_counter() - t1) * len(names)
    estimate = torch.tensor([per_batch * hp.gptq_calibration_batches + gptq], dtype=torch.float64, device=rt.device)
    if rt.distributed:
        dist.all_reduce(estimate, op=dist.ReduceOp.MAX)
    return dict(hessian_s_per_batch=round(per_batch, 3), gptq_s=round(gptq, 3), estimate_s=round(estimate.item(), 3))


def gptq_reserve_seconds(trainer: Trainer, hp: Hyperparameters, rt: Runtime, log: RunLog) -> float:
    """GPTQ_RESERVE_SECONDS, or when it is unset the measured estimate times GPTQ_RESERVE_MARGIN."""
    if hp.max_wallclock_seconds <= 0 or hp.gptq_reserve_seconds is not None:
        return hp.gptq_reserve_seconds or 0.0
    batch = next(trainer.calibration_batches(1))
    measured = measure_gptq_reserve(trainer.model, batch, hp, rt)
    reserve = measured["estimate_s"] * hp.gptq_reserve_margin
    trainer.loader = trainer.new_loader()  # the measurement's batch is not taken from training
    log(f"gptq_reserve: {reserve:.1f}s = {hp.gptq_reserve_margin:g} x measured {measured['estimate_s']:.1f}s "
        f"({measured['hessian_s_per_batch']:.2f}s/batch x {hp.gptq_calibration_batches} + GPTQ {measured['gptq_s']:.1f}s)")
    log.update(gptq_reserve=dict(measured, margin=hp.gptq_reserve_margin, reserve_s=round(reserve, 3)))
    return reserve


# -----------------------------------------------------------------------------------------------
# Counted code size: the challenge counts the bytes of the submitted train_gpt.py. As in the public
# records (#1530 on), the run counts the file it would submit: a two-line self-extracting wrapper of
# this source, minified (python-minifier), brotli-compressed and base85-encoded. tools/pack_code.py
# imports `counted_code` and writes exactly that wrapper; a run of the wrapper counts its own bytes.
# -----------------------------------------------------------------------------------------------

# base85's alphabet has no quote, backslash or newline, so the payload is one plain string literal.
WRAPPER_PREFIX = 'import brotli,base64\nexec(brotli.decompress(base64.b85decode("'
WRAPPER_SUFFIX = '")))\n'
CODE_MINIFIED, CODE_UNMINIFIED, CODE_WRAPPER = "minified", "unminified", "wrapper"
CODE_METHODS = {
    CODE_MINIFIED: "python-minifier + brotli-11 + base85 self-extracting wrapper of this source",
    CODE_UNMINIFIED: "brotli-11 + base85 self-extracting wrapper of the UNMINIFIED source (python-minifier missing)",
    CODE_WRAPPER: "this file is the self-extracting wrapper: its own bytes",
}


@dataclasses.dataclass(frozen=True)
class CountedCode:
    text: str  # the file a submission of this code is (the wrapper)
    method: str  # a key of CODE_METHODS

    @property
    def size(self) -> int:
        return len(self.text.encode("utf-8"))


def minify_source(source: str) -> Optional[str]:
    """The source through python-minifier, or None when the package is not installed.

    Every option keeps behaviour: docstrings go (nothing reads __doc__); local names shrink, but
    arguments keep theirs (keyword calls); global names stay (exception class names are logged);
    class attribute annotations stay (they are the Hyperparameters fields and their types); asserts
    stay. Literal hoisting is off: it made the compressed wrapper ~120 bytes larger (BENCHMARKS.md).
    """
    try:
        import python_minifier
    except ImportError:
        return None
    keep_fields = python_minifier.RemoveAnnotationsOptions(remove_class_attribute_annotations=False)
    return python_minifier.minify(source, remove_annotations=keep_fields, remove_literal_statements=True,
                                  rename_locals=True, rename_globals=False, hoist_literals=False,
                                  remove_asserts=False, remove_debug=False)


def wrap_code(code: str) -> str:
    # brotli-11 beat lzma (alone or raw, any preset) by ~900 bytes on the minified script (BENCHMARKS.md)
    payload = base64.b85encode(brotli.compress(code.encode("utf-8"), quality=11)).decode("ascii")
    return WRAPPER_PREFIX + payload + WRAPPER_SUFFIX


def is_wrapper(text: str) -> bool:
    payload = text[len(WRAPPER_PREFIX):-len(WRAPPER_SUFFIX)]
    return (text.startswith(WRAPPER_PREFIX) and text.endswith(WRAPPER_SUFFIX)
            and not any(c in payload for c in '"\\\n'))


def counted_code(source: str) -> CountedCode:
    """The submission file this source stands for, and how it was made."""
    if is_wrapper(source):  # running the packed file: it is the submission, count it as it is
        return CountedCode(source, CODE_WRAPPER)
    minified = minify_source(source)
    if minified is None:
        return CountedCode(wrap_code(source), CODE_UNMINIFIED)
    return CountedCode(wrap_code(minified), CODE_MINIFIED)


def log_counted_code(counted: CountedCode, source_bytes: int, log: RunLog) -> None:
    if counted.method == CODE_UNMINIFIED:
        log("WARNING: python-minifier is not installed (pip install python-minifier): Code size counts a wrapper "
            "of the unminified source, several KB more than a submission needs")
    log(f"code: {source_bytes} bytes of source; counted {counted.size} bytes: {CODE_METHODS[counted.method]}")
    log.update(code_bytes=counted.size, code_method=counted.method)


# -----------------------------------------------------------------------------------------------
# Evaluation of the artifact: sliding windows, score-first test-time training, other loop counts.
# -----------------------------------------------------------------------------------------------


# --- Causal n-gram tilt (NGRAM_TILT): a closed-form boost of the token that the validation prefix predicts.
# The hint for target t comes from tokens[:t] only, by the rule of the public record #2135 (its token expert):
# the context is the ORDER-1 tokens before t; among that context's earlier occurrences, the continuation
# seen most often (ties keep the one that reached the count first) is the hint when it followed in at least
# THRESHOLD of them. Contexts may span a BOS: repeats across documents are the signal. The record streams
# this through hash tables (~190 s, ~8 GB per rank); here the same hints come from two sorts of the stream.

NGRAM_HASH_TRIES = 4  # salts tried before giving up on a 64-bit context hash without collisions


@dataclasses.dataclass(frozen=True)
class NgramTilt:
    hints: Tensor  # hints[t]: hinted token for target tokens[t] (int32 on the scoring device), -1 = no tilt
    boost: float  # β added to the hinted token's logit before renormalizing


def stable_argsort(keys: np.ndarray) -> np.ndarray:
    """Indices sorting 64-bit keys (by their int64 bits: only equal keys need to end up together), ties in
    index order. torch's radix sort is ~3x numpy's timsort on one core."""
    return torch.sort(torch.from_numpy(keys.view(np.int64)), stable=True).indices.numpy()


def context_hashes(tokens: np.ndarray, context: int, salt: int) -> np.ndarray:
    """A 64-bit hash of tokens[i : i+context] for every i (one per position t = i + context); tokens uint64."""
    multipliers = np.random.default_rng(salt).integers(0, 1 << 63, size=context, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    count = len(tokens) - context
    keys, term = np.zeros(count, dtype=np.uint64), np.empty(count, dtype=np.uint64)
    for j in range(context):
        keys += np.multiply(tokens[j:j + count], multipliers[j], out=term)
    return keys


def contexts_sorted(tokens: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Window starts i sorted by their context tokens[i : i+context], equal contexts in stream order, and a
    flag marking the first of each run of equal contexts. Hash runs are checked token by token, so a
    collision (rare: ~N²/2^65, one run in ~10^4 at N = 48M) costs a rehash, never a wrong hint."""
    for salt in range(NGRAM_HASH_TRIES):
        keys = context_hashes(tokens, context, salt)
        order = stable_argsort(keys)
        sorted_keys = keys[order]
        same = sorted_keys[1:] == sorted_keys[:-1]
        later, earlier = order[1:][same], order[:-1][same]
        if all(np.array_equal(tokens[later + j], tokens[earlier + j]) for j in range(context)):
            return order, np.concatenate(([True], ~same))
    raise RuntimeError(f"n-gram tilt: {NGRAM_HASH_TRIES} salts of the 64-bit context hash all collided")


def running_pair_counts(group: np.ndarray, following: np.ndarray) -> np.ndarray:
    """For each element (groups contiguous, stream order inside), how often its (group, following token)
    pair has occurred so far, itself included."""
    pair = group * (int(following.max()) + 1) + following
    order = stable_argsort(pair)
    sorted_pair = pair[order]
    run_start = np.flatnonzero(np.concatenate(([True], sorted_pair[1:] != sorted_pair[:-1])))
    run_lengths = np.diff(np.append(run_start, len(pair)))
    counts = np.empty(len(pair), dtype=np.int64)
    counts[order] = np.arange(len(pair)) - np.repeat(run_start, run_lengths) + 1
    return counts


def ngram_hints(tokens: np.ndarray, order: int, threshold: float) -> np.ndarray:
    """hints[t] for every position t (int32, -1 = none), read from tokens[:t] as the block comment says."""
    context = order - 1
    hints = np.full(len(tokens), -1, dtype=np.int32)
    if len(tokens) <= context:
        return hints
    tokens = tokens.astype(np.uint64)  # one type for hashing and indexing; ids are < 2^16
    starts, first = contexts_sorted(tokens, context)
    group = np.cumsum(first) - 1
    repeated = np.bincount(group)[group] > 1  # a context seen once never gives a hint nor receives one
    if not repeated.any():  # e.g. random tokens: no context comes back, so there is nothing to count
        return hints
    targets, group, first = starts[repeated] + context, group[repeated], first[repeated]
    following = tokens[targets].astype(np.int64)
    counts = running_pair_counts(group, following)
    span = len(counts) + 1  # offsets make one running max restart at every group
    top_count = np.maximum.accumulate(counts + group * span) - group * span
    index = np.arange(len(counts))
    new_top = first | (counts > np.concatenate(([0], top_count[:-1])))  # strictly exceeds: ties keep the old top
    top_at = np.maximum.accumulate(np.where(new_top, index, 0))
    group_start = np.maximum.accumulate(np.where(first, index, 0))
    read = np.flatnonzero(~first)  # each read sees the state after the group's previous element
    seen = read - group_start[read]
    share = top_count[read - 1] / seen
    gated = read[share >= threshold]
    hints[targets[gated]] = following[top_at[gated - 1]]
    return hints


def tilted_nll(nll: Tensor, logits: Tensor, targets: Tensor, hints: Tensor, boost: float) -> Tensor:
    """Per-position NLL under p'(a) = p(a)·e^(β·[a = h]) / (1 + p(h)·(e^β − 1)), the exact softmax of the
    logits with β added at the hint h: nll − β·[y = h] + log(1 + p(h)·(e^β − 1)). Flat inputs
    ([N], [N, V], [N], [N]); positions with hint -1 keep their nll."""
    rows = torch.nonzero(hints >= 0).squeeze(1)
    z = logits[rows].float()
    hinted = hints[rows].long()
    log_p_hint = z.gather(1, hinted[:, None]).squeeze(1) - torch.logsumexp(z, dim=1)
    change = torch.log1p(math.expm1(boost) * torch.exp(log_p_hint)) - boost * (targets[rows] == hinted).float()
    return nll.index_add(0, rows, change.to(nll.dtype))


def build_ngram_tilt(val: Validation, hp: Hyperparameters, rt: Runtime, log: RunLog) -> NgramTilt:
    """Hints from the validation tokens (never training data), once per run; their time counts as eval time.
    Rank 0 builds them (~60 bytes of host memory per token, once per machine rather than once per rank)
    and broadcasts the int32 array."""
    t0 = time.perf_counter()
    hints = torch.empty(len(val.tokens), dtype=torch.int32)
    if rt.is_main:
        hints = torch.from_numpy(ngram_hints(val.tokens, hp.ngram_tilt_order, hp.ngram_tilt_threshold))
    hints = hints.to(rt.device)
    if rt.distributed:
        dist.broadcast(hints, src=0)
    synchronize(rt.device)
    ms = round(1000.0 * (time.perf_counter() - t0))
    hinted = hints[1:] >= 0
    right = int((hints[1:][hinted].cpu().numpy() == val.tokens[1:][hinted.cpu().numpy()]).sum())
    log(f"ngram_tilt: order {hp.ngram_tilt_order} threshold {hp.ngram_tilt_threshold} boost {hp.ngram_tilt_boost}: "
        f"{int(hinted.sum())} of {len(hinted)} targets hinted ({hinted.float().mean().item():.2%}), {right} right, "
        f"in {ms}ms")
    log.metric(ngram_hint_ms=ms, ngram_hinted=int(hinted.sum()), ngram_hints_right=right)
    return NgramTilt(hints, hp.ngram_tilt_boost)


@dataclasses.dataclass(frozen=True)
class Window:
    """Inputs tokens[start : start+length]; targets are the next tokens; positions first..length-1 are scored."""

    start: int
    length: int
    first: int


def sliding_windows(num_targets: int, seq_len: int, stride: int) -> list[Window]:
    """Windows advanced by `stride`: the first scores all its targets, each later one only its last `stride`.

    Window k >= 1 scores targets [seq_len + (k-1)·stride, seq_len + k·stride), so every target is
    scored exactly once, with at least seq_len - stride tokens of left context after the first window.
    """
    windows, start = [], 0
    while True:
        length = min(seq_len, num_targets - start)
        first = 0 if start == 0 else seq_len - stride
        if first >= length:
            return windows
        windows.append(Window(start, length, first))
        start += stride


def masked_score(nll: Tensor, logits: Tensor, x: Tensor, y: Tensor, mask: Tensor, positions: Tensor,
                 counts: ByteCounts, tilt: Optional[NgramTilt]) -> Tensor:
    """[nll, tokens, bytes] summed over the positions in `mask` (rows x (B, T), targets y, positions: index of each
    input token in the stream), each NLL under the n-gram tilt when `tilt` is given."""
    if tilt is not None:
        hints = torch.where(mask, tilt.hints[positions + 1], -1)
        nll = tilted_nll(nll.flatten(), logits.flatten(0, 1), y.flatten(), hints.flatten(), tilt.boost).view_as(y)
    return torch.stack((nll[mask].double().sum(), mask.sum().double(),
                        counts.count(x[mask], y[mask], positions[mask]).sum()))


def score_windows(logits_fn, tokens: np.ndarray, windows: list[Window], batch: int, seq_len: int,
                  counts: ByteCounts, rt: Runtime, tilt: Optional[NgramTilt] = None) -> Tensor:
    """Sums [nll, tokens, bytes] over the scored positions of `windows` (batches padded to a fixed shape),
    each NLL under the n-gram tilt when `tilt` is given."""
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    for i in range(0, len(windows), batch):
        group = windows[i:i + batch]
        x = np.zeros((batch, seq_len), dtype=np.int64)
        y = np.zeros((batch, seq_len), dtype=np.int64)
        mask = np.zeros((batch, seq_len), dtype=bool)
        positions = np.zeros((batch, seq_len), dtype=np.int64)
        for r, w in enumerate(group):
            x[r, :w.length] = tokens[w.start:w.start + w.length]
            y[r, :w.length] = tokens[w.start + 1:w.start + w.length + 1]
            mask[r, w.first:w.length] = True
            positions[r, :w.length] = np.arange(w.start, w.start + w.length)
        x, y, mask, positions = (torch.from_numpy(a).to(rt.device) for a in (x, y, mask, positions))
        with torch.no_grad(), autocast(rt):
            logits = logits_fn(x)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view_as(y)
        sums += masked_score(nll, logits, x, y, mask, positions, counts, tilt)
    return sums


def my_share(items: list, rt: Runtime) -> list:
    return items[len(items) * rt.rank // rt.world_size:len(items) * (rt.rank + 1) // rt.world_size]


def ttt_chunk_starts(chunk: int, num_targets: int, hp: Hyperparameters) -> list[int]:
    """Starts of the whole EVAL_SEQ_LEN sequences that TTT trains on after scoring chunk `chunk`."""
    chunk_start = chunk * hp.ttt_chunk_tokens
    chunk_end = min(chunk_start + hp.ttt_chunk_tokens, num_targets)
    return list(range(chunk_start, chunk_end - hp.eval_seq_len + 1, hp.eval_seq_len))


def cosine_lr(base: float, step: int, steps: int) -> float:
    """base decayed to 0 along a half cosine over `steps` steps (0 at the last)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(steps - 1, 1)))


def reduce_clip_step(model: nn.Module, optimizer, clip: float, rt: Runtime) -> None:
    """Sum the ranks' gradients (a parameter without one counts as zero), clip their norm, step."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    if rt.distributed:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    if clip > 0:
        nn.utils.clip_grad_norm_(list(model.parameters()), clip)
    optimizer.step()


def score_first_eval(model: GPT, val: Validation, hp: Hyperparameters, rt: Runtime, epochs: int,
                     observer=None, tilt: Optional[NgramTilt] = None) -> tuple[float, float]:
    """Sliding-window scoring, chunk by chunk; with epochs > 0, score-first test-time training.

    The stream is cut into TTT_CHUNK_TOKENS chunks by the position of each window's first scored
    target. Each chunk is first scored under no_grad, and only then (except the last chunk) the model
    trains on that chunk's tokens with SGD: TTT_EPOCHS passes, LR cosine-decayed across chunks,
    gradients averaged over ranks and clipped. No target is scored twice or trained on before it is
    scored. `observer(kind, positions)` ('score' or 'train', target positions) lets tests check that.
    With epochs = 0 this is plain sliding-window evaluation. `tilt` tilts the scores only, not TTT's loss.
    """
    seq_len, tokens = hp.eval_seq_len, val.tokens
    num_targets = len(tokens) - 1
    windows = sliding_windows(num_targets, seq_len, hp.eval_stride)
    num_chunks = -(-num_targets // hp.ttt_chunk_tokens)
    per_chunk = [[] for _ in range(num_chunks)]
    for w in windows:
        per_chunk[(w.start + w.first) // hp.ttt_chunk_tokens].append(w)
    batch = max(1, micro_batch_seqs(hp.val_batch_tokens, seq_len))
    counts = val.bytes.to(rt.device)
    logits_fn = torch.compile(model.forward_logits, dynamic=False, fullgraph=True) if rt.compile else model.forward_logits
    train_fn = torch.compile(model, dynamic=False, fullgraph=True) if rt.compile and epochs > 0 else model
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=hp.ttt_lr, momentum=hp.ttt_momentum) if epochs > 0 else None
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    for c, chunk_windows in enumerate(per_chunk):
        model.eval()
        mine = my_share(chunk_windows, rt)
        sums += score_windows(logits_fn, tokens, mine, batch, seq_len, counts, rt, tilt)
        if observer is not None:
            observer("score", [w.start + 1 + p for w in mine for p in range(w.first, w.length)])
        if optimizer is None or c == num_chunks - 1:
            continue
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(hp.ttt_lr, c, num_chunks)
        starts = ttt_chunk_starts(c, num_targets, hp)
        model.train()
        for _ in range(epochs):
            for i in range(0, len(starts), batch):
                ttt_step(train_fn, model, optimizer, tokens, my_share(starts[i:i + batch], rt),
                         len(starts[i:i + batch]) * seq_len, hp, rt, observer)
    model.eval()
    if rt.distributed:
        dist.all_reduce(sums)
    return nats_and_bpb(*sums.tolist())


def ttt_step(train_fn, model: GPT, optimizer, tokens: np.ndarray, starts: list[int], global_tokens: int,
             hp: Hyperparameters, rt: Runtime, observer) -> None:
    """One SGD step on sequences starting at `starts` (this rank's share of a global batch).

    Each rank backpropagates its summed loss over the global token count and gradients are summed
    across ranks, so the step is the exact mean over the global batch even when shares are uneven
    (a rank with no share still joins the all-reduce).
    """
    optimizer.zero_grad(set_to_none=False)
    if starts:
        seq_len = hp.eval_seq_len
        rows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
        chunk = torch.from_numpy(rows).to(rt.device)
        with autocast(rt):
            loss = train_fn(chunk[:, :-1], chunk[:, 1:])
        (loss * (len(starts) * seq_len / global_tokens)).backward()
        if observer is not None:
            observer("train", [s + 1 + p for s in starts for p in range(seq_len)])
    reduce_clip_step(model, optimizer, hp.ttt_grad_clip, rt)



# --- Phased per-document LoRA TTT (TTT_ENABLED=1 TTT_MODE=phased) ---------------------------------
# Documents: each BOS up to the next BOS inclusive, so a document's last target is the BOS that ends it
# and every target of the stream belongs to exactly one document. Sorted by length, documents form
# batches of TTT_BATCH_SIZE, longest batch first: one document per row, positions from 0 at the row's
# window start, right-padded (padding is never scored). Each document gets fresh adapter outputs (B = 0;
# A is kept from the rank's previous batch, a warm start) and is scored TTT_CHUNK_SIZE targets at a time,
# each chunk with the TTT_EVAL_SEQ_LEN tokens of its document that end at the chunk's end; only after a
# chunk is scored do the adapters take one AdamW step on it, and a document's last chunk is never trained on.
# Phases: the first PHASED_TTT_PREFIX_DOCS documents of the processing order, cut into PHASED_TTT_NUM_PHASES
# cumulative prefixes. When every batch holding a prefix's documents has been scored (all ranks), the base
# weights train with SGD on that prefix, the adapters are rebuilt, and scoring goes on. Ranks split each
# phase's batches statically, balanced by estimated cost (no shared file system, no counter).


@dataclasses.dataclass(frozen=True)
class Documents:
    starts: np.ndarray  # stream index of each document's first token
    lengths: np.ndarray  # its targets: tokens[start + 1 : start + length + 1]


def val_documents(tokens: np.ndarray) -> Documents:
    starts = document_starts(tokens).astype(np.int64)
    lengths = np.append(starts[1:], len(tokens) - 1) - starts
    keep = lengths > 0  # a BOS that ends the stream starts no document
    return Documents(starts[keep], lengths[keep])


def ttt_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Document indices sorted by length (ties in stream order), cut into batches, longest batch first."""
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)][::-1]


def batch_cost(lengths: np.ndarray, chunk: int, context: int) -> int:
    """Padded tokens the batch's forwards process: rows x the window width of each chunk."""
    ends = np.minimum(np.arange(1, -(-int(lengths.max()) // chunk) + 1) * chunk, lengths.max())
    return len(lengths) * int(np.minimum(ends, context).sum())


def assign_batches(costs: list[int], world_size: int) -> list[list[int]]:
    """Each batch to exactly one rank: costliest first, each to the least loaded rank (longest processing time
    first), the same on every rank. Each rank's list is in batch order."""
    loads, shares = [0] * world_size, [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = loads.index(min(loads))
        loads[rank] += costs[i]
        shares[rank].append(i)
    return [sorted(share) for share in shares]


def phase_ends(batches: list[np.ndarray], prefix_docs: int, num_phases: int) -> list[tuple[int, int]]:
    """(batches to score before the phase, documents of its prefix) per global phase. A phase that would
    come after the last batch is dropped: nothing would be left to score with its weights."""
    done = np.cumsum([len(b) for b in batches])
    phases = []
    for k in range(num_phases):
        docs = min(prefix_docs * (k + 1) // num_phases, int(done[-1]))
        end = int(np.searchsorted(done, docs)) + 1
        if docs > 0 and end < len(batches) and (not phases or phases[-1][1] < docs):
            phases.append((end, docs))
    return phases


def ttt_window_widths(chunk: int, context: int, growth: float) -> list[int]:
    """The widths chunk windows are padded to: `chunk`, then each `growth` times the last rounded up to whole
    chunks (at least one more), below `context`; then `context`. A short list known from the knobs alone, so the
    compiled scoring forward has a few static shapes that the warm-up builds before the eval timer: with
    dynamic=True the adapters' document count (a parameter shape, kept static) still recompiles inside the timer.
    Right padding is never scored and, attention being causal, changes no scored logit; it costs < growth x on
    short windows and nothing on full-context ones (BENCHMARKS.md: +8-34% forward tokens at growth 2)."""
    widths, width = [], min(chunk, context)
    while width < context:
        widths.append(width)
        width = max(width + chunk, -(-math.ceil(width * growth) // chunk) * chunk)
    return widths + [context]


def padded_width(width: int, chunk: int, context: int, growth: float) -> int:
    """The smallest of ttt_window_widths that holds a `width`-token window."""
    return next(w for w in ttt_window_widths(chunk, context, growth) if w >= width)


@dataclasses.dataclass(frozen=True)
class ChunkRows:
    """One chunk of every document of a batch: row r is document r's window (numpy, (docs, width))."""
    inputs: np.ndarray
    targets: np.ndarray
    positions: np.ndarray  # stream index of each input token
    scored: np.ndarray  # the chunk's targets
    weight: np.ndarray  # training weight: 1/chunk length on the chunk's targets of documents with a later chunk


def chunk_rows(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, index: int, chunk: int,
               context: int, growth: float) -> ChunkRows:
    """Chunk `index` of each document: targets [index·chunk, end) with end = min((index+1)·chunk, length),
    inputs the `context` tokens of the document ending at `end` (fewer near its start), right-padded to a width
    of ttt_window_widths(chunk, context, growth). Rows of documents with no such chunk are padding."""
    first = index * chunk
    ends = np.minimum(first + chunk, lengths)
    win = np.maximum(0, ends - context)
    live = first < lengths
    width = padded_width(int((ends - win)[live].max()), chunk, context, growth)
    rows = ChunkRows(*(np.zeros((len(starts), width), dtype=t) for t in (np.int64, np.int64, np.int64, bool, np.float32)))
    for r in np.flatnonzero(live):
        s, n = starts[r] + win[r], ends[r] - win[r]
        rows.inputs[r, :n] = tokens[s:s + n]
        rows.targets[r, :n] = tokens[s + 1:s + n + 1]
        rows.positions[r, :n] = np.arange(s, s + n)
        rows.scored[r, first - win[r]:n] = True
        if ends[r] < lengths[r]:
            rows.weight[r, first - win[r]:n] = 1.0 / (ends[r] - first)
    return rows


def lora_shapes(model: GPT, sites: tuple[str, ...]) -> dict[str, tuple[int, int, int]]:
    """(slots, in, out) of each adapted site: one slot per virtual layer, one for the head."""
    hp, slots = model.hp, model.plan.num_slots
    d, kv = hp.model_dim, hp.num_kv_heads * (hp.model_dim // hp.num_heads)
    shapes = dict(q=(slots, d, d), k=(slots, d, kv), v=(slots, d, kv), o=(slots, d, d), mlp=(slots, d, d),
                  head=(1, d, hp.vocab_size))
    return {site: shapes[site] for site in sites}


def fresh_lora(previous: Optional[BatchedLora], model: GPT, docs: int, hp: Hyperparameters, rt: Runtime,
               generator: torch.Generator) -> BatchedLora:
    """Adapters for a batch of `docs` documents: the previous set with B zeroed (A warm-started) when it
    has that many documents, else a new set."""
    if previous is not None and next(iter(previous.a.values())).size(1) == docs:
        with torch.no_grad():
            for b in previous.b.values():
                b.zero_()
        return previous
    lora = BatchedLora(lora_shapes(model, ttt_sites(hp)), docs, hp.ttt_lora_rank, hp.ttt_lora_alpha, generator)
    return lora.to(rt.device)


def score_document_batch(logits_fn, model: GPT, lora: BatchedLora, rows: np.ndarray, docs: Documents,
                         tokens: np.ndarray, counts: ByteCounts, hp: Hyperparameters, rt: Runtime,
                         observer=None, tilt: Optional[NgramTilt] = None, adapt: bool = True) -> Tensor:
    """Score the documents `rows` chunk by chunk, one AdamW step of the adapters after each chunk is scored
    (none with adapt=False: the same forwards, no backward). Returns [nll, tokens, bytes]. The loss is the sum
    over documents of their mean NLL on the chunk, so each document's adapters see only their own gradient
    (AdamW is elementwise)."""
    optimizer = torch.optim.AdamW(lora.parameters(), lr=hp.ttt_lora_lr, betas=(hp.ttt_beta1, hp.ttt_beta2),
                                  eps=1e-10, weight_decay=hp.ttt_weight_decay, fused=rt.device.type == "cuda")
    starts, lengths = docs.starts[rows], docs.lengths[rows]
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    for index in range(-(-int(lengths.max()) // hp.ttt_chunk_size)):
        chunk = chunk_rows(tokens, starts, lengths, index, hp.ttt_chunk_size, hp.ttt_eval_seq_len, hp.ttt_width_growth)
        x, y, positions, scored, weight = (torch.from_numpy(a).to(rt.device) for a in dataclasses.astuple(chunk))
        with model.adapted(lora), autocast(rt):  # with grad even when nothing trains: one graph per shape, not two
            logits = logits_fn(x)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view_as(y)
        sums += masked_score(nll.detach(), logits.detach(), x, y, scored, positions, counts, tilt)
        if observer is not None:
            observer("score", (positions[scored] + 1).tolist())
        if not adapt or not chunk.weight.any():
            continue
        optimizer.zero_grad(set_to_none=True)
        (nll * weight).sum().backward()
        if observer is not None:
            observer("train", (positions[weight > 0] + 1).tolist())
        optimizer.step()
    return sums


def phase_rows(docs: Documents, prefix: np.ndarray, length: int) -> list[tuple[int, int]]:
    """(first input index, targets) of the rows a global phase trains on: each prefix document cut into
    `length`-target rows, in processing order."""
    return [(s, min(length, int(docs.starts[d] + docs.lengths[d]) - s)) for d in prefix
            for s in range(int(docs.starts[d]), int(docs.starts[d] + docs.lengths[d]), length)]


def global_sgd_phase(model: GPT, tokens: np.ndarray, pieces: list[tuple[int, int]], hp: Hyperparameters,
                     rt: Runtime, observer=None) -> int:
    """One epoch of SGD of every base weight over `pieces` (all already scored): steps of about
    GLOBAL_TTT_CHUNK_TOKENS targets, each rank taking a share of a step's rows, LR cosine-decayed across
    steps, gradients summed over ranks (each rank's loss is its NLL sum over the step's target count) and
    clipped at TTT_GRAD_CLIP. Returns the number of steps."""
    bounds = np.cumsum([n for _, n in pieces]) // hp.global_ttt_chunk_tokens
    steps = [[p for p, b in zip(pieces, bounds) if b == k] for k in np.unique(bounds)]
    optimizer = torch.optim.SGD(model.parameters(), lr=hp.global_ttt_lr, momentum=hp.global_ttt_momentum)
    model.requires_grad_(True)
    for k, step in enumerate(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(hp.global_ttt_lr, k, len(steps))
        optimizer.zero_grad(set_to_none=True)
        mine = my_share(step, rt)
        if mine:
            width = max(n for _, n in mine)
            x = np.zeros((len(mine), width), dtype=np.int64)
            y = np.full((len(mine), width), -100, dtype=np.int64)  # F.cross_entropy's ignore_index
            for r, (s, n) in enumerate(mine):
                x[r, :n], y[r, :n] = tokens[s:s + n], tokens[s + 1:s + n + 1]
            x, y = torch.from_numpy(x).to(rt.device), torch.from_numpy(y).to(rt.device)
            with autocast(rt):
                logits = model.forward_logits(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
            (loss / sum(n for _, n in step)).backward()
            if observer is not None:
                observer("train", [s + 1 + j for s, n in mine for j in range(n)])
        reduce_clip_step(model, optimizer, hp.ttt_grad_clip, rt)
    model.requires_grad_(False)
    return len(steps)


@dataclasses.dataclass
class TTTDeadline:
    """TTT_DEADLINE_SECONDS's guard: past `at` (a time.perf_counter() value) a rank scores its remaining batches
    without training adapters (still chunk by chunk, so every target is scored once, before any update: trivially
    legal) and no further global phase runs. Unadapted documents are the shortest (batches go longest first),
    which adapters help least. The counts are this rank's until phased_ttt_eval sums them over ranks."""
    at: float
    unadapted_docs: int = 0
    unadapted_batches: int = 0
    skipped_phases: int = 0

    def adapts(self, docs: int, where: str, log: Callable[[str], None]) -> bool:
        """Whether a batch of `docs` documents may train its adapters; past the deadline, count it (log the first)."""
        if time.perf_counter() < self.at:
            return True
        if not self.unadapted_batches:
            log(f"ttt_deadline: past TTT_DEADLINE_SECONDS at {where}: the rest of this rank's batches are scored "
                f"without adaptation")
        self.unadapted_docs, self.unadapted_batches = self.unadapted_docs + docs, self.unadapted_batches + 1
        return False

    def any_rank_late(self, rt: Runtime) -> bool:
        """Whether any rank is past the deadline, the same answer on every rank: a global phase's all-reduces need
        every rank, so all run it or all skip it (one late rank skipping alone would deadlock the others)."""
        late = torch.tensor([float(time.perf_counter() >= self.at)], device=rt.device)
        if rt.distributed:
            dist.all_reduce(late, op=dist.ReduceOp.MAX)
        return bool(late.item())

    def summed(self, rt: Runtime) -> None:
        """The unadapted counts of all ranks (skipped phases are the same on every rank)."""
        counts = torch.tensor([self.unadapted_docs, self.unadapted_batches], dtype=torch.float64, device=rt.device)
        if rt.distributed:
            dist.all_reduce(counts)
        self.unadapted_docs, self.unadapted_batches = (int(c) for c in counts.tolist())

    def metrics(self) -> dict:
        hit = bool(self.unadapted_batches or self.skipped_phases)
        return dict(ttt_deadline_hit=hit, ttt_unadapted_docs=self.unadapted_docs,
                    ttt_unadapted_batches=self.unadapted_batches, ttt_skipped_phases=self.skipped_phases)


def phased_ttt_eval(model: GPT, val: Validation, hp: Hyperparameters, rt: Runtime, log: Callable[[str], None],
                    observer=None, tilt: Optional[NgramTilt] = None,
                    deadline: Optional[TTTDeadline] = None) -> tuple[float, float]:
    """Phased per-document LoRA TTT (see the comment above Documents); changes the model's weights when
    GLOBAL_TTT_LR > 0. `observer(kind, positions)` ('score' or 'train', target positions) lets tests check
    the order; `tilt` tilts the scores only; `deadline` stops adaptation past it (see TTTDeadline)."""
    docs = val_documents(val.tokens)
    batches = ttt_batches(docs.lengths, hp.ttt_batch_size)
    order = np.concatenate(batches)
    counts = val.bytes.to(rt.device)
    generator = torch.Generator().manual_seed(hp.seed + rt.rank)
    logits_fn = (torch.compile(model.forward_logits, dynamic=False, fullgraph=True)  # warm_up_phased built its graphs
                 if rt.compile else model.forward_logits)
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    model.eval()
    model.requires_grad_(False)
    begin = 0
    for phase, (end, prefix) in enumerate([*phase_ends(batches, hp.phased_ttt_prefix_docs, hp.phased_ttt_num_phases),
                                           (len(batches), 0)]):
        t0, lora = time.perf_counter(), None
        segment = batches[begin:end]
        costs = [batch_cost(docs.lengths[b], hp.ttt_chunk_size, hp.ttt_eval_seq_len) for b in segment]
        for i in assign_batches(costs, rt.world_size)[rt.rank]:
            lora = fresh_lora(lora, model, len(segment[i]), hp, rt, generator)
            adapt = deadline is None or deadline.adapts(len(segment[i]), f"segment {phase + 1} batch {i + 1}", log)
            sums += score_document_batch(logits_fn, model, lora, segment[i], docs, val.tokens, counts, hp, rt,
                                         observer, tilt, adapt)
        log(f"phased_ttt: segment {phase + 1}: {sum(map(len, segment))} documents in {len(segment)} batches scored "
            f"in {1000.0 * (time.perf_counter() - t0):.0f}ms")
        if prefix and deadline is not None and deadline.any_rank_late(rt):
            deadline.skipped_phases += 1
            log(f"phased_ttt: global phase {phase + 1} skipped: a rank is past TTT_DEADLINE_SECONDS")
        elif prefix:
            t0 = time.perf_counter()
            pieces = phase_rows(docs, order[:prefix], hp.ttt_eval_seq_len)
            steps = global_sgd_phase(model, val.tokens, pieces, hp, rt, observer)
            log(f"phased_ttt: global phase {phase + 1}: SGD on the first {prefix} documents "
                f"({sum(n for _, n in pieces)} targets, {steps} steps) in {1000.0 * (time.perf_counter() - t0):.0f}ms")
        begin = end
    model.requires_grad_(True)
    if rt.distributed:
        dist.all_reduce(sums)
    if deadline is not None:
        deadline.summed(rt)
    return nats_and_bpb(*sums.tolist())


def timed_eval(label: str, fn, log: RunLog, rt: Runtime) -> tuple[float, float, int]:
    synchronize(rt.device)
    t0 = time.perf_counter()
    loss, bpb = fn()
    synchronize(rt.device)
    ms = round(1000.0 * (time.perf_counter() - t0))
    log(f"{label} val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:{ms}ms")
    return loss, bpb, ms


# --- Compile warm-up of the evaluation, outside the eval timer (spec §7.6). Each compiled graph the timed
# evaluation runs (one per entry point, mode, loop count and batch shape) is built first on random tokens from
# a seeded generator, never on validation tokens (a record was flagged for warming on them): the warm-up is
# given only the stream's length and document count, which fix the shapes. It runs a throwaway model of the same
# architecture (and throwaway adapters: a fresh BatchedLora of the same shape reuses the graph, checked on CPU):
# compiled code is cached on GPT's methods and guarded on shapes, modes and flags, not on the instance, so the
# artifact's model (and TTT's fresh copy) reuse it. Without compilation there is nothing to warm up.

EVAL_WARMUP_SEED = 12345  # the random tokens' generator: fixed, so every rank and run warms the same way


def plain_eval_batches(num_tokens: int, hp: Hyperparameters, rt: Runtime) -> list[int]:
    """The distinct batch sizes (in EVAL_SEQ_LEN sequences) of this rank's `evaluate` of the stream."""
    mine = my_share(range((num_tokens - 1) // hp.eval_seq_len), rt)
    batch = max(1, micro_batch_seqs(hp.val_batch_tokens, hp.eval_seq_len))
    return sorted({len(mine[i:i + batch]) for i in range(0, len(mine), batch)})


def ttt_step_rows(num_tokens: int, hp: Hyperparameters, rt: Runtime) -> list[int]:
    """The distinct numbers of sequences this rank trains on per TTT step (score_first_eval's loop)."""
    num_targets = num_tokens - 1
    batch = max(1, micro_batch_seqs(hp.val_batch_tokens, hp.eval_seq_len))
    rows = set()
    for c in range(-(-num_targets // hp.ttt_chunk_tokens) - 1):  # the last chunk is never trained on
        starts = ttt_chunk_starts(c, num_targets, hp)
        rows.update(len(my_share(starts[i:i + batch], rt)) for i in range(0, len(starts), batch))
    return sorted(rows - {0})


def phased_batch_rows(num_docs: int, hp: Hyperparameters) -> list[int]:
    """The distinct document counts of phased TTT's batches of `num_docs` documents (TTT_BATCH_SIZE and the rest)."""
    return sorted({min(hp.ttt_batch_size, num_docs - i) for i in range(0, num_docs, hp.ttt_batch_size)})


def warm_up_phased(model: GPT, tokens: Callable[[int, int], Tensor], rows: list[int], hp: Hyperparameters,
                   rt: Runtime, generator: torch.Generator) -> list[int]:
    """Compile phased TTT's scoring forward with adapters and its backward at every (documents, padded width)
    on throwaway adapters, as score_document_batch runs them (eval mode, frozen base weights, grad on). The
    AdamW step and the global SGD phase run eagerly: nothing to compile. Returns the widths."""
    widths = ttt_window_widths(hp.ttt_chunk_size, hp.ttt_eval_seq_len, hp.ttt_width_growth)
    logits_fn = torch.compile(model.forward_logits, dynamic=False, fullgraph=True)
    model.eval()
    model.requires_grad_(False)
    for docs, width in itertools.product(rows, widths):
        lora = BatchedLora(lora_shapes(model, ttt_sites(hp)), docs, hp.ttt_lora_rank, hp.ttt_lora_alpha, generator)
        x = tokens(docs, width)
        with model.adapted(lora.to(rt.device)), autocast(rt):
            logits = logits_fn(x)
        F.cross_entropy(logits.flatten(0, 1).float(), x.flatten()).backward()
    return widths


def warm_up_eval(num_tokens: int, hp: Hyperparameters, rt: Runtime, log: RunLog, num_docs: int) -> None:
    """Compile every graph of the timed evaluation of a `num_tokens` stream of `num_docs` documents (the count
    matters only to phased TTT), on random tokens."""
    if not rt.compile:
        log("eval_warmup: skipped (COMPILE off, nothing to compile)")
        return
    t0, graphs = time.perf_counter(), compiled_graph_count()
    generator = torch.Generator().manual_seed(EVAL_WARMUP_SEED)
    model = GPT(hp, rt.attn_backend, rt.activation_dtype).to(rt.device)
    seq_len = hp.eval_seq_len

    def tokens(rows: int, length: int) -> Tensor:  # laid out as each path lays out its inputs: graphs are
        flat = torch.randint(0, hp.vocab_size, (rows * length,), generator=generator)  # guarded on strides
        return flat.to(rt.device).view(rows, length)

    net = torch.compile(model, dynamic=False, fullgraph=True)
    logits_fn = torch.compile(model.forward_logits, dynamic=False, fullgraph=True)
    sliding_batch = max(1, micro_batch_seqs(hp.val_batch_tokens, seq_len))
    plain = plain_eval_batches(num_tokens, hp, rt)
    model.eval()
    with torch.no_grad(), autocast(rt):
        for loops, rows in itertools.product(dict.fromkeys((hp.num_loops, *hp.eval_loops)), plain):
            with model.looping(loops):
                flat = tokens(1, rows * seq_len + 1)[0]  # `evaluate`: views of one flat span
                net(flat[:-1].view(-1, seq_len), flat[1:].view(-1, seq_len))
        if hp.sliding_window_enabled:
            logits_fn(tokens(sliding_batch, seq_len))  # `score_windows`: a padded [batch, seq_len] array
    phased = hp.ttt_enabled and hp.ttt_mode == "phased"
    ttt_rows = ttt_step_rows(num_tokens, hp, rt) if hp.ttt_enabled and not phased and hp.ttt_epochs > 0 else []
    model.train()
    for rows in ttt_rows:
        chunk = tokens(rows, seq_len + 1)  # `ttt_step`: slices of [rows, seq_len + 1]
        with autocast(rt):
            loss = net(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
    doc_rows = phased_batch_rows(num_docs, hp) if phased else []
    widths = warm_up_phased(model, tokens, doc_rows, hp, rt, generator) if phased else []
    del model, net, logits_fn
    synchronize(rt.device)
    if rt.distributed:
        dist.barrier()  # every rank starts the eval timer together
    log(f"eval_warmup: random tokens (seed {EVAL_WARMUP_SEED}), seq_len {hp.eval_seq_len}: plain batches {plain} "
        f"at loops {list(dict.fromkeys((hp.num_loops, *hp.eval_loops)))}, sliding batch "
        f"{sliding_batch if hp.sliding_window_enabled else '-'}, TTT steps {ttt_rows}, phased TTT documents "
        f"{doc_rows} x widths {widths}; "
        f"{compiled_graph_count() - graphs} graph(s) compiled in {time.perf_counter() - t0:.1f}s (not timed)")


def timed_load(label: str, path: Path, hp: Hyperparameters, rt: Runtime, log: RunLog) -> GPT:
    """load_artifact (read, decompress, check, dequantize, to the device) as a timed phase: `{label}_ms`."""
    synchronize(rt.device)
    t0 = time.perf_counter()
    model = load_artifact(path, hp, rt)
    synchronize(rt.device)
    ms = round(1000.0 * (time.perf_counter() - t0))
    log(f"{label}: {path} read, decompressed and loaded in {ms}ms")
    log.metric(**{f"{label}_ms": ms})
    return model


# The phases a submission's score needs, whose time counts against CHALLENGE_SECONDS: from reading the artifact
# to the last score (EVAL_LOOPS's extra scores are diagnostics and do not count; the warm-up is not timed).
SCORED_EVAL_PHASES = ("artifact_load_ms", "post_quant_eval_ms", "ngram_hint_ms", "sliding_eval_ms", "ttt_reload_ms",
                      "ttt_eval_ms")


def report_eval_total(log: RunLog, graphs_compiled: int) -> None:
    """One line with the counted phases, their sum against CHALLENGE_SECONDS, and the graphs compiled while timed."""
    metrics = log.result["metrics"]
    phases = {k: metrics[k] for k in SCORED_EVAL_PHASES if k in metrics}
    total = sum(phases.values())
    parts = ", ".join(f"{k.removesuffix('_ms')} {v}" for k, v in phases.items())
    log(f"eval_total: {total}ms of {1000.0 * CHALLENGE_SECONDS:.0f}ms ({parts}); "
        f"{graphs_compiled} graph(s) compiled inside the timed evaluation")
    log.metric(eval_total_ms=total, eval_graphs_compiled=graphs_compiled)


def report_ttt_deadline(deadline: TTTDeadline, hp: Hyperparameters, log: RunLog) -> None:
    metrics = deadline.metrics()
    log(f"ttt_deadline: {hp.ttt_deadline_seconds:g}s {'HIT' if metrics['ttt_deadline_hit'] else 'not reached'}: "
        f"{deadline.unadapted_docs} documents in {deadline.unadapted_batches} batches scored without adaptation, "
        f"{deadline.skipped_phases} global phase(s) skipped")
    log.metric(**metrics)


def evaluate_artifact(path: Path, val: Validation, pre_quant_bpb: Optional[float], hp: Hyperparameters, rt: Runtime,
                      log: RunLog) -> None:
    """Every score of the artifact read back from disk: plain, at EVAL_LOOPS, sliding windows, TTT (full or
    phased: its metrics are ttt_*, whichever mode). No quantization gap without the pre-quantization score."""
    phased = hp.ttt_enabled and hp.ttt_mode == "phased"  # its shapes need the document count, not the tokens
    warm_up_eval(len(val.tokens), hp, rt, log, len(val_documents(val.tokens).starts) if phased else 0)
    graphs, started = compiled_graph_count(), time.perf_counter()  # the eval timer starts with the artifact load
    model = timed_load("artifact_load", path, hp, rt, log)
    net = torch.compile(model, dynamic=False, fullgraph=True) if rt.compile else model
    loss, bpb, ms = timed_eval("quantized", lambda: evaluate(net, val, hp, rt), log, rt)
    log.metric(post_quant_val_loss=loss, post_quant_val_bpb=bpb, post_quant_eval_ms=ms)
    if pre_quant_bpb is not None:  # None under EVAL_ARTIFACT: the file's unquantized model is not at hand
        log.metric(quantization_gap_bpb=bpb - pre_quant_bpb)
    for loops in hp.eval_loops:
        with model.looping(loops):
            loss, bpb, ms = timed_eval(f"quantized_loops{loops}", lambda: evaluate(net, val, hp, rt), log, rt)
        log.metric(**{f"loops{loops}_val_loss": loss, f"loops{loops}_val_bpb": bpb, f"loops{loops}_eval_ms": ms})
    tilt = build_ngram_tilt(val, hp, rt, log) if hp.ngram_tilt else None
    if hp.sliding_window_enabled:
        loss, bpb, ms = timed_eval("quantized_sliding_window", lambda: score_first_eval(model, val, hp, rt, 0, tilt=tilt),
                                   log, rt)
        log.metric(sliding_val_loss=loss, sliding_val_bpb=bpb, sliding_eval_ms=ms)
    if hp.ttt_enabled:
        model = timed_load("ttt_reload", path, hp, rt, log)  # TTT changes the weights: start again from the file
        deadline = TTTDeadline(started + hp.ttt_deadline_seconds) if phased and hp.ttt_deadline_seconds > 0 else None
        if hp.ttt_mode == "phased":
            label, score = "quantized_phased_ttt", lambda: phased_ttt_eval(model, val, hp, rt, log, tilt=tilt,
                                                                           deadline=deadline)
        else:
            label, score = "quantized_ttt", lambda: score_first_eval(model, val, hp, rt, hp.ttt_epochs, tilt=tilt)
        loss, bpb, ms = timed_eval(label, score, log, rt)
        log.metric(ttt_val_loss=loss, ttt_val_bpb=bpb, ttt_eval_ms=ms)
        if deadline is not None:
            report_ttt_deadline(deadline, hp, log)
    report_eval_total(log, compiled_graph_count() - graphs)


# -----------------------------------------------------------------------------------------------
# main: configure, load data, train, evaluate, record.
# -----------------------------------------------------------------------------------------------


def log_configuration(hp: Hyperparameters, rt: Runtime, log: RunLog) -> None:
    log("Hyperparameters:")
    for name, value in sorted(hp.as_dict().items()):
        log(f"  {name}: {value}")
    log(f"runtime: world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum_steps} device:{device_name(rt.device)} "
        f"compile:{int(rt.compile)} activation_dtype:{str(rt.activation_dtype).removeprefix('torch.')}")
    log(f"attention: {rt.attn_backend}")
    if hp.doc_attention and FLASH_ATTN_3 is not None and FLASH_ATTN_3_VARLEN is None:
        log("attention: this FlashAttention 3 build has no flash_attn_varlen_func; DOC_ATTENTION runs on flex_attention")


def log_model(model: GPT, log: RunLog) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    plan, loops = model.plan, model.hp.num_loops
    log(f"model_params:{n_params} virtual_layers:{len(plan.virtual_layers(loops))} {plan.describe(loops)}")
    log.update(model_params=n_params)


def post_training(trainer: Trainer, val: Validation, code_bytes: int) -> bool:
    """Artifact, then the scores of the model loaded back from it. Returns whether the budget holds."""
    hp, rt, log = trainer.hp, trainer.rt, trainer.log
    pre_loss, pre_bpb, pre_ms = timed_eval("pre-quantization post-ema", lambda: trainer.val_score(val), log, rt)
    log.metric(pre_quant_val_loss=pre_loss, pre_quant_val_bpb=pre_bpb, pre_quant_eval_ms=pre_ms)
    artifact = build_artifact(trainer.model, trainer.calibration_batches(hp.gptq_calibration_batches), code_bytes,
                              hp, rt, log)
    train_plus_gptq_ms = log.result["train_time_ms"] + 1000.0 * artifact["gptq_total_s"]
    log(f"train+gptq: {train_plus_gptq_ms:.0f}ms of {1000.0 * CHALLENGE_SECONDS:.0f}ms")
    log.update(**artifact, train_plus_gptq_ms=round(train_plus_gptq_ms))
    evaluate_artifact(Path(ARTIFACT_PATH), val, pre_bpb, hp, rt, log)
    log.update(compliance=compliance(log.result))
    return not artifact["artifact_over_budget"] or hp.allow_over_budget


def eval_compliance(metrics: dict) -> dict:
    """The evaluation's limit: its counted phases against CHALLENGE_SECONDS."""
    eval_ms = sum(metrics.get(k, 0) for k in SCORED_EVAL_PHASES)
    return dict(eval_under_600s=eval_ms <= 1000.0 * CHALLENGE_SECONDS, eval_ms=eval_ms)


def compliance(result: dict) -> dict:
    """The challenge's limits, checked on this run's own numbers (tools/package_record.py reads them)."""
    return dict(train_plus_gptq_under_600s=result["train_plus_gptq_ms"] <= 1000.0 * CHALLENGE_SECONDS,
                **eval_compliance(result["metrics"]),
                artifact_under_16mb=result["total_bytes"] <= SUBMISSION_LIMIT_BYTES,
                no_train_val_overlap=result.get("data_check", {}).get("overlap_docs") == 0)


def evaluate_only(val: Validation, hp: Hyperparameters, rt: Runtime, log: RunLog) -> None:
    """EVAL_ARTIFACT: score an existing artifact, as a training run scores its own, without training or GPTQ, so
    one trained file can be scored several ways. Its compliance is the evaluation's alone (the file's training
    time and size are the run's that made it); which file was scored is recorded by path, size and hash."""
    path = Path(hp.eval_artifact)
    blob = path.read_bytes()
    log(f"eval_artifact: scoring {path} ({len(blob)} bytes); training and GPTQ skipped")
    log.update(eval_artifact=dict(path=str(path.resolve()), bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest()))
    evaluate_artifact(path, val, None, hp, rt, log)
    log.update(compliance=eval_compliance(log.result["metrics"]), status="completed")


def run(hp: Hyperparameters, rt: Runtime) -> bool:
    code = Path(__file__).read_text(encoding="utf-8")
    counted = counted_code(code)
    log = RunLog(hp, rt, code)
    log_configuration(hp, rt, log)
    log_counted_code(counted, len(code.encode("utf-8")), log)
    try:
        sp = load_tokenizer(hp)
        val = load_validation(hp, sp, log)
        if hp.eval_artifact:
            evaluate_only(val, hp, rt, log)
            return True
        check_train_val_overlap(hp, rt, log)
        trainer = Trainer(hp, rt, log)
        log_model(trainer.model, log)
        log(f"train_shards: {len(trainer.train_files)} val_tokens: {len(val.tokens) - 1}")
        trainer.warm_up()
        trainer.train(val, gptq_reserve_seconds(trainer, hp, rt, log))
        within_budget = post_training(trainer, val, counted.size)
        log.update(status="completed" if within_budget else "over_budget")
        return within_budget
    except BaseException as exc:
        log.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise


def main() -> None:
    try:
        hp = Hyperparameters.from_env(os.environ)
        rt = init_runtime(hp, os.environ)
    except ConfigError as exc:
        sys.exit(f"train_gpt.py: configuration error: {exc}")
    try:
        within_budget = run(hp, rt)
        if rt.distributed:
            dist.barrier()  # no rank tears the process group down while another is still finishing
        if not within_budget:
            sys.exit(f"train_gpt.py: the submission is over {hp.artifact_limit_bytes} bytes (see the log); "
                     "set ALLOW_OVER_BUDGET=1 for an exploratory run")
    except DataError as exc:
        sys.exit(f"train_gpt.py: data error: {exc}")
    except ArtifactError as exc:
        sys.exit(f"train_gpt.py: artifact error: {exc}")
    finally:
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
