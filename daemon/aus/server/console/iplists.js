// IP lists: named sets of addresses, CIDRs and DNS names that rules use
// as destinations.

import { api } from "./api.js";
import { h, num, replace } from "./dom.js";
import { confirmDialog, entryList, field, FieldErrors } from "./forms.js";

async function remove(ctx, l) {
  const ok = await confirmDialog({ title: `Delete IP list “${l.name}”?`, body: "Rules that name it must be changed first." });
  if (!ok) return;
  try {
    await api(`/ip-lists/${encodeURIComponent(l.id)}`, { method: "DELETE" });
    ctx.navigate("#/ip-lists", { status: `Deleted IP list “${l.name}” in the draft.` });
  } catch (err) {
    ctx.setStatus(err.message, "error");
  }
}

export async function list(ctx) {
  const [data, rules] = await Promise.all([api("/ip-lists"), api("/rules")]);
  if (!ctx.current()) return;
  const usedBy = (name) => rules.items.filter((r) => r.destinations.includes(name)).map((r) => r.name);
  replace(ctx.main,
    h("h1", {}, "IP lists"),
    h("p", { class: "lead" }, "Named sets of addresses, CIDRs and DNS names. A rule names a list among its destinations; changing the list changes every rule that uses it."),
    h("div", { class: "actions" }, h("a", { class: "button", href: "#/ip-lists/new" }, "New IP list")),
    data.items.length ? h("table", { class: "data", id: "ip-lists-table" },
      h("caption", { class: "visually-hidden" }, "IP lists"),
      h("thead", {}, h("tr", {}, ["Name", "Entries", "Used by rules", "Actions"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, data.items.map((l) => {
        const users = usedBy(l.name);
        return h("tr", { "data-ip-list": l.name },
          h("th", { scope: "row" }, h("a", { href: `#/ip-lists/${encodeURIComponent(l.id)}` }, l.name)),
          h("td", {}, h("ul", { class: "inline-list codes" }, l.entries.map((e) => h("li", {}, h("code", {}, e))))),
          h("td", {}, users.length ? users.join(", ") : h("span", { class: "muted" }, "none")),
          h("td", { class: "row-actions" },
            h("a", { href: `#/ip-lists/${encodeURIComponent(l.id)}`, "aria-label": `Edit ${l.name}` }, "Edit"),
            h("button", { type: "button", class: "link-button danger", "aria-label": `Delete ${l.name}`,
                          onclick: () => remove(ctx, l) }, "Delete")));
      })))
      : h("p", { class: "empty" }, "No IP lists yet."));
}

export async function edit(ctx) {
  const id = ctx.params[0] || null;
  let current = null;
  if (id) {
    const all = await api("/ip-lists");
    current = all.items.find((l) => l.id === id);
    if (!current) throw new Error(`no IP list with id ${id} in this org`);
  }
  if (!ctx.current()) return;
  const name = field({ name: "name", label: "Name", value: current ? current.name : "",
    hint: "Letters, digits and _ . : @ - ; rules name the list by it." });
  const entries = entryList({ key: "entries", legend: "Entries", noun: "entry",
    hint: "Addresses and CIDRs, IPv4 or IPv6: 192.0.2.10, 10.20.0.0/16, 2001:db8::/48; DNS names: dns:github.com, dns:*.githubusercontent.com (every name under it).",
    values: current ? current.entries : [], placeholder: "10.20.0.0/16" });
  const summary = h("div", { class: "alert error", role: "alert", hidden: true });
  const errors = new FieldErrors(summary, [name, entries]);
  const save = h("button", { type: "submit" }, current ? "Save IP list" : "Create IP list");
  replace(ctx.main,
    h("nav", { class: "breadcrumb", "aria-label": "Breadcrumb" },
      h("a", { href: "#/ip-lists" }, "IP lists"), " / ", h("span", { "aria-current": "page" }, current ? current.name : "New IP list")),
    h("h1", {}, current ? `Edit IP list “${current.name}”` : "New IP list"),
    h("form", {
      id: "ip-list-form", class: "card", novalidate: true,
      onsubmit: async (ev) => {
        ev.preventDefault();
        errors.clear();
        save.disabled = true;
        try {
          const saved = await api(id ? `/ip-lists/${encodeURIComponent(id)}` : "/ip-lists", {
            method: id ? "PUT" : "POST", body: { name: name.value().trim(), entries: entries.values() } });
          ctx.navigate("#/ip-lists", { status: `Saved IP list “${saved.name}” to the draft; provision it to apply (version ${num(saved.policy_version)} stays in force).` });
        } catch (err) {
          (errors.show(err) || summary).focus();
        } finally {
          save.disabled = false;
        }
      },
    }, summary, name.el, entries.el,
    h("div", { class: "actions" }, save, h("a", { class: "button secondary", href: "#/ip-lists" }, "Cancel"),
      current ? h("button", { type: "button", class: "danger", onclick: () => remove(ctx, current) }, "Delete IP list") : null)));
}
