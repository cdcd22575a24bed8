"""steer_api's vector routes: ``/v1/steering/vectors`` on vLLM's app.

This module's job: the HTTP API over the vector store (create from contrast prompts, a
dataset of contrast pairs (JSON or a JSONL file), given directions or a safetensors file;
list; describe; delete; GGUF import and export),
built by ``vector_router`` and included by ``steer_server.serving.api.SteerApiPlugin.attach_router``.
The routes live on the same app as vLLM's handlers, so vLLM's ``--api-key`` middleware
guards them (it guards every path under ``/v1``).

Request bodies are typed (pydantic), so the routes and their body schemas are in the
server's ``/openapi.json``. Errors are answered in the steering error format by
``VectorRoute`` (``steer_server.serving.route_errors.SteeringRoute``), request validation included.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Annotated, Any, Literal, Union

import torch
from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from steer_server.serving.access import Tenant
from steer_server.client import LIST_PAGE_DEFAULT, LIST_PAGE_MAX, VECTORS_PATH
from steer_server.serving.route_errors import SteeringRoute, validation_error
from steer_server.serving.state import Steer, SteerServer
from steer_server.serving.steering import FiniteCoeff, SteeringError, bad_request
from vector_store import StoredVector, VectorMeta, VectorNotFound, VectorStoreError
from vector_store.base import parse_order_key
from vector_store.compute import PCA_METHODS


SAFETENSORS_TYPES = ("application/octet-stream", "application/x-safetensors", "application/safetensors")
# The dtypes an uploaded direction may have: floating types, each read as float32 as the store keeps it.
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# A few hundred bytes a layer in practice; the bound keeps the tensors parsed in proportion.
MAX_SAFETENSORS_HEADER = 1024 * 1024
# A pairs file: one {"positive", "negative"} object a line; the other fields go in the query.
JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/jsonlines", "application/x-jsonlines")
# ASCII digits ("²".isdigit() holds, and int() refuses it), few enough for int() to read.
LAYER_NUMBER = re.compile(r"[0-9]{1,18}")
LAYERS_RULE = 'a list of layers, or "all" (every stream point 0..num_layers)'
CREATE_SHAPES = 'expected "additions" (actadd), "pairs" (constant) or "layers" (upload)'


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PromptCoeff(FiniteCoeff):
    prompt: str


class Pair(_Strict):
    positive: str
    negative: str


class ActAddVectorCreate(_Strict):
    """An ActAdd vector: sum of coeff * (padded prompt streams) at ``layer``, ``[k, hidden]``."""

    name: str | None = None
    layer: int
    additions: list[PromptCoeff] = Field(min_length=1)
    pad: str | None = None  # absent: the server's --steering-pad; null: no padding


class ConstantVectorCreate(_Strict):
    """A constant vector from contrast pairs, ``[1, hidden]`` at each of ``layer`` or ``layers``:
    ``method`` (mean_diff: the mean of positive - negative; pca_diff, pca_center: repeng's first
    principal components, turned so positives project higher) over each example's stream at
    ``position`` (its last token, or the mean over its tokens); ``template: "chat"`` renders each
    example as a user turn with the served model's chat template first."""

    name: str | None = None
    layer: int | None = None
    layers: list[int] | Literal["all"] | None = None
    pairs: list[Pair] = Field(min_length=1)
    method: Literal["mean_diff", "pca_diff", "pca_center"] = "mean_diff"
    position: Literal["last", "mean"] = "last"
    template: Literal["chat"] | None = None

    @field_validator("layers", mode="wrap")
    @classmethod
    def _layers(cls, value: Any, handler) -> Any:
        # One message for the field, instead of one per member of the union naming its type.
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"expected {LAYERS_RULE}") from None


class UploadVectorCreate(_Strict):
    """Given directions: ``{"6": [[hidden floats], ...]}`` (k rows) or ``{"6": [hidden floats]}``."""

    name: str | None = None
    layers: dict[str, list[list[float]] | list[float]] = Field(min_length=1)
    kind: str | None = None  # "actadd" | "constant"; default: constant if every layer has one row


# The JSON body's key that picks its shape, checked in this order (a body with several is
# read as the first one's shape, whose strict model then names the extra keys).
_JSON_SHAPES: dict[str, type[BaseModel]] = {
    "additions": ActAddVectorCreate, "pairs": ConstantVectorCreate, "layers": UploadVectorCreate,
}
_SAFETENSORS_TAG = "safetensors"


def _create_shape(value: Any) -> str | None:
    if isinstance(value, bytes):
        return _SAFETENSORS_TAG
    if isinstance(value, dict):
        return next((key for key in _JSON_SHAPES if key in value), None)
    return next((key for key, model in _JSON_SHAPES.items() if type(value) is model), None)


def _shape_union(*members) -> Any:
    return Annotated[Union[members], Discriminator(_create_shape, custom_error_type="vector_shape",
                                                   custom_error_message=CREATE_SHAPES)]


_JSON_MEMBERS = tuple(Annotated[model, Tag(key)] for key, model in _JSON_SHAPES.items())
SafetensorsFile = Annotated[bytes, Strict(), WithJsonSchema({
    "type": "string", "format": "binary",
    "description": "a safetensors file (tensors layer.N, [k, hidden]), sent as the raw body with "
                   "Content-Type application/octet-stream and the name in ?name=",
})]
# What POST /v1/steering/vectors takes: FastAPI hands the model a dict for a JSON content
# type and the raw bytes for any other.
VectorCreate = _shape_union(*_JSON_MEMBERS, Annotated[SafetensorsFile, Tag(_SAFETENSORS_TAG)])
_JSON_CREATE = TypeAdapter(_shape_union(*_JSON_MEMBERS))

_PAIRS_CREATE = TypeAdapter(ConstantVectorCreate)

_BINARY_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
_UPLOAD_BODIES = {"requestBody": {"content": {
    content_type: {"schema": {"type": "string", "format": "binary"}}
    for content_type in (*SAFETENSORS_TYPES, *JSONL_TYPES)}}}


def _validation_error(error: dict) -> SteeringError:
    """As every steering route's, plus this body's own cases: which shape, and an empty body."""
    if error["type"] == "vector_shape":
        return bad_request("body", CREATE_SHAPES if isinstance(error["input"], dict) else "expected a JSON object")
    if error["type"] == "missing" and list(error["loc"]) in (["body"], []):
        return bad_request("body", "empty; send a JSON object (or a pairs file as application/jsonl, or a safetensors "
                                   "file as application/octet-stream)")
    return validation_error(error, union_tags=(*_JSON_SHAPES, _SAFETENSORS_TAG))


class VectorRoute(SteeringRoute):
    """The vector routes' route class: steering errors, with the create body's union read."""

    def validation_error(self, error: dict) -> SteeringError:
        return _validation_error(error)


def vector_router() -> APIRouter:
    router = APIRouter(route_class=VectorRoute)

    @router.post(VECTORS_PATH, status_code=201, openapi_extra=_UPLOAD_BODIES)
    async def create_vector(request: Request, spec: Annotated[VectorCreate, Body()], srv: Steer, tenant: Tenant,
                            name: str | None = None, method: str | None = None, layer: int | None = None,
                            layers: str | None = None, position: str | None = None, template: str | None = None):
        """Create a vector: JSON from contrast prompts (``additions`` or ``pairs``) or given
        directions (``layers``); a JSONL pairs file (one ``{"positive", "negative"}`` a line) as
        the raw body with the pairs body's other fields in the query (``?name=&method=&layers=all``,
        ``layers`` comma-separated); or a safetensors file (tensors ``layer.N``, ``[k, hidden]``)
        as the raw body with ``?name=``."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        options = {key: value for key, value in (("method", method), ("layer", layer), ("layers", layers),
                                                 ("position", position), ("template", template)) if value is not None}
        if isinstance(spec, bytes) and content_type in JSONL_TYPES:
            pairs, lines = _pairs_file(spec)
            content_id = await _create_from_pairs(srv, _pairs_file_spec(pairs, name, options), tenant, lines)
        elif options:
            raise bad_request(next(iter(options)), "a query parameter of a JSONL pairs upload (Content-Type "
                                                   "application/jsonl); a JSON body carries it in the body")
        elif isinstance(spec, bytes) and content_type in SAFETENSORS_TYPES:
            content_id = await srv.save(_vector_from_safetensors(srv, spec), name, tenant)
        else:
            if isinstance(spec, bytes):
                spec = _json_body(spec)  # JSON under another content type (curl -d sends a form's)
            if name is not None and "name" not in spec.model_fields_set:
                spec = spec.model_copy(update={"name": name})
            content_id = await _create_from_json(srv, spec, tenant)
        content_id, vector = await srv.lookup(content_id, tenant)
        return JSONResponse(await srv.describe(content_id, vector, tenant), status_code=201)

    @router.get(VECTORS_PATH)
    async def list_vectors(srv: Steer, tenant: Tenant, all: bool = False,  # noqa: A002 - the query parameter's name
                           limit: int = LIST_PAGE_DEFAULT, after: str | None = None):
        """The caller's tenant's named vectors, oldest first, one page at a time (``?all=true``: also the unnamed ones
        computed for requests): up to ``limit`` of them (default 100, at most 1000) after the
        cursor ``after``, the ``next_cursor`` of the page before (absent: the first page).
        ``has_more``: whether more followed this page when it was read (then ``next_cursor`` is
        set; null on the last page)."""
        if not 1 <= limit <= LIST_PAGE_MAX:
            raise bad_request("limit", f"expected 1..{LIST_PAGE_MAX} vectors a page, got {limit}")
        if after is not None:
            try:
                parse_order_key(after)
            except VectorStoreError as exc:
                raise bad_request("after", str(exc)) from None
        page = await srv.store.listing_page(limit, after, named_only=not all, tenant=tenant)
        data = []
        for entry in page.entries:
            shapes = entry.shapes
            if shapes is None:  # stored before shapes were kept beside the tensors: read them
                try:
                    vector = await srv.store.get(entry.content_id)
                except (VectorNotFound, VectorStoreError):
                    continue
                shapes = {layer: list(t.shape) for layer, t in vector.directions.items()}
            meta = entry.meta
            data.append({
                "id": entry.content_id,
                "names": entry.names,
                "kind": meta.kind,
                "method": meta.method,
                "model": meta.model_fingerprint,
                "served_model": meta.model_fingerprint == srv.model.fingerprint,
                "layers": sorted(shapes),
                "shape": {str(layer): shape for layer, shape in sorted(shapes.items())},
                "stats": meta.stats,
                "created": meta.created,
            })
        return {"object": "list", "data": data, "next_cursor": page.next_cursor,
                "has_more": page.next_cursor is not None}

    @router.post(VECTORS_PATH + "/import/gguf", status_code=201, openapi_extra=_BINARY_BODY)
    async def import_gguf_route(request: Request, srv: Steer, tenant: Tenant, name: str | None = None):
        """A llama.cpp control vector (the raw file as the body): ``direction.N`` becomes layer N+1."""
        from vector_store.gguf_io import import_gguf

        body = await request.body()
        if not body:
            raise bad_request("body", "empty; send the GGUF file's bytes")
        vector = import_gguf(body, model_fingerprint=srv.model.fingerprint, hidden_size=srv.model.hidden_size,
                             num_layers=srv.model.num_layers)
        vector = StoredVector(dataclasses.replace(vector.meta, created=time.time()), vector.directions)
        content_id = await srv.save(vector, name, tenant)
        content_id, vector = await srv.lookup(content_id, tenant)
        return JSONResponse(await srv.describe(content_id, vector, tenant), status_code=201)

    @router.get(VECTORS_PATH + "/{name_or_id}")
    async def get_vector(name_or_id: str, srv: Steer, tenant: Tenant, norms: bool = False):
        """Metadata; ``?norms=true`` adds each row's L2 norm and a typical token's norm at that layer."""
        content_id, vector = await srv.lookup(name_or_id, tenant)
        return await srv.describe(content_id, vector, tenant, norms=norms)

    @router.delete(VECTORS_PATH + "/{name_or_id}")
    async def delete_vector(name_or_id: str, srv: Steer, tenant: Tenant):
        """By name: the name goes, and the vector too once no name of the tenant points at it.
        By content id: the vector and every name of the tenant pointing at it. "Deleted" is the
        tenant's view: the content stays stored while another tenant references it."""
        target = await srv.store.name_target(name_or_id, tenant=tenant)
        if target is not None:
            await srv.store.delete_name(name_or_id, tenant=tenant)
            remaining = await srv.names_of(target, tenant)
            deleted = None
            if not remaining:
                await srv.store.delete(target, tenant=tenant)
                deleted = target
            return {"object": "steering.vector.deleted", "names_removed": [name_or_id], "deleted": deleted}
        content_id = await srv.store.resolve(name_or_id, tenant=tenant)
        names = await srv.names_of(content_id, tenant)
        await srv.store.delete(content_id, tenant=tenant)
        srv.store.forget(tenant, *names)
        return {"object": "steering.vector.deleted", "names_removed": names, "deleted": content_id}

    @router.get(VECTORS_PATH + "/{name_or_id}/gguf")
    async def export_gguf_route(name_or_id: str, srv: Steer, tenant: Tenant):
        """The vector as a llama.cpp control vector file (constant vectors, layers 2..num_layers)."""
        import io

        from vector_store.gguf_io import export_gguf

        content_id, vector = await srv.lookup(name_or_id, tenant)
        out = io.BytesIO()
        export_gguf(vector, out, srv.model_type, num_layers=srv.model.num_layers)
        filename = name_or_id if not name_or_id.startswith("v-") else content_id
        return Response(
            out.getvalue(),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{filename}.gguf"'},
        )

    return router


def _json_body(body: bytes) -> ActAddVectorCreate | ConstantVectorCreate | UploadVectorCreate:
    """A JSON body that came under a content type other than JSON's."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request("body", f"not valid JSON ({exc})") from None
    except RecursionError:
        raise bad_request("body", "JSON nested deeper than this server reads") from None
    try:
        return _JSON_CREATE.validate_python(payload)
    except ValidationError as exc:
        raise _validation_error(exc.errors()[0]) from None


async def _create_from_json(srv: SteerServer, spec: ActAddVectorCreate | ConstantVectorCreate | UploadVectorCreate,
                            tenant: str) -> str:
    resolver = srv.resolver
    if isinstance(spec, ActAddVectorCreate):
        _check_name(spec.name)
        resolver.check_layer(spec.layer, "layer")
        pad_id = resolver.default_pad_id
        if "pad" in spec.model_fields_set:
            pad_id = None if spec.pad is None else resolver.pad_token_id(spec.pad, "pad")
        prompts = [resolver.prompt_ids(a.prompt, f"additions[{i}].prompt", True) for i, a in enumerate(spec.additions)]
        content_ids = await srv.computer.actadd(prompts, spec.layer, pad_id, tenant=tenant)
        source = {
            "layer": spec.layer,
            "prompts": [a.prompt for a in spec.additions],
            "coeffs": [a.coeff for a in spec.additions],
            "pad_token_id": pad_id,
            "parts": content_ids,
        }
        content_id = await srv.computer.combine(list(zip(content_ids, [a.coeff for a in spec.additions])), source,
                                                tenant=tenant)
    elif isinstance(spec, ConstantVectorCreate):
        return await _create_from_pairs(srv, spec, tenant)
    else:
        directions = {}
        for key, rows in spec.layers.items():
            if not LAYER_NUMBER.fullmatch(key):
                raise bad_request(f"layers.{key}", "layer keys are decimal integers")
            layer = int(key)
            resolver.check_layer(layer, f"layers.{key}")
            try:
                tensor = torch.tensor(rows, dtype=torch.float32)
            except ValueError as exc:  # rows of different lengths
                raise bad_request(f"layers.{key}", f"rows of one length expected ({exc})") from None
            directions[layer] = _checked_rows(srv, tensor, f"layers.{key}")
        vector = StoredVector(_upload_meta(srv, directions, spec.kind, "upload"), directions)
        return await srv.save(vector, spec.name, tenant)
    return await _named(srv, content_id, spec.name, tenant)


def _check_name(name: str | None) -> None:
    """Before any computing: a bad name must not cost a capture."""
    if name is not None:
        from vector_store.codec import check_name

        check_name(name)


async def _named(srv: SteerServer, content_id: str, name: str | None, tenant: str) -> str:
    if name is not None:
        await srv.store.set_name(name, content_id, tenant=tenant)
    return content_id


async def _create_from_pairs(srv: SteerServer, spec: ConstantVectorCreate, tenant: str,
                             lines: list[int] | None = None) -> str:
    """A vector from contrast pairs; ``lines``: the file line of each pair, for a pairs file's errors."""
    _check_name(spec.name)
    layers = _pairs_layers(srv, spec)
    if spec.method in PCA_METHODS and len(spec.pairs) < 2:
        raise bad_request("pairs", f"{spec.method} needs at least 2 pairs (a principal component of one pair is "
                                   "not defined), got 1; mean_diff takes one")
    pairs = []
    for i, pair in enumerate(spec.pairs):
        try:
            pairs.append(tuple(_example_ids(srv, getattr(pair, side), f"pairs[{i}].{side}", spec.template)
                               for side in ("positive", "negative")))
        except SteeringError as exc:
            if lines is None:
                raise
            reason = exc.message.removeprefix(f"{exc.param}: ")
            raise bad_request(exc.param, f"line {lines[i]} of the file: {reason}") from None
    content_id = await srv.computer.from_pairs(pairs, layers, spec.method, spec.position, spec.template,
                                               tenant=tenant)
    return await _named(srv, content_id, spec.name, tenant)


def _pairs_layers(srv: SteerServer, spec: ConstantVectorCreate) -> list[int]:
    """The layers a pairs body asks for: ``layer``, or ``layers`` (a list or "all"), checked."""
    if spec.layer is not None and spec.layers is not None:
        raise bad_request("layers", f'give "layer" (one) or "layers" ({LAYERS_RULE}), not both')
    if spec.layer is not None:
        srv.resolver.check_layer(spec.layer, "layer")
        return [spec.layer]
    if spec.layers is None:
        raise bad_request("layer", f'required: one layer, or "layers": {LAYERS_RULE}')
    if spec.layers == "all":
        return list(range(srv.model.num_layers + 1))
    if not spec.layers:
        raise bad_request("layers", f"empty; expected {LAYERS_RULE}")
    for i, layer in enumerate(spec.layers):
        srv.resolver.check_layer(layer, f"layers[{i}]")
    return spec.layers


def _example_ids(srv: SteerServer, text: str, param: str, template: str | None) -> list[int]:
    """One example's token ids: as a prompt is tokenized, or rendered as a chat's user turn."""
    if template is None:
        return srv.resolver.prompt_ids(text, param, True)
    if not text:
        raise bad_request(param, "the prompt is empty")
    ids = srv.chat_prompt_ids(text)
    limit = srv.settings.max_prompt_tokens
    if len(ids) > limit:
        raise bad_request(param, f"the prompt has {len(ids)} tokens as the chat template renders it, over this "
                                 f"server's limit of {limit} (--max-steering-prompt-tokens)")
    return ids


def _pairs_file(body: bytes) -> tuple[list[dict], list[int]]:
    """A JSONL pairs file -> its pairs and the line each came from (blank lines are skipped);
    anything else is a 400 naming the line."""
    pairs, lines = [], []
    lacking: dict[int, str] = {}  # line -> the side it lacks
    for number, raw in enumerate(body.splitlines(), start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # an editor's BOM is not an error
        except UnicodeDecodeError as exc:
            raise bad_request("pairs", f"line {number} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except ValueError as exc:
            raise bad_request("pairs", f"line {number} is not valid JSON ({exc})") from None
        except RecursionError:
            raise bad_request("pairs", f"line {number} is JSON nested deeper than this server reads") from None
        if not isinstance(entry, dict):
            raise bad_request("pairs", f'line {number}: expected a {{"positive", "negative"}} object')
        for side in ("positive", "negative"):
            if side not in entry:
                lacking.setdefault(number, side)
            elif not isinstance(entry[side], str):
                raise bad_request("pairs", f'line {number}: "{side}" must be a string')
        pairs.append({side: entry.get(side) for side in ("positive", "negative")})
        lines.append(number)
    if lacking:
        positives = sum(pair["positive"] is not None for pair in pairs)
        negatives = sum(pair["negative"] is not None for pair in pairs)
        first = min(lacking)
        raise bad_request("pairs", f"the file has {positives} positives and {negatives} negatives on {len(pairs)} "
                                   f'lines: line {first} has no "{lacking[first]}" (each line holds one pair)')
    if not pairs:
        raise bad_request("pairs", 'the file holds no pairs; expected one {"positive", "negative"} object a line')
    return pairs, lines


def _pairs_file_spec(pairs: list[dict], name: str | None, options: dict) -> ConstantVectorCreate:
    """A pairs file's body: its pairs, and the fields the query gave."""
    payload: dict[str, Any] = {"pairs": pairs, **options}
    if name is not None:
        payload["name"] = name
    if isinstance(options.get("layers"), str) and options["layers"] != "all":
        try:
            payload["layers"] = [int(part) for part in options["layers"].split(",")]
        except ValueError:
            raise bad_request("layers", f'expected "all" or layers separated by commas (4,8,12), '
                                        f"got {options['layers']!r}") from None
    try:
        return _PAIRS_CREATE.validate_python(payload)
    except ValidationError as exc:
        raise validation_error(exc.errors()[0]) from None


def _checked_rows(srv: SteerServer, tensor: torch.Tensor, param: str) -> torch.Tensor:
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[0] == 0:
        raise bad_request(param, f"expected [k, hidden] or [hidden], got shape {list(tensor.shape)}")
    if tensor.shape[1] != srv.model.hidden_size:
        raise bad_request(param, f"rows have {tensor.shape[1]} values, the served model's hidden size is {srv.model.hidden_size}")
    if not bool(torch.isfinite(tensor).all()):
        raise bad_request(param, "holds NaN or infinite values")
    return tensor.contiguous()


def _upload_meta(srv: SteerServer, directions: dict[int, torch.Tensor], kind: str | None, method: str) -> VectorMeta:
    single = all(t.shape[0] == 1 for t in directions.values())
    if kind is None:
        kind = "constant" if single else "actadd"
    if kind not in ("actadd", "constant"):
        raise bad_request("kind", f"expected 'actadd' or 'constant', got {kind!r}")
    if kind == "constant" and not single:
        raise bad_request("kind", "a constant vector has one row per layer")
    return VectorMeta(srv.model.fingerprint, srv.model.hidden_size, kind, method, {}, time.time())


def _vector_from_safetensors(srv: SteerServer, body: bytes) -> StoredVector:
    from safetensors import SafetensorError, deserialize

    declared = int.from_bytes(body[:8], "little")
    if len(body) >= 8 and declared > min(len(body) - 8, MAX_SAFETENSORS_HEADER):
        raise bad_request("body", f"the safetensors header declares {declared} bytes; the body holds {len(body) - 8} "
                                  f"after the length, and a header here is at most {MAX_SAFETENSORS_HEADER}")
    try:
        entries = deserialize(body)  # checks every tensor's offsets and size against the body
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise bad_request("body", f"not a readable safetensors file ({exc})") from None
    if not entries:
        raise bad_request("body", "the safetensors file holds no tensors")
    directions = {}
    for key, entry in entries:
        param = f"body[{key!r}]"
        if not (key.startswith("layer.") and LAYER_NUMBER.fullmatch(key[6:])):
            raise bad_request(param, "tensors are named layer.N (N = the layer whose entering stream they steer)")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise bad_request(param, f"dtype {entry['dtype']}: expected a floating type, "
                                     f"one of {', '.join(SAFETENSORS_DTYPES)}")
        layer = int(key[6:])
        srv.resolver.check_layer(layer, param)
        values = torch.frombuffer(entry["data"], dtype=dtype) if entry["data"] else torch.empty(0, dtype=dtype)
        directions[layer] = _checked_rows(srv, values.reshape(entry["shape"]).to(torch.float32), param)
    return StoredVector(_upload_meta(srv, directions, None, "upload"), directions)
