/*
 * kefu visitor chat page (chat.html).  Protocol: docs/protocol.md.
 *
 * Rules this file keeps:
 *  - Everything a person typed (visitor, agent, bot knowledge, names) is put into the page
 *    with textContent / DOM calls only, never as HTML.
 *  - No inline scripts, inline handlers or eval, so the server can send a strict CSP.
 *  - Each message is sent with a client id and shown as pending until the server's ack (which
 *    carries its seq); a resend after a reconnect reuses the id, so it is stored once.
 *  - Messages are kept by seq: a replay after a reconnect (hello with last_seq) never shows a
 *    message twice, and a message that arrives out of order is put in its place.
 *  - Reconnects back off exponentially with jitter, and immediately when the browser comes
 *    back online.
 */
(function () {
  "use strict";

  // ---------------------------------------------------------------- configuration
  var query = new URLSearchParams(location.search);
  var frag = new URLSearchParams(location.hash.replace(/^#/, ""));
  var BOT = (query.get("bot") || "").slice(0, 64);
  var EMBED = query.get("embed") === "1";
  var HOST_ORIGIN = frag.get("host") || "*";   // where the widget lives (for postMessage only)
  var IDENTITY = null;                          // host-signed visitor identity, from the widget
  if (frag.get("visitor_id") && frag.get("visitor_hash")) {
    IDENTITY = { id: frag.get("visitor_id"), hash: frag.get("visitor_hash") };
    var ts = frag.get("visitor_ts");
    if (ts && /^\d+(\.\d+)?$/.test(ts)) IDENTITY.ts = Number(ts);
    else if (ts) IDENTITY.ts = ts;
  }
  // Keep the identity out of the address bar and history once read.
  if (location.hash && history.replaceState) {
    try { history.replaceState(null, "", location.pathname + location.search); } catch (e) { /* ignore */ }
  }

  var BACKOFF_BASE_MS = 500, BACKOFF_MAX_MS = 30000;
  var PING_EVERY_MS = 25000, DEAD_AFTER_MS = 60000;
  var TYPING_THROTTLE_MS = 3000, TYPING_IDLE_MS = 4000;
  var MAX_TEXT = 4000;
  var ACK_TIMEOUT_MS = 5000;   // no ack this long: resend with the same id

  // ---------------------------------------------------------------- persistent state
  var storeKey = "kefu.visitor." + (BOT || "default") + (IDENTITY ? ".u." + IDENTITY.id : "");
  function loadStore() {
    try { return JSON.parse(localStorage.getItem(storeKey) || "{}") || {}; } catch (e) { return {}; }
  }
  var saved = loadStore();
  function save() {
    try {
      localStorage.setItem(storeKey, JSON.stringify({ token: state.token, conversation: state.conversation }));
    } catch (e) { /* private mode or storage blocked: the session lasts as long as the page */ }
  }

  var state = {
    token: typeof saved.token === "string" ? saved.token : null,
    conversation: typeof saved.conversation === "string" ? saved.conversation : null,
    convState: null,        // bot | queued | human | closed
    agentName: null,
    startNew: false,        // next hello asks for a new conversation
    ws: null,
    connected: false,       // welcome received on the current socket
    attempt: 0,
    timer: null,
    lastFrameAt: 0,
    pingTimer: null,
    seqs: Object.create(null),      // seq -> element, for every message shown
    byClientId: Object.create(null),// client id -> element, for the visitor's own messages
    pending: [],                    // client ids not yet acked, in send order
    contiguous: 0,                  // every seq <= this is shown: resume from here
    maxSeq: 0,
    readSent: 0,                    // highest seq we told the server we read
    peerRead: 0,                    // highest seq the agent read
    unread: 0,
    visible: true,                  // in the widget: whether the panel is open (it is when created)
    typingSent: 0,
    typingIdle: null,
    typingHide: null,
    leftMessage: false,
    unavailableSeq: 0,              // seq of the last "nobody online" event
    gapTimer: null,
    syncedAt: -1,                   // contiguous seq we last asked a sync from
    immediate: false,               // reconnect at once (not a failure)
    features: {},                   // what the server's welcome advertises
    suggestTimer: null,
    suggestFor: ""
  };

  // ---------------------------------------------------------------- elements
  var $ = function (id) { return document.getElementById(id); };
  var log = $("log"), input = $("input"), composer = $("composer"), humanBtn = $("human-btn");
  var typingEl = $("typing"), typingLabel = $("typing-label"), connDot = $("conn-dot");
  var connStatus = $("conn-status"), suggestions = $("suggestions"), leaveForm = $("leave-form");
  var titleEl = $("title");

  if (EMBED) {
    document.documentElement.classList.add("embed");
    var closeBtn = document.createElement("button");
    closeBtn.type = "button";
    closeBtn.className = "btn btn-ghost btn-close";
    closeBtn.setAttribute("aria-label", "Close chat");
    closeBtn.textContent = "\u2715";
    closeBtn.addEventListener("click", function () { toParent({ kefu: "close" }); });
    document.querySelector(".bar").appendChild(closeBtn);
  }

  function toParent(msg) {
    if (!EMBED || window.parent === window) return;
    try { window.parent.postMessage(msg, HOST_ORIGIN); } catch (e) { /* host origin malformed */ }
  }

  // ---------------------------------------------------------------- helpers
  function newId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    var b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmtTime(ts) {
    if (typeof ts !== "number") return "";
    var d = new Date(ts * 1000);
    return ("0" + d.getHours()).slice(-2) + ":" + ("0" + d.getMinutes()).slice(-2);
  }
  function nearBottom() { return log.scrollHeight - log.scrollTop - log.clientHeight < 80; }
  function scrollDown(force) { if (force || nearBottom()) log.scrollTop = log.scrollHeight; }

  function setConn(kind, text) {
    connDot.className = "dot " + (kind === "on" ? "dot-on" : kind === "wait" ? "dot-wait" : "dot-off");
    connDot.setAttribute("title", text || "");
    if (kind === "on") { connStatus.hidden = true; }
    else { connStatus.hidden = false; connStatus.textContent = text; }
  }

  // ---------------------------------------------------------------- rendering messages
  function roleLabel(msg) {
    if (msg.role === "agent") return (msg.meta && typeof msg.meta.name === "string" && msg.meta.name) || "Agent";
    if (msg.role === "bot") return "Assistant";
    return "";
  }

  function buildMessage(msg) {
    if (msg.role === "system") {
      var s = el("div", "msg-system", msg.text);
      s.setAttribute("role", "note");
      return s;
    }
    var role = msg.role === "visitor" ? "visitor" : msg.role === "agent" ? "agent" : "bot";
    var wrap = el("div", "msg msg-" + role);
    if (role !== "visitor") wrap.appendChild(el("div", "who", roleLabel(msg)));
    wrap.appendChild(el("div", "bubble", msg.text));
    var meta = el("div", "meta", fmtTime(msg.ts));
    wrap.appendChild(meta);
    return wrap;
  }

  function placeBySeq(node, seq) {
    // Insert before the first shown message with a higher seq, else before the pending ones.
    node.setAttribute("data-seq", String(seq));
    var kids = log.children;
    for (var i = 0; i < kids.length; i++) {
      var k = kids[i];
      var ks = k.getAttribute("data-seq");
      if (ks === null || Number(ks) > seq) { log.insertBefore(node, k); return; }
    }
    log.appendChild(node);
  }

  function advance(seq) {
    if (seq > state.maxSeq) state.maxSeq = seq;
    while (state.seqs[state.contiguous + 1]) state.contiguous++;
  }

  function visitorMeta(node) {
    var meta = node.querySelector(".meta");
    if (!meta) return;
    var seq = Number(node.getAttribute("data-seq") || 0);
    var parts = [];
    var t = node.getAttribute("data-ts");
    if (t) parts.push(fmtTime(Number(t)));
    if (node.classList.contains("msg-failed")) parts.push(node.getAttribute("data-error") || "Not sent");
    else if (!seq) parts.push("Sending\u2026");
    else if (seq <= state.peerRead) parts.push("Read");
    else parts.push("Sent");
    meta.textContent = parts.join(" \u00b7 ");
  }

  function showMessage(msg) {
    if (typeof msg.seq !== "number" || msg.seq < 1) return;
    if (state.seqs[msg.seq]) return;                         // already shown: no duplicates
    var stick = nearBottom();
    var node = null;
    if (msg.role === "visitor" && msg.client_id && state.byClientId[msg.client_id]) {
      node = state.byClientId[msg.client_id];               // our own pending message came back
      ackNode(node, msg.client_id, msg.seq, msg.ts);
    } else {
      node = buildMessage(msg);
      if (msg.role === "visitor") {
        if (msg.client_id) { state.byClientId[msg.client_id] = node; node.setAttribute("data-cid", msg.client_id); }
        if (typeof msg.ts === "number") node.setAttribute("data-ts", String(msg.ts));
        state.seqs[msg.seq] = node;
        placeBySeq(node, msg.seq);
        visitorMeta(node);
      } else {
        state.seqs[msg.seq] = node;
        placeBySeq(node, msg.seq);
      }
    }
    advance(msg.seq);
    if (msg.role === "bot" || msg.role === "agent") {
      hideTyping();
      if (!state.visible || document.visibilityState !== "visible") {
        state.unread++;
        toParent({ kefu: "unread", count: state.unread });
      }
      showQuickReplies(msg.meta && msg.meta.suggestions);
    }
    if (msg.role === "system" && msg.meta) {
      if (msg.meta.event === "unavailable") state.unavailableSeq = msg.seq;
      applyEvent(msg.meta, false);
    }
    if (msg.role === "visitor" && state.unavailableSeq && msg.seq > state.unavailableSeq) {
      state.leftMessage = true;                          // they already wrote after the notice
      hideLeaveForm();
    }
    checkGap();
    scrollDown(stick || msg.role === "visitor");
    maybeRead();
  }

  function checkGap() {
    // Messages arrive in seq order; a hole that stays means something was lost: ask again once.
    clearTimeout(state.gapTimer);
    if (state.maxSeq <= state.contiguous) return;
    state.gapTimer = setTimeout(function () {
      if (state.connected && state.maxSeq > state.contiguous && state.syncedAt !== state.contiguous) {
        state.syncedAt = state.contiguous;
        sendFrame({ type: "sync", last_seq: state.contiguous });
      }
    }, 3000);
  }

  function ackNode(node, cid, seq, ts) {
    var i = state.pending.indexOf(cid);
    if (i >= 0) state.pending.splice(i, 1);
    var other = state.seqs[seq];
    if (other && other !== node) { other.parentNode && other.parentNode.removeChild(other); }
    node.classList.remove("msg-pending", "msg-failed");
    if (typeof ts === "number") node.setAttribute("data-ts", String(ts));
    state.seqs[seq] = node;
    if (node.parentNode) node.parentNode.removeChild(node);
    placeBySeq(node, seq);
    advance(seq);
    visitorMeta(node);
    if (state.unavailableSeq && seq > state.unavailableSeq) state.leftMessage = true;
  }

  function clearLog() {
    while (log.firstChild) log.removeChild(log.firstChild);
    state.seqs = Object.create(null);
    state.byClientId = Object.create(null);
    state.pending = [];
    state.contiguous = 0;
    state.maxSeq = 0;
    state.readSent = 0;
    state.peerRead = 0;
    state.unavailableSeq = 0;
    state.leftMessage = false;
    state.syncedAt = -1;
    hideLeaveForm();
  }

  function notice(text) {
    var n = el("div", "msg-system", text);
    n.setAttribute("role", "note");
    log.appendChild(n);
    scrollDown(true);
    return n;
  }

  // ---------------------------------------------------------------- conversation state
  function setConvState(s) {
    if (!s) return;
    state.convState = s;
    humanBtn.hidden = s !== "bot";
    humanBtn.disabled = !state.connected;
    if (s === "human") hideLeaveForm();
    if (s === "closed") {
      hideLeaveForm();
      input.placeholder = "Type to start a new conversation\u2026";
    } else {
      input.placeholder = "Type a message\u2026";
    }
    titleEl.textContent = s === "human" && state.agentName ? state.agentName : "Customer service";
  }

  function applyEvent(meta, live) {
    // meta of a stored system event, or a live `state` frame
    if (meta.agent && typeof meta.agent.name === "string") state.agentName = meta.agent.name;
    if (typeof meta.state === "string") setConvState(meta.state);
    if (meta.event === "unavailable" || meta.available === false) {
      if (state.convState !== "human" && state.convState !== "closed" && !state.leftMessage) showLeaveForm();
    } else if (meta.event === "assigned" || meta.event === "transferred") {
      hideLeaveForm();
    }
  }

  function showLeaveForm() {
    if (!leaveForm.hidden) return;
    leaveForm.hidden = false;
    var stick = nearBottom();
    scrollDown(stick);
  }
  function hideLeaveForm() { leaveForm.hidden = true; }

  // ---------------------------------------------------------------- typing indicator
  function showTyping(role, on) {
    clearTimeout(state.typingHide);
    if (!on) { hideTyping(); return; }
    typingLabel.textContent = role === "bot" ? "Assistant is typing\u2026"
      : (state.agentName || "Agent") + " is typing\u2026";
    typingEl.hidden = false;
    state.typingHide = setTimeout(hideTyping, 15000);   // never stuck on a lost "off"
    scrollDown(false);
  }
  function hideTyping() { clearTimeout(state.typingHide); typingEl.hidden = true; }

  function typingInput() {
    if (!state.connected || state.convState !== "human") return;
    var now = Date.now();
    if (now - state.typingSent > TYPING_THROTTLE_MS) {
      state.typingSent = now;
      sendFrame({ type: "typing", on: true });
    }
    clearTimeout(state.typingIdle);
    state.typingIdle = setTimeout(stopTyping, TYPING_IDLE_MS);
  }
  function stopTyping() {
    clearTimeout(state.typingIdle);
    if (state.typingSent && state.connected && state.convState === "human") sendFrame({ type: "typing", on: false });
    state.typingSent = 0;
  }

  // ---------------------------------------------------------------- read receipts
  function maybeRead() {
    if (!state.connected || !state.visible || document.visibilityState !== "visible") return;
    state.unread = 0;
    toParent({ kefu: "unread", count: 0 });
    var seq = state.contiguous;
    if (seq > state.readSent && state.convState === "human") {
      state.readSent = seq;
      sendFrame({ type: "read", seq: seq });
    }
  }
  document.addEventListener("visibilitychange", maybeRead);
  window.addEventListener("focus", maybeRead);
  window.addEventListener("message", function (ev) {
    // The widget tells us whether its panel is open (only our parent, only that flag).
    if (!EMBED || ev.source !== window.parent) return;
    if (HOST_ORIGIN !== "*" && ev.origin !== HOST_ORIGIN) return;
    var d = ev.data;
    if (d && typeof d === "object" && d.kefu === "visible") {
      state.visible = !!d.visible;
      if (state.visible) { maybeRead(); input.focus(); }
    }
  });

  // ---------------------------------------------------------------- suggestions
  function showQuickReplies(items) {
    while (suggestions.firstChild) suggestions.removeChild(suggestions.firstChild);
    if (!Array.isArray(items) || !items.length) { suggestions.hidden = true; return; }
    items.slice(0, 6).forEach(function (text) {
      if (typeof text !== "string" || !text) return;
      var li = el("li");
      var b = el("button", null, text);
      b.type = "button";
      b.addEventListener("click", function () {
        suggestions.hidden = true;
        sendText(text);
      });
      li.appendChild(b);
      suggestions.appendChild(li);
    });
    suggestions.hidden = !suggestions.firstChild;
  }

  // ---------------------------------------------------------------- sending
  function sendFrame(frame) {
    var ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    try { ws.send(JSON.stringify(frame)); return true; } catch (e) { return false; }
  }

  function sendText(text) {
    text = String(text).replace(/\s+$/, "");
    if (!text.trim()) return;
    if (text.length > MAX_TEXT) text = text.slice(0, MAX_TEXT);
    if (state.convState === "closed") {
      // A closed conversation: start a new one and send this as its first message.
      state.startNew = true;
      state.conversation = null;
      save();
      clearLog();
      queueMessage(text);
      reconnectNow();
      return;
    }
    queueMessage(text);
  }

  function queueMessage(text) {
    var cid = newId();
    var node = buildMessage({ role: "visitor", text: text });
    node.classList.add("msg-pending");
    node.setAttribute("data-cid", cid);
    node.setAttribute("data-text", text);
    node.setAttribute("data-ts", String(Date.now() / 1000));
    state.byClientId[cid] = node;
    state.pending.push(cid);
    log.appendChild(node);
    visitorMeta(node);
    scrollDown(true);
    if (state.connected && sendFrame({ type: "message", id: cid, text: text })) node.setAttribute("data-sent", String(Date.now()));
    stopTyping();
  }

  function resendPending(olderThan) {
    var now = Date.now();
    state.pending.slice().forEach(function (cid) {
      var node = state.byClientId[cid];
      if (!node || node.classList.contains("msg-failed")) return;
      if (olderThan && now - Number(node.getAttribute("data-sent") || 0) < olderThan) return;
      if (sendFrame({ type: "message", id: cid, text: node.getAttribute("data-text") || "" }))
        node.setAttribute("data-sent", String(now));
    });
  }
  setInterval(function () { if (state.connected) resendPending(ACK_TIMEOUT_MS); }, 2000);

  function failNode(cid, why) {
    var node = state.byClientId[cid];
    if (!node) return;
    var i = state.pending.indexOf(cid);
    if (i >= 0) state.pending.splice(i, 1);
    node.classList.remove("msg-pending");
    node.classList.add("msg-failed");
    node.setAttribute("data-error", why);
    visitorMeta(node);
  }

  composer.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var text = input.value;
    if (!text.trim()) return;
    input.value = "";
    autoGrow();
    suggestions.hidden = true;
    sendText(text);
    input.focus();
  });
  input.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      composer.requestSubmit ? composer.requestSubmit() : composer.dispatchEvent(new Event("submit"));
    }
  });
  function autoGrow() {
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight + 2, 120) + "px";
  }
  input.addEventListener("input", function () { autoGrow(); typingInput(); askSuggestions(); });

  // Type-ahead: only when the server's welcome advertises it (features: ["suggest"]); the
  // protocol has no such frame today, and an unknown frame type would count as an error.
  function askSuggestions() {
    if (!state.features.suggest || state.convState !== "bot") return;
    clearTimeout(state.suggestTimer);
    state.suggestTimer = setTimeout(function () {
      var prefix = input.value.trim();
      if (prefix === state.suggestFor) return;
      state.suggestFor = prefix;
      if (prefix.length < 2) { showQuickReplies([]); return; }
      sendFrame({ type: "suggest", prefix: prefix.slice(0, 100) });
    }, 250);
  }
  input.addEventListener("blur", stopTyping);

  humanBtn.addEventListener("click", function () {
    if (!state.connected) return;
    humanBtn.disabled = true;
    sendFrame({ type: "handoff" });
  });

  leaveForm.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var name = $("leave-name").value.trim(), contact = $("leave-contact").value.trim();
    var text = $("leave-text").value.trim();
    if (!text) { $("leave-text").focus(); return; }
    var parts = [];
    if (name) parts.push("Name: " + name);
    if (contact) parts.push("Contact: " + contact);
    parts.push(text);
    queueMessage(parts.join("\n"));
    state.leftMessage = true;
    $("leave-text").value = "";
    hideLeaveForm();
    notice("Thanks! Your message is saved and an agent will get back to you.");
  });
  $("leave-cancel").addEventListener("click", function () { state.leftMessage = true; hideLeaveForm(); });

  // ---------------------------------------------------------------- the socket
  function wsUrl() {
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws/visitor";
  }

  function connect() {
    clearTimeout(state.timer);
    state.timer = null;
    if (state.ws) return;
    setConn("wait", state.attempt ? "Reconnecting\u2026" : "Connecting\u2026");
    var ws;
    try { ws = new WebSocket(wsUrl()); } catch (e) { scheduleReconnect(); return; }
    state.ws = ws;
    state.connected = false;
    ws.onopen = function () {
      var hello = { type: "hello" };
      if (state.token) hello.token = state.token;
      else if (IDENTITY) hello.identity = IDENTITY;
      if (BOT) hello.bot = BOT;
      if (state.startNew) hello["new"] = true;
      else if (state.conversation) { hello.conversation = state.conversation; hello.last_seq = state.contiguous; }
      ws.send(JSON.stringify(hello));
      state.lastFrameAt = Date.now();
      startPings();
    };
    ws.onmessage = function (ev) {
      if (ws !== state.ws) return;
      state.lastFrameAt = Date.now();
      var frame;
      try { frame = JSON.parse(ev.data); } catch (e) { return; }
      if (frame && typeof frame === "object") handle(frame);
    };
    ws.onclose = function (ev) {
      if (ws !== state.ws) return;
      state.ws = null;
      state.connected = false;
      stopPings();
      hideTyping();
      humanBtn.disabled = true;
      if (ev.code === 4001) {
        // A bad or expired token, or a host identity that failed its check (stale timestamp...):
        // go on as an anonymous visitor (the server changed nothing).
        if (state.token) state.token = null; else IDENTITY = null;
        save();
      }
      // The conversation is gone (or not this visitor's): the next welcome starts a new one and
      // clears the page, keeping what is waiting to be sent.
      if (ev.code === 4004) { state.conversation = null; save(); }
      if (state.immediate) { state.immediate = false; connect(); return; }
      scheduleReconnect(ev.code === 4029 ? 10000 : 0);
    };
    ws.onerror = function () { /* onclose follows */ };
  }

  function scheduleReconnect(minDelay) {
    if (state.timer) return;
    var cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * Math.pow(2, state.attempt));
    // 0.5 s doubling to 30 s, then "equal jitter" (50-100 % of that) spreads a reconnect storm;
    // after a 4029 (flood) at least 10 s.
    var delay = Math.max(minDelay || 0, cap / 2 + Math.random() * cap / 2);
    state.attempt++;
    setConn("off", navigator.onLine === false ? "You are offline. Waiting for the network\u2026"
      : "Connection lost. Reconnecting in " + Math.ceil(delay / 1000) + " s\u2026");
    state.timer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (state.ws) { state.immediate = true; try { state.ws.close(1000, "reconnect"); } catch (e) { /* closing */ } return; }
    clearTimeout(state.timer);
    state.timer = null;
    connect();
  }

  window.addEventListener("online", function () { if (!state.ws) { state.attempt = 0; reconnectNow(); } });
  window.addEventListener("offline", function () { if (state.ws) { try { state.ws.close(); } catch (e) {} } });

  function startPings() {
    stopPings();
    state.pingTimer = setInterval(function () {
      if (!state.ws) return;
      if (Date.now() - state.lastFrameAt > DEAD_AFTER_MS) {
        // Silent for too long: assume a dead link (a sleeping phone, a dropped NAT entry).
        var ws = state.ws;
        try { ws.close(4000, "no traffic"); } catch (e) { /* ignore */ }
        if (ws.onclose) ws.onclose({ code: 4000 });
        return;
      }
      if (state.connected) sendFrame({ type: "ping" });
    }, PING_EVERY_MS);
  }
  function stopPings() { clearInterval(state.pingTimer); state.pingTimer = null; }

  // ---------------------------------------------------------------- frames from the server
  function handle(f) {
    switch (f.type) {
      case "welcome": return onWelcome(f);
      case "message": return showMessage(f);
      case "ack": return onAck(f);
      case "typing": return showTyping(f.role, f.on !== false);
      case "read":
        if (f.role !== "visitor" && typeof f.seq === "number" && f.seq > state.peerRead) {
          state.peerRead = f.seq;
          Array.prototype.forEach.call(log.querySelectorAll(".msg-visitor[data-seq]"), visitorMeta);
        }
        return;
      case "state": return applyEvent(f, true);
      case "resync": return onResync(f);
      case "suggestions":
        if (typeof f.prefix === "string" && f.prefix !== input.value.trim()) return;   // stale answer
        return showQuickReplies(f.items || f.suggestions);
      case "error": return onError(f);
      case "notice":                                    // transient (not stored): the bot's reply failed
        if (typeof f.text === "string") notice(f.text);
        return;
      case "pong": return;
      default: return;                                  // unknown frames are ignored (forward compatible)
    }
  }

  function onWelcome(f) {
    var conv = f.conversation || {};
    if (typeof f.token === "string") state.token = f.token;
    if (conv.id && conv.id !== state.conversation) {
      // A different conversation than the one shown (new, or the old one is gone): start clean,
      // keeping the messages the visitor is still waiting to send.
      var keep = state.pending.map(function (cid) { return state.byClientId[cid]; }).filter(Boolean);
      var keepIds = state.pending.slice();
      clearLog();
      keep.forEach(function (node, i) {
        log.appendChild(node);
        state.byClientId[keepIds[i]] = node;
        state.pending.push(keepIds[i]);
      });
    }
    state.conversation = conv.id || null;
    state.startNew = false;
    state.connected = true;
    state.attempt = 0;
    if (typeof f.agent_name === "string" && f.agent_name) state.agentName = f.agent_name;
    state.verified = f.verified === true;
    state.features = {};
    if (Array.isArray(f.features)) f.features.forEach(function (x) { if (typeof x === "string") state.features[x] = true; });
    save();
    setConn("on", "Connected");
    setConvState(conv.state || "bot");
    humanBtn.disabled = false;
    // Frames are handled in order by the server: these resends are processed after the replay
    // of what we missed, and an already-stored one is acked again with its original seq.
    resendPending();
    maybeRead();
  }

  function onAck(f) {
    if (typeof f.id !== "string" || typeof f.seq !== "number") return;
    var node = state.byClientId[f.id];
    if (!node) return;
    if (state.seqs[f.seq] === node) { state.pending = state.pending.filter(function (c) { return c !== f.id; }); return; }
    ackNode(node, f.id, f.seq, f.ts);
    maybeRead();
  }

  function onError(f) {
    var cid = typeof f.id === "string" ? f.id : null;
    switch (f.code) {
      case "text_too_long": case "empty_text": case "bad_field": case "missing_field":
        if (cid) failNode(cid, f.code === "text_too_long" ? "Too long: not sent" : "Not sent");
        return;
      case "bad_state":
        if (cid) {
          // The conversation was closed under us: start a new one and send it there.
          var node = state.byClientId[cid];
          if (node && state.convState === "closed") {
            var text = node.getAttribute("data-text") || "";
            node.parentNode && node.parentNode.removeChild(node);
            state.pending = state.pending.filter(function (c) { return c !== cid; });
            sendText(text);
          } else failNode(cid, "Not sent");
        }
        return;
      case "storage_unavailable": case "rate_limited": case "internal":
        // Nothing was stored: the message stays pending and is resent with the same id.
        if (cid) setTimeout(function () {
          var n = state.byClientId[cid];
          if (n && state.pending.indexOf(cid) >= 0 && state.connected)
            sendFrame({ type: "message", id: cid, text: n.getAttribute("data-text") || "" });
        }, 2000);
        return;
      default:
        return;
    }
  }

  function onResync(f) {
    // More was missed than the server replays: reload the transcript over REST.
    if (!state.token || !state.conversation) return;
    var cid = state.conversation;
    var after = 0;
    var keep = state.pending.slice();
    var keepNodes = keep.map(function (c) { return state.byClientId[c]; });
    clearLog();
    keep.forEach(function (c, i) { if (keepNodes[i]) { state.byClientId[c] = keepNodes[i]; state.pending.push(c); log.appendChild(keepNodes[i]); } });
    (function page() {
      fetch("/api/v1/conversations/" + encodeURIComponent(cid) + "/messages?limit=200&after=" + after, {
        headers: { Authorization: "Bearer " + state.token }, cache: "no-store", credentials: "omit"
      }).then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
        .then(function (data) {
          (data.messages || []).forEach(showMessage);
          if (data.next_after) { after = data.next_after; page(); }
        })
        .catch(function () { notice("Some earlier messages could not be loaded."); });
    })();
  }

  // ---------------------------------------------------------------- start
  setConvState("bot");
  humanBtn.disabled = true;
  autoGrow();
  connect();

  // For tests and debugging only: read-only view of the connection.
  window.kefuChat = {
    get connected() { return state.connected; },
    get lastSeq() { return state.contiguous; },
    get conversation() { return state.conversation; },
    get verified() { return state.verified; },
    dropConnection: function () { if (state.ws) state.ws.close(4000, "test"); }
  };
})();
