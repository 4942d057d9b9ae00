/**
 * CRC32C (Castagnoli), the checksum of every entry header and payload. Computed by hash-wasm's
 * WebAssembly CRC, which runs synchronously once the module has been instantiated at import.
 *
 * @module
 */
import { createCRC32, type IHasher } from "hash-wasm";

const CRC32C_POLYNOMIAL = 0x82F63B78;

const hasher: IHasher = await createCRC32(CRC32C_POLYNOMIAL);

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
  hasher.init();
  hasher.update(bytes);
  return digestToUint32(hasher.digest("binary"));
}

/** A CRC32C computed over many chunks, for snapshots that are read a buffer at a time. */
export class Crc32cStream {
  #hasher: IHasher | undefined;

  /** Starts a new checksum. Call {@linkcode Crc32cStream.init} before the first update. */
  async init(): Promise<void> {
    this.#hasher = await createCRC32(CRC32C_POLYNOMIAL);
    this.#hasher.init();
  }

  /** Adds `bytes` to the checksum. */
  update(bytes: Uint8Array): void {
    if (this.#hasher === undefined) throw new Error("Crc32cStream.update() before init()");
    this.#hasher.update(bytes);
  }

  /** Returns the checksum as 8 lowercase hex digits. */
  digestHex(): string {
    if (this.#hasher === undefined) throw new Error("Crc32cStream.digestHex() before init()");
    return this.#hasher.digest("hex");
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

/** x^(2^k) modulo the polynomial, for k = 0..31 (x^1 is 1 << 30 in reflected order). */
const X_POW_2K: number[] = (() => {
  const table = [1 << 30];
  for (let k = 1; k < 32; k++) table.push(multiplyModP(table[k - 1], table[k - 1]));
  return table;
})();

/** x^(8 × bytes) modulo the polynomial: what appending `bytes` zero bytes multiplies by. */
function xPowBytes(bytes: number): number {
  let p = 0x8000_0000; // x^0
  let k = 3; // 8 × bytes = bytes × 2^3
  for (let n = bytes; n > 0; n = Math.floor(n / 2), k++) {
    if (n % 2 === 1) p = multiplyModP(X_POW_2K[k & 31], p);
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
