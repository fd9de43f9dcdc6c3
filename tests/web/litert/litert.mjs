// Run plan.json's calls with LiteRT.js on its WASM CPU build and leave the outputs in
// globalThis.__result (read by tests/web/litert_drive.mjs).
// plan: {"models": {KEY: URL}, "calls": [{"model": KEY, "signature": NAME,
//        "feeds": {NAME: {"data": [...], "dims": [...]}}, "carry": {INPUT: OUTPUT}}]}
// "carry" feeds an output of the previous call (a train step's new.weight -> weight).
// result: {"loaded": {KEY: true | "error text"}, "calls": [{"outputs": {NAME: {"data",
//          "dims"}}, "ms": ...} | {"error": "..."}], "version": ...}
import { loadAndCompile, loadLiteRt, Tensor } from "@litertjs/core";

const msg = (e) => String(e && e.message ? e.message : e);

async function main() {
  const plan = await (await fetch("./plan.json")).json();
  await loadLiteRt("./core/wasm/");
  const models = {}, loaded = {};
  for (const [key, url] of Object.entries(plan.models)) {
    try {
      const bytes = new Uint8Array(await (await fetch(url)).arrayBuffer());
      models[key] = await loadAndCompile(bytes, { accelerator: "wasm" });
      loaded[key] = true;
    } catch (e) {
      loaded[key] = msg(e);
    }
  }
  const calls = [];
  for (const c of plan.calls) {
    if (!models[c.model]) { calls.push({ error: `model ${c.model} not loaded` }); continue; }
    const feeds = {};
    try {
      const prev = calls.length ? calls[calls.length - 1].outputs : undefined;
      const given = { ...c.feeds };
      for (const [inp, out] of Object.entries(c.carry ?? {})) given[inp] = prev[out];
      for (const [k, v] of Object.entries(given)) {
        feeds[k] = new Tensor(Float32Array.from(v.data), v.dims);
      }
      const t0 = performance.now();
      const outs = await models[c.model].signatures[c.signature].run(feeds);
      const ms = performance.now() - t0;
      const outputs = {};
      for (const [k, t] of Object.entries(outs)) {
        const host = t.accelerator !== "wasm" ? await t.moveTo("wasm") : t; // CPU memory to read
        outputs[k] = { data: Array.from(host.toTypedArray()),
          dims: Array.from(host.type.layout.dimensions) };
        if (host !== t) host.delete();
        t.delete();
      }
      calls.push({ outputs, ms });
    } catch (e) {
      calls.push({ error: msg(e) });
    } finally {
      for (const t of Object.values(feeds)) t.delete();
    }
  }
  return { loaded, calls };
}

main().then((r) => { globalThis.__result = r; },
  (e) => { globalThis.__result = { error: msg(e) }; })
  .finally(() => { document.getElementById("out").textContent = "done"; });
