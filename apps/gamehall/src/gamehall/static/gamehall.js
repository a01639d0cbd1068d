// gamehall's only script: a live page over one websocket, in the spirit of htmx's ws
// extension. Forms marked data-ws are sent as JSON; every HTML message from the server
// replaces the elements with the same ids. No framework, no state kept here.
(function () {
  "use strict";
  const root = document.getElementById("game");
  if (!root) return;
  const conn = document.getElementById("conn");
  let ws = null, tries = 0;

  function say(text) { if (conn) conn.textContent = text; }

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

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    ws = new WebSocket(scheme + location.host + root.dataset.ws);
    ws.onopen = function () { tries = 0; say(""); };
    ws.onmessage = function (ev) { swap(ev.data); };
    ws.onclose = function (ev) {
      if (ev.code === 1000) { say("Disconnected."); return; }  // the server said why, in #notice
      const why = ev.code === 1009 ? "the last message was too big" :
                  ev.code === 1008 ? (ev.reason || "too many messages") : "the connection dropped";
      const wait = Math.min(5000, 250 * Math.pow(2, tries++));
      say("Reconnecting (" + why + ")…");
      setTimeout(connect, wait);
    };
  }

  document.addEventListener("submit", function (ev) {
    const form = ev.target.closest("form[data-ws]");
    if (!form) return;
    ev.preventDefault();
    const data = Object.fromEntries(new FormData(form, ev.submitter));
    if ("move" in data) data.move = Number(data.move);
    if (data.action === "join" && data.name) localStorage.setItem("gamehall-name", data.name);
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(data));
    else say("Not connected yet; try again in a moment.");
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
