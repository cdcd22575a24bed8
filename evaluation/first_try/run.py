"""The first-try measurement (issue 22): a vector made in one call from a shipped pairs
dataset (sentiment or weddings), calibrated in one call, then used by name with no coefficient
on prompts it was not calibrated on, beside the unsteered model and a random vector at the same
layer, dose and positions.

Concept, sentiment: the vector's own readout, computed here in plain transformers (not by the
server): the share of each completion's generated tokens whose stream entering the vector's
layer, through the unsteered model, projects past the midpoint of the pairs it was made from.
Concept, weddings: the share of completions that mention a word of the shipped wedding lexicon
(the calibration is given the same words).
Fluency: NLL per token of the completion given the prompt under the unsteered model, also in
transformers. Intervals: 95%, normal approximation over completions.

    python evaluation/first_try/run.py --url http://127.0.0.1:8000 --out evaluation/first_try
    python evaluation/first_try/run.py --dataset wedding --position mean --out evaluation/first_try/wedding_first_try

The direction is made again here from the token ids the server stored as the vector's source,
by ``steer_server.reference.contrast_vectors`` (transformers), and its midpoint checked against
the server's: the script reads nothing from the server's store. ``--reuse`` measures a vector
already made and calibrated under that name (a run that stopped after calibrating).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from steer_server.default_model import default_model_dir
from steer_server.measure.data import (calibration_prompts, hostile_prompts, neutral_prompts, sentiment_pairs_file,
                                       wedding_lexicon, wedding_pairs_file)
from steer_server.reference import contrast_vectors

VECTORS = "/v1/steering/vectors"
PAIRS = {"sentiment": sentiment_pairs_file, "wedding": wedding_pairs_file}
MIDPOINT_TOLERANCE = 0.03
HELD_OUT = {"neutral": neutral_prompts, "hostile": hostile_prompts}  # the eval's sentence openings


def interval(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return {"value": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="-")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", choices=sorted(PAIRS), default="sentiment",
                        help="the shipped pairs the vector is made from (its name too)")
    parser.add_argument("--held-out", choices=sorted(HELD_OUT), default="neutral",
                        help="the prompts the calibrated vector is measured on (none is a calibration prompt)")
    parser.add_argument("--reuse", action="store_true", help="measure the vector already made and calibrated")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--method", default="mean_diff", help="how the vector is made from the pairs")
    parser.add_argument("--position", default="last", help="which token of each example: last or mean")
    parser.add_argument("--calibrate", type=json.loads, default={}, metavar="JSON",
                        help="the calibrate body (default: the server's defaults; weddings add the lexicon)")
    args = parser.parse_args()
    name = args.dataset
    lexicon = wedding_lexicon() if name == "wedding" else None
    if lexicon is not None:
        args.calibrate = {"lexicon": sorted(lexicon.entries), **args.calibrate}
    held_out = HELD_OUT[args.held_out]()
    assert not set(held_out) & set(calibration_prompts()), "held-out prompts must not be calibration prompts"
    http = httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.api_key}"}, timeout=3600)
    model_name = http.get("/v1/models").raise_for_status().json()["data"][0]["id"]

    started = time.perf_counter()
    if args.reuse:
        vector = http.get(f"{VECTORS}/{name}").raise_for_status().json()
        calibration, calibration_cells, made_s, calibrate_s = vector["calibration"], None, float("nan"), float("nan")
    else:
        created = http.post(VECTORS, params={"name": name, "layers": "all", "method": args.method,
                                             "position": args.position},
                            content=PAIRS[name]().read_bytes(), headers={"Content-Type": "application/jsonl"})
        created.raise_for_status()
        made_s = time.perf_counter() - started
        started = time.perf_counter()
        calibrated = http.post(f"{VECTORS}/{name}/calibrate", json=args.calibrate)
        if calibrated.status_code != 200:
            raise SystemExit(f"calibration refused: {calibrated.text}")
        calibrate_s = time.perf_counter() - started
        calibration = calibrated.json()["calibration"]
        calibration_cells = calibrated.json()["cells"]
        vector = http.get(f"{VECTORS}/{name}").raise_for_status().json()
    layer, dose, positions = calibration["layer"], calibration["dose"], calibration["positions"]
    server_midpoint = vector["stats"][str(layer)]["midpoint"]
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    pairs = [(list(p), list(n)) for p, n in vector["source"]["pairs"]]
    direction, reference_stats = contrast_vectors(hf, pairs, [layer], vector["method"],
                                                  vector["source"].get("position", "last"))[layer]
    unit = direction.double().numpy()
    unit /= np.linalg.norm(unit)
    # The readout uses this script's float32 midpoint. A server in bfloat16 (a CPU with bfloat16
    # instructions) makes its own about 1% apart; more than MIDPOINT_TOLERANCE means another vector.
    midpoint = reference_stats["midpoint"]
    assert abs(midpoint - server_midpoint) <= MIDPOINT_TOLERANCE * max(1.0, abs(midpoint)), \
        f"the server's midpoint {server_midpoint} is not the reference's {midpoint}"

    rng = np.random.default_rng(0)
    random_row = rng.standard_normal(vector["hidden_size"])
    floor = http.post(VECTORS, json={"name": f"{name}-random-floor", "layers": {str(layer): [random_row.tolist()]}})
    floor.raise_for_status()
    arms = {
        "unsteered": None,
        "calibrated": {"additions": [{"vector": name}]},  # by name, no coefficient
        "random floor": {"mode": "constant", "additions": [{"vector": f"{name}-random-floor", "layer": layer,
                                                            "dose": dose, "positions": positions}]},
    }
    completions: dict[str, list[tuple[list[int], list[int], str]]] = {arm: [] for arm in arms}
    for arm, steering in arms.items():
        for prompt in held_out:
            body = {"model": model_name, "prompt": prompt, "max_tokens": args.max_tokens, "n": args.samples,
                    "temperature": 1.0, "top_p": 0.3, "repetition_penalty": 1.2, "return_token_ids": True}
            if steering:
                body["steering"] = steering
            answer = http.post("/v1/completions", json=body).raise_for_status().json()
            for choice in answer["choices"]:
                completions[arm].append((choice["prompt_token_ids"], choice["token_ids"], choice["text"]))

    report = {"dataset": name, "calibration": calibration,
              "midpoint": {"reference": midpoint, "server": server_midpoint},
              "vector": {"id": vector["id"], "layers": len(vector["layers"]), "method": vector["method"],
                         "position": vector["source"].get("position", "last"), "seconds": round(made_s, 1)},
              "calibrate_seconds": round(calibrate_s, 1), "calibrate_body": args.calibrate,
              "calibration_cells": calibration_cells,
              "held_out_prompts": {"set": args.held_out, "count": len(held_out)},
              "samples": args.samples, "max_tokens": args.max_tokens, "arms": {}}
    for arm, items in completions.items():
        concept, nll = [], []
        for prompt_ids, token_ids, text in items:
            if not token_ids:
                continue
            ids = torch.tensor([prompt_ids + token_ids])
            with torch.no_grad():
                out = hf(input_ids=ids, output_hidden_states=True)
            if lexicon is not None:
                concept.append(float(lexicon.mentions(text)))
            else:
                stream = out.hidden_states[layer][0, len(prompt_ids):].double().numpy()
                concept.append(float(((stream @ unit) > midpoint).mean()))
            logp = torch.log_softmax(out.logits[0, len(prompt_ids) - 1:-1].double(), dim=-1)
            nll.append(-float(logp.gather(1, torch.tensor(token_ids)[:, None]).mean()))
        report["arms"][arm] = {"concept": interval(concept), "nll": interval(nll),
                               "examples": [text for _, _, text in items[:: max(1, len(items) // 4)]][:4]}
    base = report["arms"]["unsteered"]
    for arm in ("calibrated", "random floor"):
        report["arms"][arm]["concept_move"] = report["arms"][arm]["concept"]["value"] - base["concept"]["value"]
        report["arms"][arm]["nll_cost"] = report["arms"][arm]["nll"]["value"] - base["nll"]["value"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({arm: {k: v for k, v in r.items() if k != "examples"} for arm, r in report["arms"].items()}, indent=1))
    print(json.dumps(calibration))
    return 0


if __name__ == "__main__":
    sys.exit(main())
