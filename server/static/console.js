/*
 * kefu agent console (console.html).  Protocol: docs/protocol.md; REST: /api/v1.
 *
 * Every visitor-typed string (messages, names, previews) goes into the page through
 * textContent; no inline scripts or handlers, no eval (a strict CSP holds).
 * The agent token lives in sessionStorage (this tab only), travels in the hello frame and
 * Authorization headers, never in a URL.
 */
(function () {
  "use strict";

  var BACKOFF_BASE_MS = 500, BACKOFF_MAX_MS = 30000;
  var PING_EVERY_MS = 25000, DEAD_AFTER_MS = 60000;
  var TOKEN_KEY = "kefu.agent.token";

  var $ = function (id) { return document.getElementById(id); };
  var loginView = $("login-view"), consoleView = $("console-view");
  var mineList = $("mine-list"), queueList = $("queue-list");
  var transcript = $("transcript"), replyBox = $("reply"), replyForm = $("reply-form");
  var presenceSel = $("presence"), transferSel = $("transfer-to");

  var S = {
    token: null,
    me: null,
    ws: null,
    connected: false,
    attempt: 0,
    timer: null,
    pingTimer: null,
    lastFrameAt: 0,
    convs: Object.create(null),   // id -> {id, state, bot, visitor, meta, msgs: {seq: msg}, maxSeq, contiguous, unread, mine}
    mineOrder: [],
    queue: [],
    selected: null,
    pending: Object.create(null), // client id -> {conversation, text, node}
    typingSent: 0,
    typingIdle: null,
    typingHide: null,
    agents: []
  };

  try { S.token = sessionStorage.getItem(TOKEN_KEY); } catch (e) { S.token = null; }

  // ---------------------------------------------------------------- helpers
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function newId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    var b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
  }
  function fmtTime(ts) {
    if (typeof ts !== "number") return "";
    var d = new Date(ts * 1000);
    return ("0" + d.getHours()).slice(-2) + ":" + ("0" + d.getMinutes()).slice(-2);
  }
  function api(method, path, body) {
    var opts = { method: method, headers: {}, cache: "no-store", credentials: "omit" };
    if (S.token) opts.headers.Authorization = "Bearer " + S.token;
    if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    return fetch("/api/v1" + path, opts).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (data) {
        if (!r.ok) {
          var err = new Error((data && data.error && data.error.message) || ("HTTP " + r.status));
          err.status = r.status;
          throw err;
        }
        return data;
      });
    });
  }
  function setConn(kind, text) {
    $("conn-dot").className = "dot " + (kind === "on" ? "dot-on" : kind === "wait" ? "dot-wait" : "dot-off");
    $("conn-label").textContent = text;
  }

  // ---------------------------------------------------------------- login
  function showLogin(message) {
    consoleView.hidden = true;
    loginView.hidden = false;
    var err = $("login-error");
    err.hidden = !message;
    err.textContent = message || "";
    $("login-user").focus();
  }

  $("login-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var username = $("login-user").value.trim(), password = $("login-pass").value;
    $("login-error").hidden = true;
    api("POST", "/auth/login", { username: username, password: password }).then(function (data) {
      S.token = data.token;
      try { sessionStorage.setItem(TOKEN_KEY, S.token); } catch (e) { /* this page only */ }
      $("login-pass").value = "";
      start();
    }).catch(function (err) {
      showLogin(err.status === 429 ? "Too many attempts. Wait a minute." :
                err.status === 401 ? "Wrong username or password." : "Login failed: " + err.message);
    });
  });

  $("logout").addEventListener("click", function () {
    // The server revokes the token (and every other session of this agent); the page forgets
    // it whatever the answer.
    if (S.token) api("POST", "/auth/logout").catch(function () { /* logged out here anyway */ });
    logout();
  });
  function logout(message) {
    S.token = null;
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* ignore */ }
    var ws = S.ws;
    S.ws = null;
    clearTimeout(S.timer);
    stopPings();
    if (ws) { try { ws.close(1000, "logout"); } catch (e) { /* ignore */ } }
    S.convs = Object.create(null);
    S.mineOrder = [];
    S.queue = [];
    S.selected = null;
    renderLists();
    renderSelected();
    showLogin(message);
  }

  function start() {
    loginView.hidden = true;
    consoleView.hidden = false;
    connect();
  }

  // ---------------------------------------------------------------- conversations
  function conv(id) {
    var c = S.convs[id];
    if (!c) {
      c = S.convs[id] = { id: id, state: null, bot: "", visitor: "", meta: {}, msgs: Object.create(null),
                          maxSeq: 0, contiguous: 0, unread: 0, mine: false, readSent: 0, visitorRead: 0,
                          loaded: false, preview: "" };
    }
    return c;
  }
  function updateConv(c, d) {
    if (!d) return;
    if (d.state) c.state = d.state;
    if (d.bot) c.bot = d.bot;
    if (d.visitor) c.visitor = d.visitor;
    if (d.meta && typeof d.meta === "object") c.meta = d.meta;
  }
  function convName(c) {
    var m = c.meta || {};
    var name = (typeof m.name === "string" && m.name) || (typeof m.verified_id === "string" && m.verified_id) || "";
    return name ? name : "Visitor " + (c.visitor || c.id).slice(-6);
  }

  function addMessage(c, m) {
    if (typeof m.seq !== "number" || c.msgs[m.seq]) return false;   // no duplicates
    c.msgs[m.seq] = m;
    if (m.seq > c.maxSeq) c.maxSeq = m.seq;
    while (c.msgs[c.contiguous + 1]) c.contiguous++;
    if (m.role === "visitor") c.preview = m.text;          // what the visitor said last
    if (m.role === "system" && m.meta && typeof m.meta.state === "string") c.state = m.meta.state;
    return true;
  }

  function setMine(id, mine) {
    var c = conv(id);
    c.mine = mine;
    var i = S.mineOrder.indexOf(id);
    if (mine && i < 0) S.mineOrder.push(id);
    if (!mine && i >= 0) S.mineOrder.splice(i, 1);
  }

  // ---------------------------------------------------------------- rendering
  function listItem(c, inQueue) {
    var li = el("li");
    li.setAttribute("data-id", c.id);
    if (c.id === S.selected) li.classList.add("active");
    if (c.unread) li.classList.add("unread");
    li.appendChild(el("span", "conv-name", convName(c) + (c.unread ? " (" + c.unread + ")" : "")));
    li.appendChild(el("span", "conv-preview", c.preview || (inQueue ? "waiting for an agent" : "")));
    li.tabIndex = 0;
    li.addEventListener("click", function () { select(c.id); });
    li.addEventListener("keydown", function (ev) { if (ev.key === "Enter") select(c.id); });
    return li;
  }

  function renderLists() {
    clear(mineList);
    S.mineOrder.forEach(function (id) { mineList.appendChild(listItem(conv(id), false)); });
    clear(queueList);
    S.queue.forEach(function (id) { queueList.appendChild(listItem(conv(id), true)); });
    $("mine-count").textContent = String(S.mineOrder.length);
    $("queue-count").textContent = String(S.queue.length);
    var total = S.mineOrder.reduce(function (n, id) { return n + (conv(id).unread || 0); }, 0);
    document.title = (total ? "(" + total + ") " : "") + "kefu agent console";
  }

  function roleName(c, m) {
    if (m.role === "visitor") return convName(c);
    if (m.role === "bot") return "Bot (" + (m.sender || c.bot || "bot") + ")";
    if (m.role === "agent") {
      if (S.me && m.sender === S.me.id) return "You";
      return (m.meta && typeof m.meta.name === "string" && m.meta.name) || "Agent";
    }
    return "";
  }

  function messageNode(c, m) {
    if (m.role === "system") {
      var s = el("div", "m-system", m.text);
      s.setAttribute("data-seq", String(m.seq));
      return s;
    }
    var role = m.role === "visitor" ? "visitor" : m.role === "bot" ? "bot" : "agent";
    var wrap = el("div", "m m-" + role);
    var who = roleName(c, m) + (m.ts ? " \u00b7 " + fmtTime(m.ts) : "");
    if (m.role === "bot" && m.meta && m.meta.intent) who += " \u00b7 " + m.meta.intent;
    wrap.appendChild(el("div", "w", who));
    wrap.appendChild(el("div", "b", m.text));
    if (typeof m.seq === "number") wrap.setAttribute("data-seq", String(m.seq));
    return wrap;
  }

  function renderSelected() {
    var c = S.selected ? S.convs[S.selected] : null;
    $("empty").hidden = !!c;
    $("conv").hidden = !c;
    $("typing").hidden = true;
    if (!c) return;
    $("conv-title").textContent = convName(c);
    $("conv-state").textContent = c.state || "";
    var queued = !c.mine && c.state === "queued";
    $("accept").hidden = !queued;
    $("transfer").hidden = transferSel.hidden = $("close-conv").hidden = !c.mine;
    replyForm.hidden = !c.mine || c.state !== "human";
    clear(transcript);
    var seqs = Object.keys(c.msgs).map(Number).sort(function (a, b) { return a - b; });
    seqs.forEach(function (s) { transcript.appendChild(messageNode(c, c.msgs[s])); });
    Object.keys(S.pending).forEach(function (cid) {
      var p = S.pending[cid];
      if (p.conversation === c.id) { p.node = pendingNode(c, p.text); transcript.appendChild(p.node); }
    });
    transcript.scrollTop = transcript.scrollHeight;
    markSeen(c);
    if (c.mine) refreshAgents();
  }

  function markSeen(c) {
    // The visitor's read receipts: "Read" on the agent's messages they have seen.
    Array.prototype.forEach.call(transcript.querySelectorAll(".m-agent[data-seq]"), function (n) {
      if (Number(n.getAttribute("data-seq")) <= c.visitorRead) n.classList.add("m-read");
    });
  }

  function pendingNode(c, text) {
    var n = messageNode(c, { role: "agent", sender: S.me && S.me.id, text: text });
    n.classList.add("m-pending");
    n.removeAttribute("data-seq");
    return n;
  }

  function appendToView(c, m) {
    if (S.selected !== c.id) return;
    var node = messageNode(c, m);
    var stick = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 80;
    var kids = transcript.children;
    for (var i = 0; i < kids.length; i++) {
      var ks = kids[i].getAttribute("data-seq");
      if (ks === null || Number(ks) > m.seq) { transcript.insertBefore(node, kids[i]); break; }
    }
    if (!node.parentNode) transcript.appendChild(node);
    if (stick || m.sender === (S.me && S.me.id)) transcript.scrollTop = transcript.scrollHeight;
    $("conv-state").textContent = c.state || "";
    replyForm.hidden = !c.mine || c.state !== "human";
    markSeen(c);
  }

  function select(id) {
    S.selected = id;
    var c = conv(id);
    c.unread = 0;
    renderLists();
    renderSelected();
    if (!c.mine && !c.loaded) loadHistory(c);
    markRead(c);
    if (c.mine && !replyForm.hidden) replyBox.focus();
  }

  function loadHistory(c) {
    // A queued conversation (not subscribed): read its transcript, bot part included, over REST.
    c.loaded = true;
    var after = 0;
    api("GET", "/conversations/" + encodeURIComponent(c.id)).then(function (d) {
      updateConv(c, d);
      if (S.selected === c.id) { $("conv-title").textContent = convName(c); $("conv-state").textContent = c.state || ""; }
      renderLists();
    }).catch(function () { /* gone from the queue */ });
    (function page() {
      api("GET", "/conversations/" + encodeURIComponent(c.id) + "/messages?limit=200&after=" + after).then(function (d) {
        (d.messages || []).forEach(function (m) { if (addMessage(c, m)) appendToView(c, m); });
        if (d.next_after) { after = d.next_after; page(); }
        renderLists();
      }).catch(function () { c.loaded = false; });
    })();
  }

  function markRead(c) {
    if (!c.mine || S.selected !== c.id || document.visibilityState !== "visible") return;
    if (c.contiguous > c.readSent && c.state === "human") {
      c.readSent = c.contiguous;
      sendFrame({ type: "read", conversation: c.id, seq: c.contiguous });
    }
  }
  document.addEventListener("visibilitychange", function () { if (S.selected) markRead(conv(S.selected)); });

  // ---------------------------------------------------------------- agents (transfer)
  function refreshAgents() {
    api("GET", "/agents").then(function (d) {
      S.agents = d.agents || [];
      clear(transferSel);
      S.agents.forEach(function (a) {
        if (S.me && a.id === S.me.id) return;
        var o = el("option", null, (a.display_name || a.username) + " (" + (a.presence || "offline") + ")");
        o.value = a.id;
        if (a.presence !== "online") o.disabled = true;    // the server refuses those
        transferSel.appendChild(o);
      });
      var firstOk = Array.prototype.filter.call(transferSel.options, function (o) { return !o.disabled; })[0];
      if (firstOk) transferSel.value = firstOk.value;
      $("transfer").disabled = !firstOk;
    }).catch(function () { /* keep the old list */ });
  }

  // ---------------------------------------------------------------- actions
  $("accept").addEventListener("click", function () {
    if (!S.selected) return;
    $("accept").disabled = true;
    sendFrame({ type: "accept", conversation: S.selected });
    setTimeout(function () { $("accept").disabled = false; }, 1500);
  });
  $("transfer").addEventListener("click", function () {
    var to = transferSel.value;
    if (!S.selected || !to) return;
    sendFrame({ type: "transfer", conversation: S.selected, to: to });
  });
  $("close-conv").addEventListener("click", function () {
    if (!S.selected) return;
    sendFrame({ type: "close", conversation: S.selected });
  });
  presenceSel.addEventListener("change", function () {
    sendFrame({ type: "presence", status: presenceSel.value });
  });

  replyForm.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var text = replyBox.value.replace(/\s+$/, "");
    var c = S.selected ? S.convs[S.selected] : null;
    if (!text.trim() || !c || !c.mine) return;
    replyBox.value = "";
    var cid = newId();
    var p = S.pending[cid] = { conversation: c.id, text: text, node: pendingNode(c, text) };
    transcript.appendChild(p.node);
    transcript.scrollTop = transcript.scrollHeight;
    sendFrame({ type: "message", conversation: c.id, id: cid, text: text });
    stopTyping();
  });
  replyBox.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      replyForm.requestSubmit ? replyForm.requestSubmit() : replyForm.dispatchEvent(new Event("submit"));
    }
  });
  replyBox.addEventListener("input", function () {
    var c = S.selected && S.convs[S.selected];
    if (!c || !c.mine) return;
    var now = Date.now();
    if (now - S.typingSent > 3000) { S.typingSent = now; sendFrame({ type: "typing", conversation: c.id, on: true }); }
    clearTimeout(S.typingIdle);
    S.typingIdle = setTimeout(stopTyping, 4000);
  });
  replyBox.addEventListener("blur", stopTyping);
  function stopTyping() {
    clearTimeout(S.typingIdle);
    var c = S.selected && S.convs[S.selected];
    if (S.typingSent && c && c.mine) sendFrame({ type: "typing", conversation: c.id, on: false });
    S.typingSent = 0;
  }

  function resendPending() {
    Object.keys(S.pending).forEach(function (cid) {
      var p = S.pending[cid];
      if (conv(p.conversation).mine) sendFrame({ type: "message", conversation: p.conversation, id: cid, text: p.text });
    });
  }

  // ---------------------------------------------------------------- socket
  function sendFrame(frame) {
    if (!S.ws || S.ws.readyState !== WebSocket.OPEN || !S.connected) return false;
    try { S.ws.send(JSON.stringify(frame)); return true; } catch (e) { return false; }
  }

  function connect() {
    clearTimeout(S.timer);
    S.timer = null;
    if (S.ws || !S.token) return;
    setConn("wait", S.attempt ? "reconnecting\u2026" : "connecting\u2026");
    var ws;
    try { ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws/agent"); }
    catch (e) { scheduleReconnect(); return; }
    S.ws = ws;
    S.connected = false;
    ws.onopen = function () {
      var resume = {};
      S.mineOrder.forEach(function (id) { resume[id] = conv(id).contiguous; });
      ws.send(JSON.stringify({ type: "hello", token: S.token, resume: resume }));
      S.lastFrameAt = Date.now();
      startPings();
    };
    ws.onmessage = function (ev) {
      if (ws !== S.ws) return;
      S.lastFrameAt = Date.now();
      var f;
      try { f = JSON.parse(ev.data); } catch (e) { return; }
      if (f && typeof f === "object") handle(f);
    };
    ws.onclose = function (ev) {
      if (ws !== S.ws) return;
      S.ws = null;
      S.connected = false;
      stopPings();
      if (ev.code === 4001 || ev.code === 4002) { logout("Your session ended. Please log in again."); return; }
      scheduleReconnect(ev.code === 4029 ? 10000 : 0);
    };
  }

  function scheduleReconnect(minDelay) {
    if (S.timer || !S.token) return;
    var cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * Math.pow(2, S.attempt));
    var delay = Math.max(minDelay || 0, cap / 2 + Math.random() * cap / 2);
    S.attempt++;
    setConn("off", "disconnected; retrying in " + Math.ceil(delay / 1000) + " s");
    S.timer = setTimeout(connect, delay);
  }
  window.addEventListener("online", function () {
    if (!S.ws && S.token) { S.attempt = 0; clearTimeout(S.timer); S.timer = null; connect(); }
  });

  function startPings() {
    stopPings();
    S.pingTimer = setInterval(function () {
      if (!S.ws) return;
      if (Date.now() - S.lastFrameAt > DEAD_AFTER_MS) {
        var ws = S.ws;
        try { ws.close(4000, "no traffic"); } catch (e) { /* ignore */ }
        if (ws.onclose) ws.onclose({ code: 4000 });
        return;
      }
      sendFrame({ type: "ping" });
    }, PING_EVERY_MS);
  }
  function stopPings() { clearInterval(S.pingTimer); S.pingTimer = null; }

  // ---------------------------------------------------------------- frames
  function handle(f) {
    var c;
    switch (f.type) {
      case "welcome":
        S.connected = true;
        S.attempt = 0;
        S.me = f.agent || S.me;
        $("me").textContent = S.me ? (S.me.display_name || S.me.username) : "";
        setConn("on", "connected");
        var ids = {};
        (f.conversations || []).forEach(function (d) { ids[d.id] = 1; c = conv(d.id); updateConv(c, d); setMine(d.id, true); });
        S.mineOrder.slice().forEach(function (id) { if (!ids[id]) setMine(id, false); });
        S.queue = Array.isArray(f.queue) ? f.queue.filter(function (x) { return typeof x === "string"; }) : [];
        S.queue.forEach(function (id) { if (!conv(id).summaryLoaded) loadSummary(conv(id)); });
        renderLists();
        renderSelected();
        sendFrame({ type: "presence", status: presenceSel.value });
        resendPending();
        return;
      case "message":
        if (typeof f.conversation !== "string") return;
        c = conv(f.conversation);
        if (!addMessage(c, f)) return;
        if (f.role === "agent" && f.client_id && S.pending[f.client_id]) {
          var p = S.pending[f.client_id];
          if (p.node && p.node.parentNode) p.node.parentNode.removeChild(p.node);
          delete S.pending[f.client_id];
        }
        if (f.role === "visitor") {
          if (S.selected === c.id) $("typing").hidden = true;
          if (S.selected !== c.id || document.visibilityState !== "visible") c.unread++;
        }
        appendToView(c, f);
        markRead(c);
        renderLists();
        return;
      case "ack":
        var pend = S.pending[f.id];
        if (!pend) return;
        delete S.pending[f.id];
        c = conv(pend.conversation);
        if (pend.node && pend.node.parentNode) pend.node.parentNode.removeChild(pend.node);
        var mine = { conversation: c.id, seq: f.seq, role: "agent", sender: S.me && S.me.id, text: pend.text,
                     client_id: f.id, ts: f.ts, meta: {} };
        if (addMessage(c, mine)) appendToView(c, mine);
        renderLists();
        return;
      case "assigned":
        var d = f.conversation || {};
        if (!d.id) return;
        c = conv(d.id);
        updateConv(c, d);
        c.state = d.state || "human";
        setMine(d.id, true);
        S.queue = S.queue.filter(function (x) { return x !== d.id; });
        if (!S.selected) S.selected = d.id;
        renderLists();
        if (S.selected === d.id) renderSelected();
        return;
      case "unassigned":
        if (typeof f.conversation !== "string") return;
        setMine(f.conversation, false);
        c = conv(f.conversation);
        if (f.reason === "closed") c.state = "closed";
        if (S.selected === f.conversation) {
          renderSelected();
          transcript.appendChild(el("div", "m-system", f.reason === "transferred" ? "Transferred to another agent." :
                                    f.reason === "closed" ? "Conversation closed." : "No longer assigned to you."));
        }
        renderLists();
        return;
      case "queue":
        S.queue = Array.isArray(f.conversations) ? f.conversations.filter(function (x) { return typeof x === "string"; }) : [];
        S.queue.forEach(function (id) { var q = conv(id); if (!q.summaryLoaded) loadSummary(q); });
        renderLists();
        if (S.selected && S.convs[S.selected] && !S.convs[S.selected].mine) renderSelected();
        return;
      case "state":
        if (typeof f.conversation !== "string") return;
        c = conv(f.conversation);
        if (f.state) c.state = f.state;
        if (S.selected === c.id) { $("conv-state").textContent = c.state || ""; replyForm.hidden = !c.mine || c.state !== "human"; }
        return;
      case "typing":
        if (f.conversation === S.selected && f.role === "visitor") {
          clearTimeout(S.typingHide);
          $("typing").hidden = f.on === false;
          if (f.on !== false) S.typingHide = setTimeout(function () { $("typing").hidden = true; }, 15000);
        }
        return;
      case "read":
        if (typeof f.conversation !== "string" || typeof f.seq !== "number" || f.role !== "visitor") return;
        c = conv(f.conversation);
        if (f.seq > c.visitorRead) c.visitorRead = f.seq;
        if (S.selected === c.id) markSeen(c);
        return;
      case "presence":
        if (f.status === "online" || f.status === "away") presenceSel.value = f.status;
        return;
      case "resync":
        if (typeof f.conversation === "string") { c = conv(f.conversation); c.loaded = false; loadHistory(c); }
        return;
      case "error":
        if (typeof f.id === "string" && S.pending[f.id]) {
          var pe = S.pending[f.id];
          if (f.code === "storage_unavailable" || f.code === "rate_limited") {
            setTimeout(function () { if (S.pending[f.id]) sendFrame({ type: "message", conversation: pe.conversation, id: f.id, text: pe.text }); }, 2000);
          } else {
            delete S.pending[f.id];
            if (pe.node) { pe.node.classList.add("m-failed"); pe.node.appendChild(el("div", "w", "Not sent: " + (f.message || f.code))); }
          }
        } else if (f.code && S.selected) {
          transcript.appendChild(el("div", "m-system", "Error: " + String(f.message || f.code)));
        }
        return;
      default:
        return;
    }
  }

  function loadSummary(c) {
    // A queued conversation in the list: who, and what they said last (its recent messages).
    c.summaryLoaded = true;
    api("GET", "/conversations/" + encodeURIComponent(c.id)).then(function (d) {
      updateConv(c, d);
      var after = Math.max(0, (d.last_seq || 0) - 20);
      return api("GET", "/conversations/" + encodeURIComponent(c.id) + "/messages?limit=20&after=" + after);
    }).then(function (d) {
      (d.messages || []).forEach(function (m) { if (m.role === "visitor") c.preview = m.text; });
      renderLists();
    }).catch(function () { c.summaryLoaded = false; });
  }

  // ---------------------------------------------------------------- start
  if (S.token) start(); else showLogin();

  window.kefuConsole = {
    get connected() { return S.connected; },
    get me() { return S.me; },
    dropConnection: function () { if (S.ws) S.ws.close(4000, "test"); }
  };
})();
