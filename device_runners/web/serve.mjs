// A static server for the web page on 127.0.0.1 only, with the headers multi-threaded WASM
// needs (cross-origin isolation: COOP + COEP).
// Usage: node device_runners/web/serve.mjs [--port 8000] [--root device_runners/web]
// Prints "serving http://127.0.0.1:PORT/" once listening (--port 0: a free port).
import { createReadStream, promises as fs } from "node:fs";
import { createServer } from "node:http";
import { dirname, extname, join, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const { values } = parseArgs({ options: { port: { type: "string", default: "8000" },
  root: { type: "string", default: dirname(fileURLToPath(import.meta.url)) } } });
const ROOT = resolve(values.root);
const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8", ".wasm": "application/wasm",
  ".css": "text/css; charset=utf-8", ".json": "application/json", ".png": "image/png",
  ".svg": "image/svg+xml", ".map": "application/json" };
const HEADERS = { "Cross-Origin-Opener-Policy": "same-origin",
  "Cross-Origin-Embedder-Policy": "require-corp", "Cross-Origin-Resource-Policy": "same-origin",
  "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store" };

const server = createServer(async (req, res) => {
  const send = (code, text) => { res.writeHead(code, { ...HEADERS, "Content-Type": "text/plain" }); res.end(text); };
  if (req.method !== "GET" && req.method !== "HEAD") return send(405, "GET only\n");
  let rel;
  try { rel = decodeURIComponent(new URL(req.url, "http://x").pathname); } catch { return send(400, "bad path\n"); }
  let file = resolve(join(ROOT, rel));
  if (file !== ROOT && !file.startsWith(ROOT + sep)) return send(403, "outside the root\n");
  try {
    if ((await fs.stat(file)).isDirectory()) file = join(file, "index.html");
    const st = await fs.stat(file);
    res.writeHead(200, { ...HEADERS, "Content-Type": TYPES[extname(file)] ?? "application/octet-stream",
      "Content-Length": st.size });
    if (req.method === "HEAD") return res.end();
    createReadStream(file).pipe(res);
  } catch {
    send(404, "not found\n");
  }
});
server.listen(Number(values.port), "127.0.0.1", () => {
  console.log(`serving http://127.0.0.1:${server.address().port}/ (root ${ROOT}; Ctrl-C stops)`);
});
