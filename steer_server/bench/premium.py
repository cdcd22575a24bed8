"""``steer-server bench premium``: the paper's inference-time premium, across model sizes.

premium = t_steered / t_baseline - 1 for one batch of forward passes: 32 sequences x 64
prompt tokens, prompt only (``max_tokens=1``), through an offline ``vllm.LLM`` with the
steer plugin. The steered batch adds one stored ActAdd vector (``--rows`` rows, unit norm,
coefficient ``--coeff``) at one layer (the middle one) to every sequence; the baseline is the
same engine with no steering. Batches alternate S U, U S, ... (``--repeats`` pairs, fresh random
prompts every batch, prefix caching off, so nothing is reused), and the premium is the median
of the per-pair premiums, with min and max as the spread. The timed call is the whole
``LLM.generate`` of the batch: steering's per-request work (frontend validation, row
placement) is in it, as is the add itself.

Models (``--models``):

- ``default``: the embedded SmolLM2-135M-Instruct (``steer_server.default_model``);
- ``tiny``, ``llama-h1024``, ``llama-h2048``, ``llama-h3072``: random-weight Llama configs (see
  ``RANDOM_SHAPES``; ``tiny`` has the test suite's shape), built once into the cache directory
  with the default model's tokenizer.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from steer_server.bench import BenchError
from steer_server.settings import Settings, load_settings

BATCH_SEQUENCES = 32
BATCH_TOKENS = 64

# name -> (hidden, layers, heads, kv heads, intermediate); vocab 49152 (the default tokenizer)
RANDOM_SHAPES = {
    "tiny": (128, 3, 4, 2, 256),
    "llama-h1024": (1024, 8, 16, 8, 2816),
    "llama-h2048": (2048, 4, 16, 8, 5632),
    "llama-h3072": (3072, 2, 24, 8, 8192),
}
DEFAULT_MODELS = ["tiny", "default", "llama-h1024", "llama-h2048", "llama-h3072"]
_RANDOM_VERSION = 1  # bump when a build changes, so cached models are rebuilt


def _random_llama(name: str, root: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from steer_server.default_model import build_atomically, default_model_dir

    hidden, layers, heads, kv_heads, intermediate = RANDOM_SHAPES[name]
    tokenizer_dir = Path(default_model_dir())

    def build(out: Path) -> None:
        config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = torch.float32
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
        model.save_pretrained(str(out), safe_serialization=True)
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (tokenizer_dir / file).is_file():
                shutil.copy(tokenizer_dir / file, out / file)

    target = root / name
    build_atomically(target, build, {"shape": RANDOM_SHAPES[name], "version": _RANDOM_VERSION})
    return str(target)


def model_dir_of(name: str, root: Path) -> str:
    if name == "default":
        from steer_server.default_model import default_model_dir

        return default_model_dir()
    if name in RANDOM_SHAPES:
        return _random_llama(name, root)
    if Path(name).is_dir():
        return name
    raise BenchError(f"unknown model {name!r}: default, {', '.join(RANDOM_SHAPES)} or a model directory")


def parameter_count(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    return total


def _put_vector(store, model_dir: str, layer: int, rows: int, seed: int) -> str:
    import torch

    from vector_store import StoredVector, VectorMeta
    from vector_store.keys import model_fingerprint, model_shape

    _, hidden, _ = model_shape(model_dir)
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(rows, hidden, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    kind = "actadd" if rows > 1 else "constant"
    return store.put(StoredVector(VectorMeta(model_fingerprint(model_dir, cache_home=load_settings().cache_home), hidden, kind, "upload"), {layer: direction}))


def measure_model(name: str, model_dir: str, args, log) -> dict:
    """Start an offline engine on one model, time alternating steered/unsteered batches."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import steer_vllm
    from vector_store import open_store
    from vector_store.keys import model_shape

    _, hidden, num_layers = model_shape(model_dir)
    layer = args.layer if args.layer is not None else num_layers // 2
    store_dir = Path(tempfile.mkdtemp(prefix="steer-premium-store-"))
    # the offline engine's frontend reads vectors from here (EngineSettings.store)
    os.environ[Settings.variable("store")] = str(store_dir)
    store = open_store(str(store_dir))
    vector_ids = [_put_vector(store, model_dir, layer, args.rows, seed) for seed in range(args.distinct)]
    mode = "actadd" if args.rows > 1 else "constant"

    started = time.perf_counter()
    llm = LLM(model=model_dir, dtype=args.dtype, enforce_eager=args.enforce_eager, enable_prefix_caching=False,
              max_model_len=max(256, BATCH_TOKENS + 16), max_num_seqs=BATCH_SEQUENCES,
              max_num_batched_tokens=max(2048, BATCH_SEQUENCES * BATCH_TOKENS), seed=0)
    steer_vllm.check_engine(llm)
    start_s = time.perf_counter() - started
    rng = random.Random(0)

    def batch(steered: bool):
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1000, 20000) for _ in range(BATCH_TOKENS)])
                   for _ in range(BATCH_SEQUENCES)]
        params = []
        for i in range(BATCH_SEQUENCES):
            extra = None
            if steered:
                vector = vector_ids[i % len(vector_ids)]
                extra = {"steering": {"additions": [{"vector": vector, "layer": layer, "coeff": args.coeff,
                                                      "mode": mode}]}}
            params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args=extra))
        return prompts, params

    def timed(steered: bool) -> float:
        prompts, params = batch(steered)
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        assert len(outputs) == BATCH_SEQUENCES and all(len(o.outputs[0].token_ids) == 1 for o in outputs)
        return elapsed

    try:
        for _ in range(args.warmup):
            timed(True)
            timed(False)
        steered, baseline, premiums = [], [], []
        for repeat in range(args.repeats):
            order = (True, False) if repeat % 2 == 0 else (False, True)
            times = {flag: timed(flag) for flag in order}
            steered.append(times[True])
            baseline.append(times[False])
            premiums.append(times[True] / times[False] - 1.0)
            log(f"  {name}: pair {repeat + 1}/{args.repeats}: steered {times[True] * 1e3:.1f} ms, "
                f"baseline {times[False] * 1e3:.1f} ms, premium {premiums[-1] * 100:+.2f}%")
    finally:
        llm.llm_engine.engine_core.shutdown()
        llm = None  # drop the engine before the next model is built
        gc.collect()
        shutil.rmtree(store_dir, ignore_errors=True)
    return {
        "model": name,
        "model_dir": model_dir,
        "parameters": parameter_count(model_dir),
        "hidden_size": hidden,
        "num_layers": num_layers,
        "steered_layer": layer,
        "mode": mode,
        "rows": args.rows,
        "distinct_vectors": args.distinct,
        "engine_start_s": start_s,
        "steered_s": steered,
        "baseline_s": baseline,
        "steered_median_s": statistics.median(steered),
        "baseline_median_s": statistics.median(baseline),
        "premiums": premiums,
        "premium_median": statistics.median(premiums),
        "premium_min": min(premiums),
        "premium_max": max(premiums),
        "premium_of_medians": statistics.median(steered) / statistics.median(baseline) - 1.0,
    }


def premium_command(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from steer_server.bench.plots import plot_premium
    from steer_server.bench.report import machine_info, print_premium, wide_console, write_json

    settings = load_settings()
    chosen = {"vllm_cpu_kvcache_space": settings.vllm_cpu_kvcache_space or "2",
              "vllm_use_v2_model_runner": settings.vllm_use_v2_model_runner or "0"}
    os.environ.update({Settings.variable(field): value for field, value in chosen.items()})  # for the engines
    console = wide_console()
    root = Path(args.cache or settings.cache_dir / "bench-models")
    info = machine_info()
    started = time.perf_counter()
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("premium", total=len(args.models))
        for name in args.models:
            progress.update(task, description=f"premium: building {name}")
            model_dir = model_dir_of(name, root)
            progress.update(task, description=f"premium: {name}")
            results.append(measure_model(name, model_dir, args, progress.console.print))
            progress.advance(task)
    print_premium(results, BATCH_SEQUENCES, BATCH_TOKENS, console)
    info["load_avg_end"] = list(os.getloadavg())
    data = {"kind": "steer-server bench premium", "machine": info, "argv": sys.argv,
            "batch": {"sequences": BATCH_SEQUENCES, "tokens": BATCH_TOKENS, "max_tokens": 1},
            "settings": {"repeats": args.repeats, "warmup": args.warmup, "rows": args.rows, "coeff": args.coeff,
                         "distinct": args.distinct, "enforce_eager": args.enforce_eager, "dtype": args.dtype},
            "seconds": time.perf_counter() - started, "results": results}
    if args.json:
        write_json(args.json, data)
        console.print(f"wrote {args.json}")
    if args.plot:
        plot_premium(results, args.plot, f"steering premium, {BATCH_SEQUENCES}x{BATCH_TOKENS} prompt tokens, "
                     f"{'eager' if args.enforce_eager else 'compiled'}, CPU x{os.cpu_count()}")
        console.print(f"wrote {args.plot}")
    return 0


def add_premium_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                   help=f"default, {', '.join(RANDOM_SHAPES)} or model directories (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=8, help="steered/baseline pairs per model (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed pairs first (default: %(default)s)")
    p.add_argument("--layer", type=int, help="steered layer (default: the middle one)")
    p.add_argument("--rows", type=int, default=4, help="rows of the ActAdd vector; 1 = constant mode "
                   "(default: %(default)s)")
    p.add_argument("--coeff", type=float, default=4.0)
    p.add_argument("--distinct", type=int, default=1, help="distinct vectors across the 32 sequences "
                   "(default: %(default)s, one steering as in the paper)")
    p.add_argument("--dtype", default="auto", help="engine dtype (default: %(default)s)")
    p.add_argument("--enforce-eager", action="store_true", help="eager engine (default: compiled, as served)")
    p.add_argument("--cache", help="where random-weight models are built (default: <steer cache>/bench-models)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH")

