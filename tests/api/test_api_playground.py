"""The web playground (/playground), driven in a real headless Chromium against the session server.

What the page shows is checked against the server's own answers through the openai SDK and
httpx (greedy decoding, so each request has one right answer): the two columns, the server's
error message, the library's vectors and norms; the copied curl and openai-Python snippets
are run for real and must print the steered column. Screenshots go to
``test-artifacts/playground/`` (or ``$STEER_TEST_ARTIFACTS/playground``) for a person to look at.

The server is the session's float32 default-model server (tests/default_server.py): the page
sends its two requests at once, and only in float32 do batched and lone requests agree closely
enough to compare the columns token for token with requests sent one at a time.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from steer_server.measure.data import sentiment_pairs_file

from api_helpers import BOS, error_of
from conftest import Server, http_client, sdk_client
from default_server import ADMIN_KEY, INFERENCE_KEY

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver on PATH (.ci/run installs them)")

ARTIFACTS = Path(os.environ.get("STEER_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts")) / "playground"
PROMPT = BOS + "I went up to my friend and said"
WEDDINGS_LAYER, WEDDINGS_COEFF, MAX_TOKENS = 15, 6, 24
WAIT_S = 240  # a loaded 2-core machine



@pytest.fixture(scope="module")
def server(fp32_default_server) -> Server:
    """The session's float32 default-model server, as this module's ``server``."""
    return Server(url=fp32_default_server.url, api_key=INFERENCE_KEY, model=fp32_default_server.model,
                  store=fp32_default_server.store, log=fp32_default_server.log)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return sdk_client(server)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    """With the admin key: vector writes need it on this server."""
    with http_client(server, ADMIN_KEY) as c:
        yield c


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str):
    """Until ``condition(driver)``; an element replaced while it was read is read again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
        lambda d: condition(d), message=what)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def text_of(driver, element_id: str) -> str:
    """The element's exact text (Selenium's ``.text`` trims and folds whitespace)."""
    return by_id(driver, element_id).get_attribute("textContent")


def set_value(driver, element_id: str, value: str) -> None:
    element = by_id(driver, element_id)
    element.clear()
    element.send_keys(value)


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


@pytest.fixture(scope="module")
def page(browser, server):
    """The playground, logged in through its key form with the admin key (the library writes)."""
    browser.get(server.url + "/playground")
    set_value(browser, "api-key", ADMIN_KEY)
    shot(browser, "0-key-form")
    by_id(browser, "login").click()
    wait_for(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "yes",
             "the playground to load its model")
    return browser


def steer_rows(driver, rows: list[dict]) -> None:
    """Replace the builder's rows: each {source, text, coeff, layer} (operation add), in actadd mode."""
    from selenium.webdriver.support.select import Select

    Select(by_id(driver, "mode")).select_by_value("actadd")
    driver.execute_script("document.getElementById('steering-rows').replaceChildren()")
    for row in rows:
        by_id(driver, "add-row").click()
        tr = driver.find_elements("css selector", "#steering-rows tr")[-1]
        Select(tr.find_element("css selector", ".row-source")).select_by_value(row["source"])
        for cls, key in ((".row-text", "text"), (".row-coeff", "coeff"), (".row-layer", "layer")):
            field = tr.find_element("css selector", cls)
            field.clear()
            field.send_keys(str(row.get(key, "")))


def weddings(coeff=WEDDINGS_COEFF) -> list[dict]:
    return [{"source": "prompt", "text": BOS + " weddings", "coeff": coeff, "layer": WEDDINGS_LAYER},
            {"source": "prompt", "text": BOS + " ", "coeff": -WEDDINGS_COEFF, "layer": WEDDINGS_LAYER}]


def api_steering(coeff=WEDDINGS_COEFF) -> dict:
    return {"additions": [{"prompt": BOS + " weddings", "coeff": coeff, "layer": WEDDINGS_LAYER},
                          {"prompt": BOS + " ", "coeff": -WEDDINGS_COEFF, "layer": WEDDINGS_LAYER}], "receipt": True}


def generate(driver) -> None:
    by_id(driver, "run").click()
    wait_for(driver, lambda d: by_id(d, "run-status").text in ("done", "stopped"), "both columns to finish")


def compose(driver) -> None:
    set_value(driver, "prompt", PROMPT)
    set_value(driver, "max-tokens", str(MAX_TOKENS))
    set_value(driver, "temperature", "0")


# ------------------------------------------------------------------ without a browser: the key check


def test_page_and_assets_need_the_servers_key(server):
    assert httpx.get(server.url + "/playground").status_code == 401
    form = httpx.get(server.url + "/playground")
    assert 'id="api-key"' in form.text and "playground-config" not in form.text
    assert httpx.get(server.url + "/playground/assets/playground.js").status_code == 401
    wrong = httpx.get(server.url + "/playground", cookies={"steer_api_key": "not-the-key"})
    assert wrong.status_code == 401
    for auth in ({"headers": {"Authorization": f"Bearer {server.api_key}"}}, {"cookies": {"steer_api_key": server.api_key}},
                 {"cookies": {"steer_api_key": ADMIN_KEY}}):
        page = httpx.get(server.url + "/playground", **auth)
        assert page.status_code == 200, page.text[:300]
        config = json.loads(re.search(r'id="playground-config" type="application/json">(.*?)</script>', page.text).group(1))
        assert config["num_layers"] == 30 and config["hidden_size"] == 576 and config["keys"] is True and config["roles"] is True
        script = httpx.get(server.url + "/playground/assets/playground.js", **auth)
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    missing = httpx.get(server.url + "/playground/assets/nope.js", cookies={"steer_api_key": server.api_key})
    assert missing.status_code == 404 and "nope.js" in missing.json()["error"]["message"]


def test_page_loads_nothing_from_elsewhere(server):
    """Every script, stylesheet and image the page names is one of this server's own paths."""
    auth = {"cookies": {"steer_api_key": server.api_key}}
    html = httpx.get(server.url + "/playground", **auth).text
    script = httpx.get(server.url + "/playground/assets/playground.js", **auth).text
    css = httpx.get(server.url + "/playground/assets/playground.css", **auth).text
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == ["/playground/assets/playground.css", "/playground/assets/playground.js"]
    assert not re.search(r"https?://", css)
    assert not re.search(r"""(?:fetch|import)\(\s*["'`]https?://""", script)


# ------------------------------------------------------------------ in the browser


def test_both_columns_fill_and_match_the_api(page, client, server):
    # The API's answers first, one at a time (float32: see the module's docstring).
    expected_plain = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                               top_p=1).choices[0].text
    expected = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, top_p=1,
                                         extra_body={"steering": api_steering()})
    compose(page)
    steer_rows(page, weddings())
    generate(page)
    shot(page, "1-side-by-side")
    plain, steered = text_of(page, "out-plain"), text_of(page, "out-steered")
    assert plain == expected_plain and plain
    assert steered == expected.choices[0].text and steered
    assert plain != steered
    receipt = [row.text.split() for row in page.find_elements("css selector", "#receipt-rows tr")]
    assert [r[:2] for r in receipt] == [[str(WEDDINGS_LAYER), "add"]]
    assert by_id(page, "error-plain").is_displayed() is False and by_id(page, "error-steered").is_displayed() is False


def test_sentiment_preset_steers_by_name_at_the_calibrated_setting(page, client, server, http):
    """The preset builds the shipped sentiment vector and calibrates it on first use; here the
    vector is made and calibrated through the API first (a one-cell grid keeps the test short),
    so the preset finds both and only fills the builder: one row, the vector by name, no number."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    made = http.post("/v1/steering/vectors", params={"name": "sentiment", "layers": "12,15"},
                     headers={**admin, "Content-Type": "application/jsonl"}, content=sentiment_pairs_file().read_bytes())
    assert made.status_code == 201, made.text
    calibrated = http.post("/v1/steering/vectors/sentiment/calibrate", headers=admin, json={
        "layers": [15], "doses": [0.3], "prompts": ["The weather"], "samples": 1, "max_tokens": 4, "budget": 100})
    assert calibrated.status_code == 200, calibrated.text
    compose(page)
    by_id(page, "preset-sentiment").click()
    wait_for(page, lambda d: "calibrated" in by_id(d, "run-status").text, "the preset to fill the builder")
    (row,) = page.find_elements("css selector", "#steering-rows tr")
    from selenium.webdriver.support.select import Select

    assert Select(row.find_element("css selector", ".row-strength")).first_selected_option.text == "calibrated"
    assert not row.find_element("css selector", ".row-coeff").is_displayed()
    generate(page)
    shot(page, "1b-sentiment-calibrated")
    expected = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                         top_p=1, extra_body={"steering": {"additions": [{"vector": "sentiment"}]}})
    assert text_of(page, "out-steered") == expected.choices[0].text
    code = page.find_element("id", "code-python").get_attribute("textContent")
    assert "sentiment" in code and "coeff" not in code and "dose" not in code  # by name, no number

    # The weddings preset: the shipped wedding pairs made into a vector on first use, at a dose.
    by_id(page, "preset-weddings").click()
    wait_for(page, lambda d: len(d.find_elements("css selector", "#steering-rows tr")) == 1
             and d.find_element("css selector", "#steering-rows .row-text").get_attribute("value") == "weddings",
             "the weddings preset")
    row = page.find_element("css selector", "#steering-rows tr")
    assert Select(row.find_element("css selector", ".row-strength")).first_selected_option.text == "dose"
    assert http.get("/v1/steering/vectors/weddings").json()["stats"]["12"]["separation"] > 0.5
    generate(page)
    expected = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                         top_p=1, extra_body={"steering": {"mode": "constant", "additions": [
                                             {"vector": "weddings", "dose": 0.075, "layer": 12}]}})
    assert text_of(page, "out-steered") == expected.choices[0].text != text_of(page, "out-plain")
    by_id(page, "preset-love-hate").click()  # the page as the other tests expect it: actadd mode


def test_chat_columns_match_the_api(page, client, server):
    question = "What should I do this weekend?"
    steering = {"additions": [{"prompt": " weddings", "coeff": WEDDINGS_COEFF, "layer": WEDDINGS_LAYER},
                              {"prompt": " ", "coeff": -WEDDINGS_COEFF, "layer": WEDDINGS_LAYER}], "receipt": True}
    ask = dict(model=server.model, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS,
               temperature=0, top_p=1)
    expected_plain = client.chat.completions.create(**ask).choices[0].message.content
    expected = client.chat.completions.create(**ask, extra_body={"steering": steering}).choices[0].message.content
    from selenium.webdriver.support.select import Select

    Select(by_id(page, "endpoint")).select_by_value("chat")
    assert by_id(page, "system").is_displayed() and by_id(page, "anchor").is_displayed()
    compose(page)
    set_value(page, "prompt", question)
    steer_rows(page, [{"source": "prompt", "text": " weddings", "coeff": WEDDINGS_COEFF, "layer": WEDDINGS_LAYER},
                      {"source": "prompt", "text": " ", "coeff": -WEDDINGS_COEFF, "layer": WEDDINGS_LAYER}])
    generate(page)
    shot(page, "1b-chat")
    assert text_of(page, "out-plain") == expected_plain
    assert text_of(page, "out-steered") == expected != expected_plain
    assert f"{server.url}/v1/chat/completions" in text_of(page, "code-curl")
    Select(by_id(page, "endpoint")).select_by_value("completion")
    assert not by_id(page, "system").is_displayed()


def test_copied_curl_and_python_print_the_steered_column(page, server):
    compose(page)
    steer_rows(page, weddings())
    generate(page)
    env = dict(os.environ, STEER_API_KEY=server.api_key)
    steered = text_of(page, "out-steered")
    curl = text_of(page, "code-curl")
    assert curl.startswith(f"curl -sN {server.url}/v1/completions")
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, env=env, timeout=WAIT_S, check=True).stdout
    chunks = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == steered
    assert chunks[-1]["steering_receipt"]["layers"][0]["layer"] == WEDDINGS_LAYER
    code = text_of(page, "code-python")
    assert "extra_body=" in code and '"steering"' in code
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=WAIT_S)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == steered + "\n"


def test_bad_coefficient_shows_the_servers_error(page, http, server):
    compose(page)
    steer_rows(page, weddings(coeff="lots"))
    generate(page)
    shot(page, "2-bad-coefficient")
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True,
            "steering": {**api_steering(), "additions": [{**api_steering()["additions"][0], "coeff": "lots"},
                                                         api_steering()["additions"][1]]}}
    expected = error_of(http.post("/v1/completions", json=body))
    assert expected["param"] == "steering.additions[0].coeff"
    shown = by_id(page, "error-steered")
    assert shown.is_displayed() and shown.text == f"HTTP 400: {expected['message']}"
    assert text_of(page, "out-steered") == "" and text_of(page, "out-plain")  # the other column still ran


def _library_rows(driver) -> dict[str, dict]:
    """The library table, read in one go (it is re-rendered whenever the list reloads)."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#vector-rows tr')].map(tr => [tr.dataset.id, [...tr.children].map(td => td.textContent)])")
    return {id_: {"names": cells[0], "layers": cells[3], "norms": cells[4]} for id_, cells in rows}


def _open_library(driver) -> None:
    by_id(driver, "tab-library").click()
    wait_for(driver, lambda d: "vector(s)" in by_id(d, "library-status").text or by_id(d, "library-error").is_displayed(),
             "the library to load")


def test_library_lists_a_vector_made_through_the_api(page, http):
    made = http.post("/v1/steering/vectors", json={"name": "pg-love", "layer": 5,
                                                   "pairs": [{"positive": "Love", "negative": "Hate"}]})
    assert made.status_code == 201, made.text
    vector = made.json()
    _open_library(page)
    shot(page, "3-library")
    row = _library_rows(page)[vector["id"]]
    assert row["names"] == "pg-love" and row["layers"] == "5"
    assert row["norms"] == f"5: {vector['norm']['5']:.2f}"


def test_library_creates_imports_and_deletes(page, http, tmp_path):
    _open_library(page)
    set_value(page, "pairs-name", "pg-calm")
    set_value(page, "pairs-layer", "7")
    set_value(page, "pairs-text", "Calm | Angry")
    by_id(page, "pairs-create").click()
    wait_for(page, lambda d: any(r["names"] == "pg-calm" for r in _library_rows(d).values()), "pg-calm in the library")
    stored = http.get("/v1/steering/vectors/pg-calm").json()
    assert stored["layers"] == [7] and stored["kind"] == "constant"
    assert stored["source"]["pairs_text"] == [["Calm", "Angry"]]

    gguf = http.get("/v1/steering/vectors/pg-calm/gguf")
    assert gguf.status_code == 200
    path = tmp_path / "calm.gguf"
    path.write_bytes(gguf.content)
    set_value(page, "gguf-name", "pg-calm-gguf")
    by_id(page, "gguf-file").send_keys(str(path))
    by_id(page, "gguf-import").click()
    wait_for(page, lambda d: any(r["names"] == "pg-calm-gguf" for r in _library_rows(d).values()), "the GGUF import")
    imported = http.get("/v1/steering/vectors/pg-calm-gguf").json()
    assert imported["layers"] == [7] and abs(imported["norm"]["7"] - stored["norm"]["7"]) < 1e-3 * stored["norm"]["7"]
    shot(page, "4-library-after-import")

    delete = f'tr[data-id="{stored["id"]}"] .vector-delete'
    page.find_element("css selector", delete).click()
    wait_for(page, lambda d: d.find_element("css selector", delete).text == "confirm delete", "the delete to arm")
    assert http.get("/v1/steering/vectors/pg-calm").status_code == 200  # the first click only arms it
    page.find_element("css selector", delete).click()
    wait_for(page, lambda d: stored["id"] not in _library_rows(d), "the deleted vector to leave the list")
    assert http.get("/v1/steering/vectors/pg-calm").status_code == 404


def test_sweep_heatmap(page):
    by_id(page, "tab-sweep").click()
    set_value(page, "sweep-a", BOS + " weddings")
    set_value(page, "sweep-b", BOS + " ")
    set_value(page, "sweep-layers", f"{WEDDINGS_LAYER}, 10")
    set_value(page, "sweep-coeffs", "0, 8")
    set_value(page, "sweep-prompts", PROMPT)
    set_value(page, "sweep-samples", "2")
    set_value(page, "sweep-max-tokens", "12")
    by_id(page, "sweep-run").click()
    wait_for(page, lambda d: by_id(d, "sweep-progress").text == "done" or by_id(d, "sweep-error").is_displayed(),
             "the sweep to finish")
    shot(page, "5-sweep")
    assert not by_id(page, "sweep-error").is_displayed(), by_id(page, "sweep-error").text
    table = [[td.text for td in tr.find_elements("tag name", "td")]
             for tr in page.find_elements("css selector", "#sweep-heatmap tr")]
    assert table[0] == ["layer \\ coeff", "0", "8"]
    assert [row[0] for row in table[1:]] == [str(WEDDINGS_LAYER), "10"]
    for row in table[1:]:
        assert all(0.0 <= float(v) <= 1.0 for v in row[1:])  # topic shares
    assert by_id(page, "sweep-baseline").text.startswith("unsteered: ")


# ------------------------------------------------------------------ the sweep route itself


def _sweep(http, **fields) -> httpx.Response:
    body = {"steering": {"prompts": [{"prompt": BOS + " weddings", "weight": 1}, {"prompt": BOS + " ", "weight": -1}]},
            "prompts": [PROMPT], "layers": [WEDDINGS_LAYER], "coeffs": [0, WEDDINGS_COEFF], "samples": 1,
            "max_tokens": 16, "temperature": 0, **fields}
    return http.post("/v1/steering/sweeps", json=body)


def test_sweep_route_greedy_cells_agree_with_direct_requests(http, client, server):
    """At coefficient 0 the steered cell is the unsteered answer; at 8 it is the API's steered answer."""
    from steer_server.eval import wedding_lexicon
    from steer_server.measure.metrics import distinct_n

    result = _sweep(http)
    assert result.status_code == 200, result.text
    cells = {(c["arm"], c["coeff"]): c["metrics"] for c in result.json()["cells"]}
    assert set(cells) == {("unsteered", None), ("steered", 0.0), ("steered", WEDDINGS_COEFF)}
    assert cells[("steered", 0.0)] == cells[("unsteered", None)]
    steered = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, temperature=0, top_p=0.3,
                                        extra_body={"repetition_penalty": 1.2, "steering": api_steering()}).choices[0].text
    assert cells[("steered", WEDDINGS_COEFF)]["distinct2"]["value"] == pytest.approx(distinct_n(steered, 2))
    assert cells[("steered", WEDDINGS_COEFF)]["topic"]["value"] == float(wedding_lexicon().mentions(steered))


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"layers": [99]}, "layers[0]", "99 is outside 0..30"),
    ({"layers": list(range(5)), "coeffs": [1, 2, 3, 4, 5]}, None, "25 layer × coefficient cells; a sweep here runs at most 24"),
    ({"samples": 9}, "samples", "less than or equal to 8"),
    ({"steering": {"vector": "x", "prompts": [{"prompt": "a", "weight": 1}]}}, "steering", "give exactly one of"),
])
def test_sweep_route_refuses_what_it_cannot_run(http, fields, param, message):
    response = _sweep(http, **fields)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert message in error["message"]
    if param is not None:
        assert error["param"] == param


def test_sweep_route_names_a_missing_vector(http):
    response = _sweep(http, steering={"vector": "no-such-vector"}, floor=True)
    assert response.status_code == 404
    assert "no-such-vector" in error_of(response)["message"]


def test_sweep_route_streams_progress_then_the_result(http):
    with http.stream("POST", "/v1/steering/sweeps", json={
            "steering": {"prompts": [{"prompt": " weddings", "weight": 1}]}, "prompts": [PROMPT], "layers": [3],
            "coeffs": [2], "samples": 1, "max_tokens": 4, "stream": True}) as response:
        assert response.status_code == 200
        events = re.findall(r"event: (\w+)\ndata: (.*)\n\n", "".join(response.iter_text()))
    names = [name for name, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"progress"}
    assert json.loads(events[-2][1]) == {"done": 2, "total": 2}
    assert {c["arm"] for c in json.loads(events[-1][1])["cells"]} == {"unsteered", "steered"}



def test_an_inference_key_sees_why_it_may_not_delete(page, server, http):
    """Last: it logs the page in with the inference key."""
    made = http.post("/v1/steering/vectors", json={"name": "pg-keep", "layer": 4,
                                                   "pairs": [{"positive": "Yes", "negative": "No"}]}).json()
    page.delete_all_cookies()
    page.get(server.url + "/playground")
    set_value(page, "api-key", server.api_key)
    by_id(page, "login").click()
    wait_for(page, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "yes", "the page")
    _open_library(page)
    delete = f'tr[data-id="{made["id"]}"] .vector-delete'
    page.find_element("css selector", delete).click()
    wait_for(page, lambda d: d.find_element("css selector", delete).text == "confirm delete", "the delete to arm")
    page.find_element("css selector", delete).click()
    wait_for(page, lambda d: by_id(d, "library-error").is_displayed(), "the refusal")
    shot(page, "6-inference-key-delete-refused")
    refused = httpx.delete(f"{server.url}/v1/steering/vectors/{made['id']}",
                           headers={"Authorization": f"Bearer {server.api_key}"})
    assert refused.status_code == 403
    assert by_id(page, "library-error").text == f"HTTP 403: {error_of(refused)['message']}"
    assert http.get("/v1/steering/vectors/pg-keep").status_code == 200
