// Audit: every change to the org's configuration, newest first: when, the
// API key that made it (id and label), the action, what it changed, and
// the object before and after (GET audit, docs/audit.md).

import { api } from "./api.js";
import { h, plural, replace, time } from "./dom.js";
import { filterInput, filterSelect } from "./forms.js";

const PAGE = 50;
const KINDS = [
  ["", "Any change"],
  ["rule.*", "Rules"],
  ["ip_list.*", "IP lists"],
  ["group.*", "User groups"],
  ["policy.*", "Provisions and rollbacks"],
  ["draft.*", "Discarded drafts"],
  ["mode.*", "Enforcement modes"],
  ["api_key.*", "API keys"],
];
const VERBS = {
  "rule.create": "Rule created", "rule.update": "Rule changed", "rule.delete": "Rule deleted",
  "ip_list.create": "IP list created", "ip_list.update": "IP list changed", "ip_list.delete": "IP list deleted",
  "group.create": "User group created", "group.delete": "User group deleted",
  "policy.provision": "Draft provisioned", "policy.rollback": "Rolled back",
  "draft.discard": "Draft discarded", "mode.set": "Mode set",
  "api_key.create": "API key created", "api_key.revoke": "API key revoked",
};

// The object's name as the record shows it; the target (an id) beside it.
function targetCell(e) {
  const obj = e.after || e.before || {};
  if (e.action === "mode.set") {
    return e.target === "org" ? "Org default" : ["Workload ", h("code", {}, e.target.replace(/^workload:/, ""))];
  }
  const name = obj.name || obj.display_name;
  if (!name) return e.target;
  return [name, e.target && e.target !== name ? h("div", { class: "hint" }, h("code", {}, e.target)) : null];
}

// The keys of two snapshots whose values differ, for the summary line.
export function changedKeys(before, after) {
  if (!before || !after || typeof before !== "object" || typeof after !== "object") return [];
  const keys = [...new Set([...Object.keys(before), ...Object.keys(after)])];
  return keys.filter((k) => JSON.stringify(before[k]) !== JSON.stringify(after[k]));
}

// A provision's or rollback's changes by name: "rules added: web; IP lists changed: db".
function changesText(changes) {
  const parts = [];
  for (const [kind, label] of [["rules", "rules"], ["ip_lists", "IP lists"]]) {
    for (const how of ["added", "changed", "removed"]) {
      const names = (changes[kind] || {})[how] || [];
      if (names.length) parts.push(`${label} ${how}: ${names.join(", ")}`);
    }
  }
  return parts.join("; ");
}

function what(e) {
  if (e.after && e.after.changes) return changesText(e.after.changes);
  if (e.action === "mode.set") {
    const m = (x) => (x ? x.mode : "none (the default)");
    return `${m(e.before)} → ${m(e.after)}`;
  }
  if (e.before === null && e.after !== null) return "created";
  if (e.after === null && e.before !== null) return "deleted";
  const keys = changedKeys(e.before, e.after).filter((k) => k !== "changes");
  return keys.length ? `changed: ${keys.join(", ")}` : "";
}

function snapshot(label, value, kind) {
  return h("div", { class: `snapshot ${kind}` },
    h("h3", {}, label),
    value === null || value === undefined
      ? h("p", { class: "muted" }, kind === "before" ? "Did not exist." : "No longer exists.")
      : h("pre", { tabindex: "0" }, JSON.stringify(value, null, 2)));
}

const select = (...args) => filterSelect("audit", ...args);
const input = (...args) => filterInput("audit", ...args);

export async function view(ctx) {
  const q = ctx.query;
  const kind = select("action", "Change", KINDS, q.get("action") || "");
  const key = input("key_id", "API key", "ak0123456789abcdef", q.get("key_id"));
  const filterError = h("p", { class: "alert error", role: "alert", id: "audit-error", hidden: true });
  const filters = {};
  if (q.get("action")) filters.action = q.get("action");
  if ((q.get("key_id") || "").trim()) filters.key_id = q.get("key_id").trim();

  const form = h("form", {
    class: "card filters", id: "audit-filters", role: "search", "aria-label": "Filter the audit trail",
    onsubmit: (ev) => {
      ev.preventDefault();
      const qs = new URLSearchParams();
      if (kind.control.value) qs.set("action", kind.control.value);
      if (key.control.value.trim()) qs.set("key_id", key.control.value.trim());
      const s = qs.toString();
      ctx.navigate(`#/audit${s ? `?${s}` : ""}`);
    },
  },
  h("div", { class: "row filter-row" }, kind.el, key.el),
  h("div", { class: "actions" },
    h("button", { type: "submit" }, "Apply filters"),
    h("a", { class: "button secondary", href: "#/audit" }, "Clear")));

  const body = h("tbody", {});
  const table = h("table", { class: "data", id: "audit-table" },
    h("caption", { class: "visually-hidden" }, "Changes to this org, newest first"),
    h("thead", {}, h("tr", {},
      ["When", "Who", "Action", "Target", "Change", h("span", { class: "visually-hidden" }, "Details")].map(
        (c) => h("th", { scope: "col" }, c)))),
    body);
  const tableWrap = h("div", { class: "table-wrap" });
  const summary = h("p", { id: "audit-summary", class: "summary", "aria-live": "polite" });
  const more = h("button", { type: "button", class: "secondary", id: "audit-more", hidden: true }, "Show more");
  let shown = 0;
  let cursor = null;

  function addRows(items) {
    for (const e of items) {
      const detailsId = `audit-details-${e.id}`;
      const details = h("tr", { class: "audit-details", id: detailsId, hidden: true, "data-details": e.id },
        h("td", { colspan: 6 },
          h("div", { class: "snapshots" }, snapshot("Before", e.before, "before"), snapshot("After", e.after, "after"))));
      const toggle = h("button", {
        type: "button", class: "link-button", "aria-expanded": "false", "aria-controls": detailsId,
        "aria-label": `Before and after of event ${e.id}`,
        onclick: () => {
          const open = details.hidden;
          details.hidden = !open;
          toggle.setAttribute("aria-expanded", String(open));
          toggle.textContent = open ? "Hide" : "Before / after";
        },
      }, "Before / after");
      body.append(
        h("tr", { "data-event": e.id, "data-action": e.action },
          h("td", {}, time(e.at)),
          h("td", { class: "who" },
            e.key_label ? h("div", {}, e.key_label) : null,
            h("code", { class: e.key_label ? "hint" : null }, e.key_id === "cli" ? "aus-server command" : e.key_id)),
          h("td", {}, h("span", { class: "action", title: e.action }, VERBS[e.action] || e.action)),
          h("th", { scope: "row", class: "target" }, targetCell(e)),
          h("td", { class: "change" }, what(e)),
          h("td", { class: "row-actions" }, toggle)),
        details);
      shown += 1;
    }
  }

  async function load() {
    const data = await api("/audit", { query: { ...filters, limit: PAGE, cursor } });
    if (!ctx.current()) return;
    addRows(data.items);
    cursor = data.next;
    more.hidden = !cursor;
    if (!shown) {
      replace(tableWrap, h("p", { class: "empty" }, "No changes recorded match these filters."));
    } else if (!table.isConnected) {
      replace(tableWrap, table);
    }
    summary.textContent = shown ? `${plural(shown, "change", "changes")} shown${cursor ? "; more below" : ""}.` : "";
  }

  more.addEventListener("click", () => {
    more.disabled = true;
    load().catch((err) => ctx.setStatus(err.message, "error")).finally(() => { more.disabled = false; });
  });

  replace(ctx.main,
    h("h1", {}, "Audit"),
    h("p", { class: "lead" },
      "Every change to this org's rules, IP lists, user groups, policy versions and enforcement modes: ",
      "when, the API key that made it, and the object before and after. ",
      "Membership and groups synced from the directory over SCIM are not listed here; the User groups page shows each group's last sync."),
    form, filterError, summary, tableWrap,
    h("div", { class: "actions" }, more));
  try {
    await load();
  } catch (err) {
    if (err.status === 400 && err.fields && err.fields.length) {
      filterError.textContent = err.message;
      filterError.hidden = false;
      const bad = form.querySelector(`[name="${err.fields[0].field}"]`);
      if (bad) bad.setAttribute("aria-invalid", "true");
      replace(tableWrap);
      return;
    }
    throw err;
  }
}
