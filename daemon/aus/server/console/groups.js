// User groups: the list (server-side search and paging) with the form for
// manual groups, and one group's detail.

import { api } from "./api.js";
import { debounce, h, num, plural, replace, time } from "./dom.js";
import { confirmDialog, field, FieldErrors } from "./forms.js";

const PAGE = 50;
const MEMBER_PAGE = 50;

function isNested(g) {
  return g.nested && (g.nested.member_groups > 0 || g.nested.member_of.length > 0);
}

function sourceBadge(g) {
  const label = { scim: "Entra ID (SCIM)", manual: "Manual" }[g.source] || g.source;
  return h("span", { class: `badge source-${g.source}` }, label);
}

function uniqueIds(g) {
  const ids = [];
  if (g.external_id) ids.push(h("div", {}, h("span", { class: "id-kind" }, "Entra object ID "), h("code", {}, g.external_id)));
  if (g.sid) ids.push(h("div", {}, h("span", { class: "id-kind" }, "SID "), h("code", {}, g.sid)));
  return ids.length ? ids : h("span", { class: "muted" }, "none");
}

function lastSync(g) {
  const s = g.last_sync || {};
  if (!s.at) {
    return g.source === "manual" ? h("span", { class: "muted" }, "not synced (added by hand)")
                                 : h("span", { class: "muted" }, "never");
  }
  // The outcome is "ok", or the error the directory's request got back
  // (e.g. "409 ..."), kept so an administrator sees why a sync failed.
  const ok = (s.outcome || "").toLowerCase() === "ok";
  return h("div", {},
    time(s.at),
    h("div", { class: ok ? "outcome ok" : "outcome failed" },
      s.operation ? `${s.operation} · ` : "", ok ? "succeeded" : `failed: ${s.outcome || "no reason given"}`));
}

function ruleLinks(rules) {
  if (!rules.length) return h("span", { class: "muted" }, "none");
  return h("ul", { class: "inline-list" },
    rules.map((r) => h("li", {}, h("a", { href: `#/rules/${encodeURIComponent(r.id)}` }, r.name))));
}

function groupRow(g) {
  return h("tr", { "data-group-id": g.id },
    h("th", { scope: "row" },
      h("a", { href: `#/groups/${encodeURIComponent(g.id)}`, class: "group-name" }, g.display_name),
      isNested(g) ? h("span", { class: "badge warn", title: "Nested group: only immediate members count" }, "nested") : null),
    h("td", { class: "ids" }, uniqueIds(g)),
    h("td", {}, sourceBadge(g)),
    h("td", {}, lastSync(g)),
    h("td", { class: "num" }, num(g.member_count)),
    h("td", {}, ruleLinks(g.rules)));
}

// Previous/next paging over `total` items; calls go(offset).
function pager(label, { offset, limit, total }, go) {
  const pages = Math.max(1, Math.ceil(total / limit));
  const page = Math.floor(offset / limit) + 1;
  const button = (text, target, disabled, rel) => h("button", {
    type: "button", class: "secondary", disabled, "data-page": rel,
    onclick: () => go(target),
  }, text);
  return h("nav", { class: "pager", "aria-label": label },
    button("First", 0, offset === 0, "first"),
    button("Previous", Math.max(0, offset - limit), offset === 0, "previous"),
    h("span", { class: "page-of" }, `Page ${num(page)} of ${num(pages)}`),
    button("Next", offset + limit, offset + limit >= total, "next"),
    button("Last", (pages - 1) * limit, offset + limit >= total, "last"));
}

// After paging, keep focus on the pager button used; at either end,
// where that button is now disabled, on its nearest enabled neighbour.
const NEIGHBOUR = { first: "next", previous: "next", next: "previous", last: "previous" };
function refocus(slot, rel) {
  if (!rel) return;
  const b = slot.querySelector(`[data-page=${rel}]`);
  const other = slot.querySelector(`[data-page=${NEIGHBOUR[rel]}]`);
  (b && !b.disabled ? b : other)?.focus();
}

export async function list(ctx) {
  let q = ctx.query.get("q") || "";
  let offset = Math.max(0, Number(ctx.query.get("offset")) || 0);
  let controller = null;

  const searchInput = h("input", {
    id: "group-search", type: "search", name: "q", autocomplete: "off", spellcheck: "false",
    "aria-describedby": "group-search-hint", "aria-controls": "groups-results",
  });
  searchInput.value = q;
  const summary = h("p", { id: "groups-summary", class: "summary", "aria-live": "polite" });
  const results = h("div", { id: "groups-results", class: "table-wrap" });
  const pagerSlot = h("div", {});

  async function load({ focusPager = null } = {}) {
    if (controller) controller.abort();
    controller = new AbortController();
    results.setAttribute("aria-busy", "true");
    let data;
    try {
      data = await api("/groups", { query: { q, offset, limit: PAGE }, signal: controller.signal });
    } catch (err) {
      if (err.name === "AbortError") return;
      results.removeAttribute("aria-busy");
      replace(results, h("p", { class: "alert error", role: "alert" }, err.message));
      return;
    }
    if (!ctx.current()) return;
    if (data.total && offset >= data.total) {   // a shorter result after a search
      offset = Math.floor((data.total - 1) / PAGE) * PAGE;
      return load({ focusPager });
    }
    ctx.remember(`#/groups${hashQuery(q, offset)}`);
    const first = data.total ? offset + 1 : 0;
    const last = offset + data.items.length;
    summary.textContent = data.total
      ? `Showing ${num(first)}–${num(last)} of ${plural(data.total, "user group", "user groups")}${q ? ` matching “${q}”` : ""}`
      : (q ? `No user group matches “${q}”.` : "No user groups yet. Assign groups to the Entra ID provisioning app, or add one below.");
    summary.dataset.total = String(data.total);
    replace(results, data.items.length ? h("table", { id: "groups-table", class: "data" },
      h("caption", { class: "visually-hidden" }, "User groups"),
      h("thead", {}, h("tr", {},
        ["Name", "Unique ID", "Sync source", "Last sync", "Members", "Used by rules"].map(
          (c, i) => h("th", { scope: "col", class: i === 4 ? "num" : null }, c)))),
      h("tbody", {}, data.items.map(groupRow))) : null);
    results.removeAttribute("aria-busy");
    replace(pagerSlot, data.total > PAGE ? pager("Pages of user groups", data, (o) => {
      offset = o;
      load({ focusPager: document.activeElement?.dataset.page });
    }) : null);
    if (focusPager) refocus(pagerSlot, focusPager);
  }

  const searchNow = () => {
    typed.cancel();
    q = searchInput.value.trim();
    offset = 0;
    load();
  };
  const typed = debounce(searchNow, 250);
  searchInput.addEventListener("input", typed);
  ctx.onLeave(() => {
    typed.cancel();
    if (controller) controller.abort();
  });

  replace(ctx.main,
    h("h1", {}, "User groups"),
    h("p", { class: "lead" },
      "Groups pushed by Microsoft Entra ID over SCIM, and groups added by hand with their Active Directory SID. ",
      "Entra ID provisions immediate members only: a group nested in another is shown as such, and its members get nothing through the outer group."),
    h("form", { role: "search", class: "search", onsubmit: (ev) => { ev.preventDefault(); searchNow(); } },
      h("label", { for: "group-search" }, "Search user groups"),
      h("p", { id: "group-search-hint", class: "hint" }, "Part of a name, Entra object ID or SID; results update as you type."),
      h("div", { class: "search-row" }, searchInput, h("button", { type: "submit" }, "Search"))),
    summary, results, pagerSlot,
    manualGroupForm(ctx));
  await load();
}

function hashQuery(q, offset) {
  const p = new URLSearchParams();
  if (q) p.set("q", q);
  if (offset) p.set("offset", String(offset));
  const s = p.toString();
  return s ? `?${s}` : "";
}

function manualGroupForm(ctx) {
  const name = field({ name: "display_name", label: "Name",
    hint: "As workloads see the group (for example its sAMAccountName)." });
  const sid = field({ name: "sid", label: "SID",
    hint: "The group's Active Directory SID, S-1-5-21-…; workloads match it through SSSD." });
  const summary = h("div", { class: "alert error", role: "alert", hidden: true });
  const errors = new FieldErrors(summary, [name, sid]);
  const submit = h("button", { type: "submit" }, "Add group");
  return h("section", { class: "card", "aria-labelledby": "manual-heading" },
    h("h2", { id: "manual-heading" }, "Add a manual group"),
    h("p", { class: "hint" }, "For an Active Directory group that is not provisioned over SCIM."),
    h("form", {
      id: "manual-group-form", novalidate: true,
      onsubmit: async (ev) => {
        ev.preventDefault();
        errors.clear();
        submit.disabled = true;
        try {
          const g = await api("/groups", { method: "POST",
            body: { display_name: name.value(), sid: sid.value().trim() || null } });
          ctx.navigate(`#/groups/${encodeURIComponent(g.id)}`, { status: `Added user group “${g.display_name}”.` });
        } catch (err) {
          (errors.show(err) || name.control).focus();
        } finally {
          submit.disabled = false;
        }
      },
    }, summary, h("div", { class: "row" }, name.el, sid.el), submit));
}

export async function detail(ctx) {
  const id = ctx.params[0];
  let memberOffset = 0;
  const g = await api(`/groups/${encodeURIComponent(id)}`, { query: { limit: MEMBER_PAGE } });
  if (!ctx.current()) return;

  const membersSlot = h("div", { id: "members" });
  function renderMembers(m) {
    replace(membersSlot,
      m.items.length ? h("table", { class: "data", id: "members-table" },
        h("caption", { class: "visually-hidden" }, `Immediate members of ${g.display_name}`),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Name"), h("th", { scope: "col" }, "Type"),
          h("th", { scope: "col" }, "Status"))),
        h("tbody", {}, m.items.map((x) => h("tr", {},
          h("th", { scope: "row" }, x.type === "Group"
            ? h("a", { href: `#/groups/${encodeURIComponent(x.id)}` }, x.name ?? x.id)
            : (x.name ?? x.id)),
          h("td", {}, x.type === "Group" ? h("span", { class: "badge warn" }, "group (nested)") : "user"),
          h("td", {}, x.type === "User" ? (x.active ? "active" : h("span", { class: "muted" }, "disabled")) : "—")))))
        : h("p", { class: "muted" }, "No members."),
      m.total > MEMBER_PAGE ? pager("Pages of members", m, async (o) => {
        const rel = document.activeElement?.dataset.page;
        memberOffset = o;
        const next = await api(`/groups/${encodeURIComponent(id)}`, { query: { offset: memberOffset, limit: MEMBER_PAGE } });
        if (!ctx.current()) return;
        renderMembers(next.members);
        refocus(membersSlot, rel);
      }) : null);
  }
  renderMembers(g.members);

  const nested = g.nested || { member_groups: 0, member_of: [] };
  const warning = g.warning ? h("div", { class: "alert warning", id: "nested-warning", role: "note" },
    h("h2", {}, "Only immediate members count"),
    h("p", {}, g.warning[0].toUpperCase() + g.warning.slice(1) + "."),
    nested.member_of.length ? h("div", {}, "Member of: ",
      h("ul", { class: "inline-list" }, nested.member_of.map((p) => h("li", {},
        h("a", { href: `#/groups/${encodeURIComponent(p.id)}` }, p.display_name))))) : null,
    nested.member_groups ? h("p", {}, `Has ${plural(nested.member_groups, "group", "groups")} among its members.`) : null) : null;

  const rows = [
    ["Sync source", sourceBadge(g)],
    g.external_id ? ["Entra object ID", h("code", {}, g.external_id)] : null,
    g.sid ? ["SID", h("code", {}, g.sid)] : null,
    ["Last sync", lastSync(g)],
    ["Immediate members", num(g.member_count)],
    ["Created", time(g.created_at)],
    ["aus ID", h("code", {}, g.id)],
  ].filter(Boolean);

  const actions = [
    h("a", { class: "button", href: `#/rules/new?source=${encodeURIComponent(g.id)}` }, "New rule for this group"),
  ];
  if (g.source === "manual") {
    actions.push(h("button", {
      type: "button", class: "danger",
      onclick: async () => {
        const ok = await confirmDialog({ title: `Delete user group “${g.display_name}”?`,
          body: g.rules.length ? `Rules using it (${g.rules.map((r) => r.name).join(", ")}) will no longer grant anything through it.`
                               : "No rule uses it." });
        if (!ok) return;
        try {
          await api(`/groups/${encodeURIComponent(g.id)}`, { method: "DELETE" });
          ctx.navigate("#/groups", { status: `Deleted user group “${g.display_name}”.` });
        } catch (err) {
          ctx.setStatus(err.message, "error");
        }
      },
    }, "Delete group"));
  }

  replace(ctx.main,
    h("nav", { class: "breadcrumb", "aria-label": "Breadcrumb" },
      h("a", { href: "#/groups" }, "User groups"), " / ", h("span", { "aria-current": "page" }, g.display_name)),
    h("h1", {}, g.display_name),
    warning,
    h("dl", { class: "facts" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h("div", { class: "actions" }, actions),
    h("section", { "aria-labelledby": "rules-heading" },
      h("h2", { id: "rules-heading" }, "Rules using this group"),
      g.rules.length ? ruleLinks(g.rules) : h("p", { class: "muted" }, "No rule uses this group.")),
    h("section", { "aria-labelledby": "members-heading" },
      h("h2", { id: "members-heading" }, `Immediate members (${num(g.member_count)})`),
      membersSlot));
}
