// Runs the React Native example's flow in Node (tests/test_js_runner.py): AppFiles on node:fs,
// the bundle served on 127.0.0.1, onnxruntime-node standing in for onnxruntime-react-native.
// usage: node --import tests/rn/register.mjs tests/rn/drive.mjs EXAMPLE.js BUNDLE PUB.pem
//          OTHER.pem LOG.csv PHONE_DIR  -> one JSON object on stdout
import { promises as fs } from "node:fs";
import * as http from "node:http";
import * as path from "node:path";
import { pathToFileURL } from "node:url";

const [example, bundleDir, pubPem, otherPem, csvPath, phone] = process.argv.slice(2);
const rn = await import(pathToFileURL(path.resolve(example)).href);
const root = path.resolve(bundleDir);
const served = [];
const server = http.createServer(async (req, res) => {
  served.push(req.url);
  try { res.end(await fs.readFile(path.join(root, decodeURIComponent(req.url.slice(1))))); }
  catch { res.statusCode = 404; res.end(); }
}).listen(0, "127.0.0.1");
await new Promise((r) => server.once("listening", r));
const url = `http://127.0.0.1:${server.address().port}`;
const write = async (p, d) => {
  await fs.mkdir(path.dirname(p), { recursive: true });
  await fs.writeFile(p + ".tmp", d);
  await fs.rename(p + ".tmp", p);
};
const appFiles = {
  filesDir: path.resolve(phone, "files"),
  exists: (p) => fs.access(p).then(() => true, () => false),
  readBytes: async (p) => new Uint8Array(await fs.readFile(p)),
  readText: (p) => fs.readFile(p, "utf8"),
  writeFile: write,
  copy: (a, b) => fs.copyFile(a, b),
  remove: (p) => fs.rm(p, { recursive: true, force: true }),
  download: async (u, p) => {
    const r = await fetch(u);
    if (!r.ok) throw new Error(`${u}: HTTP ${r.status}`);
    await write(p, new Uint8Array(await r.arrayBuffer()));
  },
  readAsset: async (p) => new Uint8Array(await fs.readFile(path.resolve(phone, "assets", p))),
};
const out = { lines: [], refused: {} };
const pem = await fs.readFile(pubPem, "utf8");
const refuse = async (what, f) => {
  try { await f(); out.refused[what] = null; } catch (e) { out.refused[what] = e.message; }
};
try {
  // a wrong trust key: refused before any other file is fetched
  await refuse("other key", async () => rn.installBundle(appFiles, { url },
    await fs.readFile(otherPem, "utf8")));
  out.served_with_other_key = [...served];
  await rn.demo(appFiles, url, pem, path.resolve(csvPath), (l) => out.lines.push(l));
  const m = JSON.parse(await fs.readFile(path.join(root, "manifest.json"), "utf8"));
  const where = rn.paths(appFiles, m);
  out.paths = where;
  // an installed file changed on the phone: refused when the bundle is opened
  const bb = path.join(where.bundle, m.files.backbone.path);
  const orig = await fs.readFile(bb);
  const bad = Buffer.from(orig);
  bad[bad.length - 1] ^= 1;
  await fs.writeFile(bb, bad);
  await refuse("tampered file", () => rn.openBundle(appFiles, where.bundle, pem));
  await fs.writeFile(bb, orig);
  // an older version shipped in the APK's assets: refused (versions.json)
  const assets = path.resolve(phone, "assets", "old");
  await fs.cp(root, assets, { recursive: true });
  await fs.writeFile(path.join(assets, "manifest.json"), JSON.stringify({ ...m, version: m.version - 1 }));
  await refuse("older version", () => rn.installBundle(appFiles, { asset: "old" }));
  // predictions on a recording made with sensorCsv (no label column)
  const bundle = await rn.openBundle(appFiles, where.bundle, pem);
  const { backend } = await rn.start(bundle);
  const n = 2 * (m.input.window ?? 1);
  const rec = rn.sensorCsv(bundle.manifest, Array.from({ length: n },
    (_, i) => bundle.manifest.input.channels.map((_, c) => Math.sin(i / 7 + c))));
  out.predict = await rn.predict(appFiles, bundle, backend, rec);
  out.leftover_download = await appFiles.exists(path.join(appFiles.filesDir, "edgetl", "download"));
} finally {
  server.close();
}
console.log(JSON.stringify(out));
