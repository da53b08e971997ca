import time, torch, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import train_gpt as tg
hp = tg.Hyperparameters.from_env({})
torch.manual_seed(0)
model = tg.GPT(hp)
with torch.no_grad():
    for n, p in model.named_parameters():
        if p.ndim == 2: p.normal_(0, 0.02)
t = time.perf_counter(); q = tg.quantize_state(model, {}, hp); print("RTN", round(time.perf_counter() - t, 1), "s", flush=True)
t = time.perf_counter(); e = tg.entropy_bytes(q); print("entropy estimate", round(e), round(time.perf_counter() - t, 2), "s", flush=True)
t = time.perf_counter(); sh = tg.prune_shrinker(q, {}); print("prune ranking", sh.max_amount, round(time.perf_counter() - t, 1), "s", flush=True)
t = time.perf_counter(); sh.estimate(sh.max_amount // 3); print("one prune estimate", round(time.perf_counter() - t, 2), "s", flush=True)
raw = sum(v["codes"].numel() if "codes" in v else 2 * v["fp16"].numel() for v in q.values())
t = time.perf_counter(); b = tg.serialize_artifact(q, hp); print("raw", raw, "compressed", len(b), "brotli-11", round(time.perf_counter() - t, 1), "s", flush=True)
