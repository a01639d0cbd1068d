"""Headless chromium players on a real gamehall node: the pages as people use them, on a
desktop and on a phone-sized screen (390x844), by mouse and by keyboard. Screenshots of
every page go to artifacts/gamehall/ (desktop and phone)."""

from __future__ import annotations

import re
import urllib.request

import pytest
from playwright.sync_api import expect, sync_playwright

pytestmark = pytest.mark.timeout(180)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DESKTOP = {"viewport": {"width": 1024, "height": 800}}
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def new_page(browser, node, kind=DESKTOP):
    ctx = browser.new_context(**kind)
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=node.url)
    page = ctx.new_page()
    page.set_default_timeout(10_000)
    return page


def fits_the_screen(page) -> None:
    """Nothing sticks out sideways: no horizontal scrolling on a phone."""
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), (
        page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    )


def create(page, node, game, name=None):
    page.goto(node.url + "/")
    if name:
        page.get_by_label("Your name").fill(name)
    page.get_by_label("Game", exact=True).select_option(game)
    page.get_by_role("button", name="Create game").click()
    page.wait_for_url(re.compile(r"/g/[A-Z]{4}$"))
    return page.locator("#code").inner_text()


def test_two_browsers_play_tictactoe_to_a_win(browser, node, artifacts):
    # Two people: separate contexts, so separate cookies (player ids). Bob is on a phone.
    ann, bob = new_page(browser, node), new_page(browser, node, PHONE)
    code = create(ann, node, "tictactoe")
    # Sharing: the link and the code, each with a copy button.
    link = f"{node.url}/g/{code}"
    expect(ann.locator("#share-link")).to_have_value(link)
    ann.get_by_role("button", name="Copy link").click()
    expect(ann.locator("#copied")).to_have_text("Copied.")
    assert ann.evaluate("navigator.clipboard.readText()") == link
    ann.get_by_role("button", name="Copy code").click()
    expect(ann.locator("#copied")).to_have_text("Copied.")
    assert ann.evaluate("navigator.clipboard.readText()") == code

    ann.get_by_label("Your name").fill("Ann")
    ann.get_by_role("button", name="Join game").click()
    expect(ann.locator(".seat-0")).to_contain_text("Ann (you)")
    expect(ann.locator("#turn")).to_contain_text("Waiting for an opponent")

    bob.goto(node.url + "/")
    bob.get_by_label("Game code").fill(code.lower())
    bob.get_by_role("button", name="Join", exact=True).click()
    bob.wait_for_url(re.compile(f"/g/{code}$"))
    expect(bob.locator(".seat-0")).to_contain_text("Ann")
    bob.get_by_label("Your name").fill("<b>Bob</b>")
    bob.keyboard.press("Enter")  # keyboard: submit the focused form
    expect(ann.locator(".seat-1")).to_contain_text("<b>Bob</b>")  # shown as text

    # Before the first move everyone knows who is X and who is O, and who starts.
    expect(ann.locator("#turn")).to_contain_text("You play X and move first.")
    expect(bob.locator("#turn")).to_contain_text("You play O; Ann moves first.")
    expect(bob.locator(".seat-0 .plays")).to_have_text("plays X")
    expect(bob.locator(".seat-1 .plays")).to_have_text("plays O")
    expect(ann.locator(".seat-0 .tag")).to_have_text("moves first")
    bob.screenshot(path=str(artifacts / "tictactoe-lobby-phone.png"), full_page=True)

    ann.get_by_role("button", name="Start").click()
    expect(ann.locator("#turn")).to_have_text("Your turn: you play X")
    expect(bob.locator("#turn")).to_have_text("Waiting for Ann (X) to move")
    expect(bob.locator("#status")).to_contain_text("Ann to move")

    ann.locator("#cell-1").click()
    expect(bob.locator("#cell-1")).to_have_text("X")
    bob.locator("#cell-4").click()
    expect(ann.locator("#cell-4")).to_have_text("O")
    # Keyboard play: a number key picks a cell (as numbered on the board), Enter plays it.
    ann.keyboard.press("2")
    expect(ann.locator("#cell-2")).to_be_focused()
    ann.keyboard.press("Enter")
    expect(bob.locator("#cell-2")).to_have_text("X")
    # Arrow keys walk the free cells: right (to the first free, 3), down (6), left (5).
    for key in ("ArrowRight", "ArrowDown", "ArrowLeft"):
        bob.keyboard.press(key)
    expect(bob.locator("#cell-5")).to_be_focused()
    bob.keyboard.press("Enter")
    expect(ann.locator("#cell-5")).to_have_text("O")
    ann.screenshot(path=str(artifacts / "tictactoe-playing.png"), full_page=True)
    ann.keyboard.press("3")
    ann.keyboard.press("Enter")
    # The result, for each of them.
    expect(ann.locator("#turn")).to_have_text("You won: three in a row")
    expect(bob.locator("#turn")).to_have_text("You lost: Ann (X) won: three in a row")
    for page in (ann, bob):
        expect(page.locator("#status")).to_contain_text("Ann wins: three in a row.")
        expect(page.locator(".cell.win")).to_have_count(3)
    expect(bob.locator("#cell-9")).to_be_disabled()  # no move is possible from the page now
    fits_the_screen(bob)
    ann.screenshot(path=str(artifacts / "tictactoe-ann.png"), full_page=True)
    bob.screenshot(path=str(artifacts / "tictactoe-bob-phone.png"), full_page=True)

    # Rematch with the same code; Bob moves first now, and is X.
    bob.get_by_role("button", name="Rematch").click()
    expect(bob.locator("#turn")).to_have_text("Round 2 Your turn: you play X")
    expect(ann.locator(".seat-0")).to_contain_text("<b>Bob</b>")
    # Bob reloads the page and keeps his seat.
    bob.reload()
    expect(bob.locator(".seat-0")).to_contain_text("(you)")
    bob.locator("#cell-5").click()
    expect(ann.locator("#cell-5")).to_have_text("X")
    ann.context.close()
    bob.context.close()


def test_the_lobby_lists_games_to_join_and_to_watch(browser, node, artifacts):
    cy, di, eve = new_page(browser, node), new_page(browser, node, PHONE), new_page(browser, node, PHONE)
    code = create(cy, node, "connect4", name="Cy")  # a name on the hall page seats you at once
    expect(cy.locator(".seat-0")).to_contain_text("Cy (you)")
    expect(cy.locator("#turn")).to_contain_text("You play red and move first.")
    expect(cy.locator(".seat-0 .piece.p-red")).to_be_visible()

    di.goto(node.url + "/")
    item = di.locator("#open-games li", has_text=code)
    expect(item).to_contain_text("Connect four")
    expect(item).to_contain_text("Cy, 1 open seat")
    fits_the_screen(di)
    di.screenshot(path=str(artifacts / "hall-phone.png"), full_page=True)
    item.get_by_role("link", name=f"Join Connect four {code}").click()
    di.wait_for_url(re.compile(f"/g/{code}$"))
    expect(di.locator("#name")).to_be_visible()
    di.get_by_label("Your name").fill("Di")
    di.get_by_role("button", name="Join game").click()
    expect(di.locator("#turn")).to_contain_text("You play yellow; Cy moves first.")
    cy.get_by_role("button", name="Start").click()
    # The started board must be on the page before a key picks a column (under load the live
    # update that replaces the board could land after the key press and take the focus with it).
    expect(cy.locator("#turn")).to_have_text("Your turn: you play red")
    expect(cy.locator("#col-4")).to_be_enabled()
    # Keyboard play on connect four: number key 4 picks column 4, Enter drops the disc.
    cy.keyboard.press("4")
    expect(cy.locator("#col-4")).to_be_focused()
    cy.keyboard.press("Enter")
    expect(di.locator("#turn")).to_have_text("Your turn: you play yellow")
    di.keyboard.press("ArrowRight")
    di.keyboard.press("ArrowRight")
    expect(di.locator("#col-2")).to_be_focused()
    di.keyboard.press("Enter")
    expect(cy.locator(".c4 .hole.yellow")).to_have_count(1)
    fits_the_screen(di)
    di.screenshot(path=str(artifacts / "connect4-phone.png"), full_page=True)
    cy.screenshot(path=str(artifacts / "connect4.png"), full_page=True)

    # The game left the open list and is listed to watch; the hall page updates by itself.
    eve.goto(node.url + "/")
    expect(eve.locator("#open-games li", has_text=code)).to_have_count(0)
    live = eve.locator("#live-games li", has_text=code)
    expect(live).to_contain_text("Cy vs Di: 2 moves")
    other = node.create("tictactoe")
    expect(eve.locator("#open-games li", has_text=other)).to_have_count(1, timeout=15_000)
    live.get_by_role("link", name=f"Watch Connect four {code}").click()
    expect(eve.locator(".spectating")).to_have_text("You are watching.")
    expect(eve.locator("#turn")).to_have_text("Cy (red) to move")
    eve.screenshot(path=str(artifacts / "connect4-watching-phone.png"), full_page=True)
    hall = new_page(browser, node)
    hall.goto(node.url + "/")
    hall.screenshot(path=str(artifacts / "hall.png"), full_page=True)
    for p in (cy, di, eve, hall):
        p.context.close()


def test_battleship_labels_misses_and_phone_layout(browser, node, artifacts):
    for kind, shot in ((DESKTOP, "desktop"), (PHONE, "phone")):
        page = new_page(browser, node, kind)
        create(page, node, "battleship", name="Cy")
        page.get_by_role("button", name="Add a bot").click()
        page.get_by_role("button", name="Start").click()
        expect(page.locator("#turn")).to_have_text("Your turn")
        fleet = page.locator("form[aria-label='Your fleet']")
        expect(fleet.locator(".ship")).to_have_count(10)
        # Row letters and column numbers around each sea.
        assert fleet.locator(".lab.row").all_inner_texts() == list("ABCDEF")
        assert fleet.locator(".lab.col").all_inner_texts() == [str(c) for c in range(1, 7)]
        # Fire with the keyboard: a row letter, a column number, Enter.
        page.keyboard.press("b")
        page.keyboard.press("3")
        expect(page.get_by_role("button", name="Fire at B3")).to_be_focused()
        page.keyboard.press("Enter")
        enemy = page.locator("form.sea").nth(1)
        expect(enemy.locator("[aria-label^='B3: ']")).to_have_count(1)
        expect(page.locator("#turn")).to_have_text("Your turn")  # the bot fired back
        # Fire until one shot misses: a miss is a large dark dot on a white cell.
        for name in ("A1", "F6", "A6", "F1", "C4", "D2", "E5", "A3", "F4"):
            if enemy.locator(".cell.miss").count():
                break
            page.get_by_role("button", name=f"Fire at {name}").click()
            expect(enemy.locator(f"[aria-label^='{name}: ']")).to_have_count(1)
            expect(page.locator("#turn")).to_have_text(re.compile("Your turn|You won"))
        miss = enemy.locator(".cell.miss").first
        expect(miss).to_have_text("●")
        style = miss.evaluate(
            "e => [getComputedStyle(e).backgroundColor, getComputedStyle(e).fontSize]"
        )
        assert style[0] == "rgb(255, 255, 255)" and float(style[1][:-2]) >= 18, style
        fits_the_screen(page)
        page.screenshot(path=str(artifacts / f"battleship-{shot}.png"), full_page=True)
        page.context.close()


def test_join_errors_name_the_allowed_letters_and_the_favicon_is_served(browser, node, artifacts):
    page = new_page(browser, node, PHONE)
    page.goto(node.url + "/")
    page.get_by_label("Game code").fill("kxto")
    page.get_by_role("button", name="Join", exact=True).click()
    expect(page.locator("#error")).to_have_text(
        "“kxto” is not a game code: the letter O is not used in codes. "
        "Codes use only these letters: B C D F G H J K M N P R S T W X Z."
    )
    fits_the_screen(page)
    page.screenshot(path=str(artifacts / "join-error-phone.png"), full_page=True)
    with urllib.request.urlopen(node.url + "/favicon.ico", timeout=10) as r:
        assert r.status == 200 and r.headers["content-type"] == "image/x-icon"
        assert r.read(4) == b"\x00\x00\x01\x00"  # an ICO file
    page.context.close()
