/**
 * An in-memory {@linkcode BlockBackend}: the reference backend for tests and benchmarks.
 *
 * @example
 * ```ts
 * import { MemoryBackend } from "./memory_backend.ts";
 * const backend = new MemoryBackend({ sizeBytes: 1024 * 1024 });
 * await backend.write(0, new Uint8Array([1, 2, 3]));
 * await backend.flush();
 * console.log(backend.bytes[1], backend.flushCount); // 2 1
 * ```
 *
 * @module
 */

import { assert, assertUint } from "../_assert.ts";
import type { BackendWriteOptions, BackendZeroOptions, BlockBackend } from "./backend.ts";

/** Options of {@linkcode MemoryBackend}. */
export interface MemoryBackendOptions {
  /** Export size in bytes; the disk starts zeroed. */
  sizeBytes: number;
  /** Refuse writes (the server answers EPERM). Default false. */
  readOnly?: boolean;
  /** Advertise NBD_FLAG_CAN_MULTI_CONN. Default true: memory is shared and always "durable". */
  canMultiConn?: boolean;
}

/** A disk held in a `Uint8Array`. Every write is visible and "durable" at once. */
export class MemoryBackend implements BlockBackend {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly canMultiConn: boolean;
  #bytes: Uint8Array;
  #flushCount = 0;
  #fuaCount = 0;

  /** Creates a zeroed disk of `options.sizeBytes`. */
  constructor(options: MemoryBackendOptions) {
    assertUint(options.sizeBytes, "sizeBytes");
    this.sizeBytes = options.sizeBytes;
    this.readOnly = options.readOnly ?? false;
    this.canMultiConn = options.canMultiConn ?? true;
    this.#bytes = new Uint8Array(options.sizeBytes);
  }

  /** The disk's contents (live view, not a copy). */
  get bytes(): Uint8Array {
    return this.#bytes;
  }

  /** Calls of {@linkcode MemoryBackend.flush} so far. */
  get flushCount(): number {
    return this.#flushCount;
  }

  /** Write-like calls with `fua` set so far. */
  get fuaCount(): number {
    return this.#fuaCount;
  }

  /** Copies the range into `buffer`. */
  read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    this.#checkRange(offsetBytes, buffer.length);
    buffer.set(this.#bytes.subarray(offsetBytes, offsetBytes + buffer.length));
    return Promise.resolve();
  }

  /** Copies `data` into the disk. */
  write(offsetBytes: number, data: Uint8Array, options?: BackendWriteOptions): Promise<void> {
    this.#checkWrite(offsetBytes, data.length, options);
    this.#bytes.set(data, offsetBytes);
    return Promise.resolve();
  }

  /** Zeroes the range. */
  zero(offsetBytes: number, lengthBytes: number, options?: BackendZeroOptions): Promise<void> {
    this.#checkWrite(offsetBytes, lengthBytes, options);
    this.#bytes.fill(0, offsetBytes, offsetBytes + lengthBytes);
    return Promise.resolve();
  }

  /** Zeroes the range (a trimmed range reads back as zeroes). */
  trim(offsetBytes: number, lengthBytes: number, options?: BackendWriteOptions): Promise<void> {
    return this.zero(offsetBytes, lengthBytes, options);
  }

  /** Counts the call; memory needs no flushing. */
  flush(): Promise<void> {
    this.#flushCount++;
    return Promise.resolve();
  }

  #checkWrite(offsetBytes: number, lengthBytes: number, options?: BackendWriteOptions): void {
    assert(!this.readOnly, "write to a read-only MemoryBackend");
    this.#checkRange(offsetBytes, lengthBytes);
    if (options?.fua) this.#fuaCount++;
  }

  #checkRange(offsetBytes: number, lengthBytes: number): void {
    // The server validates ranges before calling a backend; a bad one here is a server bug.
    assertUint(offsetBytes, "offsetBytes");
    assert(offsetBytes + lengthBytes <= this.sizeBytes, "range past the end of the disk");
  }
}
