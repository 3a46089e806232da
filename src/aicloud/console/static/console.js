// aicloud console: the little script the pages need (live overview, copy, confirm,
// playground). Served from the package; no inline script (the CSP forbids it).
"use strict";

function liveRefresh() {
  const box = document.getElementById("live");
  if (!box) return;
  const every = Number(box.dataset.every) || 2000;
  async function tick() {
    try {
      const resp = await fetch(box.dataset.refresh, { headers: { accept: "text/html" } });
      if (resp.redirected || resp.status === 401) { location.reload(); return; }
      if (resp.ok) {
        // a keyboard user on one of the live part's buttons keeps their place
        const focused = box.contains(document.activeElement) ? document.activeElement.id : "";
        box.innerHTML = await resp.text();
        const again = focused && document.getElementById(focused);
        if (again) again.focus();
      }
    } catch (err) { /* the server is restarting: try again next tick */ }
    setTimeout(tick, every);
  }
  setTimeout(tick, every);
}

function copyButtons() {
  for (const button of document.querySelectorAll("[data-copy]")) {
    button.addEventListener("click", async () => {
      const field = document.getElementById(button.dataset.copy);
      const note = button.parentElement.querySelector(".copied");
      field.select();
      try {
        await navigator.clipboard.writeText(field.value);
        if (note) note.textContent = "Copied.";
      } catch (err) {
        if (note) note.textContent = "Selected: press Ctrl+C to copy.";
      }
    });
  }
}

function confirmations() {
  // on the document: forms swapped in by the live refresh ask too
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.matches("form[data-confirm]") && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
    }
  });
}

function playground() {
  const form = document.getElementById("playground");
  if (!form) return;
  const transcript = document.getElementById("pg-transcript");
  const message = document.getElementById("pg-message");
  const send = document.getElementById("pg-send");
  const problem = document.getElementById("pg-error");
  let history = [];

  function bubble(role, text) {
    const item = document.createElement("li");
    item.className = role;
    item.textContent = text;
    transcript.appendChild(item);
    return item;
  }

  function fail(text) {
    problem.textContent = text;
    problem.hidden = false;
  }

  async function answerUsage(item, requestId) {
    const resp = await fetch("/console/playground/usage/" + encodeURIComponent(requestId),
                             { headers: { accept: "application/json" } });
    if (!resp.ok) return;
    const u = await resp.json();
    const line = document.createElement("span");
    line.className = "usage";
    line.dataset.cost = u.cost_usd;
    line.textContent = `${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens` +
      (u.cached_tokens ? ` (${u.cached_tokens} cached)` : "") + ` · $${u.cost_usd} · ${u.status}`;
    item.appendChild(line);
  }

  async function ask(event) {
    event.preventDefault();
    const text = message.value.trim();
    if (!text) { message.focus(); return; }
    problem.hidden = true;
    history.push({ role: "user", content: text });
    bubble("user", text);
    message.value = "";
    const item = bubble("assistant", "");
    const body = {
      model: form.elements.model.value, project_id: form.elements.project_id.value,
      messages: history, max_tokens: Number(form.elements.max_tokens.value),
      temperature: Number(form.elements.temperature.value),
    };
    send.disabled = true;
    let answer = "", requestId = null;
    try {
      const resp = await fetch("/console/playground/chat", {
        method: "POST", body: JSON.stringify(body),
        headers: { "content-type": "application/json", accept: "text/event-stream",
                   "x-csrf-token": form.dataset.csrf },
      });
      if (!resp.ok) {
        const err = await resp.json().catch(() => ({}));
        throw new Error((err.error && err.error.message) || `HTTP ${resp.status}`);
      }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = frame.replace(/^data: /, "");
          if (!frame.startsWith("data: ") || data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          requestId = chunk.id;
          for (const choice of chunk.choices || []) {
            answer += (choice.delta && choice.delta.content) || "";
          }
          item.textContent = answer;
        }
      }
      history.push({ role: "assistant", content: answer });
      if (requestId) await answerUsage(item, requestId);
    } catch (err) {
      history.pop();
      item.remove();
      fail(err.message);
    } finally {
      send.disabled = false;
      message.focus();
    }
  }

  form.addEventListener("submit", ask);
  message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  document.getElementById("pg-clear").addEventListener("click", () => {
    history = [];
    transcript.replaceChildren();
    problem.hidden = true;
    message.focus();
  });
}

function focusFirstError() {
  // a refused form comes back with the cursor in the first field to fix
  const field = document.querySelector("[aria-invalid=true]");
  if (field) field.focus();
}

document.addEventListener("DOMContentLoaded", () => {
  focusFirstError();
  liveRefresh();
  copyButtons();
  confirmations();
  playground();
});
