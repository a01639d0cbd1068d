"""Two headless chromium pages create and join a game by code and play it to a win."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect, sync_playwright

pytestmark = pytest.mark.timeout(180)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def test_two_browsers_play_tictactoe_to_a_win(node, artifacts):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            # Two people: separate contexts, so separate cookies (player ids). Bob is on a phone.
            ann = browser.new_context(viewport={"width": 1024, "height": 800}).new_page()
            bob = browser.new_context(
                viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
            ).new_page()
            for page in (ann, bob):
                page.set_default_timeout(10_000)

            ann.goto(node.url + "/")
            ann.get_by_label("Game", exact=True).select_option("tictactoe")
            ann.get_by_role("button", name="Create game").click()
            ann.wait_for_url(re.compile(r"/g/[A-Z]{4}$"))
            code = ann.locator("#code").inner_text()
            ann.get_by_label("Your name").fill("Ann")
            ann.get_by_role("button", name="Join game").click()
            expect(ann.locator(".seat-0")).to_contain_text("Ann (you)")

            bob.goto(node.url + "/")
            bob.get_by_label("Game code").fill(code.lower())
            bob.get_by_role("button", name="Join").click()
            bob.wait_for_url(re.compile(f"/g/{code}$"))
            expect(bob.locator(".seat-0")).to_contain_text("Ann")
            bob.get_by_label("Your name").fill("<b>Bob</b>")
            bob.keyboard.press("Enter")  # keyboard play: submit the focused form
            expect(ann.locator(".seat-1")).to_contain_text("<b>Bob</b>")  # shown as text

            ann.get_by_role("button", name="Start").click()
            expect(ann.locator("#status")).to_contain_text("Your turn")
            expect(bob.locator("#status")).to_contain_text("Ann to move")

            moves = [(ann, 0, "X"), (bob, 3, "O"), (ann, 1, "X"), (bob, 4, "O")]
            for page, cell, mark in moves:
                other = bob if page is ann else ann
                page.locator(f"#cell-{cell}").click()
                expect(other.locator(f"#cell-{cell}")).to_have_text(mark)  # the other page sees it
            # Ann plays her winning move with the keyboard.
            ann.locator("#cell-2").focus()
            ann.keyboard.press("Enter")
            for page in (ann, bob):
                expect(page.locator("#status")).to_contain_text("Ann wins: three in a row.")
                expect(page.locator(".cell.win")).to_have_count(3)
            # An out-of-turn attempt is impossible from the page: every cell is disabled now.
            expect(bob.locator("#cell-8")).to_be_disabled()
            ann.screenshot(path=str(artifacts / "tictactoe-ann.png"), full_page=True)
            bob.screenshot(path=str(artifacts / "tictactoe-bob-phone.png"), full_page=True)

            # Rematch with the same code; Bob moves first now.
            bob.get_by_role("button", name="Rematch").click()
            expect(bob.locator("#status")).to_contain_text("Your turn")
            expect(ann.locator(".seat-0")).to_contain_text("<b>Bob</b>")
            # Bob reloads the page and keeps his seat.
            bob.reload()
            expect(bob.locator(".seat-0")).to_contain_text("(you)")
            bob.locator("#cell-4").click()
            expect(ann.locator("#cell-4")).to_have_text("X")
        finally:
            browser.close()


def test_battleship_in_the_browser_shows_only_your_fleet(node, artifacts):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 800, "height": 900}).new_page()
            page.set_default_timeout(10_000)
            page.goto(node.url + "/")
            page.get_by_label("Game", exact=True).select_option("battleship")
            page.get_by_role("button", name="Create game").click()
            page.get_by_label("Your name").fill("Cy")
            page.get_by_role("button", name="Join game").click()
            page.get_by_role("button", name="Add a bot").click()
            page.get_by_role("button", name="Start").click()
            expect(page.locator("#status")).to_contain_text("Your turn")
            expect(page.locator("form[aria-label='Your fleet'] .ship")).to_have_count(10)
            page.get_by_role("button", name="Fire at row 1, column 1").click()
            expect(
                page.locator(
                    "form[aria-label='Your fleet'] .cell.hit, "
                    "form[aria-label='Your fleet'] .cell.miss"
                )
            ).to_have_count(1)
            expect(page.locator("#status")).to_contain_text("Your turn")
            page.screenshot(path=str(artifacts / "battleship.png"), full_page=True)
        finally:
            browser.close()
