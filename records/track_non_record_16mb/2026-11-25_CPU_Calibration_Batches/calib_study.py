"""Calibration study: how many GPTQ calibration micro-batches does the quantized score need?

  python3 calib_study.py STATE.pt   # STATE.pt: a trained model's {'state': state_dict} (fill_study.py train writes one)

For each count N the Hessians are collected over the first N training micro-batches of a fresh loader (the
run's own calibration source, SEED-ordered), GPTQ (+ the default corrections) quantizes the state, and the
dequantized model is scored on the val split. Printed per N: tokens per Hessian column of the widest GPTQ
input, Hessian seconds, post-quantization bpb. Knobs come from the environment like train_gpt.py.
"""

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import train_gpt as tg  # noqa: E402

COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def main(saved: Path) -> None:
    hp = tg.Hyperparameters.from_env(os.environ)
    rt = tg.init_runtime(hp, os.environ)
    log = tg.RunLog(hp, rt, Path(tg.__file__).read_text())
    val = tg.load_validation(hp, tg.load_tokenizer(hp), log)
    model = tg.GPT(hp, rt.attn_backend, rt.activation_dtype)
    model.load_state_dict(torch.load(saved)["state"], strict=True)
    widest = max(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    seqs = tg.micro_batch_seqs(hp.train_batch_tokens, hp.train_seq_len)
    print(f"pre-quantization bpb {tg.evaluate(model, val, hp, rt)[1]:.5f}; micro-batch {seqs * hp.train_seq_len} tokens; "
          f"widest GPTQ input {widest}", flush=True)
    for count in COUNTS:
        loader = tg.TrainLoader(tg.find_shards(hp, "train"), hp.train_seq_len, hp.vocab_size, hp.seed, 0, 1, rt.device)
        t0 = time.perf_counter()
        with model.looping(hp.num_loops):
            hessians = tg.collect_hessians(model, (loader.next_batch(seqs)[0] for _ in range(count)), rt)
        seconds = time.perf_counter() - t0
        quantized = tg.quantize_state(model, hessians, hp)
        scored = tg.GPT(hp, rt.attn_backend, rt.activation_dtype)
        scored.load_state_dict(tg.dequantize_state(quantized), strict=True)
        bpb = tg.evaluate(scored, val, hp, rt)[1]
        print(f"N={count:3d} tokens/column {count * seqs * hp.train_seq_len / widest:9.1f} hessians {seconds:6.2f}s "
              f"post-quant bpb {bpb:.5f}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
