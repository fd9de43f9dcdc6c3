// Build the web page into device_runners/web/dist/: the page script (tsc, ES modules), the
// TypeScript runner's browser modules (device_runners/js/dist, without the Node-only cli.js
// and node.js), onnxruntime-web's WASM build and LiteRT.js (@litertjs/core: its module, the
// wasm-utils bundle it imports and its WASM CPU builds, relaxed-SIMD and compat). Needs `make js-install` (npm ci + tsc) first.
// Usage: node device_runners/web/build.mjs
import { execFileSync } from "node:child_process";
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const WEB = dirname(fileURLToPath(import.meta.url));
const JS = join(WEB, "..", "js");
const DIST = join(WEB, "dist");
const NODE_ONLY = new Set(["cli.js", "node.js"]);
// onnxruntime-web's WASM-only entry point and the module + binary it loads
const ORT_FILES = ["ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"];

function need(path, what) {
  if (!existsSync(path)) {
    console.error(`error: ${path} is missing (${what}); run \`make js-install\` first`);
    process.exit(1);
  }
}

need(join(JS, "node_modules", "typescript"), "npm ci in device_runners/js");
need(join(JS, "dist", "index.js"), "tsc -p device_runners/js");
rmSync(DIST, { recursive: true, force: true });
execFileSync(process.execPath, [join(JS, "node_modules", "typescript", "bin", "tsc"), "-p", WEB],
  { stdio: "inherit" });
mkdirSync(join(DIST, "edgerun"), { recursive: true });
for (const f of readdirSync(join(JS, "dist"))) {
  if (f.endsWith(".js") && !NODE_ONLY.has(f)) cpSync(join(JS, "dist", f), join(DIST, "edgerun", f));
}
mkdirSync(join(DIST, "ort"), { recursive: true });
for (const f of ORT_FILES) {
  const src = join(JS, "node_modules", "onnxruntime-web", "dist", f);
  need(src, "onnxruntime-web in device_runners/js/node_modules");
  cpSync(src, join(DIST, "ort", f));
}
const LRT = join(JS, "node_modules", "@litertjs");
const LRT_FILES = [["core/dist/index.js", "core/index.js"], ["wasm-utils/dist/bundle.js", "wasm-utils/bundle.js"],
  ...["litert_wasm_internal", "litert_wasm_compat_internal"].flatMap((b) =>
    [".js", ".wasm"].map((e) => [`core/wasm/${b}${e}`, `wasm/${b}${e}`]))];
for (const [src, dst] of LRT_FILES) {
  need(join(LRT, src), "@litertjs/core in device_runners/js/node_modules");
  mkdirSync(dirname(join(DIST, "litert", dst)), { recursive: true });
  cpSync(join(LRT, src), join(DIST, "litert", dst));
}
const lrtVersion = JSON.parse(readFileSync(join(LRT, "core", "package.json"), "utf8")).version;
writeFileSync(join(DIST, "litert", "version.json"), JSON.stringify({ version: lrtVersion }));
console.log(`built ${DIST}`);
