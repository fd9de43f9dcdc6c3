// Open the LiteRT.js page (tests/web/litert/) in Debian's headless Chromium with playwright-core
// (never a browser download) and print its result as JSON.
// Usage: node tests/web/litert_drive.mjs URL USER_DATA_DIR
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const require = createRequire(join(ROOT, "device_runners", "js", "package.json"));
const { chromium } = require("playwright-core");
const CHROMIUM = process.env.EDGETL_CHROMIUM ?? "/usr/bin/chromium";
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

const [url, userDataDir] = process.argv.slice(2);
const origin = new URL(url).origin;
const ctx = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM, headless: true, args: FLAGS });
const foreign = [], errors = [];
try {
  const page = ctx.pages()[0] ?? await ctx.newPage();
  page.on("request", (r) => {
    const u = r.url();
    if (!u.startsWith(origin + "/") && !u.startsWith("blob:") && !u.startsWith("data:")) foreign.push(u);
  });
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => globalThis.__result !== undefined, null, { timeout: 120000 });
  const result = await page.evaluate(() => globalThis.__result);
  console.log(JSON.stringify({ ...result, foreign_requests: foreign, page_errors: errors }));
} finally {
  await ctx.close();
}
