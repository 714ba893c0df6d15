// Rules: the list, and the editor for one rule (sources from the user
// groups, destinations as CIDRs, addresses, DNS names or IP list names,
// services).

import { api } from "./api.js";
import { h, num, replace, time, uid } from "./dom.js";
import { confirmDialog, entryList, field, FieldErrors, groupPicker } from "./forms.js";

const SERVICE_HINT = "443/tcp, a range such as 8000-8100/tcp, 53/udp, or a whole protocol: tcp, udp, icmp, any.";
const DEST_HINT = "A CIDR (10.20.0.0/16, 2001:db8::/48), a single address, a DNS name (dns:github.com, or dns:*.github.com for every name under it), or the name of an IP list.";

function codeList(items) {
  return h("ul", { class: "inline-list codes" }, items.map((x) => h("li", {}, h("code", {}, x))));
}

function sourceLinks(rule) {
  return h("ul", { class: "inline-list" }, rule.sources.map((s) => h("li", {},
    s.display_name == null
      ? h("span", { class: "badge danger", title: `user group ${s.id} no longer exists` }, "deleted group")
      : h("a", { href: `#/groups/${encodeURIComponent(s.id)}` }, s.display_name))));
}

async function deleteRule(ctx, rule) {
  const ok = await confirmDialog({
    title: `Delete rule “${rule.name}”?`,
    body: "The deletion goes into the draft: its users lose this access once the draft is provisioned.",
  });
  if (!ok) return false;
  try {
    const r = await api(`/rules/${encodeURIComponent(rule.id)}`, { method: "DELETE" });
    ctx.navigate("#/rules", { status: `Deleted rule “${rule.name}” in the draft; provision it to apply (version ${num(r.policy_version)} stays in force).` });
    return true;
  } catch (err) {
    ctx.setStatus(err.message, "error");
    return false;
  }
}

export async function list(ctx) {
  const data = await api("/rules");
  if (!ctx.current()) return;
  const table = data.items.length ? h("table", { class: "data", id: "rules-table" },
    h("caption", { class: "visually-hidden" }, "Rules"),
    h("thead", {}, h("tr", {}, ["Name", "Sources", "Destinations", "Services", "Modified", "Actions"].map(
      (c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, data.items.map((r) => h("tr", { "data-rule-id": r.id, "data-rule-name": r.name },
      h("th", { scope: "row" },
        h("a", { href: `#/rules/${encodeURIComponent(r.id)}` }, r.name),
        r.description ? h("div", { class: "hint" }, r.description) : null),
      h("td", {}, sourceLinks(r)),
      h("td", {}, codeList(r.destinations)),
      h("td", {}, codeList(r.services)),
      h("td", {}, time(r.modified_at)),
      h("td", { class: "row-actions" },
        h("a", { href: `#/rules/${encodeURIComponent(r.id)}`, "aria-label": `Edit ${r.name}` }, "Edit"),
        h("button", { type: "button", class: "link-button danger", "aria-label": `Delete ${r.name}`,
                      onclick: () => deleteRule(ctx, r) }, "Delete"))))))
    : h("p", { class: "empty" }, "No rules yet: users of every managed group are denied everything outside the baseline.");
  replace(ctx.main,
    h("h1", {}, "Rules"),
    h("p", { class: "lead" },
      "Each rule lets the members of its source user groups connect to its destinations on its services. ",
      "Rules only add access; everything no rule allows is denied."),
    h("div", { class: "actions" }, h("a", { class: "button", href: "#/rules/new" }, "New rule")),
    table);
}

// User groups by display name (as flows name them), exactly, ignoring case.
async function groupsNamed(names) {
  const found = [];
  const missing = [];
  for (const name of [...new Set(names)]) {
    const page = await api("/groups", { query: { q: name, limit: 50 } });
    const g = page.items.find((x) => x.display_name.toLowerCase() === name.toLowerCase());
    if (g) found.push({ id: g.id, display_name: g.display_name, source: g.source });
    else missing.push(name);
  }
  return { found, missing };
}

export async function edit(ctx) {
  const id = ctx.params[0] || null;
  const [rule, lists, preset, named] = await Promise.all([
    id ? api(`/rules/${encodeURIComponent(id)}`) : null,
    api("/ip-lists"),
    !id && ctx.query.get("source") ? api(`/groups/${encodeURIComponent(ctx.query.get("source"))}`, { query: { limit: 1 } }) : null,
    id ? { found: [], missing: [] } : groupsNamed(ctx.query.getAll("group")),
  ]);
  if (!ctx.current()) return;

  const chosen = rule
    ? rule.sources.map((s) => ({ id: s.id, display_name: s.display_name }))
    : [...(preset ? [{ id: preset.id, display_name: preset.display_name, source: preset.source }] : []),
       ...named.found];
  // Prefilled from the Traffic page: ?group=NAME&dest=CIDR&service=443/tcp
  const presetDest = id ? [] : ctx.query.getAll("dest");
  const presetSvc = id ? [] : ctx.query.getAll("service");
  const datalistId = uid("ip-list-names");
  const name = field({ name: "name", label: "Name", value: rule ? rule.name : "",
    hint: "Letters, digits and _ . : @ - ; at most 63 characters. Workloads report flows by this name." });
  const description = field({ name: "description", label: "Description (optional)",
    value: rule ? rule.description : "", multiline: true });
  const sources = groupPicker({ legend: "Sources: user groups", chosen });
  const destinations = entryList({ key: "destinations", legend: "Destinations", noun: "destination",
    hint: DEST_HINT, values: rule ? rule.destinations : presetDest, datalist: datalistId, placeholder: "10.20.0.0/16" });
  const services = entryList({ key: "services", legend: "Services", noun: "service",
    hint: SERVICE_HINT, values: rule ? rule.services : presetSvc, placeholder: "443/tcp" });
  const summary = h("div", { class: "alert error", role: "alert", hidden: true, id: "rule-errors" });
  const errors = new FieldErrors(summary, [name, description, sources, destinations, services]);
  const save = h("button", { type: "submit" }, rule ? "Save rule" : "Create rule");

  const form = h("form", {
    id: "rule-form", class: "card", novalidate: true,
    onsubmit: async (ev) => {
      ev.preventDefault();
      errors.clear();
      save.disabled = true;
      const body = {
        name: name.value().trim(), description: description.value(),
        sources: sources.values(), destinations: destinations.values(), services: services.values(),
      };
      try {
        const saved = await api(id ? `/rules/${encodeURIComponent(id)}` : "/rules",
                                { method: id ? "PUT" : "POST", body });
        ctx.navigate("#/rules", {
          status: `Saved rule “${saved.name}” to the draft; provision it to apply (version ${num(saved.policy_version)} stays in force).` });
      } catch (err) {
        const first = errors.show(err);
        (first || summary).focus();
      } finally {
        save.disabled = false;
      }
    },
  },
  summary,
  name.el, description.el, sources.el, destinations.el, services.el,
  h("datalist", { id: datalistId }, lists.items.map((l) => h("option", { value: l.name }, `IP list: ${l.entries.length} entries`))),
  h("div", { class: "actions" },
    save,
    h("a", { class: "button secondary", href: "#/rules" }, "Cancel"),
    rule ? h("button", { type: "button", class: "danger", onclick: () => deleteRule(ctx, rule) }, "Delete rule") : null));

  replace(ctx.main,
    h("nav", { class: "breadcrumb", "aria-label": "Breadcrumb" },
      h("a", { href: "#/rules" }, "Rules"), " / ", h("span", { "aria-current": "page" }, rule ? rule.name : "New rule")),
    h("h1", {}, rule ? `Edit rule “${rule.name}”` : "New rule"),
    named.missing.length ? h("p", { class: "alert warning", id: "rule-missing-groups" },
      `No user group in this org is named ${named.missing.map((n) => `“${n}”`).join(", ")}; pick those sources by hand.`) : null,
    rule && rule.missing_sources.length ? h("p", { class: "alert warning" },
      "Some source groups of this rule no longer exist (deleted in the directory). Remove them, or pick others.") : null,
    form);
}
