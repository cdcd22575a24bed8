"""/metrics counters move; the prefix cache never hands steered KV to an unsteered request."""
from __future__ import annotations

import uuid

import httpx
import pytest

from fleet_processes import metric_samples

pytestmark = pytest.mark.slow


def metrics(server) -> dict[str, float]:
    return metric_samples(httpx.get(server.url + "/metrics").text)


def delta(before: dict, after: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_counters_move(server, client, http):
    words = [f" zq{uuid.uuid4().hex[:6]}", f" xv{uuid.uuid4().hex[:6]}"]  # never computed before
    steering = {"additions": [{"prompt": words[0], "coeff": 4, "layer": 5}, {"prompt": words[1], "coeff": -4, "layer": 5}]}
    requests_key = 'steer_requests_total{endpoint="completions",mode="actadd"}'

    before = metrics(server)
    client.completions.create(model=server.model, prompt="Some prompt that is long enough to steer",
                              max_tokens=2, extra_body={"steering": steering})
    first = metrics(server)
    assert delta(before, first, requests_key) == 1
    assert delta(before, first, 'steer_operation_requests_total{endpoint="completions",operation="add"}') == 1
    assert delta(before, first, "steer_vector_cache_misses_total") == 2  # two new prompts
    assert delta(before, first, "steer_vector_cache_hits_total") == 0
    assert delta(before, first, "steer_capture_seconds_count") == 1  # one capture for both
    assert delta(before, first, "steer_capture_seconds_sum") > 0

    client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi, how are you today?"}],
                                   max_tokens=2, extra_body={"steering": steering})
    second = metrics(server)
    assert delta(first, second, 'steer_requests_total{endpoint="chat",mode="actadd"}') == 1
    assert delta(first, second, "steer_vector_cache_hits_total") == 2  # both cached now
    assert delta(first, second, "steer_vector_cache_misses_total") == 0
    assert delta(first, second, "steer_capture_seconds_count") == 0

    http.post("/v1/completions", json={"model": server.model, "prompt": "x", "steering": {"additions": []}})
    assert delta(second, metrics(server), 'steer_rejected_requests_total{reason="invalid",status="400"}') == 1


def test_steered_kv_is_never_reused_unsteered(server, client):
    """Same prompt steered first, then unsteered: the unsteered request reuses nothing and
    answers what an isolated unsteered request (its own client cache_salt) answers."""
    marker = uuid.uuid4().hex[:8]
    prompt = f"Report {marker}. " + "The weather today was calm and the streets were quiet. " * 25
    steering = {"additions": [{"prompt": "Love", "coeff": 12, "layer": 3}, {"prompt": "Hate", "coeff": -12, "layer": 3}]}

    def run(**extra):
        response = client.completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0,
                                             extra_body=extra)
        return response.choices[0].text, response.usage.prompt_tokens_details.cached_tokens or 0

    steered, _ = run(steering=steering)
    steered_again, steered_cached = run(steering=steering)
    assert steered_again == steered and steered_cached > 0  # the prefix cache is on, and salted per steering
    unsteered, unsteered_cached = run()
    assert unsteered_cached == 0  # nothing from the steered requests
    isolated, _ = run(cache_salt=f"isolated-{marker}")
    assert unsteered == isolated != steered
    _, repeat_cached = run()
    assert repeat_cached > 0
