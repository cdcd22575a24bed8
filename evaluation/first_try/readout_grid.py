"""Sentiment on held-out prompts over a layer × dose grid, read two ways: past the pairs'
midpoint at their own position (what calibration uses), and past a token-level midpoint (the
mean projection of every token but the first of the positive and of the negative examples).
A server on port 18800 with its store in /tmp/exp/store (EVALUATION.md, "First try").

    python readout_grid.py METHOD POSITION LAYERS DOSES held|calibration SAMPLES
"""
import json, sys, statistics
import httpx, numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from steer_server.default_model import default_model_dir
from steer_server.measure.data import neutral_prompts, calibration_prompts, sentiment_pairs_file
from vector_store.sqlite import SqliteVectorStore

URL = "http://127.0.0.1:18800"
http = httpx.Client(base_url=URL, timeout=3600)
model_name = http.get("/v1/models").json()["data"][0]["id"]
r = http.post("/v1/steering/vectors", params={"name": "sentiment", "layers": "all", "method": sys.argv[1], "position": sys.argv[2]},
              content=sentiment_pairs_file().read_bytes(), headers={"Content-Type": "application/jsonl"})
r.raise_for_status(); vec = r.json()
store = SqliteVectorStore("/tmp/exp/store")
layers = [int(x) for x in sys.argv[3].split(",")]
doses = [float(x) for x in sys.argv[4].split(",")]
prompts = neutral_prompts() if sys.argv[5] == "held" else calibration_prompts()[:8]
samples = int(sys.argv[6])
tok = AutoTokenizer.from_pretrained(default_model_dir())
hf = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
pairs = [json.loads(l) for l in sentiment_pairs_file().read_text().splitlines() if l.strip()]
units, mids = {}, {}
for L in layers:
    u = store.get(vec["id"]).directions[L].double().reshape(-1); u /= u.norm(); units[L] = u
for side in ("positive", "negative"):
    for p in pairs:
        ids = tok(p[side], return_tensors="pt").input_ids
        with torch.no_grad():
            hs = hf(input_ids=ids, output_hidden_states=True).hidden_states
        for L in layers:
            proj = (hs[L][0, 1:].double() @ units[L])
            mids.setdefault((L, side), []).extend(proj.tolist())
tokmid = {L: (statistics.fmean(mids[(L, "positive")]) + statistics.fmean(mids[(L, "negative")])) / 2 for L in layers}
lastmid = {L: vec["stats"][str(L)]["midpoint"] for L in layers}
print("midpoints last", lastmid, "tok", tokmid, flush=True)
def gen(steering):
    out = []
    for prompt in prompts:
        body = {"model": model_name, "prompt": prompt, "max_tokens": 32, "n": samples, "temperature": 1.0, "top_p": 0.3,
                "repetition_penalty": 1.2, "return_token_ids": True}
        if steering: body["steering"] = steering
        a = http.post("/v1/completions", json=body).raise_for_status().json()
        out += [(c["prompt_token_ids"], c["token_ids"]) for c in a["choices"]]
    return out
def score(items, L):
    a, b, nll = [], [], []
    for p, t in items:
        if not t: continue
        with torch.no_grad():
            o = hf(input_ids=torch.tensor([p + t]), output_hidden_states=True)
        s = o.hidden_states[L][0, len(p):].double() @ units[L]
        a.append(float((s > lastmid[L]).double().mean())); b.append(float((s > tokmid[L]).double().mean()))
        lp = torch.log_softmax(o.logits[0, len(p)-1:-1].double(), -1)
        nll.append(-float(lp.gather(1, torch.tensor(t)[:, None]).mean()))
    return statistics.fmean(a), statistics.fmean(b), statistics.fmean(nll)
base = gen(None)
for L in layers:
    b = score(base, L)
    print(f"L{L} unsteered last={b[0]:.3f} tok={b[1]:.3f} nll={b[2]:.2f}", flush=True)
    for d in doses:
        s = score(gen({"mode": "constant", "additions": [{"vector": "sentiment", "layer": L, "dose": d}]}), L)
        print(f"L{L} d{d} last={s[0]:.3f} ({s[0]-b[0]:+.3f}) tok={s[1]:.3f} ({s[1]-b[1]:+.3f}) cost={s[2]-b[2]:+.2f}", flush=True)
