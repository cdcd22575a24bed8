"""GET /v1/steering/vectors in pages (``limit``, ``after``), through the shared tiny server: every
vector once, oldest first; ``all``; a bad limit or cursor is a 400 naming it; the CLI's
``vectors list`` follows the cursors past one page of the largest size."""
from __future__ import annotations

import httpx
import pytest
import torch
from api_helpers import cli, error_of
from conftest import API_KEY

from steer_server.client import LIST_PAGE_MAX
from vector_store import StoredVector, VectorMeta, open_store

pytestmark = pytest.mark.slow

HIDDEN, LAYER = 128, 1
ROUTE = "/v1/steering/vectors"


@pytest.fixture
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        yield client


def walk(http: httpx.Client, **params) -> list[dict]:
    listed, after = [], None
    while True:
        page = http.get(ROUTE, params={**params, **({"after": after} if after else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        assert set(body) == {"object", "data", "next_cursor", "has_more"} and body["object"] == "list"
        assert body["has_more"] == (body["next_cursor"] is not None)
        assert len(body["data"]) <= params.get("limit", 100)
        listed += body["data"]
        if not body["has_more"]:
            return listed
        after = body["next_cursor"]


def test_pages_list_every_vector_once_oldest_first(http):
    made = []
    for i in range(9):
        name = f"paged-{i}" if i % 3 else None  # every third one unnamed
        body = {"layers": {str(LAYER): torch.randn(HIDDEN, generator=torch.Generator().manual_seed(900 + i)).tolist()}}
        created = http.post(ROUTE, json=body | ({"name": name} if name else {}))
        assert created.status_code == 201, created.text
        made.append((created.json()["id"], name))
    try:
        everything = walk(http, all="true", limit=1000)
        assert [(v["created"], v["id"]) for v in everything] == sorted((v["created"], v["id"]) for v in everything)
        for limit in (1, 2, 5):
            assert walk(http, all="true", limit=limit) == everything
        named = walk(http, limit=2)
        assert named == [v for v in everything if v["names"]]
        ids = [v["id"] for v in named]
        assert [content_id for content_id, name in made if name] == [i for i in ids if i in dict(made)]
        assert all(content_id not in ids for content_id, name in made if not name)
        first = http.get(ROUTE, params={"all": "true", "limit": 1}).json()
        assert len(first["data"]) == 1 and first["data"][0] == everything[0] and first["has_more"]
    finally:
        for content_id, _ in made:
            http.delete(f"{ROUTE}/{content_id}")


@pytest.mark.parametrize(("params", "param", "message"), [
    ({"limit": 0}, "limit", f"expected 1..{LIST_PAGE_MAX} vectors a page, got 0"),
    ({"limit": LIST_PAGE_MAX + 1}, "limit", f"expected 1..{LIST_PAGE_MAX} vectors a page, got {LIST_PAGE_MAX + 1}"),
    ({"limit": "ten"}, "limit", "valid integer"),
    ({"after": "garbage"}, "after", "not a listing cursor: 'garbage' (pass a next_cursor back unchanged)"),
    ({"after": "8000000000000000:v-" + "g" * 40}, "after", "not a listing cursor"),
])
def test_a_bad_limit_or_cursor_is_a_400_naming_it(http, params, param, message):
    response = http.get(ROUTE, params=params)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and message in error["message"], error


def test_openapi_documents_the_page_parameters(tiny_server):
    spec = httpx.get(tiny_server.url + "/openapi.json").json()
    params = {p["name"]: p for p in spec["paths"][ROUTE]["get"]["parameters"]}
    assert set(params) == {"all", "limit", "after"}
    assert params["limit"]["schema"]["default"] == 100


def test_cli_vectors_list_follows_the_cursors(tiny_server):
    """More named vectors than the largest page: the CLI shows every one (written straight into
    the server's store, as another replica would)."""
    store = open_store(str(tiny_server.store))
    made = []
    try:
        for i in range(LIST_PAGE_MAX + 5):
            direction = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(5000 + i))
            content_id = store.put(StoredVector(VectorMeta("cli-pages", HIDDEN, "constant"),
                                                {LAYER: direction}))
            store.set_name(f"clipage-{i:04d}", content_id)
            made.append(content_id)
        shown = cli(tiny_server, "vectors", "list").stdout
        assert all(f"clipage-{i:04d}" in shown for i in range(LIST_PAGE_MAX + 5))
    finally:
        for content_id in made:
            store.delete(content_id)
