"""Budget-fitter study: what does each shrinking method cost in post-quantization val bpb per KB shaved?

  python3 study.py train OUT.pt        # train the small CPU model once; save its EMA state and GPTQ Hessians
  python3 study.py measure OUT.pt      # for several shave amounts, fit with each method and score the result

Both phases read the knobs from the environment like train_gpt.py (see README.md here for the command).
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import train_gpt as tg  # noqa: E402

SHAVE_FRACTIONS = (0.01, 0.02, 0.05, 0.10)


def setup() -> tuple[tg.Hyperparameters, tg.Runtime, tg.RunLog, tg.Validation]:
    hp = tg.Hyperparameters.from_env(os.environ)
    rt = tg.init_runtime(hp, os.environ)
    log = tg.RunLog(hp, rt, Path(tg.__file__).read_text())
    val = tg.load_validation(hp, tg.load_tokenizer(hp), log)
    return hp, rt, log, val


def train(out: Path) -> None:
    hp, rt, log, val = setup()
    trainer = tg.Trainer(hp, rt, log)
    trainer.warm_up()
    trainer.train(val, tg.gptq_reserve_seconds(trainer, hp, rt, log))
    with trainer.model.looping(hp.num_loops):
        hessians = tg.collect_hessians(trainer.model, trainer.calibration_batches(hp.gptq_calibration_batches), rt)
    torch.save(dict(state=trainer.model.state_dict(), hessians=hessians), out)


def score(quantized: dict, hp: tg.Hyperparameters, rt: tg.Runtime, val: tg.Validation) -> float:
    model = tg.GPT(hp, rt.attn_backend, rt.activation_dtype)
    model.load_state_dict(tg.dequantize_state(quantized), strict=True)  # evaluated at NUM_LOOPS
    return tg.evaluate(model, val, hp, rt)[1]


def measure(saved: Path) -> None:
    hp, rt, log, val = setup()
    data = torch.load(saved)
    model = tg.GPT(hp, rt.attn_backend, rt.activation_dtype)
    model.load_state_dict(data["state"])
    base = tg.quantize_state(model, data["hessians"], hp)
    t0 = time.perf_counter()
    base_bytes = len(tg.serialize_artifact(base, hp))
    compress_s = time.perf_counter() - t0
    rows = [dict(method="none", shaved=0, bpb=score(base, hp, rt, val))]
    print(json.dumps(dict(base_bytes=base_bytes, one_compression_s=round(compress_s, 1), **rows[-1])), flush=True)
    for method in tg.FIT_METHODS:
        for frac in SHAVE_FRACTIONS:
            budget = base_bytes - round(frac * base_bytes)
            t0 = time.perf_counter()
            shrinker = (tg.prune_shrinker(base, data["hessians"]) if method == "prune"
                        else tg.clip_shrinker(model, data["hessians"], base, hp))
            found = tg.search_amount(shrinker, hp, base_bytes, budget)
            seconds = time.perf_counter() - t0
            if found is None:
                print(json.dumps(dict(method=method, target_shave=base_bytes - budget, cannot_fit=True,
                                      seconds=round(seconds, 1))), flush=True)
                continue
            rows.append(dict(method=method, target_shave=base_bytes - budget, shaved=base_bytes - len(found["blob"]),
                             bpb=score(found["quantized"], hp, rt, val), seconds=round(seconds, 1),
                             tries=found["tries"], amount=found["amount"]))
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    {"train": train, "measure": measure}[sys.argv[1]](Path(sys.argv[2]))
