"""``steer-server check``: is steering exact on this model? vLLM against plain transformers.

The model a user brings is loaded twice, in float32: by vLLM with the steer plugin (through
every hook a served request passes, after the start-up self-test) and by plain
transformers, steered there by ``steer_server.reference``, which shares no code with the
engine. One batch runs three requests side by side — unsteered, an ActAdd contrast pair
(front-aligned rows at the first positions), and constant vectors at every position of two
other layers — and each is decoded greedily by both. The verdict compares the chosen tokens
and their log-probabilities; for an architecture that is not verified in CI this is how a
user knows steering is right before serving it (the engine is allowed to load it here).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from steer_server import reference

if TYPE_CHECKING:
    from steer_server.settings import Settings

# fp32 on both sides: the engine's CPU kernels and transformers sum in different orders,
# which moves log-probabilities by ~1e-4 on tiny models and up to a few 1e-3 on real ones.
DEFAULT_TOLERANCE = 5e-3
PROMPT = "I went up to my friend and said that the weather today"
CONTRAST = ("Love", "Hate")


@dataclass
class CaseResult:
    name: str
    tokens_equal: bool
    max_logprob_diff: float  # over the tokens both engines chose alike
    changed_by_steering: bool | None = None  # None for the unsteered case

    def passed(self, tolerance: float) -> bool:
        return self.tokens_equal and self.max_logprob_diff <= tolerance and self.changed_by_steering is not False


@dataclass
class CheckReport:
    architecture: str
    num_layers: int
    tolerance: float
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(case.passed(self.tolerance) for case in self.cases)

    @property
    def max_logprob_diff(self) -> float:
        return max(case.max_logprob_diff for case in self.cases)


def start_offline_engine(model_dir: str, **engine_args):
    """A ``vllm.LLM`` with the steer plugin, proven before it is returned: every hook in every
    process is installed and ran for a steered request that added exactly."""
    from vllm import LLM

    import steer_vllm
    from steer_vllm.self_test import prove_steering_offline
    from steer_vllm.settings import load_engine_settings
    from vector_store.keys import model_fingerprint

    llm = LLM(model=model_dir, **engine_args)
    steer_vllm.check_engine(llm)
    prove_steering_offline(llm, model_fingerprint(model_dir, cache_home=load_engine_settings().cache_home))
    return llm


def stop_offline_engine(llm) -> None:
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _engine_environment(settings: Settings, store_dir: str, architecture: str) -> dict[str, str]:
    """What the check's engine processes read: this process's settings, with the check's
    store, its architecture allowed, and a small KV cache unless one is set."""
    chosen = {"store": store_dir, "allow_architectures": (architecture,),
              "vllm_cpu_kvcache_space": settings.vllm_cpu_kvcache_space or "1"}
    return settings.model_copy(update=chosen).to_env()


def _layers(num_layers: int) -> tuple[int, int, int]:
    """An ActAdd layer a third of the way in; constants at the embeddings and two thirds in."""
    return max(1, num_layers // 3), 0, max(1, (2 * num_layers) // 3)


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_model(model_dir: str, *, tokens: int = 16, tolerance: float = DEFAULT_TOLERANCE,
                enforce_eager: bool = True) -> CheckReport:
    """Steer one prompt three ways through vLLM and through transformers; compare."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from steer_server.settings import exported, load_settings
    from vector_store import StoredVector, VectorMeta, open_store
    from vector_store.keys import model_fingerprint

    architecture = (AutoConfig.from_pretrained(model_dir).architectures or ["?"])[0]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    num_layers = reference.num_layers(hf)
    hidden = hf.config.get_text_config().hidden_size
    prompt = tokenizer.encode(PROMPT)
    contrast = [tokenizer.encode(text, add_special_tokens=False) for text in CONTRAST]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    actadd_layer, first_constant, second_constant = _layers(num_layers)
    # Love - Hate at a coefficient that moves a stream of this model's own scale.
    actadd = reference.actadd_vector(hf, contrast, [1.0, -1.0], actadd_layer, pad)
    typical = float(reference.residual_stream(hf, prompt, second_constant).norm(dim=-1).median())
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    constant = direction / direction.norm()
    # One list per steered request; the reference reads the tensors, the engine stored copies.
    steered_cases = {
        "actadd": [{"mode": "actadd", "layer": actadd_layer, "vector": actadd, "coeff": 4.0}],
        "constant": [{"mode": "constant", "layer": layer, "vector": constant, "coeff": coeff, "positions": "all"}
                     for layer, coeff in ((first_constant, 1.0), (second_constant, 0.5 * typical))],
    }
    with tempfile.TemporaryDirectory(prefix="steer-check-") as store_dir, \
            exported(_engine_environment(load_settings(), store_dir, architecture)):
        store = open_store(store_dir)
        fingerprint = model_fingerprint(model_dir, cache_home=load_settings().cache_home)

        def engine_addition(addition: dict) -> dict:
            rows = addition["vector"].reshape(-1, hidden).float()
            meta = VectorMeta(fingerprint, hidden, addition["mode"], "check")
            content_id = store.put(StoredVector(meta, {addition["layer"]: rows}))
            return {"vector": content_id, **{k: v for k, v in addition.items() if k != "vector"}}

        payloads = {name: {"additions": [engine_addition(a) for a in additions]}
                    for name, additions in steered_cases.items()}
        llm = start_offline_engine(model_dir, dtype="float32", enforce_eager=enforce_eager,
                                   max_model_len=max(256, len(prompt) + tokens + 8), max_num_seqs=4, seed=0)
        try:
            names = ["unsteered", *payloads]
            sampling = [SamplingParams(max_tokens=tokens, temperature=0.0, logprobs=0, ignore_eos=True,
                                       extra_args={"steering": payloads[name]} if name in payloads else None)
                        for name in names]
            outputs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * len(names), sampling, use_tqdm=False)
        finally:
            stop_offline_engine(llm)

    report = CheckReport(architecture, num_layers, tolerance)
    engine: dict[str, tuple[list[int], list[float]]] = {}
    for name, output in zip(names, outputs):
        completion = output.outputs[0]
        got = (list(completion.token_ids),
               [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)])
        want_tokens, want_lp = reference.greedy_with_logprobs(hf, prompt, tokens, steered_cases.get(name, ()))
        same = _first_divergence(got[0], want_tokens)  # past it the two score different tokens
        diff = max((abs(a - b) for a, b in zip(got[1][:same], want_lp[:same])), default=0.0)
        engine[name] = got
        changed = None if name == "unsteered" else got != engine["unsteered"]
        report.cases.append(CaseResult(name, got[0] == want_tokens, diff, changed))
    return report


def print_report(report: CheckReport, model_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"steer-server check: {report.architecture} ({report.num_layers} layers) at {model_dir}")
    for column in ("request", "greedy tokens equal", "max |Δ log-prob|", "steering changed the output", "verdict"):
        table.add_column(column)
    for case in report.cases:
        changed = "—" if case.changed_by_steering is None else ("yes" if case.changed_by_steering else "NO")
        table.add_row(case.name, "yes" if case.tokens_equal else "NO", f"{case.max_logprob_diff:.2e}", changed,
                      "pass" if case.passed(report.tolerance) else "FAIL")
    console = Console()
    console.print(table)
    if report.passed:
        console.print(f"PASS: steering through vLLM matches plain transformers on {report.architecture} "
                      f"(largest per-token log-probability difference {report.max_logprob_diff:.2e}, "
                      f"tolerance {report.tolerance:.0e}).")
    else:
        console.print(f"FAIL: steering through vLLM does not match plain transformers on {report.architecture}; "
                      "do not serve it steered.")
