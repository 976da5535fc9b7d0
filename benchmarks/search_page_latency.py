"""Search page latency: what a page query costs end to end, over real HTTP on loopback.

    python benchmarks/search_page_latency.py RUN_DIR [--queries 20] [--top-k 10] [--screenshot PNG]

Starts `rehamot/search.py serve RUN_DIR` (its index built beforehand with `search.py index`) on
a free port and times GET /api/search for `--queries` different descriptions, one at a time
after one warm-up query: the text tower, the matrix-vector product, the JSON, the HTTP round
trip. Also times GET /api/motion/ID for each top hit (the page fetches one per drawn hit).
With --screenshot, headless Chromium (Debian's package) also saves the page showing one query.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUERIES = [
    "a person jumps twice", "someone walks forward and then turns left", "a man waves with his right hand",
    "a woman does jumping jacks", "a person kicks with the left leg", "someone runs in a circle",
    "a person sits down and stands up", "the figure crouches and then jumps forward", "someone punches twice",
    "a person walks backwards slowly", "a dancer spins around", "someone claps their hands three times",
    "a man lunges forward with his right leg", "a person hops on one foot", "someone raises both arms",
    "a person turns right and walks away", "a child skips forward", "someone stretches their arms above the head",
    "a person jogs on the spot", "a man bends down to pick something up",
]
SCREENSHOT_QUERY = "a person jumps twice and then turns left"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start_server(run_dir: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(REPO / "rehamot" / "search.py"), "serve", run_dir, "--port", "0"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    line = proc.stdout.readline() if ready else ""
    match = re.search(r"http://[\d.]+:\d+", line)
    if not match:
        proc.kill()
        raise SystemExit(f"serve printed no URL: {line!r}")
    return proc, match.group(0)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def timed(url: str) -> tuple[float, dict]:
    started = time.perf_counter()
    body = get_json(url)
    return time.perf_counter() - started, body


def summary(seconds: list[float]) -> str:
    ms = sorted(1e3 * s for s in seconds)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return f"median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms, min {ms[0]:.1f} ms, max {ms[-1]:.1f} ms"


def screenshot(url: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"{url}/?q={urllib.parse.quote(SCREENSHOT_QUERY)}")
        page.wait_for_function("document.querySelectorAll('#hits .hit').length > 0 && "
                               "document.querySelectorAll('#hits .hit:not(.loaded)').length === 0", timeout=60_000)
        page.wait_for_timeout(1500)  # figures mid-motion
        page.screenshot(path=str(out))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--queries", type=int, default=20, help=f"at most {len(QUERIES)}")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--screenshot", type=Path, default=None, metavar="PNG")
    args = parser.parse_args()
    proc, url = start_server(args.run_dir)
    try:
        info = get_json(f"{url}/api/info")
        get_json(f"{url}/api/search?q=warm+up&k={args.top_k}")
        search_times, motion_times = [], []
        for text in QUERIES[: args.queries]:
            seconds, result = timed(f"{url}/api/search?q={urllib.parse.quote(text)}&k={args.top_k}")
            search_times.append(seconds)
            motion_times.append(timed(f"{url}/api/motion/{result['hits'][0]['motion_id']}")[0])
        print(f"{info['num_motions']} {info['split']} motions of {info['corpus']}, top-{args.top_k}, "
              f"{len(search_times)} queries, one at a time, loopback HTTP:")
        print(f"  GET /api/search: {summary(search_times)}")
        print(f"  GET /api/motion: {summary(motion_times)}")
        if args.screenshot:
            screenshot(url, args.screenshot)
            print(f"  screenshot: {args.screenshot} ({args.screenshot.stat().st_size // 1024} KB)")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
