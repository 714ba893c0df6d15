// The management API, with the API key kept for this browser tab only
// (sessionStorage: closing the tab or signing out forgets it).

const STORE_KEY = "aus.console.credentials";

export class ApiError extends Error {
  constructor(status, message, fields = []) {
    super(message);
    this.status = status;
    this.fields = fields;
  }
}

// Base64 of UTF-8 text (btoa alone takes Latin-1 only).
function base64(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

export function credentials() {
  try {
    return JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
  } catch {
    return null;
  }
}

function authHeader(token) {
  return "Basic " + base64(token);
}

const listeners = { signedOut: [], policyVersion: [], policyBuild: [], policyDraft: [] };
export function on(event, fn) {
  listeners[event].push(fn);
}
function emit(event, ...args) {
  for (const fn of listeners[event]) fn(...args);
}

async function request(url, { method = "GET", body, token, signal } = {}) {
  const headers = { Accept: "application/json", Authorization: authHeader(token) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    // credentials "omit": the Authorization header is ours; a 401 must come
    // back to this page, not open the browser's own login prompt.
    resp = await fetch(url, {
      method, headers, signal, credentials: "omit", cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "the server cannot be reached; check that aus-server is running");
  }
  if (resp.status === 204) return null;
  let data = null;
  try {
    data = await resp.json();
  } catch {
    data = null;
  }
  if (!resp.ok) {
    const e = (data && data.error) || {};
    throw new ApiError(resp.status, e.message || `the server answered ${resp.status} ${resp.statusText}`,
                       e.fields || []);
  }
  return data;
}

// Check a token with the server; remember it and the org it belongs to.
export async function signIn(token) {
  token = token.trim();
  if (!token) throw new ApiError(0, "enter the API key token, <api_key>:<secret>", [{ field: "token", message: "required" }]);
  const who = await request("/api/whoami", { token });
  sessionStorage.setItem(STORE_KEY, JSON.stringify({ token, org: who.org, key: who.key }));
  return who;
}

export function signOut(reason) {
  sessionStorage.removeItem(STORE_KEY);
  emit("signedOut", reason);
}

// A call under /api/orgs/{org}; `path` starts with "/". A 401 (key revoked
// meanwhile) signs out with the server's message.
export async function api(path, { method = "GET", query, body, signal } = {}) {
  const cred = credentials();
  if (!cred) {
    signOut();
    throw new ApiError(401, "signed out");
  }
  let url = `/api/orgs/${encodeURIComponent(cred.org)}${path}`;
  if (query) {
    const qs = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") qs.set(k, v);
    const s = qs.toString();
    if (s) url += "?" + s;
  }
  try {
    const data = await request(url, { method, body, token: cred.token, signal });
    if (data && typeof data.policy_version === "number") emit("policyVersion", data.policy_version);
    if (data && data.draft === true) emit("policyDraft", { pending: true });
    return data;
  } catch (err) {
    // Several requests may fail with one key: the first one signs out, and
    // none undoes a sign-in made since with another key.
    const now = credentials();
    if (err instanceof ApiError && err.status === 401 && now && now.token === cred.token) signOut(err.message);
    throw err;
  }
}

// The version in force and how the last build of the policy went.
export async function refreshPolicyVersion() {
  const p = await api("/policy");
  emit("policyVersion", p.version);
  if (p.build) emit("policyBuild", p.build, p.version);
  if (p.draft) emit("policyDraft", p.draft);
  return p.version;
}
