// The annotation page: one query at a time, its ranked matches, search,
// keyboard, undo. Every caption is untrusted text: it only ever reaches the
// page through textContent, never as HTML.
"use strict";
(() => {
  const TOKEN = document.querySelector('meta[name="annotate-token"]').content;
  const CLIENT = sessionStorage.getItem("annotate-client") || (() => {
    const id = Array.from(crypto.getRandomValues(new Uint8Array(8)),
                          (b) => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem("annotate-client", id);
    return id;
  })();
  const POLL_MS = 2000;
  const $ = (id) => document.getElementById(id);

  let round = null;        // GET /api/round
  let answers = {};        // query -> answer (the server's, polled)
  let version = -1;
  let submitted = false;
  let current = 0;
  let busy = false;
  const spent = {};        // query -> ms spent on it before this visit
  let shownAt = performance.now();
  const undoStack = [];    // this tab's answers: {query, id}
  let results = null;      // {url(offset), via, offset, total}
  let lastSeconds = null;

  async function api(path, body) {
    const init = {headers: {"X-Annotate-Token": TOKEN}};
    if (body !== undefined) {
      init.method = "POST";
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      return {ok: false, status: 0, data: {error: "The server does not answer."}};
    }
    let data = {};
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    return {ok: response.ok, status: response.status, data};
  }

  function flash(text) {
    const banner = $("banner");
    banner.textContent = text;
    banner.hidden = !text;
  }

  function elapsedMs(k) {
    const now = document.hidden ? 0 : performance.now() - shownAt;
    return (spent[k] || 0) + (k === current ? now : 0);
  }

  function leave() {
    if (!document.hidden) spent[current] = elapsedMs(current);
    shownAt = performance.now();
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      spent[current] = (spent[current] || 0) + performance.now() - shownAt;
    }
    shownAt = performance.now();
  });

  const ref = (item) => `${item.modality} #${item.index}`;

  function itemElement(item) {
    const box = document.createElement("div");
    box.className = `item ${item.kind}`;
    if (item.kind === "image") {
      const img = document.createElement("img");
      img.src = `/item/${encodeURIComponent(item.modality)}/${item.index}`;
      img.alt = ref(item);
      box.append(img);
    } else {
      const p = document.createElement("p");
      p.className = "caption";
      p.textContent = item.text;
      box.append(p);
    }
    return box;
  }

  function isChosen(item) {
    const a = answers[current];
    return !!a && a.partners.some(([m, i]) => m === item.modality && i === item.index);
  }

  function card(entry, key, via) {
    const li = document.createElement("li");
    li.className = "card" + (isChosen(entry.item) ? " chosen" : "");
    li.dataset.modality = entry.item.modality;
    li.dataset.index = String(entry.item.index);
    if (key) {
      const badge = document.createElement("span");
      badge.className = "key";
      badge.textContent = String(key);
      li.append(badge);
    }
    li.append(itemElement(entry.item));
    const meta = document.createElement("div");
    meta.className = "meta";
    const label = document.createElement("span");
    label.textContent = ref(entry.item) + (entry.rank ? ` · rank ${entry.rank}` : "") +
        (entry.score !== undefined ? ` · ${entry.score.toFixed(3)}` : "");
    meta.append(label);
    if (round.browse) {
      const similar = document.createElement("button");
      similar.type = "button";
      similar.className = "similar";
      similar.textContent = "similar";
      similar.title = "Browse items similar to this one";
      similar.addEventListener("click", (e) => {
        e.stopPropagation();
        const of = `${entry.item.modality}:${entry.item.index}`;
        showResults(`Similar to ${ref(entry.item)}`, (o) =>
            `/api/similar?modality=${encodeURIComponent(entry.item.modality)}` +
            `&of=${encodeURIComponent(of)}&offset=${o}`, "similar");
      });
      meta.append(similar);
    }
    li.append(meta);
    li.addEventListener("click", () =>
        choose([[entry.item.modality, entry.item.index]], via, "click"));
    return li;
  }

  function median(values) {
    const v = [...values].sort((a, b) => a - b);
    if (!v.length) return null;
    const mid = v.length >> 1;
    return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
  }

  function complete() {
    return round && Object.keys(answers).length === round.queries.length;
  }

  function render() {
    if (!round) return;
    const q = round.queries[current];
    const n = round.queries.length;
    const times = Object.values(answers).map((a) => a.time_s);
    $("round").textContent = String(round.round);
    $("answered").textContent = String(Object.keys(answers).length);
    $("total").textContent = String(n);
    const med = median(times);
    $("timing").textContent = med === null ? "no answers yet" :
        `median ${med.toFixed(1)} s / answer` +
        (lastSeconds === null ? "" : ` · last ${lastSeconds.toFixed(1)} s`);
    $("submit").disabled = submitted || !complete();
    $("undo").disabled = submitted || !undoStack.length;
    $("warning").textContent = round.warning || "";
    $("warning").hidden = !round.warning;

    $("query-title").textContent = `Query ${current + 1} of ${n} · ${ref(q.item)}`;
    $("query-item").replaceChildren(itemElement(q.item));
    const a = answers[current];
    let status = "Not answered yet.";
    if (a) {
      const who = a.client === CLIENT ? "this browser" : "another browser";
      const what = a.partners.length ?
          a.partners.map(([m, i]) => `${m} #${i}`).join(", ") : "none of them";
      status = `Answered by ${who}: ${what}.`;
    }
    $("query-status").textContent = status;

    $("matches-note").textContent = round.shown ?
        `(the ${q.matches.length} ${q.other} items the towers rank first)` :
        "(no ranking for this round: search below)";
    $("matches").replaceChildren(...q.matches.map(
        (m, r) => card(m, r < 9 ? r + 1 : null, "ranking")));
    $("none").disabled = submitted;
    const textual = q.other_kind !== "image";
    $("filter").disabled = !textual;
    $("filter").placeholder = textual ? "Filter captions (/)" :
        "Images have no captions: browse by similarity";
    $("more").disabled = !round.ranked || round.ranked <= round.shown;
    $("browse").disabled = !round.browse;

    const done = $("done");
    done.hidden = !complete();
    $("done-text").textContent = submitted ?
        `Round ${round.round} is submitted (${round.answers_path}). Rerun ` +
        "the run's python -m mmal_jax.main command to continue; this page " +
        "follows when the run asks for the next round." :
        `All ${n} queries are answered. Press Enter or "Submit answers" to ` +
        `write ${round.answers_path}.`;
  }

  function renderResults(title, items, more) {
    $("results-title").textContent = title;
    $("results-title").hidden = false;
    $("results").append(...items.map((entry) => card(entry, null, results.via)));
    $("results-more").hidden = !more;
  }

  async function loadResults() {
    const r = await api(results.url(results.offset));
    if (!r.ok) {
      flash(r.data.error || `Error ${r.status}`);
      return;
    }
    results.offset += r.data.items.length;
    results.total = r.data.total;
    renderResults(`${results.title} (${r.data.total})`, r.data.items,
                  results.offset < r.data.total);
  }

  function showResults(title, url, via) {
    results = {title, url, via, offset: 0, total: 0};
    $("results").replaceChildren();
    loadResults();
  }

  function clearResults() {
    results = null;
    $("results").replaceChildren();
    $("results-title").hidden = true;
    $("results-more").hidden = true;
    $("filter").value = "";
  }

  function go(k) {
    if (!round) return;
    leave();
    current = (k + round.queries.length) % round.queries.length;
    clearResults();
    render();
  }

  function nextUnanswered(from) {
    const n = round.queries.length;
    for (let step = 1; step <= n; step++) {
      const k = (from + step) % n;
      if (!answers[k]) return k;
    }
    return null;
  }

  async function choose(partners, via, input) {
    const k = current;
    if (busy || !round) return;
    if (submitted) return flash("The round is submitted: nothing can change now.");
    if (answers[k]) {
      return flash(`Query ${k + 1} is answered already (u undoes this browser's last answer).`);
    }
    busy = true;
    const seconds = elapsedMs(k) / 1000;
    const r = await api("/api/answer", {query: k, partners, via, input,
                                        client: CLIENT, time_s: seconds});
    busy = false;
    if (r.ok) {
      answers[k] = r.data.answer;
      undoStack.push({query: k, id: r.data.answer.id});
      lastSeconds = seconds;
      flash("");
      const next = nextUnanswered(k);
      if (next === null) render(); else go(next);
    } else if (r.status === 409) {
      if (r.data.answer) answers[k] = r.data.answer;
      flash(`Query ${k + 1} was answered in another browser meanwhile; ` +
            "your choice was not recorded.");
      render();
    } else {
      flash(r.data.error || `Error ${r.status}`);
    }
  }

  async function undo() {
    if (busy || submitted) return;
    const last = undoStack.pop();
    if (!last) return flash("Nothing to undo in this browser.");
    busy = true;
    const r = await api("/api/undo", {query: last.query, id: last.id});
    busy = false;
    if (r.ok) {
      delete answers[last.query];
      spent[last.query] = 0;
      flash(`Undid the answer to query ${last.query + 1}.`);
      go(last.query);
      shownAt = performance.now();
    } else {
      if (r.data.answer) answers[last.query] = r.data.answer;
      flash(r.data.error || `Error ${r.status}`);
      render();
    }
  }

  async function submit() {
    if (busy || submitted || !complete()) return;
    busy = true;
    const r = await api("/api/submit", {});
    busy = false;
    if (r.ok) {
      submitted = true;
      flash(`Submitted: ${r.data.path}.`);
    } else {
      flash(r.data.error || `Error ${r.status}`);
    }
    render();
  }

  async function loadRound() {
    const r = await api("/api/round");
    if (!r.ok) return flash(r.data.error || `Error ${r.status}`);
    round = r.data;
    answers = {};
    version = -1;
    current = 0;
    undoStack.length = 0;
    await poll();
    const first = answers[0] ? nextUnanswered(0) : 0;
    go(first === null ? 0 : first);
  }

  async function poll() {
    const r = await api("/api/answers");
    if (!r.ok) return;
    if (round && r.data.round !== round.round) return loadRound();
    if (r.data.version === version && r.data.submitted === submitted) return;
    version = r.data.version;
    submitted = r.data.submitted;
    answers = {};
    for (const [k, a] of Object.entries(r.data.answers)) answers[Number(k)] = a;
    render();
  }

  let filterTimer = null;
  $("filter").addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => {
      const words = $("filter").value.trim();
      const q = round.queries[current];
      if (!words) return clearResults();
      showResults(`Captions holding "${words}"`, (o) =>
          `/api/search?modality=${encodeURIComponent(q.other)}` +
          `&q=${encodeURIComponent(words)}&offset=${o}`, "search");
    }, 150);
  });
  $("more").addEventListener("click", () => {
    const k = current;
    showResults("Further down the ranking", (o) =>
        `/api/more?query=${k}&offset=${round.shown + o}`, "more");
  });
  $("browse").addEventListener("click", () => {
    const q = round.queries[current];
    const of = `${q.item.modality}:${q.item.index}`;
    showResults(`${q.other} items by similarity to the query`, (o) =>
        `/api/similar?modality=${encodeURIComponent(q.other)}` +
        `&of=${encodeURIComponent(of)}&offset=${o}`, "similar");
  });
  $("results-more").addEventListener("click", loadResults);
  $("none").addEventListener("click", () => choose([], "none", "click"));
  $("prev").addEventListener("click", () => go(current - 1));
  $("next").addEventListener("click", () => go(current + 1));
  $("undo").addEventListener("click", undo);
  $("submit").addEventListener("click", submit);

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || !round) return;
    if (e.target instanceof HTMLInputElement) {
      if (e.key === "Escape") e.target.blur();
      return;
    }
    const q = round.queries[current];
    if (/^[1-9]$/.test(e.key)) {
      const m = q.matches[Number(e.key) - 1];
      if (m) choose([[m.item.modality, m.item.index]], "ranking", "key");
    } else if (e.key === "0") {
      choose([], "none", "key");
    } else if (e.key === "ArrowRight") {
      go(current + 1);
    } else if (e.key === "ArrowLeft") {
      go(current - 1);
    } else if (e.key === "u") {
      undo();
    } else if (e.key === "/") {
      $("filter").focus();
    } else if (e.key === "Enter" && !(e.target instanceof HTMLButtonElement)) {
      submit();
    } else {
      return;
    }
    e.preventDefault();
  });

  loadRound();
  setInterval(poll, POLL_MS);
})();
