"""``steer-server``: serve | vectors | compare | bench | eval.

- ``serve`` starts vLLM's own OpenAI-compatible server in this process (vLLM's ``serve``
  subcommand, ``steer_server.vllm_serve``) with the engine plugin (``steer``) and the HTTP plugin
  (``steer_api``, ``steer_server.serving.api``) enabled; flags it does not know go to vLLM.
- ``vectors`` and ``compare`` are HTTP clients of a running server.
- ``bench`` runs ``steer_server.bench.cli.main(argv)``; ``eval`` runs ``steer_server.eval.cli.main(argv)``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from steer_server.client import (
    DEFAULT_DOSES,
    LIST_PAGE_MAX,
    MAX_CELLS,
    VECTORS_PATH,
    auth_headers,
    client_args,
    error_message,
    positions_arg,
)
from steer_server.settings import (
    Settings,
    SettingsError,
    load_client_settings,
    load_settings,
    serve_settings,
)
from steer_vllm.limits import MAX_ADDITIONS
from vector_store.compute import METHODS, POSITIONS

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"


# ------------------------------------------------------------------------ serve


def serve_parser(defaults: Settings | None = None) -> argparse.ArgumentParser:
    """The flags of ``steer-server serve``; each defaults to its environment variable
    (``steer_server.settings.Settings``), else to the built-in default."""
    env = defaults if defaults is not None else load_settings()
    var = Settings.variable
    parser = argparse.ArgumentParser(
        prog="steer-server serve",
        allow_abbrev=False,  # never swallow a vLLM flag that shares a prefix with ours
        description="Serve a model with per-request activation steering on vLLM's OpenAI-compatible server.",
        epilog="Every other flag goes to vLLM's `serve` unchanged (e.g. --api-key, --max-model-len, "
        "--enforce-eager, --dtype, --served-model-name); `steer-server serve --vllm-help` lists them. Each flag of "
        "steer-server's own may also be given as its environment variable (named in its help); the flag wins.",
    )
    parser.add_argument("--vllm-help", nargs="?", const="", default=None, metavar="GROUP",
                        help="show vLLM's own serve flags (a GROUP such as all, Frontend, ModelConfig) and exit")
    parser.add_argument("--model", help="Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--host", help="address to bind (vLLM's default when omitted)")
    parser.add_argument("--port", type=int, help="port (vLLM's default, 8000, when omitted)")
    parser.add_argument("--store", default=env.store,
                        help="vector store: a directory, sqlite:///abs/dir or redis://host:port/db "
                        f"(default: ${var('store')} or ~/.cache/steer-server/vectors)")
    parser.add_argument("--steering-pad", default="none" if env.pad is None else env.pad, metavar="TEXT|none",
                        help="token that pads the ActAdd prompts of one layer to equal length; 'none' = no padding "
                        f"(${var('pad')}; default: %(default)r; a single space, as in the paper, unless set)")
    parser.add_argument("--max-steering-prompt-tokens", type=int, default=env.max_prompt_tokens, metavar="N",
                        help=f"longest steering prompt, in tokens (${var('max_prompt_tokens')}; default: %(default)s)")
    parser.add_argument("--max-additions", type=int, default=env.max_additions, metavar="N",
                        help=f"most additions in one request's steering (${var('max_additions')}; default: "
                        f"%(default)s, at most {MAX_ADDITIONS})")
    parser.add_argument("--max-dose", type=float, default=env.max_dose, metavar="D",
                        help="largest relative dose (‖Δh‖/‖h‖) an addition may ask for, or a coefficient may give on a "
                        "request's first step (measured by a two-token probe); over it: HTTP 400 naming the field "
                        f"(${var('max_dose')}; default: no limit)")
    parser.add_argument("--max-body-bytes", type=int, default=env.max_body_bytes, metavar="N",
                        help=f"largest request body; larger gets HTTP 413 (${var('max_body_bytes')}; default: "
                        "%(default)s)")
    parser.add_argument("--steering-table-rows", type=int, default=env.table_rows, metavar="N",
                        help="rows of the engine's steering vector table (a request uses one row per ActAdd position "
                        "and up to two per constant vector, per layer; requests with the same steering share rows; a "
                        "request waits when its rows are not free). Default: room for --max-num-seqs requests of the "
                        f"largest accepted size within 64 MiB, and never less than 8 of them (${var('table_rows')})")
    parser.add_argument("--store-timeout", type=float, default=env.store_timeout_s, metavar="SECONDS",
                        help="longest wait for one vector-store call; a request that needs the store longer gets "
                        f"HTTP 503 (${var('store_timeout_s')}; default: %(default)s)")
    parser.add_argument("--store-cache-ttl", type=float, default=env.store_fresh_s, metavar="SECONDS",
                        help="how long a vector name is trusted before the store is asked again (in the background, "
                        "for a name seen in the last 60 s); names and deletes made on another replica show "
                        f"here within it for names in steady use (${var('store_fresh_s')}; default: %(default)s)")
    parser.add_argument("--admin-api-key", metavar="KEY",
                        help="a key that may also create, import and delete vectors (vLLM's --api-key keys may only "
                        f"use them); visible to `ps` like any argument: prefer ${var('admin_api_key')} or "
                        "--api-keys-file")
    parser.add_argument("--api-keys-file", metavar="PATH", default=env.api_keys_file,
                        help="API keys with roles and tenants, one 'ROLE KEY [TENANT]' per line (ROLE: inference | "
                        "admin; a key sees only its tenant's vectors; no TENANT: the default tenant, as for every "
                        f"other key); inference keys join vLLM's --api-key keys (${var('api_keys_file')})")
    parser.add_argument("--quotas-file", metavar="PATH", default=env.quotas_file,
                        help="per-tenant quotas, one 'TENANT quota=N ...' per line ('*': every tenant not named; "
                        "quotas: vectors, bytes, capture_tokens_per_minute, steered_in_flight; one left out is "
                        f"unlimited); over one: HTTP 429 naming it (${var('quotas_file')}; default: none)")
    parser.add_argument("--metrics-tenant-label", action="store_true", default=env.metrics_tenant_label,
                        help="label the steering metrics with the caller's tenant (one series per tenant of the keys "
                        f"file; ${var('metrics_tenant_label')}; default: off)")
    return parser


def serve(argv: list[str]) -> None:
    try:
        environment = load_settings()
    except SettingsError as exc:
        raise SystemExit(f"steer-server serve: {exc}") from None
    parser = serve_parser(environment)
    args, vllm_args = parser.parse_known_args(argv)
    if args.vllm_help is not None:
        from steer_server.vllm_serve import run_vllm_serve

        run_vllm_serve([f"--help={args.vllm_help}" if args.vllm_help else "--help"])
        return
    for flag, value in (("--max-steering-prompt-tokens", args.max_steering_prompt_tokens),
                        ("--max-additions", args.max_additions), ("--max-body-bytes", args.max_body_bytes),
                        ("--store-timeout", args.store_timeout), ("--store-cache-ttl", args.store_cache_ttl)):
        if not value > 0:
            parser.error(f"{flag} must be positive")
    if args.max_dose is not None and not (math.isfinite(args.max_dose) and args.max_dose > 0):
        parser.error("--max-dose must be a finite number above 0")
    if args.steering_table_rows is not None and args.steering_table_rows < 2:
        parser.error("--steering-table-rows must be at least 2 (row 0 is the zero row)")
    if args.max_additions > MAX_ADDITIONS:
        parser.error(f"--max-additions is at most {MAX_ADDITIONS} (the engine's limit)")
    if not args.steering_pad:
        parser.error("--steering-pad must be a token's text, or 'none'")
    from steer_server.serving.access import AccessConfigError, check_access_flags

    try:
        # Keys travel to the API processes in the environment (or stay in the file), never as arguments.
        access = check_access_flags(args.admin_api_key, args.api_keys_file)
    except AccessConfigError as exc:
        parser.error(str(exc))
    if args.quotas_file is not None:
        from steer_server.serving.quotas import QuotaConfigError, read_quotas_file

        try:
            read_quotas_file(args.quotas_file)  # a bad file stops the server before vLLM starts
        except QuotaConfigError as exc:
            parser.error(str(exc))
        access["quotas_file"] = Path(args.quotas_file).expanduser().resolve()

    model = args.model
    if model is None:
        from steer_server.default_model import default_model_dir

        model = default_model_dir(environment.cache_dir)
        if not any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in vllm_args):
            vllm_args = ["--served-model-name", DEFAULT_SERVED_NAME, *vllm_args]
    if args.host is not None:
        vllm_args = ["--host", args.host, *vllm_args]
    if args.port is not None:
        vllm_args = ["--port", str(args.port), *vllm_args]

    from vector_store import VectorStoreError, open_store

    store = args.store or environment.store_location
    if "://" not in store:
        store = str(Path(store).expanduser().resolve())
    try:
        open_store(store)  # fail here, clearly, rather than inside vLLM's start-up
    except VectorStoreError as exc:
        parser.error(f"--store: {exc}")
    try:
        settings = serve_settings(
            pad=args.steering_pad,  # "none" is no padding, as in $STEER_PAD
            max_prompt_tokens=args.max_steering_prompt_tokens,
            max_additions=args.max_additions,
            max_body_bytes=args.max_body_bytes,
            table_rows=args.steering_table_rows,
            store=store,
            store_timeout_s=args.store_timeout,
            store_fresh_s=args.store_cache_ttl,
            max_dose=args.max_dose,
            metrics_tenant_label=args.metrics_tenant_label,
            **access,
        )
    except SettingsError as exc:
        parser.error(str(exc))

    vllm_args = engine_defaults(model, vllm_args, settings)
    prepare_environment(settings)
    # vLLM only logs an endpoint plugin that fails to load and then serves without it,
    # silently dropping every `steering` field: make such a failure stop us here instead.
    from steer_server.serving.api import SteerApiPlugin

    SteerApiPlugin()
    from steer_server.vllm_serve import run_vllm_serve

    run_vllm_serve([model, *vllm_args])


def engine_defaults(model_dir: str, vllm_args: list[str], settings: Settings) -> list[str]:
    """vLLM flags steer-server chooses when the user did not:

    - ``--no-async-scheduling``: steering is not tested with asynchronous scheduling
      (vLLM's default on GPU), so the plugin refuses it; asked for, it is refused loudly;
    - on CPU, ``--kv-cache-memory-bytes`` sized to the memory free now (``kv_cache``);
    - on a CPU without bfloat16 instructions, ``--dtype float32`` for a float32 checkpoint.
      vLLM would run it in bfloat16, which such a CPU emulates: the default model generates
      about 4x slower so (EVALUATION.md, "Precision on CPU")."""
    from steer_server.kv_cache import NotEnoughMemory, choose_kv_cache_bytes, free_node_memory, user_chose

    chosen = []
    if not any(a.split("=")[0] in ("--async-scheduling", "--no-async-scheduling") for a in vllm_args):
        chosen.append("--no-async-scheduling")
    from vllm.platforms import current_platform

    if (current_platform.is_cpu() and not any(a.split("=")[0] == "--dtype" for a in vllm_args)
            and not cpu_has_bfloat16() and checkpoint_dtype(model_dir) == "float32"):
        print("steer-server: --dtype float32, the checkpoint's own: this CPU has no bfloat16 instructions "
              "(AVX512-BF16, AMX), so vLLM's bfloat16 default would be emulated, several times slower",
              file=sys.stderr, flush=True)
        chosen += ["--dtype", "float32"]
    if current_platform.is_cpu() and not user_chose(vllm_args, settings):
        try:
            choice = choose_kv_cache_bytes(model_dir, free_node_memory())
        except NotEnoughMemory as exc:
            raise SystemExit(f"steer-server serve: {exc}") from None
        print(f"steer-server: {choice.explanation}", file=sys.stderr, flush=True)
        chosen += ["--kv-cache-memory-bytes", str(choice.size_bytes)]
    return [*chosen, *vllm_args]


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (x86: AVX512-BF16 or AMX; Arm: BF16)."""
    import torch

    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(flag) for flag in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def checkpoint_dtype(model_dir: str) -> str | None:
    """The dtype ``config.json`` gives the weights (``torch_dtype``, or ``dtype`` in newer files)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config", config)
    return text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or config.get("dtype")


def prepare_environment(settings: Settings) -> None:
    """What the vLLM processes need, in the environment they inherit: our plugins and our
    settings (``Settings.to_env()``). The model runner is left as the user chose (the
    plugin picks V1 when they did not)."""
    plugins = [p for p in (settings.vllm_plugins or "").split(",") if p]
    for name in ("steer", "steer_api"):
        if name not in plugins:
            plugins.append(name)
    chosen = {"vllm_plugins": ",".join(plugins)}
    if settings.vllm_use_v2_model_runner is None:
        chosen["vllm_use_v2_model_runner"] = "0"
    os.environ.update(settings.model_copy(update=chosen).to_env())


# ------------------------------------------------------------------------ HTTP clients


class ClientError(Exception):
    pass


def _http(args):
    import httpx

    return httpx.Client(base_url=args.url.rstrip("/"), headers=auth_headers(args.api_key), timeout=600)


def _check(response):
    if response.status_code >= 400:
        raise ClientError(f"HTTP {response.status_code}: {error_message(response)}")
    return response


def vectors_compute(args) -> None:
    if sum((bool(args.add), bool(args.pair), args.pairs_file is not None)) != 1:
        raise ClientError("give --add PROMPT COEFF (an actadd vector), or --pair POSITIVE NEGATIVE or --pairs-file "
                          "FILE (a constant one)")
    # The pairs body's fields besides the pairs, as the server names them.
    options = {key: value for key, value in (("layer", args.layer), ("layers", _layers_arg(args.layers)),
                                             ("method", args.method), ("position", args.position),
                                             ("template", args.template)) if value is not None}
    with _http(args) as http:
        if args.add:
            if args.layer is None or set(options) != {"layer"}:
                raise ClientError("--add takes --layer (and --pad); --layers, --method, --position and --template "
                                  "are for pairs")
            body: dict = {"name": args.name, "layer": args.layer,
                          "additions": [{"prompt": prompt, "coeff": _float(coeff)} for prompt, coeff in args.add]}
            if args.pad is not None:
                body["pad"] = None if args.pad.lower() == "none" else args.pad
            response = http.post(VECTORS_PATH, json=body)
        elif args.pair:
            pairs = [{"positive": pos, "negative": neg} for pos, neg in args.pair]
            response = http.post(VECTORS_PATH, json={"name": args.name, "pairs": pairs, **options})
        else:  # the file goes as it is: the server reads it and names the line of anything wrong
            if isinstance(options.get("layers"), list):
                options["layers"] = ",".join(map(str, options["layers"]))
            response = http.post(VECTORS_PATH, params={"name": args.name, **options},
                                 content=Path(args.pairs_file).read_bytes(),
                                 headers={"Content-Type": "application/jsonl"})
        _print_vector(_check(response).json())


def _layers_arg(text: str | None) -> str | list[int] | None:
    """``--layers``: "all" or layers separated by commas."""
    if text is None or text == "all":
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ClientError(f'--layers: expected "all" or layers separated by commas (4,8,12), got {text!r}') from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ClientError(f"not a number: {text!r}") from None


def vectors_list(args) -> None:
    from rich.console import Console
    from rich.table import Table

    data = []
    params: dict[str, str | int] = {"limit": LIST_PAGE_MAX, **({"all": "true"} if args.all else {})}
    with _http(args) as http:
        while True:  # every page: the server answers at most LIST_PAGE_MAX vectors a request
            page = _check(http.get(VECTORS_PATH, params=params)).json()
            data += page["data"]
            if not page["has_more"]:
                break
            params["after"] = page["next_cursor"]
    table = Table(title=f"steering vectors at {args.url}")
    for column in ("names", "id", "kind", "method", "layers", "rows", "served model"):
        table.add_column(column)
    for v in data:
        rows = sorted({shape[0] for shape in v["shape"].values()})
        table.add_row(", ".join(v["names"]) or "-", v["id"], v["kind"], v["method"], _layers(v["layers"]),
                      ", ".join(map(str, rows)), "yes" if v["served_model"] else "no")
    Console().print(table)


def _layers(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if len(layers) <= 8 else f"{layers[0]}..{layers[-1]} ({len(layers)})"


def vectors_show(args) -> None:
    with _http(args) as http:
        _print_vector(_check(http.get(f"{VECTORS_PATH}/{args.name}", params={"norms": "true"})).json())


def _print_vector(v: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{', '.join(v['names']) or '(unnamed)'}[/bold]  {v['id']}")
    console.print(f"model {v['model']}{'' if v['served_model'] else ' (not the served model)'}; "
                  f"kind {v['kind']}, method {v['method']}, created {_when(v['created'])}")
    if v.get("source"):
        console.print(f"source: {json.dumps(_short_source(v['source']), ensure_ascii=False)}")
    row_norms = v.get("row_norms")
    typical = v.get("typical_token_norm") or {}
    stats = v.get("stats") or {}  # vectors made from pairs: measured on their own examples
    table = Table()
    for column in ("layer", "shape", "norm", "row norms", "typical token norm", "separation", "explained variance"):
        table.add_column(column)
    for layer in map(str, v["layers"]):
        rows = ", ".join(f"{x:.2f}" for x in row_norms[layer]) if row_norms else "-"
        measured = stats.get(layer, {})
        table.add_row(layer, "x".join(map(str, v["shape"][layer])), f"{v['norm'][layer]:.2f}", rows,
                      *(_number(value) for value in (typical.get(layer), measured.get("separation"),
                                                     measured.get("explained_variance"))))
    console.print(table)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _short_source(source: dict, shown_pairs: int = 3) -> dict:
    short = {k: v for k, v in source.items() if k not in ("token_ids", "pairs", "parts")}
    pairs = short.get("pairs_text")
    if isinstance(pairs, list) and len(pairs) > shown_pairs:  # a dataset: its first pairs say what it is
        short["pairs_text"] = [*pairs[:shown_pairs], f"... {len(pairs)} pairs in all"]
    return short


def _when(created: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(created).isoformat(timespec="seconds") if created else "-"


def vectors_calibrate(args) -> None:
    """POST .../calibrate as a stream: a progress bar while the cells run, then the table. A
    grid over the route's bound runs in parts of whole layers (``"store": false``), and the best
    part's choice, by the route's own rule, is stored with PUT .../calibration."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from steer_server.measure.data import read_prompts

    body: dict = {"stream": True, "budget": args.budget, "samples": args.samples, "max_tokens": args.max_tokens}
    layers = _layers_arg(args.layers)
    doses = args.doses and list(dict.fromkeys(_float(d) for d in args.doses.split(",")))
    for key, value in (("doses", doses), ("positions", args.positions),
                       ("prompts", args.prompts and read_prompts(Path(args.prompts))),
                       ("lexicon", args.lexicon and read_prompts(Path(args.lexicon)))):
        if value:
            body[key] = value
    if layers == "all":
        raise ClientError("--layers: give the layers to try (4,8,12); the default is the vector's own, up to 4")
    parts = _calibration_parts(list(dict.fromkeys(layers or [])), len(doses or DEFAULT_DOSES))
    results, refusals = [], []
    with _http(args) as http, \
            Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as progress:
        task = progress.add_task("cells", total=None)
        for i, part in enumerate(parts):
            part_body = {**body, **({"layers": part} if part else {}), "store": len(parts) == 1}
            try:
                results.append(_calibrate_part(http, args.name, part_body, progress, task, i, len(parts)))
            except _NoCellWithin as exc:  # another part may have one
                if len(parts) == 1:
                    raise ClientError(str(exc)) from None
                refusals.append(str(exc))
        if not results:
            raise ClientError("no part of the grid has a cell within the budget: " + "; ".join(refusals))
        chosen = max((r["calibration"] for r in results), key=lambda c: (c["score"] - c["unsteered_score"], -c["dose"]))
        if len(parts) > 1:
            record = {key: chosen[key] for key in CALIBRATION_FIELDS if key in chosen}
            chosen = _check(http.put(f"{VECTORS_PATH}/{args.name}/calibration", json=record)).json()["calibration"]
    table = Table(title=f"calibration of {args.name} (concept: {chosen['concept']})")
    for column in ("layer", "dose", "concept", "unsteered", "NLL cost"):
        table.add_column(column)
    for cell in (cell for result in results for cell in result["cells"]):
        table.add_row(str(cell["layer"]), f"{cell['dose']:g}", _number(cell["concept"]["value"]),
                      _number(cell["unsteered_concept"]["value"]), _number(cell["nll_cost"]))
    console = Console()
    console.print(table)
    console.print(f"stored (version {chosen['version']}): layer {chosen['layer']}, dose {chosen['dose']:g}, positions "
                  f"{json.dumps(chosen['positions'])}: concept {chosen['score']:.2f} (unsteered "
                  f"{chosen['unsteered_score']:.2f}) at {chosen['nll_cost']:+.2f} nats/token")


# What PUT .../calibration takes of a calibration the route measured and chose.
CALIBRATION_FIELDS = ("layer", "dose", "positions", "concept", "score", "score_interval", "unsteered_score",
                      "nll_cost", "budget", "prompts", "samples")


class _NoCellWithin(ClientError):
    """A calibration (part) whose cells all cost more fluency than the budget (HTTP 422)."""


def _calibration_parts(layers: list[int], doses: int) -> list[list[int]]:
    """The layers in runs of whole layers that each fit one calibration's cell bound; one
    empty part where the server's default layers are meant."""
    if not layers:
        return [[]]
    if doses > MAX_CELLS:
        raise ClientError(f"--doses: {doses} doses; a calibration runs at most {MAX_CELLS} doses at a layer")
    per_part = MAX_CELLS // doses
    return [layers[i:i + per_part] for i in range(0, len(layers), per_part)]


def _calibrate_part(http, name: str, body: dict, progress, task, part: int, parts: int) -> dict:
    """One streamed calibration; its result. The bar counts every part's cells."""
    with http.stream("POST", f"{VECTORS_PATH}/{name}/calibrate", json=body) as stream:
        if stream.status_code >= 400:
            stream.read()
            if stream.status_code == 422:
                raise _NoCellWithin(f"HTTP 422: {error_message(stream)}")
            _check(stream)
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if event == "progress":
                    progress.update(task, completed=part * data["total"] + data["done"], total=parts * data["total"])
                elif event == "error":
                    error = data["error"]
                    raise (_NoCellWithin if error.get("code") == 422 else ClientError)(error["message"])
                else:
                    return data
    raise ClientError("the server closed the calibration without a result")


def vectors_export(args) -> None:
    out = Path(args.output or f"{args.name}.gguf")
    with _http(args) as http:
        data = _check(http.get(f"{VECTORS_PATH}/{args.name}/gguf")).content
    out.write_bytes(data)
    print(f"wrote {out} ({len(data)} bytes)")


def vectors_import(args) -> None:
    path = Path(args.file)
    data = path.read_bytes()
    params = {"name": args.name} if args.name else None
    with _http(args) as http:
        if path.suffix == ".gguf":
            response = http.post(f"{VECTORS_PATH}/import/gguf", params=params, content=data,
                                 headers={"Content-Type": "application/octet-stream"})
        elif path.suffix == ".safetensors":
            response = http.post(VECTORS_PATH, params=params, content=data, headers={"Content-Type": "application/octet-stream"})
        elif path.suffix == ".json":
            response = http.post(VECTORS_PATH, params=params, content=data, headers={"Content-Type": "application/json"})
        else:
            raise ClientError(f"{path}: expected a .gguf, .safetensors or .json file")
        _print_vector(_check(response).json())


def vectors_delete(args) -> None:
    with _http(args) as http:
        result = _check(http.delete(f"{VECTORS_PATH}/{args.name}")).json()
    print(f"removed names {result['names_removed']}; deleted vector {result['deleted'] or '(still named elsewhere)'}")


def compare(args) -> None:
    """Unsteered and steered completions of one prompt, side by side."""
    from openai import OpenAI
    from rich.console import Console
    from rich.table import Table

    text = args.steering
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        steering = json.loads(text)
    except ValueError as exc:
        raise ClientError(f"--steering is not valid JSON: {exc}") from None
    client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key or "EMPTY", max_retries=0)
    model = args.model or client.models.list().data[0].id
    common = {"model": model, "n": args.n, "max_tokens": args.max_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "seed": args.seed}
    extra = {} if args.repetition_penalty is None else {"repetition_penalty": args.repetition_penalty}

    def run(steer: dict | None) -> list[str]:
        body = dict(extra, **({"steering": steer} if steer is not None else {}))
        try:
            if args.chat:
                response = client.chat.completions.create(
                    messages=[{"role": "user", "content": args.prompt}], extra_body=body, **common)
                return [c.message.content or "" for c in sorted(response.choices, key=lambda c: c.index)]
            response = client.completions.create(prompt=args.prompt, extra_body=body, **common)
            return [c.text for c in sorted(response.choices, key=lambda c: c.index)]
        except Exception as exc:  # the openai SDK's errors carry the server's message
            raise ClientError(str(exc)) from None

    plain, steered = run(None), run(steering)
    table = Table(title=f"{args.prompt!r}  steering={json.dumps(steering)}", show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("unsteered")
    table.add_column("steered")
    for i, (a, b) in enumerate(zip(plain, steered)):
        table.add_row(str(i), a, b)
    Console().print(table)


# ------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer-server", description="Activation steering on vLLM's OpenAI server.")
    sub = parser.add_subparsers(dest="command", metavar="{serve,vectors,compare,check,bench,eval}")
    sub.add_parser("serve", help="serve a model (see `steer-server serve --help`)", add_help=False)
    sub.add_parser("bench", help="load benchmarks (steer_server.bench)", add_help=False)
    sub.add_parser("eval", help="measure steering: layer x coefficient sweeps, the ActAdd paper's experiments",
                   add_help=False)

    vectors = sub.add_parser("vectors", help="manage the server's steering vectors")
    vsub = vectors.add_subparsers(dest="vectors_command", required=True)
    p = vsub.add_parser("compute", help="compute and name a vector from contrast prompts or a dataset of pairs")
    p.add_argument("name")
    p.add_argument("--layer", type=int, help="residual stream entering this decoder block")
    p.add_argument("--add", nargs=2, action="append", metavar=("PROMPT", "COEFF"),
                   help="actadd: a prompt and its coefficient (repeat, e.g. --add Love 1 --add Hate -1)")
    p.add_argument("--pair", nargs=2, action="append", metavar=("POSITIVE", "NEGATIVE"),
                   help="constant: a contrast pair (repeat for several)")
    p.add_argument("--pairs-file", metavar="JSONL", help='constant: a dataset, one {"positive": ..., "negative": ...} a line')
    p.add_argument("--layers", metavar="all|L,L,...", help="constant: several layers in one call (instead of --layer)")
    p.add_argument("--method", choices=METHODS,
                   help="constant: mean_diff (default; mean of positive - negative), pca_diff or pca_center "
                   "(repeng's first principal components)")
    p.add_argument("--position", choices=POSITIONS,
                   help="constant: each example's last token (default) or the mean over its tokens "
                        "after the first")
    p.add_argument("--template", choices=("chat",),
                   help="constant: render each example as a user turn with the served model's chat template")
    p.add_argument("--pad", metavar="TEXT|none", help="actadd pad token (default: the server's)")
    p.set_defaults(func=vectors_compute)
    p = vsub.add_parser("list", help="list named vectors")
    p.add_argument("--all", action="store_true", help="also unnamed vectors computed for requests")
    p.set_defaults(func=vectors_list)
    p = vsub.add_parser("show", help="metadata and per-row norms next to a typical token's norm")
    p.add_argument("name")
    p.set_defaults(func=vectors_show)
    p = vsub.add_parser("calibrate", help="find and store a vector's default layer, dose and positions")
    p.add_argument("name")
    p.add_argument("--layers", metavar="L,L,...", help="layers to try (default: the vector's, up to 4 of them)")
    p.add_argument("--doses", metavar="D,D,...", help="relative doses to try (default: 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)")
    p.add_argument("--positions", type=positions_arg,
                   help="schedule: all (default), prompt, generated, after_anchor or START:END")
    p.add_argument("--prompts", metavar="FILE", help="prompts, one a line (default: the shipped calibration prompts)")
    p.add_argument("--lexicon", metavar="FILE",
                   help="topic words, one a line, to judge the concept by (default: the stream readout of a vector "
                   "made from pairs)")
    p.add_argument("--budget", type=float, default=1.0, help="nats/token of fluency the setting may cost (default: 1)")
    p.add_argument("--samples", type=int, default=4, help="completions per prompt and cell (at most 8)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per completion (at most 64)")
    p.set_defaults(func=vectors_calibrate)
    p = vsub.add_parser("export", help="save as a llama.cpp control vector (GGUF)")
    p.add_argument("name")
    p.add_argument("-o", "--output", help="file to write (default: NAME.gguf)")
    p.set_defaults(func=vectors_export)
    p = vsub.add_parser("import", help="upload a .gguf control vector, a .safetensors (layer.N tensors) or .json file")
    p.add_argument("file")
    p.add_argument("--name")
    p.set_defaults(func=vectors_import)
    p = vsub.add_parser("delete", help="remove a name (and its vector once unnamed), or a vector by id")
    p.add_argument("name")
    p.set_defaults(func=vectors_delete)
    client = load_client_settings()
    for p in vsub.choices.values():
        client_args(p, client)

    p = sub.add_parser("compare", help="unsteered vs steered completions, side by side")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steering", required=True, help='the request\'s steering JSON, or @file '
                   '(e.g. \'{"additions": [{"prompt": "Love", "coeff": 5, "layer": 2}, '
                   '{"prompt": "Hate", "coeff": -5, "layer": 2}]}\')')
    p.add_argument("--model", help="served model name (default: the server's first)")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions (the prompt is a user message)")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="per-request seed (a GPU server; vLLM's CPU build refuses it)")
    client_args(p, client)
    p.set_defaults(func=compare)

    p = sub.add_parser("check", help="is steering exact on a model? vLLM against plain transformers, in fp32")
    p.add_argument("--model", help="a Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens per request")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest per-token log-probability difference that passes (default 5e-3)")
    p.add_argument("--compiled", action="store_true", help="run vLLM compiled (torch.compile) instead of eagerly")
    p.set_defaults(func=check)
    return parser


def check(args) -> None:
    """Steer one prompt through vLLM and through plain transformers; print the verdict."""
    from steer_server.check import DEFAULT_TOLERANCE, check_model, print_report
    from steer_server.default_model import default_model_dir

    model_dir = args.model or default_model_dir()
    if not Path(model_dir, "config.json").is_file():
        raise ClientError(f"--model {model_dir}: not a Hugging Face model directory (no config.json)")
    report = check_model(model_dir, tokens=args.tokens, tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
                         enforce_eager=not args.compiled)
    print_report(report, model_dir)
    if not report.passed:
        raise ClientError(f"steering is not exact on {report.architecture}")


def main(argv: list[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        serve(argv[1:])
        return 0
    if argv and argv[0] == "bench":
        from steer_server.bench.cli import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "eval":
        from steer_server.eval.cli import main as eval_main

        return eval_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    import httpx

    try:
        args.func(args)
    except (ClientError, OSError, httpx.HTTPError) as exc:
        print(f"steer-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
