// Traffic: what the org's users reached, as the workloads reported it,
// grouped by user group, then destination and service. Rows can be
// selected and turned into a rule (the rule form, prefilled).

import { api } from "./api.js";
import { age, h, num, plural, replace, time } from "./dom.js";
import { filterInput, filterSelect } from "./forms.js";

const PAGE = 100;
const BY = "group,dst,port,proto";
const PERIODS = [["1h", "Last hour", 1], ["24h", "Last 24 hours", 24], ["7d", "Last 7 days", 24 * 7],
                 ["30d", "Last 30 days", 24 * 30]];
const VERDICT_CHOICES = [
  ["", "Any verdict"],
  ["denied,would_deny", "Blocked or would be blocked"],
  ["denied", "Blocked"],
  ["would_deny", "Would be blocked"],
  ["allowed", "Allowed"],
];
const PROTO_CHOICES = [["", "Any protocol"], ["tcp", "TCP"], ["udp", "UDP"], ["icmp", "ICMP"],
                       ["icmpv6", "ICMPv6"], ["other", "Other"]];
const TEXT_FILTERS = [
  ["user", "User", "alice@example.com"],
  ["group", "User group", "Developers"],
  ["workload", "Workload", "web-1"],
  ["dst", "Destination", "10.20.0.0/16 or 2001:db8::1"],
  ["port", "Port", "443"],
];
// Widening a destination to a network when creating a rule: prefix
// lengths for IPv4 and IPv6.
const WIDEN = [["", "Exact addresses", null, null], ["24", "Networks: /24 (IPv4), /64 (IPv6)", 24, 64],
               ["16", "Networks: /16 (IPv4), /48 (IPv6)", 16, 48]];

// -- addresses ----------------------------------------------------------------

function parseV4(text) {
  const parts = text.split(".");
  if (parts.length !== 4) return null;
  let n = 0n;
  for (const p of parts) {
    if (!/^\d{1,3}$/.test(p) || Number(p) > 255) return null;
    n = (n << 8n) | BigInt(p);
  }
  return n;
}

function parseV6(text) {
  const halves = text.split("::");
  if (halves.length > 2) return null;
  const side = (s) => (s ? s.split(":") : []);
  const head = side(halves[0]);
  const tail = halves.length === 2 ? side(halves[1]) : [];
  if (tail.length && tail[tail.length - 1].includes(".")) return null;   // mapped forms: kept exact
  const fill = 8 - head.length - tail.length;
  if ((halves.length === 1 && fill !== 0) || fill < 0) return null;
  let n = 0n;
  for (const g of [...head, ...Array(halves.length === 2 ? fill : 0).fill("0"), ...tail]) {
    if (!/^[0-9a-fA-F]{1,4}$/.test(g)) return null;
    n = (n << 16n) | BigInt(parseInt(g, 16));
  }
  return n;
}

function formatV6(n) {
  const groups = [];
  for (let i = 7; i >= 0; i -= 1) groups.push(Number((n >> BigInt(16 * i)) & 0xffffn).toString(16));
  // The longest run of two or more zero groups becomes "::" (RFC 5952).
  let best = [-1, 0];
  for (let i = 0; i < 8;) {
    if (groups[i] !== "0") { i += 1; continue; }
    let j = i;
    while (j < 8 && groups[j] === "0") j += 1;
    if (j - i > best[1] && j - i >= 2) best = [i, j - i];
    i = j;
  }
  if (best[0] < 0) return groups.join(":");
  return `${groups.slice(0, best[0]).join(":")}::${groups.slice(best[0] + best[1]).join(":")}`;
}

// The network of `prefix` bits holding address `addr`, as a CIDR; the
// address itself when `prefix` is null or the address is not plain v4/v6.
export function widen(addr, prefix4, prefix6) {
  const v4 = parseV4(addr);
  if (v4 !== null) {
    if (prefix4 === null) return addr;
    const net = v4 & (((1n << 32n) - 1n) ^ ((1n << BigInt(32 - prefix4)) - 1n));
    return `${[24n, 16n, 8n, 0n].map((s) => (net >> s) & 255n).join(".")}/${prefix4}`;
  }
  const v6 = parseV6(addr);
  if (v6 === null || prefix6 === null) return addr;
  const net = v6 & (((1n << 128n) - 1n) ^ ((1n << BigInt(128 - prefix6)) - 1n));
  return `${formatV6(net)}/${prefix6}`;
}

// A flow's service as the rule form writes it: "443/tcp", or "icmp".
export function service(port, proto) {
  if (proto === "tcp" || proto === "udp") return `${port}/${proto}`;
  return proto === "other" ? "any" : proto;
}

// -- the page -------------------------------------------------------------------

const select = (...args) => filterSelect("traffic", ...args);
const input = (...args) => filterInput("traffic", ...args);

function badges(v) {
  return [
    v.denied ? h("span", { class: "badge danger", title: `${num(v.denied)} denied` }, "blocked") : null,
    v.would_deny ? h("span", { class: "badge warn", title: `${num(v.would_deny)} would have been denied in enforce mode` },
      "would be blocked") : null,
    v.allowed ? h("span", { class: "badge ok", title: `${num(v.allowed)} allowed` }, "allowed") : null,
  ];
}

export async function view(ctx) {
  const q = ctx.query;
  // The last hour by default: what is happening now, and a summary that
  // stays quick however much history the server keeps.
  const period = PERIODS.find(([k]) => k === q.get("period")) || PERIODS[0];
  const texts = TEXT_FILTERS.map(([name, label, ph]) => input(name, label, ph, q.get(name)));
  const proto = select("proto", "Protocol", PROTO_CHOICES, q.get("proto") || "");
  const verdict = select("verdict", "Verdict", VERDICT_CHOICES, q.get("verdict") || "");
  const when = select("period", "Period", PERIODS.map(([k, text]) => [k, text]), period[0]);
  const filterError = h("p", { class: "alert error", role: "alert", id: "traffic-error", hidden: true });

  const filters = {};
  for (const [i, [name]] of TEXT_FILTERS.entries()) {
    const v = (q.get(name) || "").trim();
    if (v) filters[name] = v;
    texts[i].control.value = q.get(name) || "";
  }
  if (q.get("proto")) filters.proto = q.get("proto");
  if (q.get("verdict")) filters.verdict = q.get("verdict");
  filters.since = new Date(Date.now() - period[2] * 3600 * 1000).toISOString().replace(/\.\d+Z$/, "Z");

  const form = h("form", {
    class: "card filters", id: "traffic-filters", role: "search", "aria-label": "Filter traffic",
    onsubmit: (ev) => {
      ev.preventDefault();
      const qs = new URLSearchParams();
      for (const t of texts) if (t.control.value.trim()) qs.set(t.control.name, t.control.value.trim());
      for (const s of [proto, verdict]) if (s.control.value) qs.set(s.control.name, s.control.value);
      if (when.control.value !== PERIODS[0][0]) qs.set("period", when.control.value);
      const s = qs.toString();
      ctx.navigate(`#/traffic${s ? `?${s}` : ""}`);
    },
  },
  h("div", { class: "row filter-row" }, texts.map((t) => t.el), proto.el, verdict.el, when.el),
  h("div", { class: "actions" },
    h("button", { type: "submit" }, "Apply filters"),
    h("a", { class: "button secondary", href: "#/traffic" }, "Clear")));

  // The rows shown, by their key; the selected ones by the same key.
  const shown = new Map();
  const selected = new Set();
  const tableWrap = h("div", { class: "table-wrap" });
  const summary = h("p", { id: "traffic-summary", class: "summary", "aria-live": "polite" });
  const more = h("button", { type: "button", class: "secondary", id: "traffic-more", hidden: true }, "Show more");
  const selCount = h("span", { id: "traffic-selection", class: "muted" }, "No rows selected.");
  const widenSel = select("widen", "Destinations in the rule", WIDEN.map(([k, text]) => [k, text]), "");
  const createBtn = h("button", { type: "button", id: "traffic-create-rule", disabled: true }, "Create rule");
  const table = h("table", { class: "data", id: "traffic-table" },
    h("caption", { class: "visually-hidden" }, "Traffic grouped by user group, destination and service"),
    h("thead", {}, h("tr", {},
      h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Select")),
      ["Destination", "Service", "Verdict", "Connections", "Users", "Workloads", "First seen", "Last seen"].map(
        (c) => h("th", { scope: "col", class: ["Connections", "Users", "Workloads"].includes(c) ? "num" : null }, c)))));
  let lastGroup = null;
  let groupBody = null;
  let cursor = null;

  function updateSelection() {
    selCount.textContent = selected.size ? `${plural(selected.size, "row", "rows")} selected.` : "No rows selected.";
    createBtn.disabled = selected.size === 0;
  }

  function keyOf(r) {
    return JSON.stringify([r.group, r.dst, r.port, r.proto]);
  }

  function addRows(items) {
    for (const r of items) {
      if (r.group !== lastGroup || !groupBody) {
        lastGroup = r.group;
        groupBody = h("tbody", { "data-group": r.group },
          h("tr", { class: "group-row" },
            h("th", { scope: "colgroup", colspan: 9 },
              r.group ? r.group : h("span", { class: "muted" }, "No user group (unmanaged users)"))));
        table.append(groupBody);
      }
      const key = keyOf(r);
      shown.set(key, r);
      const label = `${r.group || "no group"} to ${r.dst} ${service(r.port, r.proto)}`;
      const box = h("input", {
        type: "checkbox", "aria-label": `Select ${label}`,
        onchange: () => {
          if (box.checked) selected.add(key);
          else selected.delete(key);
          updateSelection();
        },
      });
      groupBody.append(h("tr", { "data-dst": r.dst, "data-port": String(r.port), "data-proto": r.proto,
                                  "data-group": r.group },
        h("td", {}, box),
        h("th", { scope: "row" }, h("code", {}, r.dst)),
        h("td", {}, h("code", {}, service(r.port, r.proto))),
        h("td", { class: "verdicts" }, badges(r.verdicts)),
        h("td", { class: "num" }, num(r.count)),
        h("td", { class: "num" }, num(r.users)),
        h("td", { class: "num" }, num(r.workloads)),
        h("td", {}, time(r.first_seen)),
        h("td", {}, h("time", { datetime: r.last_seen, title: new Date(r.last_seen).toLocaleString() },
          age(r.last_seen)))));
    }
  }

  async function load() {
    const data = await api("/traffic/grouped", { query: { ...filters, by: BY, limit: PAGE, cursor } });
    if (!ctx.current()) return;
    addRows(data.items);
    cursor = data.next;
    more.hidden = !cursor;
    if (!shown.size) {
      replace(tableWrap, h("p", { class: "empty" },
        "No traffic matches these filters in this period. Workloads report what their users reach once ausd uploads flows to this server."));
    } else if (!table.isConnected) {
      replace(tableWrap, table);
    }
    summary.textContent = shown.size
      ? `${plural(shown.size, "destination and service", "destinations and services")} shown${cursor ? "; more below" : ""}.`
      : "";
  }

  more.addEventListener("click", () => {
    more.disabled = true;
    load().catch((err) => ctx.setStatus(err.message, "error")).finally(() => { more.disabled = false; });
  });

  createBtn.addEventListener("click", () => {
    const rows = [...selected].map((k) => shown.get(k)).filter(Boolean);
    const [, , p4, p6] = WIDEN.find(([k]) => k === widenSel.control.value) || WIDEN[0];
    const qs = new URLSearchParams();
    const uniq = (xs) => [...new Set(xs)];
    for (const g of uniq(rows.map((r) => r.group).filter(Boolean))) qs.append("group", g);
    for (const d of uniq(rows.map((r) => widen(r.dst, p4, p6)))) qs.append("dest", d);
    for (const s of uniq(rows.map((r) => service(r.port, r.proto)))) qs.append("service", s);
    ctx.navigate(`#/rules/new?${qs.toString()}`);
  });

  replace(ctx.main,
    h("h1", {}, "Traffic"),
    h("p", { class: "lead" },
      "What users reached from the org's workloads, as ausd reported it: by user group, then destination and service. ",
      "“Blocked” was denied; “would be blocked” is what enforce mode would deny on a workload in visibility mode. ",
      "Select rows and create a rule from them."),
    form, filterError,
    h("div", { class: "actions selection-bar" }, selCount, widenSel.el, createBtn),
    summary, tableWrap,
    h("div", { class: "actions" }, more));
  try {
    await load();
  } catch (err) {
    if (err.status === 400 && err.fields && err.fields.length) {
      // The server names the filter it refused.
      filterError.textContent = `${err.message}`;
      filterError.hidden = false;
      const bad = form.querySelector(`[name="${err.fields[0].field}"]`);
      if (bad) bad.setAttribute("aria-invalid", "true");
      replace(tableWrap);
      return;
    }
    throw err;
  }
}
