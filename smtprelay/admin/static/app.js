/* smtprelay admin page: uses only the REST API of this relay (see /api/openapi.json).
 *
 * Plain JavaScript, no framework and no build step.  Everything that comes from
 * the relay is put on the page with textContent, never as HTML: subjects and
 * addresses come from SMTP clients.  Secrets are never shown: the API answers
 * {"set": true|false} for them, and a secret input stays empty unless the
 * administrator types a new value.
 */
"use strict";

const TOKEN_KEY = "smtprelay-admin-token";
const REFRESH_MS = 10000;

const PROVIDER_FIELDS = {
  m365: [
    {key: "tenant_id", label: "Tenant ID", required: true},
    {key: "client_id", label: "Client (application) ID", required: true},
    {key: "client_secret", label: "Client secret", secret: true,
     hint: "Or use a certificate below instead."},
    {key: "client_secret_expires", label: "Client secret expires on", type: "date",
     hint: "You get a warning before this date."},
    {key: "certificate", label: "Certificate file (PEM)", placeholder: "m365-cert.pem"},
    {key: "certificate_key", label: "Certificate key file (PEM)", placeholder: "m365-key.pem"},
    {key: "save_to_sent_items", label: "Save sent messages to Sent Items", type: "checkbox", default: false},
    {key: "authority", label: "Authority", placeholder: "https://login.microsoftonline.com", advanced: true},
    {key: "graph_endpoint", label: "Graph endpoint", placeholder: "https://graph.microsoft.com", advanced: true},
    {key: "ca_file", label: "Extra CA bundle", advanced: true},
    {key: "timeout", label: "Timeout per request", placeholder: "60s", advanced: true},
  ],
  gmail: [
    {key: "service_account_file", label: "Service account file (JSON)", placeholder: "sa.json",
     hint: "Domain-wide delegation: sends as each message's sender. Or fill in user OAuth below."},
    {key: "client_id", label: "OAuth client ID"},
    {key: "client_secret", label: "OAuth client secret", secret: true},
    {key: "refresh_token", label: "OAuth refresh token", secret: true},
    {key: "token_uri", label: "Token URI", placeholder: "https://oauth2.googleapis.com/token", advanced: true},
    {key: "api_endpoint", label: "API endpoint", placeholder: "https://gmail.googleapis.com", advanced: true},
    {key: "ca_file", label: "Extra CA bundle", advanced: true},
    {key: "timeout", label: "Timeout per request", placeholder: "60s", advanced: true},
  ],
  smtp: [
    {key: "host", label: "Server host name", required: true, placeholder: "mail.company.com"},
    {key: "port", label: "Port", type: "number", placeholder: "587"},
    {key: "security", label: "Security", type: "select", default: "starttls",
     options: [["starttls", "STARTTLS (required)"], ["tls", "TLS from the start (port 465)"],
               ["none", "none (not encrypted)"]]},
    {key: "username", label: "User name"},
    {key: "password", label: "Password", secret: true},
    {key: "verify_certificate", label: "Verify the server's certificate", type: "checkbox", default: true},
    {key: "ca_file", label: "Extra CA bundle", advanced: true},
    {key: "timeout", label: "Timeout", placeholder: "60s", advanced: true},
  ],
  outbox: [
    {key: "directory", label: "Outbox folder", placeholder: "var/outbox",
     hint: "Each message is written there as a file (Maildir new/); nothing is sent."},
  ],
};

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  config: null,          // the last GET /api/config (redacted)
  pages: [null],         // cursors of the delivery log pages seen; last = current
  nextCursor: null,
  detailId: null,
  timer: null,
};

/* ---------------------------------------------------------------- helpers */

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clone(value) { return JSON.parse(JSON.stringify(value)); }

function isSecretValue(value) {
  return value && typeof value === "object" && Object.keys(value).length === 1 && "set" in value;
}

function formatTime(text) {
  if (!text) return "";
  const d = new Date(text);
  return isNaN(d) ? text : d.toLocaleString();
}

function formatDuration(seconds) {
  seconds = Math.max(0, Math.floor(seconds || 0));
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600),
        m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  if (d) return `${d} d ${h} h ${m} min`;
  if (h) return `${h} h ${m} min`;
  if (m) return `${m} min ${s} s`;
  return `${s} s`;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.fields = (body && body.fields) || {};
  }
}

async function api(method, path, body) {
  const headers = {"Accept": "application/json"};
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {method, headers, cache: "no-store",
                                  body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (e) {
    throw new ApiError(0, {error: "the relay does not answer (" + e.message + ")"});
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch (e) { data = {error: text.slice(0, 200)}; }
  }
  if (response.status === 401) {
    signOut(state.token ? "The token was not accepted (it may have been changed): sign in again." : "");
    throw new ApiError(401, data);
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

function say(id, text, kind) {
  const node = $(id);
  node.textContent = text || "";
  node.classList.toggle("error", kind === "error");
  node.classList.toggle("ok", kind === "ok");
}

/* ------------------------------------------------------------ field errors */

function clearErrors(scope) {
  for (const node of scope.querySelectorAll(".field-error")) node.textContent = "";
  for (const node of scope.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

/* Put each {"dotted.key": "problem"} beside its input; -> the problems left over. */
function showFieldErrors(scope, fields) {
  const rest = [];
  let first = null;
  for (const [key, problem] of Object.entries(fields || {})) {
    const target = $("err-" + key);
    if (target && scope.contains(target)) {
      target.textContent = problem;
      const input = scope.querySelector(`[data-key="${CSS.escape(key)}"]`);
      if (input && input !== target) {
        input.setAttribute("aria-invalid", "true");
        if (!first) first = input;
      }
    } else {
      rest.push(key ? `${key}: ${problem}` : problem);
    }
  }
  if (first) first.focus();
  return rest;
}

/* ------------------------------------------------------------- sign in/out */

function showLogin(message) {
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  say("login-error", message || "", message ? "error" : "");
  $("token").value = "";
  $("token").focus();
  if (state.timer) { clearInterval(state.timer); state.timer = null; }
}

function signOut(message) {
  state.token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin(message);
}

async function start() {
  try {
    await refreshStatus();
  } catch (e) {
    if (e.status === 401) return;  // the sign-in form is showing
    showLogin(e.message);
    return;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = !state.token;
  await Promise.allSettled([refreshStats(), loadConfig(), loadLog()]);
  if (!state.timer) {
    state.timer = setInterval(() => { refreshStatus().catch(() => {}); refreshStats().catch(() => {}); },
                              REFRESH_MS);
  }
}

/* ------------------------------------------------------- status and stats */

function renderWarnings(warnings) {
  const box = $("warnings");
  box.replaceChildren(...warnings.map(w => el("div", {class: "banner", role: "alert"},
                                              el("strong", {text: "Warning: "}), w)));
}

async function refreshStatus() {
  const s = await api("GET", "/api/status");
  const running = s.state === "running";
  for (const id of ["state", "header-state"]) {
    $(id).textContent = running ? "running" : "stopped";
    $(id).className = "badge " + (running ? "good" : "bad");
  }
  $("header-state").textContent = running ? "SMTP running" : "SMTP stopped";
  $("listen").textContent = (s.listen || []).join(", ") || "(nothing)";
  $("uptime").textContent = formatDuration(s.uptime_seconds) + ` (since ${formatTime(s.started_at)})`;
  const p = s.provider;
  let summary = `${p.type}` + (p.sender_default ? `, sending as ${p.sender_default}` : "");
  if (p.credential_expires) {
    summary += `; credential expires ${p.credential_expires} (${p.credential_days_left} days)`;
  }
  $("provider-summary").textContent = summary;
  $("version").textContent = s.version;
  $("smtp-start").disabled = running;
  $("smtp-stop").disabled = !running;
  renderWarnings(s.warnings || []);
  return s;
}

async function refreshStats() {
  const s = await api("GET", "/api/stats");
  for (const k of ["received", "sent", "failed", "queued", "deferred"]) {
    $("stat-" + k).textContent = String(s[k]);
  }
  $("stat-error-rate").textContent = (s.error_rate * 100).toFixed(1) + " %";
  const last = $("last-error");
  if (s.last_error) {
    last.replaceChildren("Last error (", formatTime(s.last_error.at), "): ", s.last_error.message, " ",
      el("button", {type: "button", class: "link", text: "show delivery",
                    onclick: () => openDetail(s.last_error.delivery_id)}));
  } else {
    last.textContent = "No error so far.";
  }
}

async function smtp(action) {
  say("state-message", action === "start" ? "Starting…" : "Stopping…");
  try {
    await api("POST", `/api/smtp/${action}`);
    await refreshStatus();
    say("state-message", action === "start" ? "SMTP started." : "SMTP stopped.", "ok");
  } catch (e) {
    say("state-message", e.message, "error");
  }
}

/* ------------------------------------------------------------ the form */

function fieldId(key) { return "provider-" + key.replace(/_/g, "-"); }

function buildProviderFields(type, section) {
  const box = $("provider-fields");
  const basic = [], advanced = [];
  for (const f of PROVIDER_FIELDS[type]) {
    const key = "provider." + f.key;
    const id = fieldId(f.key);
    const current = section && section.type === type ? section[f.key] : undefined;
    const described = [f.hint || f.secret ? "hint-" + id : null, "err-" + key].filter(Boolean).join(" ");
    let input;
    if (f.type === "select") {
      input = el("select", {id, "data-key": key, "aria-describedby": described},
        ...f.options.map(([v, label]) => el("option", {value: v, text: label})));
      input.value = current !== undefined ? current : f.default;
    } else if (f.type === "checkbox") {
      input = el("input", {id, type: "checkbox", "data-key": key, "aria-describedby": described});
      input.checked = current !== undefined ? Boolean(current) : f.default;
    } else {
      input = el("input", {
        id, "data-key": key, "aria-describedby": described,
        type: f.secret ? "password" : (f.type === "number" ? "text" : (f.type || "text")),
        inputmode: f.type === "number" ? "numeric" : null,
        autocomplete: f.secret ? "new-password" : "off",
        placeholder: f.secret ? (isSecretValue(current) && current.set ? "set: leave empty to keep it" : "not set")
                              : (f.placeholder || ""),
      });
      if (!f.secret && current !== undefined && current !== null && typeof current !== "object") {
        input.value = String(current);
      }
    }
    let hint = f.hint || "";
    if (f.secret) {
      const set = isSecretValue(current) && current.set;
      hint = (set ? "A value is set (not shown). Type a new one to replace it. " : "No value is set. ") + hint;
    }
    const label = el("label", {for: id, text: f.label + (f.required ? " (required)" : "")});
    const parts = f.type === "checkbox" ? [input, label] : [label, input];
    const field = el("div", {class: "field" + (f.type === "checkbox" ? " check" : "")}, ...parts,
      hint ? el("span", {class: "hint", id: "hint-" + id, text: hint}) : null,
      el("span", {class: "field-error", id: "err-" + key}));
    (f.advanced ? advanced : basic).push(field);
  }
  const children = [...basic];
  if (advanced.length) {
    children.push(el("details", {class: "advanced"}, el("summary", {text: "Advanced settings"}), ...advanced));
  }
  box.replaceChildren(...children);
}

function userRow(name, value) {
  const table = value && typeof value === "object" && !isSecretValue(value) &&
                ("password" in value || "allowed" in value);
  const set = table ? isSecretValue(value.password) && value.password.set
                    : isSecretValue(value) && value.set;
  const n = document.querySelectorAll("#users-body tr").length + 1;
  const row = el("tr", {"data-original": name || ""});
  const nameInput = el("input", {id: `user-name-${n}`, class: "user-name", value: name || "",
                                 "aria-label": "User name", autocomplete: "off"});
  const pw = el("input", {id: `user-password-${n}`, class: "user-password", type: "password",
                          autocomplete: "new-password", "aria-label": `Password of ${name || "the new user"}`,
                          placeholder: set ? "set: leave empty to keep it" : "required for a new user"});
  const allowed = el("input", {id: `user-allowed-${n}`, class: "user-allowed",
                               "aria-label": `Addresses ${name || "the new user"} may send as`,
                               placeholder: "any allowed sender",
                               value: table && value.allowed ? value.allowed.join(", ") : ""});
  const key = name ? `smtp.auth.users.${name}` : null;
  const err = el("span", {class: "field-error", id: key ? "err-" + key : null});
  if (key) { nameInput.setAttribute("data-key", key); }
  const pwErr = el("span", {class: "field-error", id: key ? `err-${key}.password` : null});
  if (key) pw.setAttribute("data-key", `${key}.password`);
  const allowedErr = el("span", {class: "field-error", id: key ? `err-${key}.allowed` : null});
  if (key) allowed.setAttribute("data-key", `${key}.allowed`);
  row.append(
    el("td", {}, nameInput, err),
    el("td", {}, pw, pwErr),
    el("td", {}, allowed, allowedErr),
    el("td", {}, el("button", {type: "button", class: "quiet", text: "Remove",
                               "aria-label": `Remove user ${name || ""}`.trim(),
                               onclick: () => { row.remove(); }})),
  );
  row.dataset.set = set ? "1" : "";
  row.dataset.table = table ? "1" : "";
  return row;
}

function fillForm(config) {
  const provider = config.provider || {type: "outbox"};
  const type = provider.type || "outbox";
  $("provider-type").value = type;
  buildProviderFields(type, provider);
  const sender = config.sender || {};
  $("sender-default").value = sender.default || "";
  $("sender-allowed").value = (sender.allowed || []).join("\n");
  $("sender-on-disallowed").value = sender.on_disallowed || "reject";
  const smtpSection = config.smtp || {};
  const listen = smtpSection.listen === undefined ? "" :
                 (Array.isArray(smtpSection.listen) ? smtpSection.listen.join(", ") : smtpSection.listen);
  $("smtp-listen").value = listen;
  const auth = smtpSection.auth || {};
  $("smtp-auth-required").checked = Boolean(auth.required);
  const body = $("users-body");
  body.replaceChildren();
  for (const [name, value] of Object.entries(auth.users || {})) body.append(userRow(name, value));
  clearErrors($("config-form"));
  say("config-error", "");
}

async function loadConfig() {
  state.config = await api("GET", "/api/config");
  fillForm(state.config);
}

function splitList(text) {
  return text.split(/[\s,]+/).map(s => s.trim()).filter(Boolean);
}

/* The form over a copy of the configuration last read: keys the form does not
   show (delivery, database, ...) go back unchanged. */
async function formDocument() {
  const doc = clone(state.config || {});
  const type = $("provider-type").value;
  const old = doc.provider || {};
  // keys of another provider type would only be refused: start afresh on a change
  const provider = old.type === type ? clone(old) : {};
  provider.type = type;
  for (const f of PROVIDER_FIELDS[type]) {
    const input = $(fieldId(f.key));
    if (f.type === "checkbox") {
      if (input.checked !== f.default || f.key in provider) provider[f.key] = input.checked;
    } else if (f.secret) {
      if (input.value) provider[f.key] = input.value;
      else if (!(isSecretValue(provider[f.key]) && provider[f.key].set)) delete provider[f.key];
    } else {
      const v = input.value.trim();
      if (!v) { delete provider[f.key]; continue; }
      provider[f.key] = f.type === "number" && /^\d+$/.test(v) ? Number(v) : v;
    }
  }
  doc.provider = provider;

  doc.sender = doc.sender || {};
  const sdefault = $("sender-default").value.trim();
  if (sdefault || "default" in doc.sender) doc.sender.default = sdefault;
  const allowed = $("sender-allowed").value.split("\n").map(s => s.trim()).filter(Boolean);
  if (allowed.length || "allowed" in doc.sender) doc.sender.allowed = allowed;
  const on = $("sender-on-disallowed").value;
  if (on !== "reject" || "on_disallowed" in doc.sender) doc.sender.on_disallowed = on;

  doc.smtp = doc.smtp || {};
  const listen = splitList($("smtp-listen").value);
  // a list stays a list in the file, a single address a string
  if (listen.length > 1 || (listen.length && Array.isArray(doc.smtp.listen))) doc.smtp.listen = listen;
  else if (listen.length === 1) doc.smtp.listen = listen[0];
  else delete doc.smtp.listen;
  const auth = doc.smtp.auth || {};
  const required = $("smtp-auth-required").checked;
  if (required || "required" in auth) auth.required = required;
  const users = {};
  for (const row of document.querySelectorAll("#users-body tr")) {
    const name = row.querySelector(".user-name").value.trim();
    if (!name) continue;
    const typed = row.querySelector(".user-password").value;
    let password;
    if (typed) {
      password = (await api("POST", "/api/users/hash-password", {password: typed})).hash;
    } else if (row.dataset.set && row.dataset.original === name) {
      password = {set: true};
    } else {
      password = "";   // the server says what is missing, beside the field
    }
    const may = splitList(row.querySelector(".user-allowed").value);
    users[name] = may.length ? {password, allowed: may} : password;
  }
  if (Object.keys(users).length || "users" in auth) auth.users = users;
  if (Object.keys(auth).length) doc.smtp.auth = auth;
  return doc;
}

async function saveConfig(event) {
  event.preventDefault();
  const form = $("config-form");
  clearErrors(form);
  say("config-error", "");
  say("config-status", "Saving…");
  $("config-save").disabled = true;
  try {
    const doc = await formDocument();
    state.config = await api("PUT", "/api/config", doc);
    fillForm(state.config);
    say("config-status", "Saved to the configuration file and applied.", "ok");
    refreshStatus().catch(() => {});
  } catch (e) {
    say("config-status", "");
    const rest = showFieldErrors(form, e.fields);
    const box = $("config-error");
    box.replaceChildren(el("p", {text: "Not saved: " + e.message}),
                        ...(rest.length ? [el("ul", {}, ...rest.map(r => el("li", {text: r})))] : []));
    if (!Object.keys(e.fields || {}).length || rest.length) box.focus();
  } finally {
    $("config-save").disabled = false;
  }
}

/* ----------------------------------------------------------- the tests */

async function testProvider() {
  const list = $("provider-steps");
  list.replaceChildren();
  say("provider-test-summary", "Testing…");
  $("provider-test").disabled = true;
  try {
    const r = await api("POST", "/api/provider/test");
    list.replaceChildren(...r.steps.map(s => el("li", {class: s.ok ? "ok" : "error"},
      el("span", {class: "mark", "aria-hidden": "true", text: s.ok ? "✔ " : "✘ "}),
      el("strong", {text: s.name}), ": ", s.ok ? "ok" : "failed", s.detail ? ` (${s.detail})` : "")));
    say("provider-test-summary", r.ok ? "The provider works." : "The provider test failed.",
        r.ok ? "ok" : "error");
  } catch (e) {
    say("provider-test-summary", e.message, "error");
  } finally {
    $("provider-test").disabled = false;
  }
}

async function sendTestMail(event) {
  event.preventDefault();
  const form = $("test-mail-form");
  clearErrors(form);
  say("test-mail-result", "Sending… (waiting for the provider's answer)");
  $("test-mail-send").disabled = true;
  const body = {to: $("test-to").value.trim()};
  const subject = $("test-subject").value.trim();
  if (subject) body.subject = subject;
  try {
    const r = await api("POST", "/api/test-mail", body);
    const result = $("test-mail-result");
    result.replaceChildren((r.ok ? "Sent: " : "Not sent: ") + r.detail + " ",
      el("button", {type: "button", class: "link", text: "show delivery " + r.delivery_id,
                    onclick: () => openDetail(r.delivery_id)}));
    result.className = r.ok ? "ok" : "error";
  } catch (e) {
    const rest = showFieldErrors(form, e.fields);
    say("test-mail-result", [e.message, ...rest].join("; "), "error");
  } finally {
    $("test-mail-send").disabled = false;
    loadLog().catch(() => {});
    refreshStats().catch(() => {});
  }
}

/* ------------------------------------------------------- the delivery log */

function toRfc3339(localValue) {
  if (!localValue) return null;
  const d = new Date(localValue);
  return isNaN(d) ? localValue : d.toISOString().replace(/\.\d{3}Z$/, "Z");
}

function logQuery(cursor) {
  const params = new URLSearchParams();
  for (const [id, name] of [["filter-status", "status"], ["filter-sender", "sender"],
                            ["filter-recipient", "recipient"], ["filter-q", "q"]]) {
    const v = $(id).value.trim();
    if (v) params.set(name, v);
  }
  for (const [id, name] of [["filter-since", "since"], ["filter-until", "until"]]) {
    const v = toRfc3339($(id).value);
    if (v) params.set(name, v);
  }
  params.set("limit", "25");
  if (cursor) params.set("cursor", cursor);
  return params.toString();
}

function statusBadge(item) {
  const text = item.state === "active" ? "in flight" : item.status;
  return el("span", {class: "badge " + ({sent: "good", failed: "bad", deferred: "warn"}[item.status] || ""),
                     text});
}

function canRetry(item) { return item.state !== "active" && ["failed", "deferred", "queued"].includes(item.status); }
function canCancel(item) { return item.state !== "active" && ["queued", "deferred"].includes(item.status); }

function logRow(item) {
  const actions = el("td", {class: "actions"},
    el("button", {type: "button", class: "quiet", text: "Details",
                  "aria-label": `Details of delivery ${item.id}`, onclick: () => openDetail(item.id)}));
  if (item.status === "failed" || item.status === "deferred") {
    actions.append(el("button", {type: "button", text: "Retry", "aria-label": `Retry delivery ${item.id}`,
                                 onclick: () => retry(item.id)}));
  }
  const row = el("tr", {"data-id": item.id, class: "clickable"},
    el("td", {title: item.received_at, text: formatTime(item.received_at)}),
    el("td", {}, statusBadge(item)),
    el("td", {text: item.sender || "<>"}),
    el("td", {text: item.recipients.join(", ")}),
    el("td", {text: item.subject}),
    el("td", {class: "num", text: String(item.attempts_count)}),
    el("td", {class: "error-text", text: item.error || ""}),
    actions);
  row.addEventListener("click", (e) => { if (!e.target.closest("button")) openDetail(item.id); });
  return row;
}

async function loadLog() {
  const form = $("log-filters");
  clearErrors(form);
  const cursor = state.pages[state.pages.length - 1];
  try {
    const r = await api("GET", "/api/deliveries?" + logQuery(cursor));
    $("log-body").replaceChildren(...r.items.map(logRow));
    if (!r.items.length) {
      $("log-body").append(el("tr", {}, el("td", {colspan: "8", class: "empty",
                                                  text: "No delivery matches."})));
    }
    state.nextCursor = r.next;
    $("log-next").disabled = !r.next;
    $("log-prev").disabled = state.pages.length <= 1;
    $("log-newest").disabled = state.pages.length <= 1;
    $("log-page").textContent = `Page ${state.pages.length}`;
    say("log-message", "");
  } catch (e) {
    const rest = showFieldErrors(form, e.fields);
    say("log-message", [e.message, ...rest].join("; "), "error");
  }
}

function applyFilters(event) {
  if (event) event.preventDefault();
  state.pages = [null];
  return loadLog();
}

async function openDetail(id) {
  let d;
  try {
    d = await api("GET", "/api/deliveries/" + encodeURIComponent(id));
  } catch (e) {
    say("log-message", e.message, "error");
    return;
  }
  state.detailId = id;
  const facts = [
    ["Id", d.id], ["Status", d.state === "active" ? "in flight" : d.status],
    ["Received", formatTime(d.received_at)], ["Finished", formatTime(d.finished_at)],
    ["Next attempt", formatTime(d.next_attempt_at)], ["Envelope sender", d.sender || "<>"],
    ["Recipients", (d.recipient_status || []).map(r => `${r.address} (${r.status})`).join(", ")],
    ["From header", d.header_from], ["Subject", d.subject], ["Message-ID", d.message_id],
    ["Size", `${d.size} bytes`], ["Client", d.client_address + (d.auth_user ? ` (user ${d.auth_user})` : "")],
    ["Provider", d.provider], ["Error", d.error || ""],
  ];
  $("detail-title").textContent = `Delivery ${d.id}`;
  $("detail-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {text: k}), el("dd", {text: v || "–"})]));
  $("detail-attempts").replaceChildren(...(d.attempts.length ? d.attempts.map(a => el("tr", {},
      el("td", {title: a.at, text: formatTime(a.at)}), el("td", {text: a.outcome}),
      el("td", {text: a.detail}), el("td", {class: "num", text: `${a.duration_ms} ms`})))
    : [el("tr", {}, el("td", {colspan: "4", class: "empty", text: "No attempt yet."}))]));
  $("detail-retry").hidden = !canRetry(d);
  $("detail-cancel").hidden = !canCancel(d);
  say("detail-message", "");
  $("delivery-detail").hidden = false;
  $("detail-title").focus();
}

async function retry(id) {
  try {
    await api("POST", `/api/deliveries/${encodeURIComponent(id)}/retry`);
    say("log-message", `Delivery ${id} is queued again.`, "ok");
    if (state.detailId === id && !$("delivery-detail").hidden) {
      say("detail-message", "Queued again; it is attempted now.", "ok");
    }
  } catch (e) {
    say("log-message", e.message, "error");
  }
  // the attempt takes a moment: show the queued state now, the outcome shortly after
  await loadLog();
  setTimeout(() => { loadLog(); refreshStats().catch(() => {}); }, 1500);
}

async function cancelDelivery(id) {
  if (!window.confirm(`Cancel delivery ${id}? It will not be sent.`)) return;
  try {
    await api("DELETE", `/api/deliveries/${encodeURIComponent(id)}`);
    say("detail-message", "Cancelled.", "ok");
  } catch (e) {
    say("detail-message", e.message, "error");
  }
  await loadLog();
  refreshStats().catch(() => {});
}

/* --------------------------------------------------------------- wiring */

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    $("token").value = "";  // kept in the session only, not in the form
    sessionStorage.setItem(TOKEN_KEY, state.token);
    say("login-error", "");
    start();
  });
  $("logout").addEventListener("click", () => signOut("Signed out."));
  $("smtp-start").addEventListener("click", () => smtp("start"));
  $("smtp-stop").addEventListener("click", () => smtp("stop"));
  $("provider-type").addEventListener("change", () => {
    const type = $("provider-type").value;
    buildProviderFields(type, state.config && state.config.provider);
  });
  $("config-form").addEventListener("submit", saveConfig);
  $("config-reset").addEventListener("click", () => {
    if (state.config) fillForm(state.config);
    say("config-status", "Changes discarded.");
  });
  $("user-add").addEventListener("click", () => {
    const row = userRow("", null);
    $("users-body").append(row);
    row.querySelector(".user-name").focus();
  });
  $("provider-test").addEventListener("click", testProvider);
  $("test-mail-form").addEventListener("submit", sendTestMail);
  $("log-filters").addEventListener("submit", applyFilters);
  $("filter-reset").addEventListener("click", () => {
    for (const id of ["filter-status", "filter-sender", "filter-recipient", "filter-q",
                      "filter-since", "filter-until"]) $(id).value = "";
    applyFilters();
  });
  $("log-refresh").addEventListener("click", () => { loadLog(); refreshStats().catch(() => {}); });
  $("log-next").addEventListener("click", () => {
    if (state.nextCursor) { state.pages.push(state.nextCursor); loadLog(); }
  });
  $("log-prev").addEventListener("click", () => {
    if (state.pages.length > 1) { state.pages.pop(); loadLog(); }
  });
  $("log-newest").addEventListener("click", () => { state.pages = [null]; loadLog(); });
  $("detail-close").addEventListener("click", () => {
    $("delivery-detail").hidden = true;
    const row = document.querySelector(`#log-body tr[data-id="${CSS.escape(state.detailId || "")}"] button`);
    if (row) row.focus();
  });
  $("detail-retry").addEventListener("click", async () => {
    const id = state.detailId;
    await retry(id);
    setTimeout(() => openDetail(id), 1600);
  });
  $("detail-cancel").addEventListener("click", () => cancelDelivery(state.detailId));
  $("config-error").setAttribute("tabindex", "-1");
  start();
});
