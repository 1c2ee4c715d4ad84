// The browser mate: xterm.js on a WebSocket to the relay (tether/transport/web.py).
//
// The token is the page's path (/t/TOKEN); it goes to the relay in the first
// WebSocket message, never in a URL the relay logs. Output arrives as binary
// messages, written to the terminal as they come; keys and pastes go back as
// binary messages, resizes as JSON. A dropped connection comes back by itself
// with back-off, and the relay's replica redraws the current screen. The bar
// names the session and counts who else is connected (ssh, join, web;
// read-write or read-only); a click lists them.
"use strict";

(function () {
  const RETRY_FIRST = 500;
  const RETRY_MAX = 10000;
  const FATAL = {
    4001: "invalid or expired session token",
    4003: "refused by the relay",
    4004: "the host disconnected you",
  };

  const token = decodeURIComponent(location.pathname.replace(/^\/t\//, "").replace(/\/+$/, ""));
  const stateEl = document.getElementById("state");
  const modeEl = document.getElementById("mode");
  const nameEl = document.getElementById("name");
  const matesEl = document.getElementById("mates");
  const listEl = document.getElementById("mate-list");
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

  // who is connected: text only (textContent), never markup, whatever the relay says
  function showMates(mates, more) {
    const others = mates.filter(function (m) { return !m.you; });
    const groups = {};
    others.forEach(function (m) {
      const key = String(m.kind) + " " + (m.readonly ? "ro" : "rw");
      groups[key] = (groups[key] || 0) + 1;
    });
    const parts = Object.keys(groups).sort().map(function (k) { return groups[k] + " " + k; });
    const n = others.length + (more || 0);
    matesEl.textContent = n === 0 ? "no one else connected"
      : n + (n === 1 ? " other: " : " others: ") + parts.join(", ") + (more ? ", …" : "");
    matesEl.hidden = false;
    listEl.replaceChildren();
    mates.forEach(function (m) {
      const li = document.createElement("li");
      const words = [m.you ? "you" : "mate " + m.id, String(m.kind),
        m.readonly ? "read-only" : "read-write"];
      if (m.address) words.push(String(m.address));
      li.textContent = words.join(" · ");
      if (m.you) li.className = "you";
      listEl.appendChild(li);
    });
    if (more) {
      const li = document.createElement("li");
      li.textContent = "… and " + more + " more";
      listEl.appendChild(li);
    }
  }

  matesEl.addEventListener("click", function () {
    listEl.hidden = !listEl.hidden;
    matesEl.setAttribute("aria-expanded", listEl.hidden ? "false" : "true");
    fit.fit();
    term.focus();
  });

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
      } else if (msg.type === "mates" && Array.isArray(msg.mates)) {
        showMates(msg.mates, Number(msg.more) || 0);
      } else if (msg.type === "error") {
        show(String(msg.message || "error"), "bad");
      }
    };
    sock.onclose = function (ev) {
      if (ws !== sock) return;
      ws = null;
      matesEl.hidden = true; // no longer known; the next connection lists them again
      listEl.hidden = true;
      matesEl.setAttribute("aria-expanded", "false");
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
