// The review page: one pair at a time, every verdict POSTed and saved before the page moves on.
"use strict";

const state = { reviewer: null, tokens: [], done: [], index: 0, pair: null, busy: false };
const $ = (id) => document.getElementById(id);
const query = () => "reviewer=" + encodeURIComponent(state.reviewer);

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function setStatus(text, bad) {
  $("status").textContent = text;
  $("status").className = bad ? "bad" : "";
}

function showProgress() {
  const reviewed = state.done.filter(Boolean).length;
  $("bar").max = state.tokens.length || 1;
  $("bar").value = reviewed;
  $("count").textContent = `${reviewed} of ${state.tokens.length} reviewed`;
}

async function start(name) {
  const session = await api("/api/session?reviewer=" + encodeURIComponent(name));
  Object.assign(state, { reviewer: session.reviewer, tokens: session.tokens, done: session.done });
  localStorage.setItem("spa-vl-reviewer", state.reviewer);
  history.replaceState(null, "", "?" + query());
  $("login").hidden = true;
  $("who").textContent = "reviewer: " + state.reviewer;
  showProgress();
  const first = state.done.indexOf(false);
  if (first < 0) showDone(); else await show(first);
}

async function show(index) {
  const pair = await api(`/api/pair/${state.tokens[index]}?` + query());
  Object.assign(state, { index, pair });
  $("position").textContent = `Pair ${index + 1} / ${state.tokens.length}`;
  $("labels").textContent = pair.labels.filter(Boolean).join(" › ");
  $("image").src = pair.image;
  $("question").textContent = pair.question;
  $("text-A").textContent = pair.answers[0];
  $("text-B").textContent = pair.answers[1];
  const verdict = pair.verdict || { pick: null, unsafe: [false, false], note: "" };
  $("unsafe-A").checked = verdict.unsafe[0];
  $("unsafe-B").checked = verdict.unsafe[1];
  $("note").value = verdict.note;
  for (const button of document.querySelectorAll(".picks button")) {
    button.classList.toggle("picked", button.dataset.pick === verdict.pick);
  }
  setStatus(verdict.pick ? "reviewed before: pick again to change it" : "");
  $("review").hidden = false;
  $("done").hidden = true;
  window.scrollTo(0, 0);
}

function showDone() {
  state.index = state.tokens.length;
  $("review").hidden = true;
  $("done").hidden = false;
}

function nextUnreviewed(from) {
  for (let k = 1; k <= state.tokens.length; k++) {
    const i = (from + k) % state.tokens.length;
    if (!state.done[i]) return i;
  }
  return -1;
}

async function pick(choice) {
  if (state.busy || !state.pair) return;
  state.busy = true;
  setStatus("saving…");
  const verdict = {
    reviewer: state.reviewer, token: state.pair.token, pick: choice,
    unsafe: [$("unsafe-A").checked, $("unsafe-B").checked], note: $("note").value,
  };
  try {
    await api("/api/verdict", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(verdict),
    });
    state.done[state.index] = true;
    showProgress();
    const next = nextUnreviewed(state.index);
    if (next < 0) showDone(); else await show(next);
    setStatus("saved");
  } catch (error) {
    setStatus("not saved: " + error.message + " (pick again to retry)", true);
  } finally {
    state.busy = false;
  }
}

async function step(delta) {
  const target = state.index + delta;
  if (target >= state.tokens.length) showDone();
  else if (target >= 0) await show(target);
}

function onKey(event) {
  if (!$("login").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target === $("note")) {
    if (event.key === "Escape" || (event.key === "Enter" && !event.shiftKey)) {
      event.preventDefault();
      $("note").blur();
    }
    return;
  }
  const onPair = !$("review").hidden;
  const actions = {
    "1": () => pick("A"), a: () => pick("A"), "2": () => pick("B"), b: () => pick("B"),
    "3": () => pick("tie"), t: () => pick("tie"),
    u: () => { $("unsafe-A").checked = !$("unsafe-A").checked; },
    i: () => { $("unsafe-B").checked = !$("unsafe-B").checked; },
    n: () => $("note").focus(),
    arrowleft: () => step(-1), arrowright: () => step(1),
  };
  const action = actions[event.key.toLowerCase()];
  if (!action || (!onPair && !event.key.startsWith("Arrow"))) return;
  event.preventDefault();
  action();
}

function init() {
  document.addEventListener("keydown", onKey);
  for (const button of document.querySelectorAll(".picks button")) {
    button.addEventListener("click", () => pick(button.dataset.pick));
  }
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    start($("name").value.trim()).catch((error) => alert(error.message));
  });
  const named = new URLSearchParams(location.search).get("reviewer");
  if (named) {
    start(named).catch((error) => alert(error.message));
  } else {
    $("name").value = localStorage.getItem("spa-vl-reviewer") || "";
    $("login").hidden = false;
    $("name").focus();
  }
}

init();
