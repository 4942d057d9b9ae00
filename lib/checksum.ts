/**
 * CRC32C (Castagnoli), the checksum of every entry header and payload. Computed by
 * `@node-rs/crc32` (a Node-API addon using the CPU's CRC32 instruction, ~5 GB/s here) when it
 * loads, else by hash-wasm's WebAssembly CRC (~2 GB/s) — the same numbers either way.
 *
 * @module
 */
import { createCRC32, type IHasher } from "hash-wasm";
import { assert } from "./_assert.ts";

const CRC32C_POLYNOMIAL = 0x82F63B78;
/** CRC32C of the ASCII bytes "123456789", the standard check value. */
const CRC32C_CHECK = 0xe3069283;

/** A CRC32C continued from `initial` (the CRC of the bytes before), as the addon computes it. */
type Crc32cFn = (bytes: Uint8Array, initial?: number) => number;

const native: Crc32cFn | undefined = await loadNative();
const hasher: IHasher = await createCRC32(CRC32C_POLYNOMIAL);

async function loadNative(): Promise<Crc32cFn | undefined> {
  if (Deno.env.get("SECTORLOG_CRC32C") === "wasm") return undefined;
  try {
    // A computed specifier keeps bundlers from inlining the addon's platform-specific loader;
    // where it cannot be resolved (a bundled build) the WebAssembly CRC serves.
    const specifier = ["@node-rs", "crc32"].join("/");
    const addon = await import(specifier);
    const crc = addon.crc32c as Crc32cFn;
    const check = new TextEncoder().encode("123456789");
    return crc(check) >>> 0 === CRC32C_CHECK ? crc : undefined;
  } catch {
    // No addon for this platform, or no FFI permission: the WebAssembly CRC serves.
    return undefined;
  }
}

/** Which implementation computes CRC32C in this process. */
export const CRC32C_IMPLEMENTATION: "native" | "wasm" = native === undefined ? "wasm" : "native";

/**
 * Returns the CRC32C of `bytes` as an unsigned 32-bit integer.
 *
 * @example
 * ```ts
 * import { crc32c } from "./checksum.ts";
 * crc32c(new TextEncoder().encode("123456789")); // 0xe3069283
 * ```
 */
export function crc32c(bytes: Uint8Array): number {
  if (native !== undefined) return native(bytes) >>> 0;
  hasher.init();
  hasher.update(bytes);
  return digestToUint32(hasher.digest("binary"));
}

/** A CRC32C as manifests and the wire write it: 8 lowercase hex digits. */
export function crc32cHex(crc: number): string {
  return (crc >>> 0).toString(16).padStart(8, "0");
}

/** A CRC32C computed over many chunks, for data that arrives a buffer at a time. */
export class Crc32cStream {
  #crc = 0;
  #hasher: IHasher | undefined;
  #ready = false;

  /** Starts a new checksum. Call {@linkcode Crc32cStream.init} before the first update. */
  async init(): Promise<void> {
    this.#crc = 0;
    if (native === undefined) {
      this.#hasher = await createCRC32(CRC32C_POLYNOMIAL);
      this.#hasher.init();
    }
    this.#ready = true;
  }

  /** Adds `bytes` to the checksum. */
  update(bytes: Uint8Array): void {
    if (!this.#ready) throw new Error("Crc32cStream.update() before init()");
    if (native !== undefined) this.#crc = native(bytes, this.#crc) >>> 0;
    else this.#hasher!.update(bytes);
  }

  /** Returns the checksum as 8 lowercase hex digits. */
  digestHex(): string {
    if (!this.#ready) throw new Error("Crc32cStream.digestHex() before init()");
    if (native !== undefined) return crc32cHex(this.#crc);
    return this.#hasher!.digest("hex");
  }
}

function digestToUint32(digest: Uint8Array): number {
  return ((digest[0] << 24) | (digest[1] << 16) | (digest[2] << 8) | digest[3]) >>> 0;
}

/**
 * Multiplies two polynomials modulo the CRC32C polynomial, in the reflected bit order CRCs use.
 * `a` must not be zero.
 */
function multiplyModP(a: number, b: number): number {
  let m = 0x8000_0000;
  let product = 0;
  for (;;) {
    if ((a & m) !== 0) {
      product ^= b;
      if ((a & (m - 1)) === 0) break;
    }
    m >>>= 1;
    b = (b & 1) !== 0 ? (b >>> 1) ^ CRC32C_POLYNOMIAL : b >>> 1;
  }
  return product >>> 0;
}

/**
 * x^(2^k) modulo the polynomial, for k = 0..63 (x^1 is 1 << 30 in reflected order). zlib keeps 32
 * entries and wraps k, which relies on x^(2^32) ≡ x: true for its polynomial, false for the
 * Castagnoli one (the wrap gave wrong results for runs of 512 MiB and more), so every k a safe
 * integer byte count needs (3 + 53 bits) has its own entry.
 */
const X_POW_2K: number[] = (() => {
  const table = [1 << 30];
  for (let k = 1; k < 64; k++) table.push(multiplyModP(table[k - 1], table[k - 1]));
  return table;
})();

/** x^(8 × bytes) modulo the polynomial: what appending `bytes` zero bytes multiplies by. */
function xPowBytes(bytes: number): number {
  assert(Number.isSafeInteger(bytes) && bytes >= 0, `bad byte count ${bytes}`);
  let p = 0x8000_0000; // x^0
  let k = 3; // 8 × bytes = bytes × 2^3
  for (let n = bytes; n > 0; n = Math.floor(n / 2), k++) {
    if (n % 2 === 1) p = multiplyModP(X_POW_2K[k], p);
  }
  return p;
}

/**
 * The CRC32C of `A ‖ B` from the CRC32C of `A`, the CRC32C of `B` and B's length, without
 * reading either (zlib's crc32_combine, for the Castagnoli polynomial).
 */
export function crc32cCombine(crcA: number, crcB: number, bytesB: number): number {
  if (bytesB === 0) return crcA >>> 0;
  return (multiplyModP(xPowBytes(bytesB), crcA >>> 0) ^ crcB) >>> 0;
}

/** The CRC32C of `bytes` zero bytes, in O(log bytes): holes are checksummed without reading. */
export function crc32cOfZeros(bytes: number): number {
  if (bytes === 0) return 0;
  return (multiplyModP(xPowBytes(bytes), 0xffff_ffff) ^ 0xffff_ffff) >>> 0;
}
