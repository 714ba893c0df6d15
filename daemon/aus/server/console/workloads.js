// Workloads: the daemons that fetched the policy bundle, the version each
// enforces and when each last checked in.

import { api } from "./api.js";
import { h, num, plural, replace, time } from "./dom.js";

const REFRESH_MS = 10000;

export async function view(ctx) {
  const summary = h("p", { id: "workloads-summary", class: "summary", "aria-live": "polite" });
  const table = h("div", { class: "table-wrap" });
  const refreshed = h("p", { class: "hint" });

  async function load() {
    const data = await api("/workloads");
    if (!ctx.current()) return;
    const current = data.items.filter((w) => w.current).length;
    summary.textContent = data.items.length
      ? `Policy version ${num(data.policy_version)} is enforced by ${num(current)} of ${plural(data.items.length, "workload", "workloads")}.`
      : "No workload has fetched the policy yet. Point ausd at this server (policy: https://…/api/orgs/<org>/bundle).";
    summary.className = `summary ${data.items.length && current === data.items.length ? "ok" : ""}`;
    replace(table, data.items.length ? h("table", { class: "data", id: "workloads-table" },
      h("caption", { class: "visually-hidden" }, "Workloads"),
      h("thead", {}, h("tr", {}, ["Name", "Address", "Enforcing version", "Status", "Last seen"].map((c, i) =>
        h("th", { scope: "col", class: i === 2 ? "num" : null }, c)))),
      h("tbody", {}, data.items.map((w) => h("tr", { "data-workload": w.name },
        h("th", { scope: "row" }, w.name),
        h("td", {}, w.address ? h("code", {}, w.address) : h("span", { class: "muted" }, "unknown")),
        h("td", { class: "num" }, num(w.enforcing_version)),
        h("td", {}, w.current
          ? h("span", { class: "badge ok" }, "current")
          : h("span", { class: "badge warn" }, w.enforcing_version < data.policy_version
            ? `behind by ${plural(data.policy_version - w.enforcing_version, "version", "versions")}` : "not current")),
        h("td", {}, time(w.last_seen, { withAge: true }))))))
      : null);
    refreshed.textContent = `Updated at ${new Date().toLocaleTimeString()}; refreshes every ${REFRESH_MS / 1000} s.`;
  }

  const timer = setInterval(() => load().catch((err) => ctx.setStatus(err.message, "error")), REFRESH_MS);
  ctx.onLeave(() => clearInterval(timer));
  replace(ctx.main,
    h("h1", {}, "Workloads"),
    h("p", { class: "lead" }, "The ausd daemons that fetched this org's policy. A workload is current when it enforces the newest policy version; daemons long-poll, so a change reaches them within seconds."),
    h("div", { class: "actions" }, h("button", { type: "button", class: "secondary", onclick: () => load().catch((err) => ctx.setStatus(err.message, "error")) }, "Refresh")),
    summary, table, refreshed);
  await load();
}
