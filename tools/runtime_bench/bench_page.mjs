// The browser side of tools/runtime_bench (bench.html): runBench(plan) times the TypeScript
// runner on the bundle served at /bundle/ and the data at /data/NAME, on onnxruntime-web
// (WASM, plan.threads threads) or LiteRT.js (WASM), as the web page loads them: the WASM
// runtime is instantiated with the first session, inside load_s.
import * as E from "@edgetl/edgerun";
import * as ort from "onnxruntime-web";
import { measure } from "./measure.mjs";

const bytes = async (url) => {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`GET ${url}: ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
};

async function makeBackend(bundle, plan) {
  if (bundle.manifest.target !== "tflite") {
    ort.env.wasm.numThreads = plan.threads;
    ort.env.wasm.wasmPaths = "/dist/ort/";
    ort.env.logLevel = "error";
    return E.OrtBackend.create(ort, bundle, { name: "onnxruntime-web", threads: plan.threads });
  }
  const spec = "@litertjs/core";
  const lrt = await import(spec);
  await lrt.loadLiteRt("/dist/litert/wasm/");
  const { version } = await (await fetch("/dist/litert/version.json")).json();
  return E.LiteRtBackend.create(lrt, bundle, { name: "litert.js", version });
}

globalThis.runBench = async (plan) => {
  const r = await measure(E, {
    readFiles: async () => {
      const files = new Map([["manifest.json", await bytes("/bundle/manifest.json")]]);
      const m = JSON.parse(new TextDecoder().decode(files.get("manifest.json")));
      for (const e of Object.values(m.files)) files.set(e.path, await bytes(`/bundle/${e.path}`));
      return files;
    },
    readData: async () => [await bytes(`/data/${plan.dataName}`), plan.dataName],
    makeBackend: (b) => makeBackend(b, plan), adapt: plan.adapt,
  });
  return { ...r, threads: r.backend.startsWith("litert") ? 1 : plan.threads,
    isolated: globalThis.crossOriginIsolated };
};

globalThis.startup_s = performance.now() / 1000; // navigation start -> modules imported
globalThis.benchReady = true;
document.getElementById("out").textContent = "ready";
