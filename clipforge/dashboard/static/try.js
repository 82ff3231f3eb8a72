// Try a checkpoint: upload an image, type candidate captions, see the model's probabilities.
"use strict";

(function () {
  const page = document.getElementById("page");
  const state = { image: null };

  function renderResult(data) {
    const order = data.probabilities.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]);
    const bars = CF.el("div", { class: "bars", id: "probabilities" });
    for (const [p, i] of order) {
      bars.append(CF.el("div", { class: "bar", "data-caption": data.captions[i], "data-probability": String(p) },
        CF.el("span", { class: "label", text: data.captions[i], title: data.captions[i] }),
        CF.el("span", { class: "fill", style: `width:${Math.max(1, p * 300).toFixed(0)}px` }),
        CF.el("span", { text: (p * 100).toFixed(1) + "%" })));
    }
    document.getElementById("result").replaceChildren(bars,
      CF.el("p", { class: "muted", text: `logit scale ${CF.fmt(data.logit_scale, 4)} · ${data.model} · ${data.seconds} s` }));
  }

  async function score() {
    const result = document.getElementById("result");
    const checkpoint = document.getElementById("checkpoint").value;
    const captions = document.getElementById("captions").value.split("\n").map((s) => s.trim()).filter(Boolean);
    if (!checkpoint) return CF.showError(result, "pick a checkpoint");
    if (!state.image) return CF.showError(result, "choose an image");
    if (!captions.length) return CF.showError(result, "type at least one caption, one per line");
    const button = document.getElementById("score");
    button.disabled = true;
    result.replaceChildren(CF.el("p", { class: "muted", text: "scoring (the first call loads the checkpoint)…" }));
    try {
      const resp = await fetch("/api/try", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ checkpoint, image: state.image, captions }) });
      const data = await resp.json();
      if (!resp.ok) throw new Error(data.error || resp.statusText);
      renderResult(data);
    } catch (err) {
      CF.showError(result, err);
    } finally {
      button.disabled = false;
    }
  }

  function build(checkpoints) {
    const select = CF.el("select", { id: "checkpoint" },
      ...checkpoints.map((c) => CF.el("option", { value: c.id, text: `${c.id}  (step ${c.step}, ${c.model})` })));
    const wanted = CF.params.get("checkpoint");
    if (wanted && checkpoints.some((c) => c.id === wanted)) select.value = wanted;
    else if (checkpoints.length) select.value = checkpoints[checkpoints.length - 1].id;
    const preview = CF.el("img", { class: "preview", id: "preview", alt: "", hidden: true });
    const file = CF.el("input", { type: "file", id: "image", accept: "image/*", onchange: (ev) => {
      const f = ev.target.files[0];
      if (!f) return;
      const reader = new FileReader();
      reader.onload = () => { state.image = reader.result; preview.src = reader.result; preview.hidden = false; };
      reader.readAsDataURL(f);
    } });
    const captions = CF.el("textarea", { id: "captions", rows: 8, cols: 40,
      placeholder: "one caption per line, e.g.\na photo of a dog\na photo of a cat" });
    captions.value = CF.params.get("captions") || "";
    CF.fill(page,
      CF.el("h1", { text: "Try a checkpoint" }),
      checkpoints.length ? null : CF.el("p", { class: "muted", text: "No complete checkpoints under this folder yet." }),
      CF.el("div", { class: "two" },
        CF.el("div", { class: "card" },
          CF.el("p", {}, CF.el("label", {}, "checkpoint ", select)),
          CF.el("p", {}, file), preview,
          CF.el("p", {}, captions),
          CF.el("button", { id: "score", onclick: score, text: "Score captions" })),
        CF.el("div", { class: "card" }, CF.el("h2", { text: "Probabilities" }), CF.el("div", { id: "result" }))));
    document.body.dataset.loaded = "1";
  }

  CF.header("/try");
  CF.api("/api/checkpoints").then((d) => { CF.setRoot(d.root); build(d.checkpoints); }).catch((err) => CF.showError(page, err));
})();
