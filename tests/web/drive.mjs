// Drive the edgetl web page in Debian's headless Chromium with playwright-core (never a
// browser download). Usage: node tests/web/drive.mjs PLAN.json  -> JSON results on stdout.
//
// PLAN: {"url": "http://127.0.0.1:PORT/", "userDataDir": "/tmp/x", "outDir": "/tmp/out",
//        "steps": [{"goto": "?threads=1"}, {"bundle": DIR}, {"data": FILE},
//                  {"adapt": {"epochs": 6, "seed": 9}, "save": "t1"}, {"screenshot": PNG}]}
// {"trust": PEM} picks a trust key (then the picked bundle is checked again).
// {"folder": DIR} picks a folder of photos (image bundles); {"decode": FILE} decodes one image
// with the page's decoder and returns its RGBA bytes (base64), width and height.
// {"drop": "#bundle-drop" | "#data-drop", "files": [PATH...]} drops files on a drop zone.
// Each "bundle"/"data"/"drop" step reports the page's status text, or its error box when it refused
// the input; "adapt" saves the downloaded head.npz and report.json under outDir/save/.
import { mkdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const require = createRequire(join(ROOT, "device_runners", "js", "package.json"));
const { chromium } = require("playwright-core");

export const CHROMIUM = process.env.EDGETL_CHROMIUM ?? "/usr/bin/chromium";
export const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

const plan = JSON.parse(readFileSync(process.argv[2], "utf8"));
const origin = new URL(plan.url).origin;
const ctx = await chromium.launchPersistentContext(plan.userDataDir, {
  executablePath: CHROMIUM, headless: true, args: FLAGS, acceptDownloads: true,
  viewport: { width: 900, height: 1200 } });
const out = { steps: [], foreign_requests: [], console_errors: [] };
const page = ctx.pages()[0] ?? await ctx.newPage();
page.on("request", (r) => {
  const u = r.url();
  if (!u.startsWith(origin + "/") && !u.startsWith("blob:") && !u.startsWith("data:")) {
    out.foreign_requests.push(u);
  }
});
page.on("console", (m) => { if (m.type() === "error") out.console_errors.push(m.text()); });
page.on("pageerror", (e) => out.console_errors.push(String(e)));
const T = plan.timeoutMs ?? 60000;
const text = (sel) => page.locator(sel).innerText();
const errorShown = () => page.locator("#error").isVisible();

// Clear the markers a step waits for, so that a step cannot read the previous one's outcome
// (the page sets them again when it handles the new input).
const unmark = (bundle, data) => page.evaluate(([b, d]) => {
  document.getElementById("error").hidden = true;
  if (b) document.getElementById("selftest").dataset.state = "idle";
  if (d) document.getElementById("data-info").hidden = true;
}, [bundle, data]);

async function outcome(okSel) {
  // the page shows either okSel or its error box
  await page.waitForFunction((s) => !!document.querySelector(s) ||
    !document.getElementById("error").hidden, okSel, { timeout: T });
  if (await errorShown()) return { ok: false, error: await text("#error") };
  return { ok: true };
}

try {
  for (const step of plan.steps) {
    const t0 = Date.now();
    let r = {};
    if (step.goto === undefined && step.screenshot === undefined) {
      const bundleStep = step.bundle !== undefined || step.trust !== undefined ||
        step.drop === "#bundle-drop";
      await unmark(bundleStep, step.data !== undefined || step.folder !== undefined ||
        step.drop === "#data-drop");
    }
    if (step.goto !== undefined) {
      await page.goto(new URL(step.goto, plan.url).href);
      await page.waitForSelector("body[data-ready='1']", { timeout: T });
      r = { runtime: await text("#runtime"),
        isolated: await page.evaluate(() => globalThis.crossOriginIsolated) };
    } else if (step.bundle !== undefined) {
      await page.setInputFiles("#bundle-input", step.bundle);
      r = await outcome("#selftest[data-state='passed'], #selftest[data-state='failed']");
      r.selftest = await text("#selftest");
      if (r.ok) r.manifest = await text("#bundle-info");
    } else if (step.trust !== undefined) {
      // a trust key (PEM): the page re-checks the picked bundle with it
      await page.setInputFiles("#trust-input", step.trust);
      r = await outcome("#selftest[data-state='passed']");
      r.selftest = await text("#selftest");
      if (r.ok) r.manifest = await text("#bundle-info");
    } else if (step.drop !== undefined) {
      // drag and drop: the files (flat, by name) dropped on a drop zone
      const files = step.files.map((p) => ({ name: p.split("/").pop(),
        b64: readFileSync(p).toString("base64") }));
      const dt = await page.evaluateHandle((fs) => {
        const d = new DataTransfer();
        for (const f of fs) d.items.add(new File([Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0))], f.name));
        return d;
      }, files);
      await page.dispatchEvent(step.drop, "drop", { dataTransfer: dt });
      r = await outcome(step.drop === "#bundle-drop"
        ? "#selftest[data-state='passed'], #selftest[data-state='failed']" : "#data-info:not([hidden])");
      if (r.ok) r.status = await text(step.drop === "#bundle-drop" ? "#selftest" : "#data-info");
    } else if (step.folder !== undefined) {
      await page.setInputFiles("#folder-input", step.folder);
      r = await outcome("#data-info:not([hidden])");
      r.progress = await page.evaluate(() => {
        const p = document.getElementById("progress");
        return [p.value, p.max];
      });
      r.progress_text = await text("#progress-text");
      if (r.ok) r.info = await text("#data-info");
    } else if (step.decode !== undefined) {
      r = await page.evaluate(async (b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const im = await globalThis.edgetl.decodeImage(new Blob([bytes]));
        let s = "";
        for (let i = 0; i < im.data.length; i += 8192) {
          s += String.fromCharCode(...im.data.subarray(i, i + 8192));
        }
        return { width: im.width, height: im.height, rgba: btoa(s) };
      }, readFileSync(step.decode).toString("base64"));
    } else if (step.data !== undefined) {
      await page.setInputFiles("#data-input", step.data);
      r = await outcome("#data-info:not([hidden])");
      if (r.ok) r.info = await text("#data-info");
    } else if (step.adapt !== undefined) {
      for (const [k, v] of Object.entries(step.adapt)) await page.fill(`#${k}`, String(v));
      await page.click("#personalise");
      r = await outcome("#result[data-state='done']");
      r.progress = await page.evaluate(() => {
        const p = document.getElementById("progress");
        return [p.value, p.max];
      });
      r.progress_text = await text("#progress-text");
      if (r.ok) {
        r.decision = await text("#decision");
        const dir = join(plan.outDir, step.save ?? "adapt");
        mkdirSync(dir, { recursive: true });
        for (const [id, name] of [["download-head", "head.npz"], ["download-report", "report.json"]]) {
          const [dl] = await Promise.all([page.waitForEvent("download", { timeout: T }),
            page.click(`#${id}`)]);
          await dl.saveAs(join(dir, name));
        }
        r.saved = dir;
      }
    } else if (step.screenshot !== undefined) {
      await page.screenshot({ path: step.screenshot, fullPage: true });
    }
    r.seconds = (Date.now() - t0) / 1000;
    out.steps.push(r);
  }
} finally {
  await ctx.close();
}
console.log(JSON.stringify(out));
