// The page of `reco serve`: POST /search (JSON text query or a multipart image upload) and
// GET /items/{id}/image for thumbnails. Everything the server returns is untrusted: it reaches
// the page through textContent and attributes only, never as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "reco.token";

  const form = document.getElementById("search-form");
  const textField = document.getElementById("text-field");
  const imageField = document.getElementById("image-field");
  const textInput = document.getElementById("query-text");
  const imageInput = document.getElementById("query-image");
  const kInput = document.getElementById("query-k");
  const whereInput = document.getElementById("query-where");
  const tokenBox = document.getElementById("token-box");
  const tokenInput = document.getElementById("token");
  const remember = document.getElementById("token-remember");
  const button = document.getElementById("search-button");
  const statusLine = document.getElementById("status");
  const errorLine = document.getElementById("error");
  const results = document.getElementById("results");

  // Blob URLs of the thumbnails on show, revoked when the next results replace them.
  let thumbnails = [];
  // Thumbnails of an older search that arrive late are dropped.
  let generation = 0;

  function storage() {
    try {
      return window.sessionStorage;
    } catch (e) {
      return null; // storage disabled: the token lives in the input only
    }
  }

  const saved = storage() && storage().getItem(TOKEN_KEY);
  if (saved) {
    tokenInput.value = saved;
    remember.checked = true;
  }

  function keepToken() {
    const s = storage();
    if (!s) return;
    if (remember.checked && tokenInput.value) s.setItem(TOKEN_KEY, tokenInput.value);
    else s.removeItem(TOKEN_KEY);
  }
  tokenInput.addEventListener("change", keepToken);
  remember.addEventListener("change", keepToken);

  function mode() {
    return form.elements.namedItem("mode").value;
  }

  function showMode() {
    const image = mode() === "image";
    textField.hidden = image;
    imageField.hidden = !image;
  }
  for (const radio of form.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", showMode);
  }
  showMode();

  function headers() {
    const h = {};
    const token = tokenInput.value.trim();
    if (token) h.Authorization = "Bearer " + token;
    return h;
  }

  function setStatus(text) {
    statusLine.textContent = text;
  }

  // The alert stays in the accessibility tree (hiding it would keep its news from being
  // announced); empty, it takes no room.
  function setError(text) {
    errorLine.textContent = text;
  }

  // The server's message ({"error": "..."}) or the HTTP status line.
  async function errorMessage(response) {
    let message = "";
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") message = body.error;
    } catch (e) {
      // not JSON: fall back on the status line
    }
    if (!message) message = response.statusText || "request failed";
    return "Error " + response.status + ": " + message;
  }

  function clearResults() {
    generation += 1;
    for (const url of thumbnails) URL.revokeObjectURL(url);
    thumbnails = [];
    results.replaceChildren();
  }

  function formatScore(score) {
    return typeof score === "number" && Number.isFinite(score) ? score.toFixed(4) : String(score);
  }

  function text(value) {
    return value === null || value === undefined ? "" : String(value);
  }

  // A thumbnail fetched with the token; the figure is removed when the item has no image.
  async function loadThumbnail(id, img, figure, mine) {
    try {
      const response = await fetch("items/" + encodeURIComponent(id) + "/image", {
        headers: headers(),
        cache: "force-cache",
      });
      if (!response.ok) throw new Error(String(response.status));
      const blob = await response.blob();
      if (mine !== generation) return;
      const url = URL.createObjectURL(blob);
      thumbnails.push(url);
      img.src = url;
    } catch (e) {
      if (mine === generation) figure.remove();
    }
  }

  function property(list, name, value) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.className = name;
    dd.textContent = value;
    if (name === "source") dd.title = value;
    list.append(dt, dd);
  }

  function showResults(hits) {
    clearResults();
    const mine = generation;
    for (const hit of hits) {
      const meta = hit && typeof hit.metadata === "object" && hit.metadata ? hit.metadata : {};
      const caption = text(meta.caption);
      const item = document.createElement("li");
      item.className = "hit";

      const figure = document.createElement("div");
      figure.className = "thumb";
      const img = document.createElement("img");
      img.alt = caption || "image of item " + text(hit.id);
      img.width = 96;
      img.height = 96;
      img.decoding = "async";
      img.addEventListener("error", () => figure.remove());
      figure.append(img);
      item.append(figure);
      loadThumbnail(hit.id, img, figure, mine);

      const body = document.createElement("div");
      body.className = "hit-body";
      const title = document.createElement("h3");
      title.className = "caption";
      title.textContent = caption || "(no caption)";
      body.append(title);
      const props = document.createElement("dl");
      props.className = "props";
      property(props, "score", formatScore(hit.score));
      property(props, "id", text(hit.id));
      // The memory's metadata calls it label_name; the label's number, where given, is "label".
      const label = meta.label_name ?? meta.label;
      if (label !== undefined && label !== null) property(props, "label", text(label));
      if (meta.source !== undefined && meta.source !== null) {
        property(props, "source", text(meta.source));
      }
      body.append(props);
      item.append(body);
      results.append(item);
    }
  }

  function request() {
    const k = Number.parseInt(kInput.value, 10);
    const where = whereInput.value.trim();
    if (mode() === "image") {
      const file = imageInput.files && imageInput.files[0];
      if (!file) return { problem: "Choose an image file.", focus: imageInput };
      const data = new FormData();
      data.append("image", file);
      if (Number.isFinite(k)) data.append("k", String(k));
      if (where) data.append("where", where);
      return { body: data, headers: headers(), what: "the image " + file.name };
    }
    const query = textInput.value.trim();
    if (!query) return { problem: "Type a text to search for.", focus: textInput };
    const json = { text: query };
    if (Number.isFinite(k)) json.k = k;
    if (where) json.where = where;
    const h = headers();
    h["Content-Type"] = "application/json";
    return { body: JSON.stringify(json), headers: h, what: "\u201c" + query + "\u201d" };
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const req = request();
    if (req.problem) {
      setStatus("");
      setError(req.problem);
      req.focus.focus();
      return;
    }
    setError("");
    setStatus("Searching\u2026");
    button.disabled = true;
    form.setAttribute("aria-busy", "true");
    try {
      const response = await fetch("search", {
        method: "POST",
        headers: req.headers,
        body: req.body,
      });
      if (!response.ok) {
        const message = await errorMessage(response);
        clearResults();
        setStatus("");
        setError(message);
        if (response.status === 401 || response.status === 403) {
          tokenBox.open = true;
          tokenInput.focus();
        }
        return;
      }
      const body = await response.json();
      const hits = body && Array.isArray(body.results) ? body.results : [];
      showResults(hits);
      const n = hits.length;
      setStatus(n + (n === 1 ? " result" : " results") + " for " + req.what + ".");
    } catch (e) {
      clearResults();
      setStatus("");
      setError("The server could not be reached: " + e.message);
    } finally {
      button.disabled = false;
      form.removeAttribute("aria-busy");
    }
  });
})();
