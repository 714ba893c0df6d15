// The console: sign-in, the header, and a router over location.hash
// (#/groups, #/groups/<id>, #/rules, #/rules/<id>, #/ip-lists, #/workloads,
// #/traffic, #/draft, #/history, #/audit).

import { ApiError, credentials, on, refreshPolicyVersion, signIn, signOut } from "./api.js";
import * as audit from "./audit.js";
import { h, num, replace } from "./dom.js";
import { field, FieldErrors } from "./forms.js";
import * as groups from "./groups.js";
import * as iplists from "./iplists.js";
import * as policy from "./policy.js";
import * as rules from "./rules.js";
import * as traffic from "./traffic.js";
import * as workloads from "./workloads.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const session = document.getElementById("session");
const statusEl = document.getElementById("status");
const versionEl = document.getElementById("policy-version");
const orgEl = document.getElementById("org");
const buildEl = document.getElementById("build-alert");
const draftEl = document.getElementById("draft-pending");
const BUILD_POLL_MS = 15000;

const ROUTES = [
  [/^\/groups$/, groups.list, "groups"],
  [/^\/groups\/([^/]+)$/, groups.detail, "groups"],
  [/^\/rules$/, rules.list, "rules"],
  [/^\/rules\/new$/, rules.edit, "rules"],
  [/^\/rules\/([^/]+)$/, rules.edit, "rules"],
  [/^\/ip-lists$/, iplists.list, "ip-lists"],
  [/^\/ip-lists\/new$/, iplists.edit, "ip-lists"],
  [/^\/ip-lists\/([^/]+)$/, iplists.edit, "ip-lists"],
  [/^\/workloads$/, workloads.view, "workloads"],
  [/^\/traffic$/, traffic.view, "traffic"],
  [/^\/draft$/, policy.draft, "draft"],
  [/^\/history$/, policy.history, "history"],
  [/^\/audit$/, audit.view, "audit"],
];

let generation = 0;
let leaving = [];
let pendingStatus = null;
let signOutReason = null;

export function setStatus(message, kind = "info") {
  statusEl.textContent = message || "";
  statusEl.className = `status ${message ? kind : ""}`;
}

function parseHash() {
  const raw = location.hash.startsWith("#/") ? location.hash.slice(1) : "/groups";
  const [path, qs = ""] = raw.split("?");
  return { path, query: new URLSearchParams(qs) };
}

// Go to `hash`; `status` is shown once the next page has rendered.
export function navigate(hash, { status } = {}) {
  pendingStatus = status || null;
  if (location.hash === hash) route();
  else location.hash = hash;
}

// Change the hash without rendering again (search terms, page offsets),
// so a reload or a shared link shows the same view. Only while the address
// still shows that page: a navigation that is under way must not be undone.
export function remember(hash) {
  if (parseHash().path === hash.slice(1).split("?")[0]) history.replaceState(null, "", hash);
}

function setVersion(v) {
  versionEl.hidden = false;
  replace(versionEl, "Policy version ", h("strong", { id: "policy-version-number" }, num(v)));
  versionEl.dataset.version = String(v);
}

// A policy the server cannot build: say what workloads enforce meanwhile.
function setBuild(build, version) {
  if (build.ok) {
    buildEl.hidden = true;
    buildEl.textContent = "";
    return;
  }
  const when = (t) => (t ? new Date(t).toLocaleString() : "unknown");
  replace(buildEl,
    h("strong", {}, "The policy cannot be built. "),
    `Failing since ${when(build.since)}, ${build.attempts} ${build.attempts === 1 ? "attempt" : "attempts"}; next attempt ${when(build.next_attempt_at)}. `,
    build.published
      ? `Workloads get the last good policy (version ${num(version)}) with the current members of its groups: removals and disabled users still reach them, rule changes do not until this is fixed. `
      : "No policy was ever published for this org. ",
    h("span", { class: "build-error" }, `Reason: ${build.error}`));
  buildEl.hidden = false;
}

on("policyVersion", setVersion);
on("policyBuild", setBuild);
// Rule and IP-list edits wait in the draft: say so in the header.
on("policyDraft", (draft) => {
  draftEl.hidden = !draft.pending;
});
setInterval(() => {
  if (credentials()) refreshPolicyVersion().catch(() => {});
}, BUILD_POLL_MS);
on("signedOut", (reason) => {
  signOutReason = reason || null;
  route();
});

async function route() {
  for (const fn of leaving) fn();
  leaving = [];
  generation += 1;
  const mine = generation;
  const cred = credentials();
  if (!cred) {
    renderSignIn();
    return;
  }
  nav.hidden = false;
  session.hidden = false;
  orgEl.textContent = `Org ${cred.org}`;
  refreshPolicyVersion().catch(() => {});
  const { path, query } = parseHash();
  const found = ROUTES.find(([re]) => re.test(path));
  if (!found) {
    navigate("#/groups");
    return;
  }
  const [re, page, section] = found;
  const params = path.match(re).slice(1).map(decodeURIComponent);
  for (const a of nav.querySelectorAll("a")) {
    if (a.dataset.section === section) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const status = pendingStatus;
  pendingStatus = null;
  setStatus("");
  replace(main, h("p", { class: "loading" }, "Loading…"));
  const ctx = {
    main, query, params,
    current: () => mine === generation,
    onLeave: (fn) => leaving.push(fn),
    navigate, remember, setStatus,
  };
  try {
    await page(ctx);
  } catch (err) {
    if (!ctx.current() || err.name === "AbortError") return;
    if (err instanceof ApiError && err.status === 401) return;   // signed out already
    replace(main, h("h1", { tabindex: "-1" }, "Something went wrong"),
      h("p", { class: "alert error", role: "alert" }, err.message));
  }
  if (!ctx.current()) return;
  const h1 = main.querySelector("h1");
  document.title = `${h1 ? h1.textContent : "Console"} · aus`;
  if (status) setStatus(status, "success");
  // Move focus to the new page's heading, as a page load would.
  if (h1 && !main.contains(document.activeElement)) {
    h1.setAttribute("tabindex", "-1");
    h1.focus();
  }
}

function renderSignIn() {
  nav.hidden = true;
  session.hidden = true;
  versionEl.hidden = true;
  buildEl.hidden = true;
  draftEl.hidden = true;
  document.title = "Sign in · aus";
  const token = field({
    name: "token", label: "API key", type: "password",
    hint: "The token aus-server api-key create printed: <api_key>:<secret>.",
    attrs: { autocomplete: "current-password", required: true },
  });
  const summary = h("div", { class: "alert error", role: "alert", hidden: true, tabindex: "-1" });
  const errors = new FieldErrors(summary, [token], { summary: false });
  const button = h("button", { type: "submit" }, "Sign in");
  const form = h("form", {
    class: "card signin", novalidate: true,
    onsubmit: async (ev) => {
      ev.preventDefault();
      errors.clear();
      button.disabled = true;
      try {
        await signIn(token.value());
        signOutReason = null;
        await refreshPolicyVersion().catch(() => {});
        const target = location.hash.startsWith("#/") ? location.hash : "#/groups";
        navigate(target, { status: "Signed in." });
      } catch (err) {
        // The server's own words: "wrong secret for this API key", ...
        const shown = err.fields && err.fields.length ? err : new ApiError(err.status, err.message, [
          { field: "token", message: err.message }]);
        errors.show(shown);
        token.control.focus();
      } finally {
        button.disabled = false;
      }
    },
  }, summary, token.el, button);
  replace(main,
    h("div", { class: "signin-page" },
      h("h1", { tabindex: "-1" }, "Sign in to the aus console"),
      h("p", { class: "lead" },
        "Use an API key of your organization. It is kept in this browser tab only and sent to this server alone."),
      signOutReason ? h("p", { class: "alert warning", role: "status" }, `Signed out: ${signOutReason}`) : null,
      form));
  token.control.focus();
}

document.getElementById("sign-out").addEventListener("click", () => {
  signOut();
  setStatus("Signed out.", "info");
});

document.querySelector(".skip").addEventListener("click", (ev) => {
  ev.preventDefault();
  const h1 = main.querySelector("h1");
  (h1 || main).focus();
});

window.addEventListener("hashchange", route);

if (credentials()) refreshPolicyVersion().catch(() => {});
route();
