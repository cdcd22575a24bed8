"""`steer-server eval` against ONE real server (the default SmolLM2-135M-Instruct, eager).

The model must be a real one: the question is whether a steering that works shows up as
working (topic share above unsteered) and a random vector of equal norm does not. Fluency
and relevance numbers are checked against plain transformers on the same weights.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from default_server import ADMIN_KEY

pytestmark = pytest.mark.slow

BOS = "<|endoftext|>"
# A setting `steer-server eval paper` found to steer this model (see EVALUATION.md).
LAYER, COEFF = 18, 4.0
PROMPTS = 8
SAMPLES = 4


@pytest.fixture(scope="module")
def server(fp32_default_server) -> SimpleNamespace:
    """The session's float32 default-model server (tests/default_server.py), with its admin key."""
    return SimpleNamespace(url=fp32_default_server.url, api_key=ADMIN_KEY)


def run(coro):
    return asyncio.run(coro)


def wedding_plan(**overrides):
    from steer_server.eval import PromptAdditions, Sampling, SweepPlan, neutral_prompts, wedding_lexicon

    plan = dict(
        steering=PromptAdditions(((BOS + " weddings", 1.0), (BOS + " ", -1.0))),
        prompts=tuple(BOS + p for p in neutral_prompts()[:PROMPTS]), layers=(LAYER,), coeffs=(COEFF,),
        lexicon=wedding_lexicon(), sampling=Sampling(max_tokens=24, samples=SAMPLES),
    )
    return SweepPlan(**(plan | overrides))


async def _sweep(server, plan, out: Path):
    from steer_server.eval import SteerClient, run_sweep

    async with SteerClient(server.url, server.api_key) as client:
        return await run_sweep(client, plan, out)


@pytest.fixture(scope="module")
def wedding_sweep(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("wedding-sweep")
    return run(_sweep(server, wedding_plan(), out)), out


def test_steering_raises_topic_share_and_random_floor_does_not(wedding_sweep):
    result, _ = wedding_sweep
    unsteered = result.cell("unsteered").summary["topic"]
    steered = result.cell("steered", LAYER, COEFF).summary["topic"]
    floor = result.cell("random", LAYER, COEFF).summary["topic"]
    assert unsteered.n == steered.n == floor.n == PROMPTS * SAMPLES
    # Sampled without a per-request seed (vLLM's CPU build refuses one), so the bounds are
    # one-sided: the steered share's 95% lower bound lies above both other shares.
    assert steered.low > unsteered.value, (unsteered, steered)
    assert abs(floor.value - unsteered.value) <= 0.1, (unsteered, floor)
    assert steered.low > floor.value, (floor, steered)


@pytest.fixture(scope="module")
def reference_model():
    """The served weights in plain transformers (fp32, as the server runs them here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steer_server.default_model import default_model_dir

    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer, AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


def _answer_logprobs(model, context: list[int], answer: list[int]) -> list[float]:
    """log p(each answer token | context, the answer tokens before it)."""
    import torch

    ids = torch.tensor([context + answer])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return logprobs[torch.arange(len(targets)), targets][len(context) - 1:].tolist()


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()[1:]]


def test_fluency_is_the_unsteered_models_nll_of_the_sampled_tokens(wedding_sweep, reference_model):
    """Recompute a steered unit's NLLs with plain transformers on the served weights, from the
    sampled token ids the sweep journals."""
    result, out = wedding_sweep
    record = next(r for r in _records(out) if r["key"].startswith("steered@") and r["key"].endswith("#prompt=0"))
    tokenizer, model = reference_model
    prompt_ids = tokenizer(result.plan.prompts[0], add_special_tokens=True)["input_ids"]
    assert record["prompt_token_ids"] == prompt_ids
    assert [len(ids) for ids in record["token_ids"]] == record["tokens"]
    for answer, nll in zip(record["token_ids"], record["nll"]):
        per_token = _answer_logprobs(model, prompt_ids, answer)
        # fp32 on both sides; reading the log-probabilities one position off moves this by ~0.05
        assert nll == pytest.approx(-sum(per_token) / len(per_token), abs=0.01)


def test_relevance_is_the_pmi_of_prompt_and_answer_under_the_unsteered_model(wedding_sweep, reference_model):
    """Per completion: mean log p(answer token | prompt) − mean log p(answer token | <|endoftext|>
    alone), recomputed with plain transformers on the journaled token ids."""
    result, out = wedding_sweep
    tokenizer, model = reference_model
    # SmolLM2's tokenizer adds no BOS, so a text with nothing before it starts after the
    # one-token document separator
    assert tokenizer("Hello")["input_ids"] == tokenizer("Hello", add_special_tokens=False)["input_ids"]
    start = tokenizer(BOS, add_special_tokens=False)["input_ids"]
    assert len(start) == 1
    checked = 0
    for record in _records(out):
        if not record["key"].endswith(("#prompt=0", "#prompt=5")):
            continue
        prompt = record["prompt_token_ids"]
        assert prompt[:1] == start  # the sweep's prompts start with it too
        for answer, pmi in zip(record["token_ids"], record["pmi"]):
            after_prompt = _answer_logprobs(model, prompt, answer)
            alone = _answer_logprobs(model, start, answer)
            assert pmi == pytest.approx(sum(after_prompt) / len(answer) - sum(alone) / len(answer), abs=0.01)
            checked += 1
    assert checked == 3 * 2 * SAMPLES  # unsteered, steered and random cells × 2 prompts
    # plain answers depend on their prompts: the unsteered cell's PMI is clearly positive
    assert result.cell("unsteered").summary["relevance"].low > 0


def test_sweep_outputs_are_written_and_readable(wedding_sweep, tmp_path):
    import matplotlib.image

    from steer_server.eval.report import write_outputs
    from steer_server.measure.sweep import METRICS

    result, _ = wedding_sweep
    written = write_outputs(result, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {(c["arm"], c["layer"], c["coeff"]) for c in summary["cells"]} == {
        ("unsteered", None, None), ("steered", LAYER, COEFF), ("random", LAYER, COEFF)}
    assert set(summary["cells"][0]["metrics"]) == set(METRICS)
    cells = {c["arm"]: c["metrics"] for c in summary["cells"]}
    plain = cells["unsteered"]
    for arm, m in cells.items():  # the scores, from the summary's own numbers
        fluency = min(1.0, math.exp(plain["nll"]["value"] - m["nll"]["value"]))
        relevance = min(1.0, max(0.0, m["relevance"]["value"] / plain["relevance"]["value"]))
        topic = m["topic"]["value"]
        harmonic = 0.0 if 0.0 in (topic, fluency, relevance) else 3 / (1 / topic + 1 / fluency + 1 / relevance)
        assert m["fluency_score"]["value"] == pytest.approx(fluency), arm
        assert m["relevance_score"]["value"] == pytest.approx(relevance), arm
        assert m["harmonic"]["value"] == pytest.approx(harmonic), arm
    for name in METRICS:
        image = matplotlib.image.imread(tmp_path / f"heatmap_{name}.png")
        assert image.shape[0] > 50 and image.shape[1] > 50
    assert len(written) == 1 + len(METRICS)


def test_records_from_before_relevance_resume_with_it_missing(server, wedding_sweep, tmp_path):
    """An output directory journaled without "pmi" (evaluation/ holds such) finishes without new
    units: relevance and the scores that need it are missing, the rest as measured."""
    result, out = wedding_sweep
    old = tmp_path / "old"
    old.mkdir()
    header, *lines = (out / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    kept = {"key", "texts", "nll", "tokens"}  # what a record held before token ids and relevance
    (old / "records.jsonl").write_text("\n".join([header, *(json.dumps({k: r[k] for k in kept}) for r in records)]) + "\n")
    resumed = run(_sweep(server, wedding_plan(), old))
    assert len((old / "records.jsonl").read_text().splitlines()) == 1 + len(records)  # nothing redone
    for before, after in zip(result.cells, resumed.cells):
        assert after.summary["topic"] == before.summary["topic"]
        assert after.summary["nll"] == before.summary["nll"]
        assert after.summary["relevance"].value is None and after.summary["relevance"].n == 0
        assert after.summary["relevance_score"].value is None and after.summary["harmonic"].value is None
        assert after.summary["fluency_score"] == before.summary["fluency_score"]


def test_random_floor_has_the_steerings_row_norms(server):
    from steer_server.eval import SteerClient
    from steer_server.measure.steerings import random_floor

    steering = wedding_plan().steering

    async def norms():
        async with SteerClient(server.url, server.api_key) as client:
            floor = await random_floor(client, steering, [LAYER], seed=3)
            reference = await steering.reference_vector(client, LAYER)
            uploaded = await client.vector(floor.vector_of_layer[LAYER], norms=True)
            return reference, uploaded

    reference, uploaded = run(norms())
    assert uploaded["layers"] == [LAYER]
    assert uploaded["row_norms"][str(LAYER)] == pytest.approx(reference["row_norms"][str(LAYER)], rel=1e-5)


def test_cli_sweep_resumes_after_an_interruption(server, tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "steer_server.cli", "eval", "sweep", "--url", server.url,
               *(["--api-key", server.api_key] if server.api_key else []), "--bos", BOS, "--add", " weddings", "1", "--add", " ", "-1",
               "--layers", str(LAYER), "--coeffs", f"{COEFF:g}", "--samples", "2", "--max-tokens", "8", "-o", str(out)]
    wide = dict(os.environ, COLUMNS="200")  # rich wraps its table to the terminal's width
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=wide)
    assert first.returncode == 0, first.stderr
    assert "topic share" in first.stdout and "unsteered" in first.stdout
    assert json.loads((out / "summary.json").read_text())["layers"] == [LAYER]
    records = out / "records.jsonl"
    lines = records.read_text().splitlines()
    units = 3 * 16  # unsteered, steered, random × the 16 shipped prompts
    assert len(lines) == 1 + units
    # Interrupt: keep the header and 10 units, and half of an 11th line.
    records.write_text("\n".join(lines[:11]) + "\n" + lines[11][: len(lines[11]) // 2])
    second = subprocess.run(command, capture_output=True, text=True, timeout=600, env=wide)
    assert second.returncode == 0, second.stderr
    resumed = [line for line in records.read_text().splitlines() if line.strip()]
    assert resumed[:11] == lines[:11]  # finished units kept, not redone
    keys = [json.loads(line)["key"] for line in resumed[1:] if line.endswith("}") and line.startswith('{"key"')]
    assert len(keys) == units and len(set(keys)) == units
    # A different sweep refuses the directory instead of mixing records.
    other = subprocess.run([*command[:-2], "--seed", "1", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert other.returncode == 1 and "different run" in other.stderr


def test_paper_pipeline_writes_a_readable_report(server, tmp_path):
    """The paper command's whole path at toy size (3 layers, 2 prompts × 2 samples of 8 tokens)."""
    import matplotlib.image

    from steer_server.eval import PaperSettings, SteerClient, run_paper
    from steer_server.eval.paper_report import write_report

    settings = PaperSettings(layer_stride=15, topic_coeff=COEFF, topic_coeffs=(1.0, COEFF), sentiment_coeff=5.0,
                             prompts=2, samples=2, max_tokens=8)

    async def paper():
        async with SteerClient(server.url, server.api_key) as client:
            return await run_paper(client, settings, tmp_path)

    result = run(paper())
    assert result.bos == BOS  # SmolLM2's tokenizer adds none; <|endoftext|> is one token
    assert result.topic_layers.plan.layers == (0, 15, 30)  # learned from the server: 30 blocks
    report = write_report(result, tmp_path, "steer-server eval paper (test)")
    text = report.read_text()
    assert "SmolLM2-135M-Instruct" in text and "| off-topic perplexity ratio |" in text
    images = [part.split(")")[0] for line in text.splitlines() if line.startswith("![")
              for part in line.split("](")[1:]]
    assert len(images) == 5
    for image in images:
        assert matplotlib.image.imread(tmp_path / image).shape[0] > 50
    saved = json.loads((tmp_path / "paper.json").read_text())
    assert saved["best_layer"] in (0, 15, 30) and len(saved["perplexity"]["texts"]) == 34
    # The setting is chosen over every topic cell, both sweeps': the highest share within one
    # nat/token of its sweep's unsteered NLL (else of all), the smaller coefficient on a tie.
    candidates, fluent = [], []
    for sweep in ("topic_layers", "topic_coeffs"):
        cells = saved[sweep]["cells"]
        base = next(c for c in cells if c["arm"] == "unsteered")["metrics"]["nll"]["value"]
        steered = [c for c in cells if c["arm"] == "steered"]
        candidates += steered
        fluent += [c for c in steered if c["metrics"]["nll"]["value"] <= base + 1.0]
    best = max(fluent or candidates, key=lambda c: (c["metrics"]["topic"]["value"], -c["coeff"]))
    assert (saved["layer"], saved["coeff"]) == (best["layer"], best["coeff"])
    assert len(candidates) == 3 + 2
    assert f"Chosen setting: layer {saved['layer']}, coefficient {saved['coeff']:g}," in text
    assert "| relevance score | harmonic mean |" in text
    assert set(saved["treatment"]) == {"BOS, − ' '", "BOS, no negative", "no BOS, − ' '", "no BOS, no negative"}
