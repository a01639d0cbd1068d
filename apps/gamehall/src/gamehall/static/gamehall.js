// gamehall's only script: a live page over one websocket, in the spirit of htmx's ws
// extension. Forms marked data-ws are sent as JSON; every HTML message from the server
// replaces the elements with the same ids. No framework, no game state kept here: the
// server sends the whole live part of the page on every (re)connect.
(function () {
  "use strict";

  // -- copy buttons (the game code, the share link) -------------------------------
  function copied(text) {
    const el = document.getElementById("copied");
    if (!el) return;
    el.textContent = text;
    setTimeout(function () { if (el.textContent === text) el.textContent = ""; }, 2500);
  }
  function copy(value) {
    function fallback() {  // no clipboard API (plain http on another host): select and copy
      const t = document.createElement("textarea");
      t.value = value; t.setAttribute("readonly", ""); t.style.position = "fixed"; t.style.opacity = "0";
      document.body.appendChild(t); t.select();
      let ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      t.remove();
      copied(ok ? "Copied." : "Select it and copy.");
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(value).then(function () { copied("Copied."); }, fallback);
    } else fallback();
  }
  document.addEventListener("click", function (ev) {
    const b = ev.target.closest("[data-copy], [data-copy-from]");
    if (!b) return;
    const from = b.dataset.copyFrom && document.getElementById(b.dataset.copyFrom);
    copy(from ? from.value : b.dataset.copy);
  });
  const link = document.getElementById("share-link");
  if (link && link.dataset.path) link.value = location.origin + link.dataset.path;  // the address in use
  if (link) link.addEventListener("focus", function () { link.select(); });

  // -- the hall: the lobby refreshes itself ----------------------------------------
  const lobby = document.getElementById("lobby");
  if (lobby) {
    setInterval(function () {
      if (document.hidden) return;
      fetch(lobby.dataset.refresh, { cache: "no-store" }).then(function (r) {
        return r.ok ? r.text() : null;
      }).then(function (html) {
        if (!html) return;
        const tpl = document.createElement("template");
        tpl.innerHTML = html;
        const fresh = tpl.content.getElementById("lobby");
        const now = document.getElementById("lobby");
        if (fresh && now && fresh.innerHTML !== now.innerHTML) now.replaceWith(fresh);
      }).catch(function () {});
    }, 4000);
  }

  const player = document.querySelector("input[data-remember]");
  if (player) {  // the name you play under, remembered between games
    if (!player.value) player.value = localStorage.getItem("gamehall-name") || "";
    player.form.addEventListener("submit", function () {
      if (player.value.trim()) localStorage.setItem("gamehall-name", player.value.trim());
    });
  }

  const root = document.getElementById("game");
  if (!root) return;
  const conn = document.getElementById("conn");
  let ws = null, tries = 0, timer = null, connected = false, queued = null, reconnects = 0;

  function say(text, retry) {
    if (!conn) return;
    conn.textContent = text;
    if (retry) {
      const b = document.createElement("button");
      b.type = "button"; b.className = "quiet small"; b.id = "retry"; b.textContent = "Retry now";
      b.addEventListener("click", function () { reconnectSoon(0); });
      conn.appendChild(b);
    }
  }

  function swap(html) {
    const tpl = document.createElement("template");
    tpl.innerHTML = html;
    const focused = document.activeElement && document.activeElement.id;
    for (const el of Array.from(tpl.content.children)) {
      const old = el.id && document.getElementById(el.id);
      if (old) old.replaceWith(el);
    }
    if (focused) {
      const again = document.getElementById(focused);
      if (again && !again.disabled) again.focus();
    }
    tick();
  }

  // Reconnect to whatever address serves this page now (behind the edge any live node
  // will do), with exponential backoff and jitter, so a dead node is not hammered and a
  // crowd of pages does not come back at once. The server then sends the whole page state.
  function reconnectSoon(wait) {
    clearTimeout(timer);
    timer = setTimeout(connect, wait);
  }

  function connect() {
    clearTimeout(timer);
    if (ws && (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING)) return;
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const sock = new WebSocket(scheme + location.host + root.dataset.ws);
    ws = sock;
    sock.onopen = function () {
      connected = true;
      root.dataset.conn = "open";
      if (tries) {
        say("Reconnected.");
        root.dataset.reconnects = String(++reconnects);
      }
      tries = 0;
      if (queued) { sock.send(queued); queued = null; }  // what was pressed while away
      setTimeout(function () { if (connected && conn && conn.textContent === "Reconnected.") say(""); }, 2000);
    };
    sock.onmessage = function (ev) { swap(ev.data); };
    sock.onclose = function (ev) {
      if (sock !== ws) return;
      connected = false;
      root.dataset.conn = "closed";
      if (ev.code === 1000) { say("Disconnected."); return; }  // the server said why, in #notice
      const why = ev.code === 1009 ? "the last message was too big" :
                  ev.code === 1008 ? (ev.reason || "too many messages") : "the connection dropped";
      const base = Math.min(10000, 300 * Math.pow(2, tries++));
      const wait = Math.round(base / 2 + Math.random() * base / 2);
      say("Reconnecting in " + Math.max(1, Math.round(wait / 1000)) + " s (" + why + ")…", true);
      reconnectSoon(wait);
    };
  }
  // Back on the network, or back to the tab: try at once instead of waiting out the backoff.
  window.addEventListener("online", function () { if (!connected) reconnectSoon(0); });
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && !connected && tries) reconnectSoon(0);
  });

  document.addEventListener("submit", function (ev) {
    const form = ev.target.closest("form[data-ws]");
    if (!form) return;
    ev.preventDefault();
    const data = Object.fromEntries(new FormData(form, ev.submitter));
    if ("move" in data) data.move = Number(data.move);
    if (data.action === "join" && data.name) localStorage.setItem("gamehall-name", data.name);
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(data));
    else {  // sent on reconnecting (the server checks it against the game as it is then)
      queued = JSON.stringify(data);
      say("Not connected just now: it will be sent when the page reconnects…", true);
    }
  });

  // -- keyboard play: arrow keys move between cells, number keys (or a row letter and
  // a column number in battleship) pick one, Enter plays the focused one. ------------
  let rowKey = "";
  function boardButtons() {
    const board = document.querySelector("form.board [data-move]");
    const form = board && board.closest("form.board");
    if (!form) return null;
    return { form: form, cols: Number(form.dataset.cols) || 1,
             buttons: Array.from(form.querySelectorAll("button[data-move]")) };
  }
  function byMove(b, n) { return b.buttons.find(function (x) { return Number(x.dataset.move) === n; }); }
  document.addEventListener("keydown", function (ev) {
    if (ev.altKey || ev.ctrlKey || ev.metaKey) return;
    const t = ev.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) return;
    const b = boardButtons();
    if (!b || !b.buttons.length) return;
    const size = b.form.classList.contains("c4") ? 7 : b.cols * b.cols;
    const cur = b.buttons.indexOf(document.activeElement) >= 0 ? Number(document.activeElement.dataset.move) : 0;
    const steps = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
    if (steps[ev.key]) {
      ev.preventDefault();
      if (!cur) { b.buttons[0].focus(); return; }
      const [dr, dc] = steps[ev.key];
      let r = Math.floor((cur - 1) / b.cols), c = (cur - 1) % b.cols;
      // Walk in that direction to the next cell still playable (taken ones are disabled).
      for (;;) {
        r += dr; c += dc;
        if (c < 0 || c >= b.cols || r < 0 || (r * b.cols + c) >= size) return;
        const next = byMove(b, r * b.cols + c + 1);
        if (next) { next.focus(); return; }
      }
    }
    const battleship = b.form.classList.contains("sea");
    if (battleship && /^[a-z]$/i.test(ev.key)) { rowKey = ev.key.toUpperCase(); return; }
    if (/^[1-9]$/.test(ev.key)) {
      const n = Number(ev.key);
      let target = null;
      if (battleship) {
        target = b.buttons.find(function (x) { return x.dataset.name === rowKey + n; });
        rowKey = "";
      } else target = byMove(b, n);
      if (target) { ev.preventDefault(); target.focus(); }
    }
  });

  // Turn timers count down on the page; the server decides when time is up.
  function tick() {
    for (const el of document.querySelectorAll("[data-deadline]")) {
      const left = Math.max(0, Math.round(Number(el.dataset.deadline) - Date.now() / 1000));
      el.textContent = left + " s left";
    }
    const name = document.getElementById("name");
    if (name && !name.value) name.value = localStorage.getItem("gamehall-name") || "";
  }
  setInterval(tick, 1000);
  tick();
  connect();
})();
