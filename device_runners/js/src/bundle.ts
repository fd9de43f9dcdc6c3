/**
 * A verified bundle from its files (`{path: bytes}`): manifest parsed once and checked,
 * every listed file's sha256 verified (WebCrypto), the Ed25519 signature `manifest.sig`
 * checked over the manifest's bytes when a trust key (PEM public key) is given.
 */
import { parseManifest } from "./check.js";
import { RunnerError } from "./errors.js";
import { Manifest } from "./manifest.js";

export const MANIFEST = "manifest.json";
export const SIGNATURE = "manifest.sig";
export const MAX_MANIFEST_BYTES = 4 << 20;

export type BundleFiles = Map<string, Uint8Array> | Record<string, Uint8Array>;

interface SubtleLike {
  digest(alg: string, data: BufferSource): Promise<ArrayBuffer>;
  importKey(f: "spki", k: BufferSource, a: { name: string }, x: boolean,
    u: string[]): Promise<unknown>;
  verify(a: { name: string }, k: unknown, s: BufferSource, d: BufferSource): Promise<boolean>;
}

async function subtle(): Promise<SubtleLike> {
  const c = (globalThis as { crypto?: { subtle?: SubtleLike } }).crypto;
  if (c?.subtle) return c.subtle;
  try { // Node without the global (older builds): node:crypto's webcrypto
    const mod = await import("node:crypto");
    return (mod.webcrypto as unknown as { subtle: SubtleLike }).subtle;
  } catch {
    throw new RunnerError("no WebCrypto on this platform (crypto.subtle); it is needed to " +
      "verify the bundle's sha256. Serve the page over https or localhost");
  }
}

function hex(buf: ArrayBuffer): string {
  return Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");
}

function ab(b: Uint8Array): Uint8Array<ArrayBuffer> {
  return b.slice() as Uint8Array<ArrayBuffer>;
}

/** Hex sha256 of bytes (WebCrypto). */
export async function sha256(bytes: Uint8Array): Promise<string> {
  return hex(await (await subtle()).digest("SHA-256", ab(bytes)));
}

function pemBody(pem: string, what: string): Uint8Array {
  const m = /-----BEGIN PUBLIC KEY-----([\s\S]+?)-----END PUBLIC KEY-----/.exec(pem);
  if (!m) {
    throw new RunnerError(`${what} is not a PEM public key (no "BEGIN PUBLIC KEY" block); pass ` +
      "the .pem that `edgetl keygen` wrote");
  }
  const b64 = m[1].replace(/\s+/g, "");
  const bin = atob(b64);
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

/** Check `manifest.sig` (Ed25519 over the manifest's bytes) against a PEM public key. */
export async function verifySignature(body: Uint8Array, sig: Uint8Array | undefined,
  pem: string, what = "the trust key"): Promise<void> {
  if (!sig) {
    throw new RunnerError(`the bundle is not signed (no ${SIGNATURE}) but a trust key was ` +
      "given; refusing it. Sign it with `edgetl export --sign-key`");
  }
  const s = await subtle();
  let key: unknown;
  try {
    key = await s.importKey("spki", ab(pemBody(pem, what)), { name: "Ed25519" }, false,
      ["verify"]);
  } catch (e) {
    if (e instanceof RunnerError) throw e;
    throw new RunnerError(`${what} is not a readable Ed25519 public key, or this platform's ` +
      `WebCrypto has no Ed25519 (${String(e).slice(0, 120)})`);
  }
  let ok = false;
  try {
    ok = await s.verify({ name: "Ed25519" }, key, ab(sig), ab(body));
  } catch { ok = false; }
  if (!ok) {
    throw new RunnerError(`manifest.json's signature does not verify with ${what} (wrong key, ` +
      "or the manifest was modified); refusing it");
  }
}

/** Whether `rel` names a file directly inside the bundle (no folders, `..`, NUL, absolute). */
export function checkRelPath(rel: string): void {
  if (rel.includes("\0") || rel.includes("/") || rel.includes("\\") || rel === "." ||
    rel === ".." || rel === "" || /^[A-Za-z]:/.test(rel)) {
    throw new RunnerError(`manifest file ${JSON.stringify(rel)} points outside the bundle; ` +
      "refusing it");
  }
}

export interface BundleOptions {
  /** PEM text of the Ed25519 public key the manifest must be signed with. */
  trustKey?: string;
  /** A name for messages (default: the bundle's manifest name). */
  source?: string;
  /** Verify every file's sha256 (default true). */
  verify?: boolean;
}

/** A verified bundle: `manifest` and `file(role)` for its files' bytes. */
export class Bundle {
  private constructor(readonly manifest: Manifest, readonly manifestSha256: string,
    private readonly files: Map<string, Uint8Array>, readonly source: string) {}

  static async fromFiles(files: BundleFiles, opts: BundleOptions = {}): Promise<Bundle> {
    const map = files instanceof Map ? files : new Map(Object.entries(files));
    const src = opts.source ?? "bundle";
    const body = map.get(MANIFEST);
    if (!body) throw new RunnerError(`${src} has no ${MANIFEST}; is it an edgetl bundle?`);
    if (body.length > MAX_MANIFEST_BYTES) {
      throw new RunnerError(`${src}/${MANIFEST} is larger than ${MAX_MANIFEST_BYTES >> 20} MiB; ` +
        "not a manifest");
    }
    if (opts.trustKey) await verifySignature(body, map.get(SIGNATURE), opts.trustKey);
    const m = parseManifest(body);
    const b = new Bundle(m, await sha256(body), map, src);
    if (opts.verify !== false) await b.verify();
    return b;
  }

  /** The bytes of the file with `role` (e.g. `backbone`). */
  file(role: string): Uint8Array {
    const entry = this.manifest.files[role];
    if (!entry) {
      throw new RunnerError(`manifest lists no file for role '${role}'; known roles: ` +
        `${JSON.stringify(Object.keys(this.manifest.files).sort())}`);
    }
    checkRelPath(entry.path);
    const b = this.files.get(entry.path);
    if (!b) throw new RunnerError(`bundle file ${entry.path} (${role}) is missing from ${this.source}`);
    return b;
  }

  /** Every listed file is present and matches its sha256. */
  async verify(): Promise<void> {
    for (const [role, entry] of Object.entries(this.manifest.files)) {
      checkRelPath(entry.path);
      const b = this.files.get(entry.path);
      if (!b) {
        throw new RunnerError(`bundle file ${entry.path} (${role}) is missing from ${this.source}`);
      }
      const d = await sha256(b);
      if (d !== entry.sha256) {
        throw new RunnerError(`bundle file ${entry.path} (${role}) fails its hash check: sha256 ` +
          `${d.slice(0, 12)}… but manifest.json says ${entry.sha256.slice(0, 12)}…; the file ` +
          "was modified or corrupted. Re-download the bundle");
      }
    }
  }

  get labels(): string[] {
    return [...this.manifest.labels];
  }
}
