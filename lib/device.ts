/**
 * The device: a raw block device (`/dev/loop3`) or an image file, read and written with
 * positional I/O. Writes go to the page cache synchronously (fast, ordered); durability comes from
 * {@linkcode Device.sync}, which runs fdatasync on the thread pool.
 *
 * @module
 */
import { assert } from "./_assert.ts";
import { UsageError } from "./errors.ts";
import { realStorage } from "./storage/real_storage.ts";
import { readFully, type Storage, type StorageFile, StorageNotFound } from "./storage/storage.ts";

/** Zeroes are written from one shared buffer of this size. */
const ZERO_CHUNK_BYTES = 1024 * 1024;
const zeroChunk = new Uint8Array(ZERO_CHUNK_BYTES);

/** Options of {@linkcode Device.open}. */
export interface DeviceOpenOptions {
  /** Open for reading only. */
  readOnly?: boolean;
  /** Where the device lives (default: the local filesystem). */
  storage?: Storage;
}

/** An open device or image file. */
export class Device {
  readonly path: string;
  readonly sizeBytes: number;
  readonly isBlockDevice: boolean;
  readonly readOnly: boolean;
  #file: StorageFile;

  private constructor(
    path: string,
    file: StorageFile,
    sizeBytes: number,
    isBlockDevice: boolean,
    readOnly: boolean,
  ) {
    this.path = path;
    this.#file = file;
    this.sizeBytes = sizeBytes;
    this.isBlockDevice = isBlockDevice;
    this.readOnly = readOnly;
  }

  /**
   * Opens `path`, a block device or a regular file. Its size is found by seeking to the end, so
   * block devices report their real size.
   *
   * @example
   * ```ts
   * import { Device } from "./device.ts";
   * const device = await Device.open("/var/lib/images/vm.img", { readOnly: true });
   * device.close();
   * ```
   */
  static open(path: string, options: DeviceOpenOptions = {}): Promise<Device> {
    const readOnly = options.readOnly === true;
    const storage = options.storage ?? realStorage;
    let file: StorageFile;
    let kind: string | undefined;
    try {
      kind = storage.stat(path)?.kind;
      if (kind !== undefined && kind !== "file" && kind !== "block-device") {
        return Promise.reject(
          new UsageError(`Cannot use ${path} as a device: it is neither a block device nor a file`),
        );
      }
      file = storage.open(path, { write: !readOnly });
    } catch (error) {
      return Promise.reject(deviceOpenError(path, error));
    }
    const isBlockDevice = kind === "block-device";
    return Promise.resolve(new Device(path, file, file.sizeBytes(), isBlockDevice, readOnly));
  }

  /** Reads `target.length` bytes at `offsetBytes`. */
  readInto(offsetBytes: number, target: Uint8Array): void {
    this.#assertRange(offsetBytes, target.length);
    readFully(this.#file, target, target.length, offsetBytes);
  }

  /** Writes `data` at `offsetBytes` (to the page cache). */
  write(offsetBytes: number, data: Uint8Array): void {
    this.#assertWritable(offsetBytes, data.length);
    this.#file.write(data, data.length, offsetBytes);
  }

  /** Writes zeroes over `[offsetBytes, offsetBytes + lengthBytes)`. */
  writeZeroes(offsetBytes: number, lengthBytes: number): void {
    this.#assertWritable(offsetBytes, lengthBytes);
    for (let done = 0; done < lengthBytes; done += ZERO_CHUNK_BYTES) {
      const chunkBytes = Math.min(ZERO_CHUNK_BYTES, lengthBytes - done);
      this.#file.write(zeroChunk, chunkBytes, offsetBytes + done);
    }
  }

  /** Makes every completed write durable. */
  sync(): Promise<void> {
    return this.#file.syncData();
  }

  /** Closes the device. */
  close(): void {
    this.#file.close();
  }

  #assertRange(offsetBytes: number, lengthBytes: number): void {
    assert(
      Number.isSafeInteger(offsetBytes) && offsetBytes >= 0 && lengthBytes >= 0 &&
        offsetBytes + lengthBytes <= this.sizeBytes,
      `device range ${offsetBytes}+${lengthBytes} outside ${this.path} (${this.sizeBytes} bytes)`,
    );
  }

  #assertWritable(offsetBytes: number, lengthBytes: number): void {
    assert(!this.readOnly, `device ${this.path} is open read-only`);
    this.#assertRange(offsetBytes, lengthBytes);
  }
}

function deviceOpenError(path: string, error: unknown): Error {
  if (error instanceof StorageNotFound) {
    return new UsageError(`Cannot open device ${path}: no such file`);
  }
  const code = (error as { code?: string }).code;
  if (code === "EACCES" || code === "EPERM") {
    return new UsageError(`Cannot open device ${path}: permission denied (run as root?)`);
  }
  return new Error(`Cannot open device ${path}: ${(error as Error).message}`, { cause: error });
}
