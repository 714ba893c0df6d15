// Workloads: the daemons that fetched the policy bundle, the version each
// enforces, when each last checked in, and the enforcement mode: the org's
// default, each workload's own, what the workload says it applies, and its
// denials of the last hour; and the flow records a workload reported it
// dropped (its traffic is incomplete). Switching to enforce asks first.

import { api } from "./api.js";
import { age, h, num, plural, replace, time } from "./dom.js";
import { confirmDialog } from "./forms.js";

const REFRESH_MS = 10000;
const MODE_TEXT = { enforce: "Enforce", visibility: "Visibility" };
const SOURCE_TEXT = { workload: "set for this workload", org: "org default" };

function modeBadge(mode) {
  if (!mode) return h("span", { class: "muted" }, "not set (ausd.yaml)");
  return h("span", { class: `badge ${mode === "enforce" ? "danger" : "ok"}`, "data-mode": mode }, MODE_TEXT[mode]);
}

// Enforce cuts off whatever no rule allows: say so, and how much, first.
async function confirmEnforce(what, wouldDeny) {
  return confirmDialog({
    title: `Switch ${what} to enforce?`,
    body: "Traffic no rule allows will be blocked instead of only reported" +
      (wouldDeny === undefined ? "." : `; in the last hour ${plural(wouldDeny, "connection was", "connections were")} reported as would be blocked.`),
    confirm: "Switch to enforce",
  });
}

export async function view(ctx) {
  const summary = h("p", { id: "workloads-summary", class: "summary", "aria-live": "polite" });
  const orgMode = h("div", { id: "org-mode" });
  const table = h("div", { class: "table-wrap" });
  const refreshed = h("p", { class: "hint" });
  const fail = (err) => ctx.setStatus(err.message, "error");

  async function setMode(path, mode, label, wouldDeny) {
    if (mode === "enforce" && !(await confirmEnforce(label, wouldDeny))) return false;
    await api(path, { method: "PUT", body: { mode } });
    ctx.setStatus(mode === null ? `${label} follows the org default again.`
      : `${label}: ${MODE_TEXT[mode].toLowerCase()}.`, "success");
    await load();
    return true;
  }

  function modeControl(w, orgDefault) {
    const select = h("select", { "aria-label": `Mode of ${w.name}`, name: "mode", "data-workload": w.name },
      h("option", { value: "" }, `Org default${orgDefault ? ` (${MODE_TEXT[orgDefault].toLowerCase()})` : ""}`),
      h("option", { value: "visibility" }, "Visibility"),
      h("option", { value: "enforce" }, "Enforce"));
    select.value = w.mode_source === "workload" ? w.mode : "";
    select.addEventListener("change", async () => {
      const mode = select.value || null;
      try {
        if (!(await setMode(`/workloads/${encodeURIComponent(w.name)}/mode`, mode, w.name, w.would_deny_last_hour))) {
          select.value = w.mode_source === "workload" ? w.mode : "";
        }
      } catch (err) {
        fail(err);
      }
    });
    return select;
  }

  // What the workload says it applies; a difference is explained: not yet
  // taken (it is behind) or its own ausd.yaml sets the mode (it is current).
  function appliedCell(w) {
    if (!w.last_seen) return h("span", { class: "muted" }, "not seen yet");
    if (!w.applied_mode) return h("span", { class: "muted" }, "not reported");
    const differs = w.mode && w.applied_mode !== w.mode;
    return h("span", {}, modeBadge(w.applied_mode),
      !differs ? null : w.current
        ? h("span", { class: "badge warn", title: "the mode set in the workload's ausd.yaml wins over the server's" }, "ausd.yaml")
        : h("span", { class: "badge", title: "the workload has not taken the newest policy version yet" }, "changing"));
  }

  // Records the workload lost before they reached the server (window cap,
  // full spool, refused batches): its traffic here is incomplete.
  function droppedCell(w) {
    if (!w.flows_dropped) return h("span", { class: "muted" }, "none");
    return h("span", {},
      h("span", { class: "badge warn", title: "flow records this workload could not report: its traffic is incomplete" },
        num(w.flows_dropped)),
      " ", w.flows_dropped_at
        ? h("time", { datetime: w.flows_dropped_at, title: `last reported ${w.flows_dropped_at}` }, `last ${age(w.flows_dropped_at)}`)
        : null);
  }

  function renderOrgMode(mode) {
    const select = h("select", { id: "org-mode-select", name: "org-mode" },
      h("option", { value: "visibility" }, "Visibility"),
      h("option", { value: "enforce" }, "Enforce"));
    select.value = mode || "visibility";
    const save = h("button", { type: "submit" }, "Set default");
    const form = h("form", { class: "inline-form", "aria-label": "Org default mode" },
      h("label", { for: "org-mode-select" }, "Org default mode "), select, save,
      h("p", { class: "hint" }, mode
        ? "Every workload without a mode of its own applies this one, unless its ausd.yaml sets one."
        : "No default is set: workloads without a mode of their own keep the mode of their ausd.yaml (enforce if it sets none)."));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        await setMode("/mode", select.value, "The org default");
      } catch (err) {
        fail(err);
      }
    });
    replace(orgMode, form);
  }

  async function load() {
    const data = await api("/workloads");
    if (!ctx.current()) return;
    const seen = data.items.filter((w) => w.last_seen);
    const current = seen.filter((w) => w.current).length;
    summary.textContent = seen.length
      ? `Policy version ${num(data.policy_version)} is enforced by ${num(current)} of ${plural(seen.length, "workload", "workloads")}.`
      : "No workload has fetched the policy yet. Point ausd at this server (policy: https://…/api/orgs/<org>/bundle).";
    summary.className = `summary ${seen.length && current === seen.length ? "ok" : ""}`;
    renderOrgMode(data.default_mode);
    replace(table, data.items.length ? h("table", { class: "data", id: "workloads-table" },
      h("caption", { class: "visually-hidden" }, "Workloads"),
      h("thead", {}, h("tr", {}, ["Name", "Address", "Mode", "Applies", "Denied, 1 h", "Would deny, 1 h",
        "Records dropped", "Policy version", "Last seen", "Set mode"].map((c, i) =>
        h("th", { scope: "col", class: [4, 5].includes(i) ? "num" : null }, c)))),
      h("tbody", {}, data.items.map((w) => h("tr", { "data-workload": w.name },
        h("th", { scope: "row" }, w.name),
        h("td", {}, w.address ? h("code", {}, w.address) : h("span", { class: "muted" }, "unknown")),
        h("td", { class: "mode" }, modeBadge(w.mode),
          w.mode_source ? h("span", { class: "muted", "data-source": w.mode_source }, ` ${SOURCE_TEXT[w.mode_source]}`) : null),
        h("td", { class: "applied" }, appliedCell(w)),
        h("td", { class: "num denied" }, num(w.denied_last_hour)),
        h("td", { class: "num would-deny" }, num(w.would_deny_last_hour)),
        h("td", { class: "dropped" }, droppedCell(w)),
        h("td", {}, !w.last_seen ? h("span", { class: "muted" }, "–") : [num(w.enforcing_version), " ", w.current
          ? h("span", { class: "badge ok" }, "current")
          : h("span", { class: "badge warn" }, w.enforcing_version < data.policy_version
            ? `behind by ${plural(data.policy_version - w.enforcing_version, "version", "versions")}` : "not current")]),
        h("td", {}, w.last_seen ? time(w.last_seen, { withAge: true }) : "–"),
        h("td", {}, modeControl(w, data.default_mode))))))
      : null);
    refreshed.textContent = `Updated at ${new Date().toLocaleTimeString()}; refreshes every ${REFRESH_MS / 1000} s.`;
  }

  // A workload not seen yet may get its mode before its first check-in.
  const newName = h("input", { id: "new-workload-name", name: "workload", autocomplete: "off", placeholder: "host name (as ausd sends it)" });
  const newMode = h("select", { id: "new-workload-mode", name: "new-mode" },
    h("option", { value: "visibility" }, "Visibility"), h("option", { value: "enforce" }, "Enforce"));
  const ahead = h("form", { class: "inline-form", "aria-label": "Set the mode of a workload not seen yet" },
    h("label", { for: "new-workload-name" }, "Workload "), newName,
    h("label", { for: "new-workload-mode" }, " mode "), newMode,
    h("button", { type: "submit", class: "secondary" }, "Set"));
  ahead.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const name = newName.value.trim();
    if (!name) return fail(new Error("enter the workload's name"));
    try {
      if (await setMode(`/workloads/${encodeURIComponent(name)}/mode`, newMode.value, name)) newName.value = "";
    } catch (err) {
      fail(err);
    }
  });

  const timer = setInterval(() => load().catch(fail), REFRESH_MS);
  ctx.onLeave(() => clearInterval(timer));
  replace(ctx.main,
    h("h1", {}, "Workloads"),
    h("p", { class: "lead" }, "The ausd daemons that fetched this org's policy. A workload is current when it enforces the newest policy version; daemons long-poll, so a change reaches them within seconds. In visibility mode nothing is blocked: what would be is counted and reported."),
    h("div", { class: "actions" }, h("button", { type: "button", class: "secondary", onclick: () => load().catch(fail) }, "Refresh")),
    summary, orgMode, table, ahead, refreshed);
  await load();
}
