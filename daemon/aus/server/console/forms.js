// Form building blocks: labelled fields, per-field server errors, lists of
// entries (destinations, services, IP list entries) and the user group
// picker.
//
// The server names each problem by field: "name", "destinations" (the list
// as a whole) or "destinations[1]" (one entry). Every widget below can say
// which control and error slot a field name belongs to, so a message lands
// next to what it is about, in the server's words.

import { api } from "./api.js";
import { debounce, h, num, replace, uid } from "./dom.js";

// A labelled input with a hint and an error slot.
export function field({ name, label, hint, type = "text", value = "", attrs = {}, multiline = false }) {
  const id = uid(`f-${name}`);
  const hintId = hint ? `${id}-hint` : null;
  const errId = `${id}-error`;
  const control = multiline
    ? h("textarea", { id, name, rows: 2, ...attrs })
    : h("input", { id, name, type, autocomplete: "off", spellcheck: "false", ...attrs });
  control.value = value;
  const error = h("p", { id: errId, class: "field-error", hidden: true });
  setDescribedBy(control, hintId, null);
  const wrap = h("div", { class: "field" },
    h("label", { for: id }, label),
    hint ? h("p", { id: hintId, class: "hint" }, hint) : null,
    control, error);
  return {
    el: wrap, control, name,
    value: () => control.value,
    target: (f) => (f === name ? { control, error, label } : null),
  };
}

function setDescribedBy(control, hintId, errId) {
  const ids = [hintId, errId].filter(Boolean).join(" ");
  if (ids) control.setAttribute("aria-describedby", ids);
  else control.removeAttribute("aria-describedby");
}

// Shows server field errors on a form's widgets, and a summary with links.
export class FieldErrors {
  // With `summary` false, problems show next to their fields only.
  constructor(summaryEl, widgets, { summary = true } = {}) {
    this.summary = summaryEl;
    this.widgets = widgets;
    this.withSummary = summary;
    this.shown = [];
  }

  clear() {
    for (const { control, error } of this.shown) {
      error.hidden = true;
      error.textContent = "";
      if (control) {
        control.removeAttribute("aria-invalid");
        const rest = (control.getAttribute("aria-describedby") || "").split(" ").filter((x) => x && x !== error.id);
        if (rest.length) control.setAttribute("aria-describedby", rest.join(" "));
        else control.removeAttribute("aria-describedby");
      }
    }
    this.shown = [];
    this.summary.hidden = true;
    this.summary.replaceChildren();
  }

  find(fieldName) {
    for (const w of this.widgets) {
      const t = w.target(fieldName);
      if (t) return t;
    }
    return null;
  }

  // `err` is an ApiError; returns the first control with a problem.
  show(err) {
    this.clear();
    const items = [];
    let first = null;
    for (const f of err.fields || []) {
      const t = this.find(f.field);
      if (t) {
        // Several problems may name one field: keep them all.
        t.error.textContent = t.error.textContent ? `${t.error.textContent} ${f.message}` : f.message;
        t.error.hidden = false;
        if (t.control) {
          t.control.setAttribute("aria-invalid", "true");
          const ids = (t.control.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
          if (!ids.includes(t.error.id)) ids.push(t.error.id);
          t.control.setAttribute("aria-describedby", ids.join(" "));
        }
        this.shown.push(t);
        first = first || t.control;
      }
      const label = t ? t.label : f.field;
      const link = t && t.control
        ? h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); t.control.focus(); } }, label)
        : h("span", {}, label);
      items.push(h("li", {}, link, ": ", f.message));
    }
    replace(this.summary,
      h("h2", {}, capitalize(err.message)),
      items.length ? h("ul", {}, items) : null);
    // Without a summary, it still shows what no field could take.
    const placedAll = items.length > 0 && items.length === this.shown.length;
    this.summary.hidden = !this.withSummary && placedAll;
    return first;
  }
}

export function capitalize(s) {
  return s ? s[0].toUpperCase() + s.slice(1) : s;
}

// An ordered list of one-line entries with add and remove buttons.
// `noun` names one entry ("destination"); `key` is the API field.
export function entryList({ key, legend, noun, hint, values = [], datalist = null, placeholder = "" }) {
  const listId = uid(`list-${key}`);
  const hintId = `${listId}-hint`;
  const listError = h("p", { id: `${listId}-error`, class: "field-error", hidden: true });
  const ol = h("ol", { class: "entries", id: listId });
  const rows = [];
  let sent = [];

  function renumber() {
    rows.forEach((r, i) => {
      r.label.textContent = `${capitalize(noun)} ${i + 1}`;
      r.remove.setAttribute("aria-label", `Remove ${noun} ${i + 1}`);
    });
  }

  function addRow(value = "", focus = false) {
    const id = uid(`${key}-entry`);
    const input = h("input", {
      id, type: "text", autocomplete: "off", spellcheck: "false", class: "entry-input",
      list: datalist, placeholder, "data-entry": key,
    });
    input.value = value;
    input.setAttribute("aria-describedby", hintId);
    const error = h("p", { id: `${id}-error`, class: "field-error", hidden: true });
    const label = h("label", { for: id, class: "visually-hidden" });
    const row = { input, error, label };
    row.remove = h("button", {
      type: "button", class: "link-button",
      onclick: () => {
        const i = rows.indexOf(row);
        rows.splice(i, 1);
        li.remove();
        if (!rows.length) addRow("", false);
        renumber();
        (rows[Math.min(i, rows.length - 1)].input).focus();
      },
    }, "Remove");
    const li = h("li", {}, h("div", { class: "entry" }, label, input, row.remove), error);
    row.li = li;
    rows.push(row);
    ol.append(li);
    renumber();
    if (focus) input.focus();
    return row;
  }

  for (const v of values) addRow(v);
  if (!rows.length) addRow();

  const legendEl = h("legend", {}, legend);
  const addButton = h("button", { type: "button", class: "secondary", onclick: () => addRow("", true) },
    `Add ${noun}`);
  const el = h("fieldset", { class: "entry-list", "aria-describedby": `${hintId} ${listId}-error` },
    legendEl,
    h("p", { class: "hint", id: hintId }, hint),
    listError, ol, addButton);

  return {
    el, key,
    // Non-empty entries, in order; remembers which row each came from so
    // "destinations[1]" finds its row even when blank rows were skipped.
    values() {
      sent = rows.filter((r) => r.input.value.trim() !== "");
      return sent.map((r) => r.input.value.trim());
    },
    target(f) {
      if (f === key) return { control: rows[0].input, error: listError, label: legend };
      const m = f.match(/^(\w+)\[(\d+)\]$/);
      if (!m || m[1] !== key) return null;
      const row = sent[Number(m[2])];
      if (!row || !row.li.isConnected) return { control: rows[0].input, error: listError, label: legend };
      const i = rows.indexOf(row);
      return { control: row.input, error: row.error, label: `${capitalize(noun)} ${i + 1}` };
    },
  };
}

const SOURCE_NAMES = { scim: "Entra ID", manual: "Manual" };
export function sourceLabel(source) {
  return SOURCE_NAMES[source] || source;
}

// Picks user groups through the groups API: a combobox whose options are
// the first matches of what is typed (server-side search, so it works the
// same with 10 groups or 10,000), and the chosen groups as a list.
export function groupPicker({ key = "sources", legend, chosen = [] }) {
  const picked = chosen.map((g) => ({ ...g }));
  const inputId = uid("picker");
  const listboxId = `${inputId}-listbox`;
  const hintId = `${inputId}-hint`;
  const listError = h("p", { id: `${inputId}-error`, class: "field-error", hidden: true });
  const chosenList = h("ul", { class: "chosen", "aria-label": "Chosen user groups" });
  const input = h("input", {
    id: inputId, type: "text", role: "combobox", autocomplete: "off", spellcheck: "false",
    "aria-autocomplete": "list", "aria-expanded": "false", "aria-controls": listboxId,
    "aria-describedby": hintId, placeholder: "Type part of a group name or ID",
  });
  const listbox = h("ul", { id: listboxId, role: "listbox", class: "listbox", hidden: true,
                            "aria-label": "Matching user groups" });
  const more = h("p", { class: "hint picker-status", "aria-live": "polite" });
  let options = [];
  let active = -1;
  let controller = null;
  const chipRows = [];

  function renderChosen() {
    chipRows.length = 0;
    replace(chosenList, picked.map((g, i) => {
      const error = h("p", { id: uid("chip-error"), class: "field-error", hidden: true });
      const name = g.display_name ?? `deleted group ${g.id}`;
      const remove = h("button", {
        type: "button", class: "link-button", "aria-label": `Remove ${name}`,
        onclick: () => {
          picked.splice(i, 1);
          renderChosen();
          input.focus();
        },
      }, "Remove");
      const li = h("li", { class: g.display_name == null ? "chip missing" : "chip" },
        h("span", { class: "chip-name" }, name),
        g.source ? h("span", { class: "badge" }, sourceLabel(g.source)) : null,
        remove, error);
      chipRows.push({ li, error, remove, name });
      return li;
    }));
    chosenList.hidden = picked.length === 0;
  }

  function close() {
    listbox.hidden = true;
    input.setAttribute("aria-expanded", "false");
    input.removeAttribute("aria-activedescendant");
    active = -1;
  }

  function setActive(i) {
    const items = listbox.querySelectorAll("[role=option]");
    items.forEach((el, j) => el.setAttribute("aria-selected", j === i ? "true" : "false"));
    active = i;
    if (i >= 0 && items[i]) {
      input.setAttribute("aria-activedescendant", items[i].id);
      items[i].scrollIntoView({ block: "nearest" });
    } else {
      input.removeAttribute("aria-activedescendant");
    }
  }

  function pick(g) {
    if (!picked.some((p) => p.id === g.id)) picked.push(g);
    renderChosen();
    input.value = "";
    more.textContent = `Added ${g.display_name}.`;
    close();
    input.focus();
  }

  const search = debounce(async () => {
    const q = input.value.trim();
    if (controller) controller.abort();
    if (!q) {
      close();
      more.textContent = "";
      return;
    }
    controller = new AbortController();
    let data;
    try {
      data = await api("/groups", { query: { q, limit: 8 }, signal: controller.signal });
    } catch (err) {
      if (err.name === "AbortError") return;
      more.textContent = err.message;
      return;
    }
    options = data.items.filter((g) => !picked.some((p) => p.id === g.id));
    replace(listbox, options.map((g, i) => h("li", {
      id: `${listboxId}-${i}`, role: "option", "aria-selected": "false", class: "option",
      onmousedown: (ev) => ev.preventDefault(),   // keep focus in the input
      onclick: () => pick(g),
    }, h("span", { class: "option-name" }, g.display_name),
       h("span", { class: "option-meta" }, `${sourceLabel(g.source)} · ${g.external_id || g.sid || g.id}`))));
    if (!options.length) {
      listbox.append(h("li", { class: "option empty", role: "option", "aria-disabled": "true" },
        `No user group matches “${q}”`));
    }
    listbox.hidden = false;
    input.setAttribute("aria-expanded", "true");
    setActive(options.length ? 0 : -1);
    more.textContent = data.total > data.items.length
      ? `${num(data.total)} groups match; showing the first ${data.items.length}. Keep typing to narrow.`
      : `${num(data.total)} ${data.total === 1 ? "group matches" : "groups match"}.`;
  }, 200);

  input.addEventListener("input", search);
  input.addEventListener("keydown", (ev) => {
    const open = !listbox.hidden;
    if (ev.key === "ArrowDown") {
      ev.preventDefault();
      if (!open) search();
      else if (options.length) setActive((active + 1) % options.length);
    } else if (ev.key === "ArrowUp" && open && options.length) {
      ev.preventDefault();
      setActive((active - 1 + options.length) % options.length);
    } else if (ev.key === "Enter" && (open || input.value.trim())) {
      // Enter picks; it submits the form only when nothing is being typed.
      ev.preventDefault();
      if (open && active >= 0) pick(options[active]);
      else search();
    } else if (ev.key === "Escape" && open) {
      ev.preventDefault();
      close();
    }
  });
  input.addEventListener("blur", () => setTimeout(close, 150));

  renderChosen();
  const el = h("fieldset", { class: "picker" },
    h("legend", {}, legend),
    h("p", { class: "hint", id: hintId },
      "Search the user groups by name, Entra object ID or SID; pick with the arrow keys and Enter, or click."),
    listError,
    chosenList,
    h("div", { class: "combo" },
      h("label", { for: inputId }, "Add a user group"),
      input, listbox),
    more);

  return {
    el, key, input,
    values: () => picked.map((g) => g.id),
    target(f) {
      if (f === key) return { control: input, error: listError, label: legend };
      const m = f.match(/^(\w+)\[(\d+)\]$/);
      if (!m || m[1] !== key) return null;
      const row = chipRows[Number(m[2])];
      if (!row) return { control: input, error: listError, label: legend };
      return { control: row.remove, error: row.error, label: row.name };
    },
  };
}

// A modal confirmation (<dialog>: focus stays inside, Escape cancels).
// Resolves true when confirmed.
export function confirmDialog({ title, body, confirm = "Delete" }) {
  return new Promise((resolve) => {
    const titleId = uid("dialog-title");
    const ok = h("button", { type: "submit", value: "ok", class: "danger" }, confirm);
    const cancel = h("button", { type: "submit", value: "cancel", class: "secondary", formnovalidate: true }, "Cancel");
    const dialog = h("dialog", { class: "confirm", "aria-labelledby": titleId },
      h("form", { method: "dialog" },
        h("h2", { id: titleId }, title),
        h("p", {}, body),
        h("div", { class: "actions" }, ok, cancel)));
    const opener = document.activeElement;
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok");
      dialog.remove();
      if (opener && opener.isConnected) opener.focus();
    });
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

// Filter bars (Traffic, Audit): a labelled select or text input whose id is
// the page's prefix and the query parameter it sets; { el, control }.
export function filterSelect(prefix, name, label, choices, value) {
  const id = `${prefix}-${name}`;
  const control = h("select", { id, name },
    choices.map(([v, text]) => h("option", { value: v, selected: v === value }, text)));
  return { el: h("div", { class: "field" }, h("label", { for: id }, label), control), control };
}

export function filterInput(prefix, name, label, placeholder, value) {
  const id = `${prefix}-${name}`;
  const control = h("input", { id, name, type: "text", autocomplete: "off", spellcheck: "false",
                               placeholder });
  control.value = value || "";
  return { el: h("div", { class: "field" }, h("label", { for: id }, label), control), control };
}
