// One browser cell of tools/runtime_bench: Debian's headless Chromium (playwright-core, never
// a browser download), launched fresh, two fresh contexts (no shared cache):
//  1. the web page (device_runners/web): pick the bundle folder -> "Self-test passed"
//     (page_load_s: reading, sha256, the WASM runtime, sessions, self-test: what a user waits);
//  2. bench.html: measure.mjs on the same bundle and data (load_s, selftest_s, adapt_s, ...).
// Both are served here on 127.0.0.1 with the COOP/COEP headers multi-threaded WASM needs.
// Usage: node tools/runtime_bench/browser_cell.mjs '{"bundle": DIR, "data": FILE,
//   "threads": 1, "adapt": {"seed": 0, "epochs": 30}, "page": true}'  -> one JSON line
import { createReadStream, promises as fs } from "node:fs";
import { createServer } from "node:http";
import { createRequire } from "node:module";
import { basename, dirname, extname, join, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "..", "..");
const require = createRequire(join(ROOT, "device_runners", "js", "package.json"));
const { chromium } = require("playwright-core");
const CHROMIUM = process.env.EDGETL_CHROMIUM ?? "/usr/bin/chromium";
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8", ".wasm": "application/wasm",
  ".css": "text/css; charset=utf-8", ".json": "application/json" };
const HEADERS = { "Cross-Origin-Opener-Policy": "same-origin",
  "Cross-Origin-Embedder-Policy": "require-corp", "Cross-Origin-Resource-Policy": "same-origin",
  "Cache-Control": "no-store" };

const plan = JSON.parse(process.argv[2]);
const T = plan.timeoutMs ?? 300000;
// URL prefix -> folder; /data/NAME is the one data file
const mounts = [["/bench/", HERE], ["/bundle/", resolve(plan.bundle)],
  ["/", join(ROOT, "device_runners", "web")]];
const dataName = basename(plan.data);

const server = createServer(async (req, res) => {
  const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
  let file = null;
  if (path === `/data/${dataName}`) {
    file = resolve(plan.data);
  } else {
    const [prefix, dir] = mounts.find(([p]) => path.startsWith(p));
    file = resolve(join(dir, path.slice(prefix.length)));
    if (file !== dir && !file.startsWith(dir + sep)) file = null;
  }
  try {
    if (file && (await fs.stat(file)).isDirectory()) file = join(file, "index.html");
    const st = await fs.stat(file);
    res.writeHead(200, { ...HEADERS, "Content-Type": TYPES[extname(file)] ?? "application/octet-stream",
      "Content-Length": st.size });
    createReadStream(file).pipe(res);
  } catch {
    res.writeHead(404, HEADERS);
    res.end();
  }
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const url = `http://127.0.0.1:${server.address().port}`;

const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: FLAGS });
const out = { errors: [] };
async function fresh() {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  page.on("pageerror", (e) => out.errors.push(String(e)));
  return [ctx, page];
}
try {
  if (plan.page) {
    const [ctx, page] = await fresh();
    await page.goto(`${url}/?threads=${plan.threads}`);
    await page.waitForSelector("body[data-ready='1']", { timeout: T });
    const t0 = Date.now();
    await page.setInputFiles("#bundle-input", resolve(plan.bundle));
    await page.waitForFunction(() => ["passed", "failed"].includes(
      document.getElementById("selftest").dataset.state), null, { timeout: T, polling: 10 });
    out.page_load_s = (Date.now() - t0) / 1000;
    out.page_selftest = await page.locator("#selftest").innerText();
    if (!out.page_selftest.includes("Self-test passed")) {
      throw new Error(`the web page did not pass the self-test: ${out.page_selftest} ` +
        await page.locator("#error").innerText());
    }
    await ctx.close();
  }
  const [ctx, page] = await fresh();
  await page.goto(`${url}/bench/bench.html`);
  await page.waitForFunction(() => globalThis.benchReady === true, null, { timeout: T });
  out.startup_s = await page.evaluate(() => globalThis.startup_s);
  Object.assign(out, await page.evaluate((p) => globalThis.runBench(p),
    { threads: plan.threads, adapt: plan.adapt, dataName }));
  out.chromium = browser.version();
  await ctx.close();
} finally {
  await browser.close();
  server.close();
}
console.log(JSON.stringify(out));
