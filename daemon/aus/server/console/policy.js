// The policy lifecycle: the pending draft as a diff against the version in
// force, its impact preview on recent flows, Provision and Discard; the
// history of provisioned versions, the diff between two, and rollback.

import { api, refreshPolicyVersion } from "./api.js";
import { h, num, plural, replace, time } from "./dom.js";
import { confirmDialog, field, FieldErrors } from "./forms.js";

function codes(items) {
  return h("ul", { class: "inline-list codes" }, items.map((x) => h("li", {}, h("code", {}, x))));
}

function sources(rule) {
  return h("ul", { class: "inline-list" }, rule.sources.map((s) => h("li", {},
    s.current_name === null ? h("span", { class: "badge danger" }, `deleted group (${s.name || s.id})`)
      : s.current_name || s.name || s.id)));
}

function ruleCells(r) {
  return [h("td", {}, sources(r)), h("td", {}, codes(r.destinations)), h("td", {}, codes(r.services))];
}

// A diff as returned by GET draft and GET policy/diff.
export function diffView(d, id) {
  const rows = [];
  for (const r of d.rules.added) {
    rows.push(h("tr", { class: "diff-added", "data-change": "added", "data-rule": r.name },
      h("td", {}, h("span", { class: "badge ok" }, "added")), h("th", { scope: "row" }, r.name), ruleCells(r)));
  }
  for (const c of d.rules.changed) {
    const renamed = c.before.name !== c.after.name ? `${c.before.name} → ${c.after.name}` : c.after.name;
    rows.push(h("tr", { class: "diff-before", "data-change": "changed-before", "data-rule": c.after.name },
      h("td", { rowspan: 2 }, h("span", { class: "badge warn" }, "changed")),
      h("th", { scope: "row", rowspan: 2 }, renamed), ruleCells(c.before)));
    rows.push(h("tr", { class: "diff-after", "data-change": "changed-after", "data-rule": c.after.name },
      ruleCells(c.after)));
  }
  for (const r of d.rules.removed) {
    rows.push(h("tr", { class: "diff-removed", "data-change": "removed", "data-rule": r.name },
      h("td", {}, h("span", { class: "badge danger" }, "removed")), h("th", { scope: "row" }, r.name), ruleCells(r)));
  }
  const lists = [];
  for (const [kind, badge] of [["added", "success"], ["removed", "danger"]]) {
    for (const l of d.ip_lists[kind]) {
      lists.push(h("tr", { "data-change": kind, "data-list": l.name },
        h("td", {}, h("span", { class: `badge ${badge}` }, kind)), h("th", { scope: "row" }, l.name),
        h("td", {}, codes(l.entries))));
    }
  }
  for (const c of d.ip_lists.changed) {
    lists.push(h("tr", { "data-change": "changed", "data-list": c.after.name },
      h("td", {}, h("span", { class: "badge warn" }, "changed")), h("th", { scope: "row" }, c.after.name),
      h("td", {}, h("div", {}, "before: ", codes(c.before.entries)), h("div", {}, "after: ", codes(c.after.entries)))));
  }
  if (!rows.length && !lists.length) return h("p", { class: "empty", id }, "No differences.");
  return h("div", { id },
    rows.length ? h("table", { class: "data diff" },
      h("caption", {}, "Rules"),
      h("thead", {}, h("tr", {}, ["Change", "Rule", "Sources", "Destinations", "Services"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows)) : null,
    lists.length ? h("table", { class: "data diff" },
      h("caption", {}, "IP lists"),
      h("thead", {}, h("tr", {}, ["Change", "IP list", "Entries"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, lists)) : null);
}

function impactSide(title, side, id) {
  const table = (caption, head, items, cells) => items.length ? h("table", { class: "data" },
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, head.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, items.map((x) => h("tr", {}, cells(x))))) : null;
  return h("section", { id, class: "impact" },
    h("h3", {}, `${title}: ${plural(side.flows, "flow", "flows")}`),
    side.flows ? [
      table("By group", ["Group", "Flows"], side.by_group, (g) => [h("td", {}, g.group), h("td", {}, num(g.count))]),
      table("By user", ["User", "Flows"], side.by_user, (u) => [h("td", {}, u.user), h("td", {}, num(u.count))]),
      table("By destination", ["Destination", "Users", "Flows", "Rule before", "Rule after"], side.by_destination,
        (d) => [h("td", {}, h("code", {}, `${d.dst} ${d.proto}${d.port ? "/" + d.port : ""}`)),
                h("td", {}, d.users.join(", ")), h("td", {}, num(d.count)),
                h("td", {}, d.rules_before.join(", ") || "—"), h("td", {}, d.rules_after.join(", ") || "—")]),
    ] : h("p", { class: "empty" }, "None."));
}

function previewView(p) {
  return h("div", { id: "preview-result" },
    h("p", {}, `Flows of the last ${plural(p.days, "day", "days")}: ${num(p.flows)} considered, ${num(p.unchanged)} unchanged.`),
    p.truncated ? h("p", { class: "alert warning", role: "status" },
      `Truncated: only the busiest ${num(p.keys_decided)} distinct flows were decided; ${num(p.skipped)} flows were not.`) : null,
    impactSide("Newly blocked", p.newly_blocked, "newly-blocked"),
    impactSide("Newly allowed", p.newly_allowed, "newly-allowed"));
}

export async function draft(ctx) {
  const d = await api("/draft");
  if (!ctx.current()) return;
  if (!d.pending) {
    replace(ctx.main, h("h1", {}, "Draft"),
      h("p", { class: "empty", id: "draft-empty" },
        "No pending changes: the rules and IP lists are those of the policy in force",
        d.active_version ? ` (version ${num(d.active_version)}).` : "."),
      h("p", {}, h("a", { href: "#/history" }, "Policy history")));
    return;
  }
  const days = field({ name: "days", label: "Days of flows", type: "number", value: "7",
    attrs: { min: 1, max: 90, required: true } });
  const result = h("div", { id: "preview" });
  const previewErrors = new FieldErrors(h("div", { class: "alert error", role: "alert", hidden: true }), [days]);
  const previewButton = h("button", { type: "submit", class: "secondary" }, "Preview impact");
  const previewForm = h("form", { id: "preview-form", class: "card", novalidate: true,
    onsubmit: async (ev) => {
      ev.preventDefault();
      previewErrors.clear();
      previewButton.disabled = true;
      replace(result, h("p", { class: "loading" }, "Deciding recent flows under both policies…"));
      try {
        const p = await api("/draft/preview", { method: "POST", body: { days: Number(days.value()) } });
        if (ctx.current()) replace(result, previewView(p));
      } catch (err) {
        replace(result);
        previewErrors.show(err);
      } finally {
        previewButton.disabled = false;
      }
    } }, h("h2", {}, "Impact on recent flows"),
  h("p", { class: "hint" }, "Which flows workloads reported would change verdict if this draft were provisioned."),
  days.el, h("div", { class: "actions" }, previewButton), result);

  const note = field({ name: "note", label: "Note (what and why)", multiline: true, attrs: { maxlength: 2000 } });
  const summary = h("div", { class: "alert error", role: "alert", hidden: true, id: "provision-errors" });
  const errors = new FieldErrors(summary, [note]);
  const provision = h("button", { type: "submit", id: "provision" }, "Provision");
  const discard = h("button", { type: "button", class: "danger", id: "discard",
    onclick: async () => {
      const ok = await confirmDialog({ title: "Discard the draft?",
        body: "Every pending change to rules and IP lists is lost; they return to the policy in force.",
        confirm: "Discard" });
      if (!ok) return;
      try {
        await api("/draft", { method: "DELETE" });
        await refreshPolicyVersion().catch(() => {});
        ctx.navigate("#/draft", { status: "Discarded the draft." });
      } catch (err) {
        ctx.setStatus(err.message, "error");
      }
    } }, "Discard");
  const provisionForm = h("form", { id: "provision-form", class: "card", novalidate: true,
    onsubmit: async (ev) => {
      ev.preventDefault();
      errors.clear();
      provision.disabled = true;
      try {
        const r = await api("/provision", { method: "POST", body: { note: note.value() } });
        await refreshPolicyVersion().catch(() => {});
        ctx.navigate("#/history", { status: `Provisioned policy version ${num(r.policy_version)}.` });
      } catch (err) {
        const first = errors.show(err);
        (first || summary).focus();
      } finally {
        provision.disabled = false;
      }
    } }, h("h2", {}, "Provision"),
  h("p", { class: "hint" }, "Publishes the draft as a new policy version; workloads apply it on their next fetch."),
  summary, note.el, h("div", { class: "actions" }, provision, discard));

  replace(ctx.main,
    h("h1", {}, "Draft"),
    h("p", { class: "lead" }, `${plural(d.changes, "pending change", "pending changes")} against policy version ${num(d.active_version)}. `,
      "Rule and IP-list edits collect here; workloads keep enforcing the version in force until you provision."),
    diffView(d, "draft-diff"),
    previewForm,
    provisionForm);
}

export async function history(ctx) {
  const data = await api("/policy/versions", { query: { limit: 200 } });
  if (!ctx.current()) return;
  const items = data.items;
  const rollback = async (v) => {
    const ok = await confirmDialog({ title: `Roll back to version ${num(v.version)}?`,
      body: "Its rules and IP lists are published as a new version, and become the draft.", confirm: "Roll back" });
    if (!ok) return;
    try {
      const r = await api(`/policy/versions/${v.version}/rollback`, { method: "POST", body: { note: "" } });
      await refreshPolicyVersion().catch(() => {});
      ctx.navigate("#/history", { status: `Rolled back to version ${num(v.version)} as version ${num(r.policy_version)}.` });
    } catch (err) {
      ctx.setStatus(err.message, "error");
    }
  };
  const table = items.length ? h("table", { class: "data", id: "versions-table" },
    h("caption", { class: "visually-hidden" }, "Policy versions"),
    h("thead", {}, h("tr", {}, ["Version", "Provisioned", "By key", "Note", "Rules", "Actions"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, items.map((v) => h("tr", { "data-version": v.version },
      h("th", { scope: "row" }, num(v.version), v.version === data.active_version ? h("span", { class: "badge ok" }, " in force") : null),
      h("td", {}, time(v.created_at)),
      h("td", {}, v.key_id ? h("code", {}, v.key_id) : h("span", { class: "muted" }, "—")),
      h("td", {}, v.note || h("span", { class: "muted" }, "—"),
        v.rolled_back_from ? h("div", { class: "hint" }, `rollback to version ${num(v.rolled_back_from)}`) : null),
      h("td", {}, num(v.rules)),
      h("td", { class: "row-actions" },
        v.version === data.active_version ? null
          : h("button", { type: "button", class: "link-button", "aria-label": `Roll back to version ${v.version}`,
                          onclick: () => rollback(v) }, "Roll back"))))))
    : h("p", { class: "empty" }, "No version provisioned yet.");

  const options = (sel) => items.map((v) => h("option", { value: v.version, selected: v.version === sel }, `version ${v.version}`));
  const fromSel = h("select", { id: "diff-from", name: "from" }, h("option", { value: 0 }, "empty policy"),
    options(items.length > 1 ? items[1].version : 0));
  const toSel = h("select", { id: "diff-to", name: "to" }, options(items.length ? items[0].version : 0));
  const out = h("div", { id: "version-diff" });
  const diffForm = items.length ? h("form", { id: "diff-form", class: "card",
    onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const d = await api("/policy/diff", { query: { from: fromSel.value, to: toSel.value } });
        if (ctx.current()) replace(out, h("h3", {}, `From ${fromSel.value === "0" ? "the empty policy" : "version " + fromSel.value} to version ${toSel.value}`), diffView(d, "version-diff-result"));
      } catch (err) {
        ctx.setStatus(err.message, "error");
      }
    } }, h("h2", {}, "Compare two versions"),
  h("div", { class: "field" }, h("label", { for: "diff-from" }, "From"), fromSel),
  h("div", { class: "field" }, h("label", { for: "diff-to" }, "To"), toSel),
  h("div", { class: "actions" }, h("button", { type: "submit", class: "secondary" }, "Show diff")), out) : null;

  replace(ctx.main,
    h("h1", {}, "Policy history"),
    h("p", { class: "lead" }, "Every provisioned version, who provisioned it (the API key), when, and why."),
    table, diffForm);
}
