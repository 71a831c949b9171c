// minipacs's page: the buttons (data-action) and the upload form. Plain JavaScript, no build.
"use strict";

const dicomweb = () => document.body.dataset.dicomweb;

function say(element, text, ok) {
  element.textContent = text;
  element.classList.toggle("error", !ok);
  element.classList.toggle("ok", ok);
}

async function reason(response) {
  const text = await response.text();
  try { return JSON.parse(text).message || text; } catch (e) { return text || response.statusText; }
}

async function action(path, body) {  // the page's POSTs: JSON, so another site cannot forge one
  const response = await fetch(path, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  if (!response.ok) return {ok: false, message: `${response.status}: ${await reason(response)}`};
  return await response.json();
}

async function echo(button) {
  const cell = button.closest("tr").querySelector(".echo-result");
  say(cell, "…", true);
  const done = await action("/admin/api/echo", {peer: button.dataset.peer});
  say(cell, done.message, done.ok);
}

async function send(button) {
  const result = document.getElementById("result");
  const peer = document.getElementById("send-peer").value;
  say(result, `sending to ${peer}…`, true);
  const done = await action("/admin/api/send", {peer: peer, study: button.dataset.study});
  say(result, done.message, done.ok);
}

async function remove(button) {
  if (!confirm(`Delete ${button.dataset.what}? This cannot be undone.`)) return;
  const result = document.getElementById("result");
  const response = await fetch(dicomweb() + button.dataset.path, {method: "DELETE"});
  if (!response.ok) { say(result, `${response.status}: ${await reason(response)}`, false); return; }
  const done = await response.json();
  say(result, `deleted ${done.instances} instance(s)`, true);
  // the study is gone when its last series went: back to the list then
  if (button.dataset.then || done.studies > 0) { location.assign("/"); } else { location.reload(); }
}

async function queue(button) {
  const op = button.dataset.op;
  if (op === "drop" && !confirm("Drop these items? They will never be sent.")) return;
  const body = {action: op, kind: button.dataset.kind};
  if (button.dataset.peer) body.peer = button.dataset.peer;
  if (button.dataset.id) body.id = Number(button.dataset.id);
  const done = await action("/admin/api/queue", body);
  say(document.getElementById("result"), done.message, done.ok !== false);
  if (done.ok !== false) location.reload();
}

const ACTIONS = {echo: echo, send: send, delete: remove, queue: queue};

document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-action]");
  if (!button) return;
  event.preventDefault();
  button.disabled = true;
  ACTIONS[button.dataset.action](button)
    .catch((error) => say(document.getElementById("result") ||
                          button.closest("tr").querySelector(".echo-result"),
                          `no answer from the server: ${error.message}`, false))
    .finally(() => { button.disabled = false; });
});

// STOW-RS (PS3.18 10.5): the chosen files as one multipart/related request
async function upload(event) {
  event.preventDefault();
  const files = document.getElementById("files").files;
  const result = document.getElementById("result");
  const failures = document.getElementById("failures");
  failures.replaceChildren();
  const boundary = "minipacs-" + Math.random().toString(36).slice(2);
  const parts = [];
  for (const file of files) {
    parts.push(`--${boundary}\r\nContent-Type: application/dicom\r\n\r\n`, file, "\r\n");
  }
  parts.push(`--${boundary}--\r\n`);
  say(result, `uploading ${files.length} file(s)…`, true);
  let response;
  try {
    response = await fetch(dicomweb() + "/studies", {
      method: "POST", body: new Blob(parts),
      headers: {"Content-Type": `multipart/related; type="application/dicom"; boundary=${boundary}`,
                "Accept": "application/dicom+json"}});
  } catch (error) {
    say(result, `no answer from the server: ${error.message}`, false);
    return;
  }
  const type = response.headers.get("Content-Type") || "";
  if (!response.ok && !type.includes("json")) {  // the whole request refused: say why
    say(result, `nothing stored: ${response.status}: ${await reason(response)}`, false);
    return;
  }
  let answer = {};
  try { answer = await response.json(); } catch (e) { /* an answer without a body */ }
  const stored = ((answer["00081199"] || {}).Value || []).length;
  const failed = (answer["00081198"] || {}).Value || [];
  for (const item of failed) {
    const li = document.createElement("li");
    const uid = ((item["00081155"] || {}).Value || ["(unreadable)"])[0];
    const code = ((item["00081197"] || {}).Value || [""])[0];
    li.textContent = `${uid}: failure reason ${Number(code).toString(16).toUpperCase()}`;
    failures.append(li);
  }
  say(result, `stored ${stored}, failed ${failed.length} (HTTP ${response.status})`,
      response.ok && failed.length === 0);
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("upload");
  if (form) form.addEventListener("submit", upload);
});
