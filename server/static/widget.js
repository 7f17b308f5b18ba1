/*
 * kefu embeddable chat widget.
 *
 *   <script src="https://chat.example/static/widget.js" data-kefu-url="https://chat.example"
 *           data-bot="shop" async></script>
 *
 * Adds a floating button to the host page; clicking it opens the kefu chat page in an iframe,
 * so the chat runs on the kefu origin, isolated from the host page's CSS and JavaScript (and
 * the host page cannot read the conversation).  The button lives in a shadow root and is styled through the CSSOM only, so host CSS does not leak in and a strict host CSP
 * (no 'unsafe-inline' styles or scripts) does not break it.
 *
 * Optional attributes:
 *   data-position="left"        button bottom-left instead of bottom-right
 *   data-label="Chat with us"   the button's accessible label / tooltip
 *   data-color="#1565c0"        button colour
 *   data-open="true"            open the chat on load
 *   A host-signed visitor identity, passed through untouched for the kefu server to verify
 *   (docs/protocol.md, hello.identity; the HMAC-SHA256 is computed by the host's backend with
 *   the shared identity_secret, never in the browser):
 *   data-visitor-id="user-42" data-visitor-ts="1764160000" data-visitor-hash="<hex>"
 *   The identity travels in the iframe URL's #fragment, so it never reaches request logs or
 *   Referer headers.
 *
 * API for the host page: window.kefuWidget.open(), .close(), .toggle().
 */
(function () {
  "use strict";
  if (window.kefuWidget && window.kefuWidget.__loaded) return;   // included twice: keep the first

  var script = document.currentScript;
  if (!script) {
    var all = document.querySelectorAll("script[data-kefu-url], script[src*='widget.js']");
    script = all[all.length - 1] || null;
  }
  function attr(name, dflt) {
    var v = script && script.getAttribute(name);
    return v === null || v === undefined || v === "" ? dflt : v;
  }

  var base = attr("data-kefu-url", "");
  if (!base && script && script.src) {
    try { base = new URL(script.src, location.href).origin; } catch (e) { base = ""; }
  }
  var kefuOrigin;
  try { kefuOrigin = new URL(base || location.origin, location.href).origin; }
  catch (e) { return; }                                            // unusable URL: do nothing
  if (!/^https?:$/.test(new URL(kefuOrigin).protocol)) return;       // never javascript:, data: ...
  base = (base || kefuOrigin).replace(/\/+$/, "");

  var bot = attr("data-bot", "shop");
  var label = attr("data-label", "Chat with us");
  var color = attr("data-color", "#1565c0");
  if (!/^#[0-9a-fA-F]{3,8}$|^[a-zA-Z]+$|^rgba?\([\d.,\s%]+\)$/.test(color)) color = "#1565c0";
  var left = attr("data-position", "right") === "left";

  function chatUrl() {
    var q = new URLSearchParams();
    q.set("bot", bot);
    q.set("embed", "1");
    var frag = new URLSearchParams();
    ["id", "ts", "hash"].forEach(function (k) {
      var v = attr("data-visitor-" + k, "");
      if (v) frag.set("visitor_" + k, v);
    });
    try { frag.set("host", location.origin); } catch (e) { /* opaque origin */ }
    var f = frag.toString();
    return base + "/static/chat.html?" + q.toString() + (f ? "#" + f : "");
  }

  // Inline !important declarations: they win over anything the host's stylesheets say.
  function css(el, styles) {
    for (var k in styles) if (Object.prototype.hasOwnProperty.call(styles, k)) el.style.setProperty(k, styles[k], "important");
    return el;
  }

  // A custom element name, so the host's `div { ... }` rules do not match it.
  var host = document.createElement("kefu-widget");
  host.setAttribute("data-kefu-widget", "");
  css(host, { all: "initial", display: "block", position: "fixed", "z-index": "2147483000", bottom: "0",
              width: "0", height: "0", overflow: "visible" });
  css(host, left ? { left: "0" } : { right: "0" });
  var root = host.attachShadow ? host.attachShadow({ mode: "open" }) : host;

  var button = document.createElement("button");
  button.type = "button";
  button.setAttribute("aria-label", label);
  button.setAttribute("aria-expanded", "false");
  button.title = label;
  css(button, {
    all: "initial", position: "fixed", bottom: "20px", width: "56px", height: "56px",
    "border-radius": "50%", background: color, "box-shadow": "0 4px 14px rgba(0,0,0,.25)",
    cursor: "pointer", display: "flex", "align-items": "center", "justify-content": "center",
    "z-index": "2147483001"
  });
  css(button, left ? { left: "20px" } : { right: "20px" });
  // The icon is built with DOM calls, not markup strings.
  var SVG = "http://www.w3.org/2000/svg";
  var icon = document.createElementNS(SVG, "svg");
  icon.setAttribute("viewBox", "0 0 24 24");
  icon.setAttribute("width", "28");
  icon.setAttribute("height", "28");
  icon.setAttribute("aria-hidden", "true");
  var path = document.createElementNS(SVG, "path");
  path.setAttribute("fill", "#fff");
  var CHAT = "M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H8l-4 4V6a2 2 0 0 1 2-2z";
  var CLOSE = "M6.4 5 12 10.6 17.6 5 19 6.4 13.4 12 19 17.6 17.6 19 12 13.4 6.4 19 5 17.6 10.6 12 5 6.4z";
  path.setAttribute("d", CHAT);
  icon.appendChild(path);
  button.appendChild(icon);

  var badge = document.createElement("span");
  css(badge, {
    all: "initial", position: "absolute", top: "-2px", right: "-2px", "min-width": "18px", height: "18px",
    "border-radius": "9px", background: "#d32f2f", color: "#fff", "font": "bold 11px/18px sans-serif",
    "text-align": "center", padding: "0 4px", display: "none"
  });
  button.appendChild(badge);

  var panel = document.createElement("div");
  css(panel, {
    all: "initial", position: "fixed", bottom: "88px", width: "380px", height: "600px",
    "max-height": "calc(100vh - 108px)", "max-width": "calc(100vw - 40px)", "border-radius": "12px",
    overflow: "hidden", "box-shadow": "0 8px 30px rgba(0,0,0,.3)", background: "#fff", display: "none",
    "z-index": "2147483001"
  });
  css(panel, left ? { left: "20px" } : { right: "20px" });

  var frame = null;
  var frameLoaded = false;
  var isOpen = false;
  var unread = 0;

  function small() { return window.matchMedia && window.matchMedia("(max-width: 480px)").matches; }
  function layout() {
    if (small()) {
      css(panel, { bottom: "0", width: "100vw", height: "100%", "max-height": "100%", "max-width": "100vw",
                   "border-radius": "0" });
      css(panel, left ? { left: "0" } : { right: "0" });
      css(button, { display: isOpen ? "none" : "flex" });
    } else {
      css(panel, { bottom: "88px", width: "380px", height: "600px", "max-height": "calc(100vh - 108px)",
                   "max-width": "calc(100vw - 40px)", "border-radius": "12px" });
      css(panel, left ? { left: "20px" } : { right: "20px" });
      css(button, { display: "flex" });
    }
  }

  function ensureFrame() {
    if (frame) return;
    frame = document.createElement("iframe");
    frame.src = chatUrl();
    frame.title = label;
    frame.setAttribute("referrerpolicy", "no-referrer");
    // Scripts, storage and forms on the kefu origin; no top navigation, no access to the host.
    frame.setAttribute("sandbox", "allow-scripts allow-same-origin allow-forms allow-popups");
    frame.setAttribute("allow", "clipboard-write");
    css(frame, { border: "0", width: "100%", height: "100%", display: "block" });
    frame.addEventListener("load", function () {
      frameLoaded = true;
      tellFrame();
    });
    panel.appendChild(frame);
  }

  // Tell the chat page whether it is on screen (for read receipts and unread counts).
  function tellFrame() {
    if (!frame || !frameLoaded) return;
    try { frame.contentWindow.postMessage({ kefu: "visible", visible: isOpen }, kefuOrigin); } catch (e) { /* gone */ }
  }

  function setUnread(n) {
    unread = n;
    badge.textContent = n > 99 ? "99+" : String(n);
    css(badge, { display: n > 0 ? "block" : "none" });
  }

  function open() {
    ensureFrame();
    isOpen = true;
    css(panel, { display: "block" });
    path.setAttribute("d", CLOSE);
    button.setAttribute("aria-expanded", "true");
    setUnread(0);
    layout();
    tellFrame();
  }
  function close() {
    isOpen = false;
    css(panel, { display: "none" });
    path.setAttribute("d", CHAT);
    button.setAttribute("aria-expanded", "false");
    layout();
    tellFrame();
  }
  function toggle() { if (isOpen) close(); else open(); }

  button.addEventListener("click", toggle);
  window.addEventListener("resize", layout);
  // Messages from the chat page: only from our iframe, only from the kefu origin.
  window.addEventListener("message", function (ev) {
    if (!frame || ev.source !== frame.contentWindow || ev.origin !== kefuOrigin) return;
    var d = ev.data;
    if (!d || typeof d !== "object") return;
    if (d.kefu === "close") close();
    else if (d.kefu === "unread" && !isOpen && typeof d.count === "number") setUnread(Math.max(0, d.count | 0));
  });

  root.appendChild(panel);
  root.appendChild(button);
  function mount() {
    document.body.appendChild(host);
    layout();
    if (attr("data-open", "") === "true") open();
  }
  if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);

  window.kefuWidget = { open: open, close: close, toggle: toggle, __loaded: true };
})();
