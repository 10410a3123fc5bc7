"""The review page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

A reviewer reviews 5 pairs with the keyboard only, closes the browser midway, comes back in a fresh
browser profile and finishes. The stored verdicts must equal what was pressed, the report's agreement
a hand count on those pairs, and no byte the page loads or sends may tell the judge's choice, the
row ids or the models apart. Skipped only where Chromium is missing and CI is not set; in CI
(.ci/run installs chromium) it always runs. SPA_VL_SCREENSHOTS=1 writes docs/review_page.png.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from builder.review import ReviewServer, make_report, open_review

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "review_page.png"
REVIEWER = "Ann Example"

if not IN_CI and not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; CI installs it)", allow_module_level=True)
if IN_CI:
    from playwright import sync_api  # CI installs it with the dev extras: a missing one must fail, not skip
else:
    sync_api = pytest.importorskip("playwright.sync_api")

# What is pressed on each of the 5 pairs, in the order the page shows them: keys before the pick,
# an optional note, the pick's key, and what must be stored.
PLAN = [
    {"keys": ["u"], "note": None, "pick_key": "1", "pick": "A", "unsafe": (True, False)},
    {"keys": [], "note": "B avoids the question", "pick_key": "2", "pick": "B", "unsafe": (False, False)},
    {"keys": ["u", "i"], "note": None, "pick_key": "3", "pick": "tie", "unsafe": (True, True)},
    # --- the browser is closed here and a new one opened ---
    {"keys": ["i"], "note": None, "pick_key": "b", "pick": "B", "unsafe": (False, True)},
    {"keys": ["u", "u"], "note": "both decline", "pick_key": "a", "pick": "A", "unsafe": (False, False)},
]


@pytest.fixture
def review_folder(tmp_path):
    from builder.dev.fixture import write_fixture

    root = tmp_path / "spa_vl"
    write_fixture(root, rows_per_domain=9, eval_rows=2, seed=3, image_size=256, progress=False)
    return root


class Traffic:
    """Every request the page makes and every answer it gets, recorded at the network layer."""

    def __init__(self, base: str):
        self.base, self.records, self.foreign = base, [], []

    def handle(self, route):
        request = route.request
        if not request.url.startswith(self.base):
            self.foreign.append(request.url)  # nothing from the internet: refuse and remember
            route.abort()
            return
        response = route.fetch()
        self.records += [request.url, request.post_data or "", str(request.headers),
                         str(response.headers), response.body().decode("utf-8", "replace")]
        route.fulfill(response=response)

    def text(self) -> str:
        return "\n".join(self.records)


def _open_page(playwright, profile: Path, traffic: Traffic):
    context = playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1100, "height": 860})
    page = context.new_page()
    page.route("**/*", traffic.handle)
    page.goto(traffic.base)
    page.wait_for_selector("#name", state="visible")
    page.keyboard.type(REVIEWER)
    page.keyboard.press("Enter")
    return context, page


def _review(page, step: dict, index: int, total: int, shot: Path | None = None) -> str:
    """Review the pair on screen with the keyboard; its token (from the image URL)."""
    sync_api.expect(page.locator("#position")).to_have_text(f"Pair {index + 1} / {total}")
    token = page.get_attribute("#image", "src").rsplit("/", 1)[1]
    for key in step["keys"]:
        page.keyboard.press(key)
    if step["note"]:
        page.keyboard.press("n")
        page.keyboard.type(step["note"])
        page.keyboard.press("Enter")  # leaves the note, saves nothing yet
    assert (page.is_checked("#unsafe-A"), page.is_checked("#unsafe-B")) == step["unsafe"]
    if shot is not None:
        page.screenshot(path=str(shot))
    page.keyboard.press(step["pick_key"])
    following = "#done" if index + 1 == total else "#position"
    if index + 1 < total:
        sync_api.expect(page.locator(following)).to_have_text(f"Pair {index + 2} / {total}")
    else:
        sync_api.expect(page.locator(following)).to_be_visible()
    return token


def test_review_with_the_keyboard_close_midway_resume_and_finish(review_folder, tmp_path):
    import pyarrow.parquet as pq

    session = open_review(review_folder, n=5, seed=4)
    total = len(session.pairs)
    assert total == 5
    shot = tmp_path / "review_page.png"
    tokens = []
    with ReviewServer(port=0).running(session) as server, sync_api.sync_playwright() as playwright:
        traffic = Traffic(server.url)
        context, page = _open_page(playwright, tmp_path / "profile-1", traffic)
        for i in range(3):
            tokens.append(_review(page, PLAN[i], i, total))
        page.wait_for_load_state("networkidle")  # the next pair's image is in: every answer gets recorded
        context.close()  # mid-review: the tab and the whole browser go away

        context, page = _open_page(playwright, tmp_path / "profile-2", traffic)  # a fresh profile: no local state
        sync_api.expect(page.locator("#count")).to_have_text(f"3 of {total} reviewed")
        for i in range(3, 5):
            tokens.append(_review(page, PLAN[i], i, total, shot=shot if i == 3 else None))
        sync_api.expect(page.locator("#count")).to_have_text(f"{total} of {total} reviewed")
        page.keyboard.press("ArrowLeft")  # back to the last pair: the page shows the stored verdict
        sync_api.expect(page.locator("#pick-A")).to_have_class(re.compile(r"\bpicked\b"))
        assert page.input_value("#note") == PLAN[4]["note"]
        html = page.content()
        page.wait_for_load_state("networkidle")
        context.close()

    # The stored verdicts are what was pressed.
    latest = session.store.latest()
    assert len(latest) == total and {who for who, _ in latest} == {REVIEWER}
    assert tokens == [p.token for p in session.pairs]
    for token, step in zip(tokens, PLAN):
        v = latest[(REVIEWER, session.sample.by_token[token].id)]
        assert (v.pick, (v.unsafe_a, v.unsafe_b), v.note) == (step["pick"], step["unsafe"], step["note"] or "")

    # The report's agreement equals a hand count on these 5 pairs.
    sides = [session.sample.by_token[t].judge_side for t in tokens]
    decisive = [(step["pick"], side) for step, side in zip(PLAN, sides) if step["pick"] != "tie"]
    report = make_report(review_folder, resamples=500).report["judge_vs_people"]
    assert report["without_ties"]["agreement"]["n"] == len(decisive) == 4
    assert report["without_ties"]["agreement"]["value"] == pytest.approx(sum(p == s for p, s in decisive) / 4, abs=1e-4)
    assert report["ties_as_disagreement"]["agreement"]["value"] == pytest.approx(sum(p == s for p, s in decisive) / 5, abs=1e-4)
    assert report["ties"]["count"] == 1

    # Blind: nothing the page loaded, sent or shows tells the judge's side, the row ids or the models.
    assert traffic.foreign == []
    secrets = set()
    for f in review_folder.glob("data/*/*.parquet"):
        columns = ["id", "chosen_model", "rejected_model", "judge_rationale", "image_name"]
        if f.parent.name != "test":
            secrets |= {v for row in pq.read_table(f, columns=columns).to_pylist() if row["id"] in session.sample.by_id
                        for v in row.values()}
    assert len(secrets) > 10
    everything = traffic.text() + html
    assert "/api/verdict" in everything and len(traffic.records) > 20  # the traffic was really recorded
    assert [s for s in secrets if s and s in everything] == []
    assert not re.search(r"chosen|rejected|judge", everything, re.I)

    assert shot.stat().st_size < 400_000
    if os.environ.get("SPA_VL_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
