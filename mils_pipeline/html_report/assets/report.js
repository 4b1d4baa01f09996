// The report's gallery: pages of cards from data/gallery.js; an item's candidates come from
// data/items-<n>.js, loaded on the first click in that chunk (scripts load from file://, fetch does not).
"use strict";
window.MILS = (function () {
  let data = null;
  let view = [];
  let page = 0;
  const chunks = {};
  const waiting = {};

  const $ = (id) => document.getElementById(id);
  const fmt = (x, digits) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(digits));

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) if (child) node.appendChild(child);
    return node;
  }

  const rescored = (item) => item.rescore !== undefined;
  const changed = (item) => rescored(item) && item.rescoreCaption !== item.caption;

  function compare(sort) {
    const by = {
      score: (a, b) => b.score - a.score,
      rescore: (a, b) => b.rescore - a.rescore || b.score - a.score,
      gain: (a, b) => b.gain - a.gain || b.score - a.score,
      rounds: (a, b) => b.rounds - a.rounds || b.score - a.score,
      key: (a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0),
    }[sort];
    return (a, b) => by(data.items[a], data.items[b]) || a - b;
  }

  function refresh() {
    const words = $("filter").value.trim().toLowerCase();
    const all = data.items.map((_, i) => i);
    view = words
      ? all.filter((i) => (data.items[i].caption + " " + data.items[i].key).toLowerCase().includes(words))
      : all;
    view.sort(compare($("sort").value));
    page = Math.min(page, Math.max(0, Math.ceil(view.length / data.pageSize) - 1));
    render();
  }

  function card(i) {
    const item = data.items[i];
    const pictures = el("div", { class: "pictures" });
    if (item.missing) pictures.appendChild(el("div", { class: "missing", text: item.missing }));
    for (const src of item.pictures) pictures.appendChild(el("img", { class: "thumb", src: src, alt: item.key }));
    const node = el(
      "div",
      { class: "card " + data.modality, "data-index": String(i), "data-key": item.key },
      pictures,
      item.sound ? el("audio", { controls: "", preload: "none", src: item.sound }) : null,
      el("div", { class: "caption", text: item.caption }),
      el("div", {
        class: "meta",
        text: `score ${fmt(item.score, 4)}${rescored(item) ? ` · rescore ${fmt(item.rescore, 4)}` : ""} · gain ${fmt(item.gain, 4)} · ${item.rounds} rounds · ${item.stop} · ${item.key}`,
      }),
      changed(item) ? el("div", { class: "rescore-caption", text: `new scorer's best: ${item.rescoreCaption}` }) : null,
    );
    node.addEventListener("click", (event) => {
      if (event.target.tagName !== "AUDIO") open(i);
    });
    return node;
  }

  function render() {
    const pages = Math.max(1, Math.ceil(view.length / data.pageSize));
    const cards = $("cards");
    cards.replaceChildren(...view.slice(page * data.pageSize, (page + 1) * data.pageSize).map(card));
    $("page-label").textContent = `page ${page + 1} of ${pages} (${view.length} items)`;
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
  }

  function loadChunk(n, then) {
    if (chunks[n]) return then(chunks[n]);
    (waiting[n] = waiting[n] || []).push(then);
    if (waiting[n].length > 1) return;
    const script = el("script", { src: `data/items-${n}.js` });
    script.onerror = () => console.error(`cannot load data/items-${n}.js`);
    document.body.appendChild(script);
  }

  function open(i) {
    const n = Math.floor(i / data.chunk);
    loadChunk(n, (items) => show(i, items[i - n * data.chunk]));
  }

  function show(i, details) {
    const item = data.items[i];
    const body = $("detail-body");
    const media = el("div", {});
    for (const src of item.pictures) media.appendChild(el("img", { class: "media", src: src, alt: item.key }));
    if (item.sound) media.appendChild(el("audio", { controls: "", preload: "none", src: item.sound }));
    if (item.missing) media.appendChild(el("div", { class: "missing", text: item.missing }));
    const facts = el(
      "div",
      {},
      el("h3", { text: item.key }),
      el("p", { class: "final-caption", text: item.caption }),
      el("p", {
        class: "meta",
        text: `shard ${item.shard} · score ${fmt(item.score, 4)}${rescored(item) ? ` · rescore ${fmt(item.rescore, 4)}` : ""} · ${item.rounds} rounds · stopped: ${item.stop}`,
      }),
      changed(item) ? el("p", { class: "rescore-caption", text: `new scorer's best: ${item.rescoreCaption}` }) : null,
      el("img", { class: "trajectory", src: details.trajectory, alt: "trajectory of " + item.key }),
    );
    const multi = details.scorers.length > 1;
    const head = el("tr", {});
    const again = rescored(item);
    for (const name of ["#", "candidate", "score", "round", "operator", ...(multi ? details.scorers : []), ...(again ? ["rescore"] : [])])
      head.appendChild(el("th", { text: name }));
    const rows = el("tbody", {});
    details.candidates.forEach((c, k) => {
      const marks = [c.text === item.caption ? "final" : "", again && c.text === item.rescoreCaption ? "rescore-best" : ""];
      const tr = el("tr", { class: marks.filter(Boolean).join(" ") });
      for (const v of [k + 1, c.text, fmt(c.score, 4), c.round, c.operator || ""]) tr.appendChild(el("td", { text: String(v) }));
      if (multi) for (const s of c.components) tr.appendChild(el("td", { text: fmt(s, 4) }));
      if (again) tr.appendChild(el("td", { text: fmt(c.rescore, 4) }));
      rows.appendChild(tr);
    });
    body.replaceChildren(
      el("div", { class: "top" }, media, facts),
      el("h4", { text: `${details.candidates.length} kept candidates` }),
      el("table", { class: "candidates" }, el("thead", {}, head), rows),
    );
    $("detail").showModal();
  }

  function start() {
    if (data.items.length && rescored(data.items[0]))
      $("sort").appendChild(el("option", { value: "rescore", text: "rescore (new scorer, best first)" }));
    $("sort").value = $("cards").dataset.initialSort;
    $("sort").addEventListener("change", () => { page = 0; refresh(); });
    $("filter").addEventListener("input", () => { page = 0; refresh(); });
    $("prev").addEventListener("click", () => { page -= 1; render(); });
    $("next").addEventListener("click", () => { page += 1; render(); });
    refresh();
  }

  return {
    gallery(payload) {
      data = payload;
      if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
      else start();
    },
    details(n, items) {
      chunks[n] = items;
      for (const then of waiting[n] || []) then(items);
      delete waiting[n];
    },
  };
})();
