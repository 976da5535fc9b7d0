"""The local search page (`search.py serve`) on a tiny trained run: its JSON API over real HTTP,
and the page itself in a real headless Chromium (Debian's package, driven by Playwright)."""
from __future__ import annotations

import http.client
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

QUERY = "a person jumps twice"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What a closed network needs: no first-run, sync, component or other background traffic.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run_dir(indexed_run) -> Path:
    return indexed_run


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """`serve` on a free port (port 0: the server picks one and prints its URL)."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "rehamot/search.py", "serve", str(run_dir), "--port", "0"],
                                cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = _first_line(proc, timeout=180)
    match = re.search(r"http://127\.0\.0\.1:\d+/", line)  # bound to this machine only by default
    if not match:
        proc.kill()
        pytest.fail(f"serve printed no URL: {line!r}\n{log.read_text()[-3000:]}")
    yield {"url": match.group(0).rstrip("/"), "proc": proc, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def get(url: str) -> tuple[int, dict]:
    """(status, JSON body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        assert err.headers["Content-Type"].startswith("application/json")
        return err.code, json.loads(err.read())


def cli_json(*args: str, capsys) -> dict:
    from rehamot.search import main

    capsys.readouterr()
    assert main(["query", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------- the API


def test_api_search_equals_query_json(server, run_dir, capsys):
    status, api = get(f"{server['url']}/api/search?q={urllib.request.quote(QUERY)}&k=7")
    assert status == 200
    assert api == cli_json(str(run_dir), QUERY, "--top-k", "7", capsys=capsys)
    assert api["query"] == QUERY and [hit["rank"] for hit in api["hits"]] == list(range(1, 8))
    assert set(api["hits"][0]) == {"rank", "motion_id", "score", "captions"}
    scores = [hit["score"] for hit in api["hits"]]
    assert scores == sorted(scores, reverse=True)

    status, default = get(f"{server['url']}/api/search?q={urllib.request.quote(QUERY)}")
    assert status == 200 and len(default["hits"]) == 10  # the page's default k


def test_api_similar_equals_query_motion_json(server, run_dir, capsys):
    index = json.loads((run_dir / "index" / "index.json").read_text())
    motion_id = index["motions"][4]["id"]
    status, api = get(f"{server['url']}/api/similar/{motion_id}?k=5")
    assert status == 200
    assert api == cli_json(str(run_dir), "--motion", motion_id, "--top-k", "5", capsys=capsys)
    assert api["query"] == {"motion_id": motion_id}
    assert len(api["motions"]) == 5 and motion_id not in [hit["motion_id"] for hit in api["motions"]]
    assert set(api["captions"][0]) == {"rank", "caption_id", "motion_id", "text", "score"}


def test_api_motion_gives_the_indexed_joints_in_metres(server, run_dir):
    index = json.loads((run_dir / "index" / "index.json").read_text())
    joints = np.load(run_dir / "index" / "joints.npy")
    frames = [m["frames"] for m in index["motions"]]
    assert joints.shape == (sum(frames), 22, 3) and index["layout"] == "humanml3d" and index["fps"] == 20.0
    motion = index["motions"][2]
    status, body = get(f"{server['url']}/api/motion/{motion['id']}")
    assert status == 200
    assert set(body) == {"motion_id", "fps", "layout", "joints", "captions"}
    assert body["motion_id"] == motion["id"] and body["fps"] == 20.0
    assert body["captions"] == [c["text"] for c in motion["captions"]]
    start = sum(frames[:2])
    np.testing.assert_allclose(np.asarray(body["joints"]), joints[start:start + frames[2]], atol=6e-5)
    # metres: frame 0's root at the origin, a standing figure a metre or two tall
    assert body["joints"][0][0][0] == 0 and body["joints"][0][0][2] == 0
    assert 1.0 < np.ptp(np.asarray(body["joints"])[0, :, 1]) < 2.5
    assert max(frames) > 100  # whole clips, not the model's 100-frame crop


@pytest.mark.parametrize("path, status, message", [
    ("/api/search?q=", 400, "empty query"),
    ("/api/search?q=%20%20", 400, "empty query"),
    ("/api/search", 400, "empty query"),
    ("/api/search?q=jump&k=0", 400, "k must be an integer in [1, 100]"),
    ("/api/search?q=jump&k=101", 400, "k must be an integer in [1, 100]"),
    ("/api/search?q=jump&k=abc", 400, "k must be an integer in [1, 100]"),
    ("/api/search?q=jump&k=2.5", 400, "k must be an integer in [1, 100]"),
    ("/api/search?q=" + "a" * 1001, 400, "at most 1000"),
    ("/api/similar/000015?k=0", 400, "k must be an integer"),
    ("/api/motion/no-such-motion", 404, "unknown motion id"),
    ("/api/similar/no-such-motion", 404, "unknown motion id"),
    ("/api/motion/..%2F..%2Fconfig.yaml", 400, "invalid motion id"),
    ("/api/motion/%2Fetc%2Fpasswd", 400, "invalid motion id"),
    ("/api/motion/..", 400, "invalid motion id"),
    ("/api/motion/../../best/config.yaml", 404, "no such endpoint"),
    ("/static/../../config.yaml", 404, "not found"),
    ("/api/nothing", 404, "no such endpoint"),
])
def test_api_refuses_bad_input_with_a_json_error(server, path, status, message):
    # http.client sends the path exactly as written (no dot-segment clean-up, no re-quoting)
    connection = http.client.HTTPConnection(server["url"].removeprefix("http://"), timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == status, body
    assert response.getheader("Content-Type").startswith("application/json")
    assert message in body["error"] and body["status"] == status


def test_concurrent_requests_get_the_serial_answers(server):
    queries = ["a person jumps twice", "someone walks forward and turns left", "a man waves", "a woman kicks"]
    urls = [f"{server['url']}/api/search?q={urllib.request.quote(q)}&k=5" for q in queries]
    urls += [f"{server['url']}/api/motion/000015", f"{server['url']}/api/similar/000015?k=3"]
    serial = [get(url) for url in urls]
    with ThreadPoolExecutor(max_workers=len(urls) * 2) as pool:
        together = list(pool.map(get, urls * 2))
    assert together == serial * 2 and all(status == 200 for status, _ in serial)


def test_a_query_answers_well_under_a_second(server):
    url = f"{server['url']}/api/search?q={urllib.request.quote('someone does jumping jacks')}"
    times = []
    for _ in range(5):
        started = time.perf_counter()
        assert get(url)[0] == 200
        times.append(time.perf_counter() - started)
    assert sorted(times)[2] < 0.5, times  # the median; tens of ms on idle cores


# --------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip("the page test needs Debian's package `chromium` (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs Playwright (the `test` extra)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield page
    page.close()
    assert errors == []  # no script error, no failed request


HIT_IDS = "(list) => Array.from(document.querySelectorAll(list + ' [data-motion-id]')).map(e => e.dataset.motionId)"
# Per canvas: how many pixels are not background white, and a hash of all of them.
CANVAS_PIXELS = """(list) => Array.from(document.querySelectorAll(list + ' canvas')).map(c => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let ink = 0, hash = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i] < 200 || d[i + 1] < 200 || d[i + 2] < 200) ink++;
    hash = (Math.imul(hash, 31) + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) | 0;
  }
  return [ink, hash];
})"""


def wait_for_hits(page, selector: str, count: int) -> list[str]:
    page.wait_for_function(f"document.querySelectorAll('{selector} .hit.loaded').length === {count}", timeout=30_000)
    return page.evaluate(HIT_IDS, selector)


def test_the_page_shows_a_shared_search_in_rank_order_and_animates_it(server, page):
    status, api = get(f"{server['url']}/api/search?q={urllib.request.quote(QUERY)}")
    assert status == 200
    page.goto(f"{server['url']}/?q={urllib.request.quote(QUERY)}")
    assert wait_for_hits(page, "#hits", len(api["hits"])) == [hit["motion_id"] for hit in api["hits"]]
    assert page.input_value("#q") == QUERY
    assert page.locator("#hits .hit").first.locator(".score").inner_text() == f"{api['hits'][0]['score']:.3f}"

    before = page.evaluate(CANVAS_PIXELS, "#hits")
    page.wait_for_timeout(700)  # 14 frames at 20 fps
    after = page.evaluate(CANVAS_PIXELS, "#hits")
    assert all(ink > 200 for ink, _ in before), before  # every hit is drawn: floor and a figure
    changed = sum(a[1] != b[1] for a, b in zip(before, after))
    assert changed >= len(before) // 2, (before, after)  # the figures move


def test_clicking_a_hit_shows_it_with_more_like_this(server, page):
    page.goto(f"{server['url']}/?q={urllib.request.quote(QUERY)}")
    ids = wait_for_hits(page, "#hits", 10)
    page.click(f"#hits [data-motion-id='{ids[1]}']")
    page.wait_for_selector("#detail[open]")
    status, similar = get(f"{server['url']}/api/similar/{ids[1]}?k=6")
    assert status == 200
    assert wait_for_hits(page, "#similar", 6) == [hit["motion_id"] for hit in similar["motions"]]
    _, motion = get(f"{server['url']}/api/motion/{ids[1]}")
    assert page.locator("#detail-captions li").all_inner_texts() == motion["captions"]
    assert page.inner_text("#detail-title") == f"Motion {ids[1]}"
    first = page.evaluate(CANVAS_PIXELS, "#detail")[0]
    page.wait_for_timeout(700)
    assert first[0] > 200 and page.evaluate(CANVAS_PIXELS, "#detail")[0][1] != first[1]

    page.click("#similar .hit >> nth=0")  # one of those, in turn
    next_id = similar["motions"][0]["motion_id"]
    page.wait_for_function(f"document.querySelector('#detail-title').textContent === 'Motion {next_id}'")
    wait_for_hits(page, "#similar", 6)
    page.keyboard.press("Escape")
    page.wait_for_selector("#detail:not([open])", state="attached")


def test_a_new_search_gets_its_own_link(server, page):
    page.goto(f"{server['url']}/")
    page.fill("#q", "someone walks forward and turns left")
    page.press("#q", "Enter")
    page.wait_for_url(re.compile(r"/\?q=someone%20walks%20forward%20and%20turns%20left$"))
    _, api = get(f"{server['url']}/api/search?q={urllib.request.quote('someone walks forward and turns left')}")
    assert wait_for_hits(page, "#hits", 10) == [hit["motion_id"] for hit in api["hits"]]
    page.go_back()  # back to the empty page: no hits
    page.wait_for_function("document.querySelectorAll('#hits .hit').length === 0")


# --------------------------------------------------------------------------- stopping (keep last)


def test_ctrl_c_stops_the_server_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, server["log"].read_text()[-3000:]
    assert "search page stopped" in proc.stdout.read()
    assert "Traceback" not in server["log"].read_text()
