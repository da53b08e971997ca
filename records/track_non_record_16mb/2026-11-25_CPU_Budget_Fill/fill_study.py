"""Budget-fill study: does spending spare bytes with BUDGET_FILL buy post-quantization bpb, and what does it choose?

  python3 fill_study.py train OUT.pt     # train the small CPU model once; save its EMA state and GPTQ Hessians
  python3 fill_study.py measure OUT.pt   # for several spare amounts and both coders: fill, then score
  python3 fill_study.py levers OUT.pt    # each fill lever alone and all together (pergroup): fill, then score

For each spare amount the filler (tg.fit_to_budget with BUDGET_FILL=1, exactly as in a run, code bytes 0) grows
GPTQ's artifact; as a control, one uniform clip tightening of every group (tg.scaled_clips) spends about the same
bytes. Knobs come from the environment like train_gpt.py (see README.md here for the command).
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "2026-11-25_CPU_Budget_Fitter"))
import train_gpt as tg  # noqa: E402
from study import score, setup, train  # noqa: E402  (the budget-fitter study's: same model, same training)

SPARE_BYTES = (5_000, 10_000, 20_000)
LEVER_SETS = ("clip", "lqer", "awq", "clip,lqer,awq")  # BUDGET_FILL_LEVERS of the `levers` study
LEVER_SPARES = (5_000, 20_000)
LEVER_TRIES = 16  # an LQER rank is ~250 bytes on this model: the default 4 tries could not show what it buys


def uniform_control(model: tg.GPT, hessians: dict, hp: tg.Hyperparameters, budget: int) -> tuple[dict, int, float]:
    """Every clip sigma times one factor (0.25% steps down), the tightest whose bytes still fit `budget`."""
    best = None
    for k in range(1, 80):
        quantized = tg.quantize_state(model, hessians, tg.scaled_clips(hp, 1 - 0.0025 * k))
        size = len(tg.serialize_artifact(quantized, hp))
        if size > budget:
            break
        best = (quantized, size, 1 - 0.0025 * k)
    return best


def measure(saved: Path) -> None:
    hp, rt, _, val = setup()
    data = torch.load(saved)
    model = tg.GPT(hp, rt.attn_backend, rt.activation_dtype)
    model.load_state_dict(data["state"])
    hessians = data["hessians"]
    base = tg.quantize_state(model, hessians, hp)
    print(json.dumps(dict(kind="gptq", bpb=round(score(base, hp, rt, val), 5))), flush=True)
    for compressor in ("pergroup", "brotli"):
        chp = tg.dataclasses.replace(hp, compressor=compressor, budget_margin_bytes=0, budget_fill=True)
        t0 = time.perf_counter()
        base_bytes = len(tg.serialize_artifact(base, chp))
        print(json.dumps(dict(compressor=compressor, base_bytes=base_bytes,
                              one_compression_s=round(time.perf_counter() - t0, 2))), flush=True)
        for spare in SPARE_BYTES:
            fhp = tg.dataclasses.replace(chp, artifact_limit_bytes=base_bytes + spare)
            t0 = time.perf_counter()
            filled, blob, report = tg.fit_to_budget(model, base, hessians, fhp, 0, lambda line: print(line, flush=True))
            seconds = round(time.perf_counter() - t0, 1)
            print(json.dumps(dict(compressor=compressor, spare=spare, kind="fill", spent=len(blob) - base_bytes,
                                  bpb=round(score(filled, hp, rt, val), 5), seconds=seconds, tries=report["tries"],
                                  knobs=report["knobs"])), flush=True)
            control = uniform_control(model, hessians, chp, len(blob)) if compressor == "pergroup" else None
            if control:
                print(json.dumps(dict(compressor=compressor, spare=spare, kind="uniform", factor=round(control[2], 3),
                                      spent=control[1] - base_bytes, bpb=round(score(control[0], hp, rt, val), 5))),
                      flush=True)


def levers(saved: Path) -> None:
    """Each lever alone, and all three, at LEVER_SPARES with pergroup and LEVER_TRIES tries: every decision
    (predicted vs measured bytes, predicted error), the fill's time, and the filled state's bpb."""
    hp, rt, _, val = setup()
    data = torch.load(saved)
    model = tg.GPT(hp, rt.attn_backend, rt.activation_dtype)
    model.load_state_dict(data["state"])
    # AWQ-lite on with no group of its own: GPTQ's state is the default one (LQER on), and the awq lever may add groups
    hp = tg.dataclasses.replace(hp, compressor="pergroup", budget_margin_bytes=0, budget_fill=True,
                                budget_fill_tries=LEVER_TRIES, awq_lite_enabled=True, awq_lite_group_top_k=0)
    hessians = data["hessians"]
    base = tg.quantize_state(model, hessians, hp)
    base_bytes = len(tg.serialize_artifact(base, hp))
    print(json.dumps(dict(kind="gptq", base_bytes=base_bytes, bpb=round(score(base, hp, rt, val), 5))), flush=True)
    for spare in LEVER_SPARES:
        for levers in LEVER_SETS:
            fhp = tg.dataclasses.replace(hp, artifact_limit_bytes=base_bytes + spare, budget_fill_levers=levers)
            filled, blob, report = tg.fit_to_budget(model, base, hessians, fhp, 0, lambda line: print(line, flush=True))
            print(json.dumps(dict(levers=levers, spare=spare, spent=len(blob) - base_bytes, seconds=report["seconds"],
                                  tries=report["tries"], kept=sum(d["accepted"] for d in report["fill"]),
                                  hessian_error=report["hessian_error"], bpb=round(score(filled, hp, rt, val), 5),
                                  decisions=report["fill"])), flush=True)


if __name__ == "__main__":
    {"train": train, "measure": measure, "levers": levers}[sys.argv[1]](Path(sys.argv[2]))
