// The browser mate: xterm.js on a WebSocket to the relay (tether/transport/web.py).
//
// The token is the page's path (/t/TOKEN); it goes to the relay in the first
// WebSocket message, never in a URL the relay logs. Output arrives as binary
// messages, written to the terminal as they come; keys and pastes go back as
// binary messages, resizes as JSON. A dropped connection comes back by itself
// with back-off, and the relay's replica redraws the current screen.
"use strict";

(function () {
  const RETRY_FIRST = 500;
  const RETRY_MAX = 10000;
  const FATAL = { 4001: "invalid or expired session token", 4003: "refused by the relay" };

  const token = decodeURIComponent(location.pathname.replace(/^\/t\//, "").replace(/\/+$/, ""));
  const stateEl = document.getElementById("state");
  const modeEl = document.getElementById("mode");
  const nameEl = document.getElementById("name");
  const encoder = new TextEncoder();

  const term = new Terminal({
    cursorBlink: true,
    scrollback: 5000,
    allowProposedApi: false,
    screenReaderMode: true, // the screen's text in the DOM: screen readers, find-in-page
    fontFamily: "ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace",
  });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  fit.fit();
  term.focus();

  let ws = null;
  let readonly = false;
  let retry = RETRY_FIRST;
  let retryTimer = null;
  let over = false;
  let ctrl = false;

  function show(text, kind) {
    stateEl.textContent = text;
    stateEl.className = kind || "";
  }

  function sendKeys(data) {
    if (readonly || !ws || ws.readyState !== WebSocket.OPEN) return;
    if (ctrl && data.length === 1) {
      const c = data.toUpperCase().charCodeAt(0);
      if (c >= 64 && c <= 95) data = String.fromCharCode(c & 31);
      setCtrl(false);
    }
    ws.send(encoder.encode(data));
  }

  function sendSize() {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
    }
  }

  function connect() {
    retryTimer = null;
    if (!token) {
      show("no session token in the link", "bad");
      return;
    }
    show("connecting…", "wait");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const sock = new WebSocket(scheme + "//" + location.host + "/ws");
    sock.binaryType = "arraybuffer";
    ws = sock;
    sock.onopen = function () {
      sock.send(JSON.stringify({ token: token, cols: term.cols, rows: term.rows }));
    };
    sock.onmessage = function (ev) {
      if (typeof ev.data !== "string") {
        term.write(new Uint8Array(ev.data));
        return;
      }
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      if (msg.type === "hello") {
        retry = RETRY_FIRST;
        readonly = !!msg.readonly;
        modeEl.textContent = readonly ? "read-only" : "";
        if (msg.session) {
          nameEl.textContent = "tether: " + msg.session;
          document.title = "tether: " + msg.session + (readonly ? " (read-only)" : "");
        } else {
          document.title = "tether" + (readonly ? " (read-only)" : "");
        }
        term.reset(); // the relay redraws the current screen
        show("connected", "");
      } else if (msg.type === "error") {
        show(String(msg.message || "error"), "bad");
      }
    };
    sock.onclose = function (ev) {
      if (ws !== sock) return;
      ws = null;
      if (FATAL[ev.code]) {
        over = true;
        if (!stateEl.classList.contains("bad")) show(FATAL[ev.code], "bad");
        return;
      }
      if (ev.code === 1000) {
        over = true;
        show(ev.reason || "the session ended", "bad");
        return;
      }
      const wait = Math.min(retry, RETRY_MAX) * (0.75 + Math.random() / 2);
      retry = Math.min(retry * 2, RETRY_MAX);
      show("connection lost; reconnecting in " + Math.ceil(wait / 1000) + " s…", "wait");
      retryTimer = setTimeout(connect, wait);
    };
  }

  term.onData(sendKeys);
  term.onBinary(function (data) {
    if (readonly || !ws || ws.readyState !== WebSocket.OPEN) return;
    const bytes = new Uint8Array(data.length);
    for (let i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 255;
    ws.send(bytes);
  });
  term.onResize(sendSize);
  term.attachCustomKeyEventHandler(function (ev) {
    // Ctrl+Shift+C / V copy and paste, as terminals do (plain Ctrl+C is the shell's)
    if (ev.type !== "keydown" || !ev.ctrlKey || !ev.shiftKey) return true;
    if (ev.code === "KeyC" && term.hasSelection() && navigator.clipboard) {
      navigator.clipboard.writeText(term.getSelection());
      return false;
    }
    if (ev.code === "KeyV" && navigator.clipboard && navigator.clipboard.readText) {
      navigator.clipboard.readText().then(function (text) { if (text) term.paste(text); });
      return false;
    }
    return true;
  });

  let fitTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(fitTimer);
    fitTimer = setTimeout(function () { fit.fit(); }, 50);
  });

  // a network that comes back: try at once instead of waiting out the back-off
  window.addEventListener("online", function () {
    if (!over && !ws && retryTimer !== null) {
      clearTimeout(retryTimer);
      retry = RETRY_FIRST;
      connect();
    }
  });

  function setCtrl(on) {
    ctrl = on;
    const b = document.querySelector('#keys [data-key="ctrl"]');
    if (b) b.setAttribute("aria-pressed", on ? "true" : "false");
  }

  const KEYS = { esc: "\x1b", tab: "\t", up: "\x1b[A", down: "\x1b[B", right: "\x1b[C", left: "\x1b[D" };
  document.getElementById("keys").addEventListener("click", function (ev) {
    const b = ev.target.closest("button");
    if (!b) return;
    const key = b.dataset.key;
    if (key === "ctrl") setCtrl(!ctrl);
    else if (KEYS[key]) sendKeys(KEYS[key]);
    term.focus();
  });

  connect();
})();
