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
