// The search page: a caption (GET /api/search) or a dropped image (POST /api/search) gives a
// grid of hits; clicking a hit shows the alignment picture of that pair (/api/explain).
// Everything from the server is inserted as text or as an image URL, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { text: null, file: null, explainUrl: null };

function setStatus(element, message, isError = false) {
  element.textContent = message;
  element.classList.toggle("error", isError);
}

async function detail(response) {
  try {
    return (await response.json()).detail;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadInfo() {
  const response = await fetch("/api/info");
  const info = await response.json();
  const indexes = Object.entries(info.indexes).map(([kind, index]) =>
    `${index.count} ${kind}s` + (index.split ? ` (${index.split} split)` : ""));
  $("info").textContent = `${info.model}: ${indexes.join(", ")}`;
  const kMax = Math.min(info.limits.k, ...Object.values(info.indexes).map((i) => i.count));
  $("k").max = kMax;
  $("k").value = Math.min(Number($("k").value), kMax);
  $("text").maxLength = info.limits.text_chars;
  if (!info.text_queries) $("text-form").hidden = true;
  if (!info.image_queries) $("drop").hidden = true;
}

function hitButton(hit) {
  const button = document.createElement("button");
  button.className = "hit";
  button.type = "button";
  button.dataset.id = hit.id;
  if (hit.caption) button.title = `a true caption: ${hit.caption}`;
  const imageId = hit.id.startsWith("image-") ? hit.id : hit.image;
  if (imageId) {
    const img = document.createElement("img");
    img.src = `/api/item/${encodeURIComponent(imageId)}`;
    img.alt = imageId;
    button.append(img);
  }
  const body = document.createElement("div");
  if (hit.text !== undefined) {
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = hit.text;
    body.append(caption);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  for (const text of [`#${hit.rank} ${hit.id}`, `score ${hit.score.toFixed(3)}`]) {
    const span = document.createElement("span");
    span.textContent = text;
    meta.append(span);
  }
  body.append(meta);
  button.append(body);
  button.addEventListener("click", () => explain(hit, button));
  return button;
}

function showHits(data, captions, seconds) {
  const results = $("results");
  results.replaceChildren(...data.hits.map(hitButton));
  results.classList.toggle("captions", captions);
  setStatus($("status"), `${data.hits.length} hits in ${seconds.toFixed(2)} s` +
    " (click one to see why it matched)");
}

async function search(request, captions) {
  setStatus($("status"), "searching…");
  $("why").hidden = true;
  const start = performance.now();
  try {
    const response = await fetch(...request);
    if (!response.ok) {
      $("results").replaceChildren();
      setStatus($("status"), await detail(response), true);
      return;
    }
    showHits(await response.json(), captions, (performance.now() - start) / 1000);
  } catch (error) {
    setStatus($("status"), `the server did not answer (${error})`, true);
  }
}

function searchText(event) {
  event.preventDefault();
  state.text = $("text").value;
  state.file = null;
  const query = new URLSearchParams({ text: state.text, k: $("k").value });
  search([`/api/search?${query}`], false);
}

function searchImage(file) {
  state.file = file;
  state.text = null;
  const preview = $("upload-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const form = new FormData();
  form.append("file", file);
  form.append("k", $("k").value);
  search(["/api/search", { method: "POST", body: form }], true);
}

async function explain(hit, button) {
  for (const other of document.querySelectorAll(".hit.selected")) other.classList.remove("selected");
  button.classList.add("selected");
  $("why").hidden = false;
  $("why-title").textContent = state.file
    ? `why the image matched “${hit.text}” (${hit.id})`
    : `why ${hit.id} matched “${state.text}”`;
  const picture = $("explain");
  picture.removeAttribute("src");
  setStatus($("why-status"), "drawing the alignment…");
  let response;
  if (state.file) {
    const form = new FormData();
    form.append("file", state.file);
    form.append("text", hit.text);
    response = await fetch("/api/explain", { method: "POST", body: form });
  } else {
    const query = new URLSearchParams({ text: state.text, id: hit.id });
    response = await fetch(`/api/explain?${query}`);
  }
  if (!response.ok) {
    setStatus($("why-status"), await detail(response), true);
    return;
  }
  if (state.explainUrl) URL.revokeObjectURL(state.explainUrl);
  state.explainUrl = URL.createObjectURL(await response.blob());
  picture.onload = () => setStatus($("why-status"), "");
  picture.src = state.explainUrl;
}

function setUpDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) searchImage(event.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (event) => {
    if (event.target.files.length) searchImage(event.target.files[0]);
  });
}

$("text-form").addEventListener("submit", searchText);
$("explain").addEventListener("click", () => $("why").classList.toggle("wide"));
setUpDrop();
loadInfo().catch((error) => setStatus($("info"), `no server info (${error})`, true));
