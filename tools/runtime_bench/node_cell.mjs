// One cell of tools/runtime_bench in a fresh Node process: the TypeScript runner
// (device_runners/js/dist) on onnxruntime-node, onnxruntime-web's WASM build (1 thread) or
// LiteRT.js (compat WASM), timed by measure.mjs. `imported_at`: epoch seconds once the runner
// and the runtime module are imported (the caller knows when it started the process).
// Usage: node tools/runtime_bench/node_cell.mjs '{"runtime": "node"|"web"|"litert",
//   "bundle": DIR, "data": FILE, "adapt": {"seed": 0, "epochs": 30}}'  -> one JSON line
import { readFile } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath, pathToFileURL } from "node:url";
import { measure } from "./measure.mjs";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const JS = join(ROOT, "device_runners", "js");
const DIST = join(JS, "dist");
const plan = JSON.parse(process.argv[2]);
const E = await import(pathToFileURL(join(DIST, "index.js")).href);
let makeBackend;
if (plan.runtime === "litert") {
  const { loadLiteRtNode } = await import(pathToFileURL(join(DIST, "node.js")).href);
  makeBackend = async (b) => { // its WASM loaded with the first model, as in the web page
    const { lrt, version } = await loadLiteRtNode();
    return E.LiteRtBackend.create(lrt, b, { name: "litert.js", version });
  };
} else {
  // the modules `import("onnxruntime-node" | "onnxruntime-web")` gives the CLI
  const req = createRequire(join(JS, "package.json"));
  const ort = await import(pathToFileURL(plan.runtime === "node" ? req.resolve("onnxruntime-node")
    : join(JS, "node_modules", "onnxruntime-web", "dist", "ort.node.min.mjs")).href);
  if (plan.runtime === "web") ort.env.wasm.numThreads = 1; // as the CLI: WASM threads need workers
  makeBackend = (b) => E.OrtBackend.create(ort, b, { name: `onnxruntime-${plan.runtime}` });
}
const importedAt = Date.now() / 1000; // the runner and the runtime module imported
const r = await measure(E, {
  readFiles: async () => { // the manifest and the files it lists, as loadBundleDir reads them
    const files = new Map([["manifest.json", new Uint8Array(await readFile(join(plan.bundle, "manifest.json")))]]);
    const m = JSON.parse(new TextDecoder().decode(files.get("manifest.json")));
    for (const e of Object.values(m.files)) {
      files.set(e.path, new Uint8Array(await readFile(join(plan.bundle, e.path))));
    }
    return files;
  },
  readData: async () => [new Uint8Array(await readFile(plan.data)), basename(plan.data)],
  makeBackend, adapt: plan.adapt,
});
console.log(JSON.stringify({ ...r, imported_at: importedAt }));
