// livetrain status page: refreshes the server-rendered page from GET /dashboard and posts rollbacks.
// Every value from the server goes in with textContent / attributes, never as HTML.
(function () {
  "use strict";
  const SVG = "http://www.w3.org/2000/svg";
  const root = document.getElementById("dashboard");
  if (!root) return;
  const refreshLabel = document.getElementById("refresh");
  let timer = null;
  let busy = root.dataset.busy === "1";

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // The same drawing as backend/api/plots.py svg(), from the same layout dict.
  function drawChart(spec) {
    const f = spec.frame;
    const svg = svgEl("svg", {class: "chart", viewBox: `0 0 ${spec.width} ${spec.height}`, role: "img",
                              "aria-label": spec.title});
    svg.appendChild(svgEl("rect", {class: "plot-bg", x: f.left, y: f.top, width: f.right - f.left, height: f.bottom - f.top}));
    for (const t of spec.y_ticks) {
      svg.appendChild(svgEl("line", {class: "grid", x1: f.left, x2: f.right, y1: t.pos, y2: t.pos}));
      svg.appendChild(svgEl("text", {class: "tick", x: f.left - 6, y: t.pos, "text-anchor": "end", dy: "0.32em"}, t.label));
    }
    for (const t of spec.x_ticks) {
      svg.appendChild(svgEl("line", {class: "tickmark", x1: t.pos, x2: t.pos, y1: f.bottom, y2: f.bottom + 4}));
      svg.appendChild(svgEl("text", {class: "tick", x: t.pos, y: f.bottom + 16, "text-anchor": "middle"}, t.label));
    }
    svg.appendChild(svgEl("line", {class: "axis", x1: f.left, x2: f.right, y1: f.bottom, y2: f.bottom}));
    svg.appendChild(svgEl("line", {class: "axis", x1: f.left, x2: f.left, y1: f.top, y2: f.bottom}));
    svg.appendChild(svgEl("text", {class: "axis-label", x: (f.left + f.right) / 2, y: spec.height - 6, "text-anchor": "middle"}, spec.x_label));
    const cy = (f.top + f.bottom) / 2;
    svg.appendChild(svgEl("text", {class: "axis-label", x: 12, y: cy, "text-anchor": "middle", transform: `rotate(-90 12 ${cy})`}, spec.y_label));
    for (const s of spec.series) {
      const g = svgEl("g", {class: `series ${s.cls}`, "data-name": s.name, "data-n": s.n});
      if ((s.kind === "line" || s.kind === "both") && s.points.length) {
        const d = s.points.map((p, i) => `${i ? "L" : "M"}${p[0]} ${p[1]}`).join(" ");
        g.appendChild(svgEl("path", {class: "line", d: d}));
      }
      if (s.kind === "points" || s.kind === "both") {
        for (const p of s.points) g.appendChild(svgEl("circle", {class: "pt", cx: p[0], cy: p[1], r: 3}));
      }
      svg.appendChild(g);
    }
    if (spec.empty) svg.appendChild(svgEl("text", {class: "empty", x: (f.left + f.right) / 2, y: cy, "text-anchor": "middle"}, "no data yet"));
    return svg;
  }

  function renderFacts(dl, facts) {
    dl.replaceChildren(...facts.map((f) => {
      const div = el("div", {class: "fact"});
      div.append(el("dt", {}, f.label), el("dd", {"data-key": f.key}, f.value));
      return div;
    }));
  }

  function setNote(node, text) {
    node.textContent = text || "";
    node.hidden = !text;
  }

  function renderChart(card, key, spec) {
    const fig = card.querySelector(`figure[data-chart="${key}"]`);
    if (!fig) return;
    fig.hidden = !spec;
    if (!spec) return;
    fig.querySelector(".chart-title").textContent = spec.title;
    fig.querySelector(".legend").replaceChildren(...spec.series.map((s) => {
      const key = el("span", {class: `key ${s.cls} kind-${s.kind}`});
      key.append(el("i"), document.createTextNode(s.name));
      return key;
    }));
    const old = fig.querySelector("svg");
    const fresh = drawChart(spec);
    if (old) old.replaceWith(fresh); else fig.appendChild(fresh);
  }

  function renderVersions(tbody, versions, columns) {
    if (!versions.length) {
      const tr = el("tr", {class: "none"});
      tr.appendChild(el("td", {colspan: columns + 1}, "No version yet."));
      tbody.replaceChildren(tr);
      return;
    }
    tbody.replaceChildren(...versions.map((v) => {
      const tr = el("tr", {"data-version": v.name});
      if (v.active) tr.className = "active";
      for (const c of v.cells) tr.appendChild(el("td", {class: `c-${c.key}`}, c.text));
      const td = el("td", {class: "js-only"});
      const button = el("button", {type: "button", class: "rollback", "data-version": v.name}, "Roll back");
      button.disabled = v.active;
      td.appendChild(button);
      tr.appendChild(td);
      return tr;
    }));
  }

  function renderProject(card, p, columns) {
    card.querySelector('[data-role="title"]').textContent = p.title;
    const badge = card.querySelector('[data-role="state"]');
    badge.textContent = p.state;
    badge.className = `badge state-${p.state}`;
    setNote(card.querySelector('[data-role="waiting"]'), p.waiting);
    setNote(card.querySelector('[data-role="last-error"]'), p.last_error);
    renderFacts(card.querySelector('[data-role="facts"]'), p.facts);
    const session = card.querySelector('[data-role="session"]');
    session.hidden = !p.session;
    if (p.session) {
      card.querySelector('[data-role="session-title"]').textContent = p.session.title;
      renderFacts(card.querySelector('[data-role="session-facts"]'), p.session.facts);
    }
    card.querySelector('[data-role="jobs"]').replaceChildren(...p.jobs.map((j) => {
      const div = el("div", {class: `job state-${j.state}`});
      const bar = el("progress", {max: "100"});
      bar.value = j.pct;
      div.append(el("span", {class: "job-label"}, j.label), bar, el("span", {class: "job-text"}, j.text));
      return div;
    }));
    for (const key of ["quality", "loss", "map"]) renderChart(card, key, p.charts[key]);
    const stream = card.querySelector('[data-role="stream"]');
    stream.hidden = !p.stream;
    if (p.stream) {
      renderFacts(card.querySelector('[data-role="stream-facts"]'), p.stream.facts);
      for (const [role, rows] of [["stream-next", p.stream.next], ["stream-clusters", p.stream.clusters]]) {
        card.querySelector(`[data-role="${role}"]`).replaceChildren(...rows.map((r) => {
          const tr = el("tr");
          tr.append(...r.map((c) => el("td", {}, c)));
          return tr;
        }));
      }
    }
    renderVersions(card.querySelector('[data-role="versions"]'), p.versions, columns);
    card.querySelector('[data-role="errors-box"]').hidden = !p.errors.length;
    card.querySelector('[data-role="errors"]').replaceChildren(...p.errors.map((e) => {
      const li = el("li");
      li.append(el("span", {class: "when"}, e.time), document.createTextNode(" "), el("span", {class: "source"}, e.source),
                document.createTextNode(" "), el("span", {class: "message"}, e.message));
      return li;
    }));
  }

  function render(data) {
    const ids = data.projects.map((p) => p.id).join(",");
    if (ids !== root.dataset.projects) {  // a project came or went: the server lays the cards out
      window.location.reload();
      return;
    }
    for (const p of data.projects) {
      const card = root.querySelector(`section.project[data-project="${CSS.escape(p.id)}"]`);
      if (card) renderProject(card, p, data.columns.length);
    }
    busy = data.busy;
    root.dataset.busy = busy ? "1" : "0";
    refreshLabel.textContent = `updated ${data.generated}` + (busy ? " · live" : "");
    refreshLabel.classList.remove("stale");
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const res = await fetch(root.dataset.url, {credentials: "same-origin", headers: {Accept: "application/json"}, cache: "no-store"});
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      render(await res.json());
    } catch (err) {
      refreshLabel.textContent = `cannot refresh (${err.message}); retrying`;
      refreshLabel.classList.add("stale");
    }
    schedule();
  }

  function schedule() {
    clearTimeout(timer);
    const ms = Number(busy ? root.dataset.pollBusy : root.dataset.pollIdle) || 5000;
    timer = setTimeout(() => { if (document.hidden) schedule(); else refresh(); }, ms);
  }

  async function rollback(button) {
    const card = button.closest("section.project");
    const version = button.dataset.version;
    const message = card.querySelector('[data-role="message"]');
    if (!window.confirm(`Serve ${version} from now on? Training continues from it.`)) return;
    button.disabled = true;
    const url = root.dataset.rollbackUrl.replace("__project__", encodeURIComponent(card.dataset.project));
    try {
      const res = await fetch(url, {method: "POST", credentials: "same-origin", cache: "no-store",
                                    headers: {"Content-Type": "application/json", Accept: "application/json"},
                                    body: JSON.stringify({version: version})});
      const body = await res.json().catch(() => ({}));
      if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
      message.className = "note ok";
      setNote(message, `Now serving ${body.active || version}.`);
    } catch (err) {
      message.className = "note error";
      setNote(message, `Rollback to ${version} failed: ${err.message}`);
      button.disabled = false;
    }
    await refresh();
  }

  root.addEventListener("click", (event) => {
    const button = event.target.closest("button.rollback");
    if (button && !button.disabled) rollback(button);
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  refresh();
})();
