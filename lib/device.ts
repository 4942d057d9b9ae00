/**
 * The device: a raw block device (`/dev/loop3`) or an image file, read and written with
 * positional I/O. Writes go to the page cache synchronously (fast, ordered); durability comes from
 * {@linkcode Device.sync}, which runs fdatasync on the thread pool.
 *
 * @module
 */
import * as fs from "node:fs";
import { assert } from "./_assert.ts";
import { UsageError } from "./errors.ts";
import { fdatasync, readFully, writeFully } from "./format/segment.ts";

/** Zeroes are written from one shared buffer of this size. */
const ZERO_CHUNK_BYTES = 1024 * 1024;
const zeroChunk = new Uint8Array(ZERO_CHUNK_BYTES);

/** Options of {@linkcode Device.open}. */
export interface DeviceOpenOptions {
  /** Open for reading only. */
  readOnly?: boolean;
}

/** An open device or image file. */
export class Device {
  readonly path: string;
  readonly sizeBytes: number;
  readonly isBlockDevice: boolean;
  readonly readOnly: boolean;
  #fd: number;

  private constructor(
    path: string,
    fd: number,
    sizeBytes: number,
    isBlockDevice: boolean,
    readOnly: boolean,
  ) {
    this.path = path;
    this.#fd = fd;
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
  static async open(path: string, options: DeviceOpenOptions = {}): Promise<Device> {
    const readOnly = options.readOnly === true;
    let fd: number;
    try {
      fd = fs.openSync(path, readOnly ? "r" : "r+");
    } catch (error) {
      throw deviceOpenError(path, error);
    }
    const stat = fs.fstatSync(fd);
    if (!stat.isFile() && !stat.isBlockDevice()) {
      fs.closeSync(fd);
      throw new UsageError(
        `Cannot use ${path} as a device: it is neither a block device nor a file`,
      );
    }
    const sizeBytes = stat.isBlockDevice() ? await blockDeviceSize(path) : stat.size;
    return new Device(path, fd, sizeBytes, stat.isBlockDevice(), readOnly);
  }

  /** Reads `target.length` bytes at `offsetBytes`. */
  readInto(offsetBytes: number, target: Uint8Array): void {
    this.#assertRange(offsetBytes, target.length);
    readFully(this.#fd, target, target.length, offsetBytes);
  }

  /** Writes `data` at `offsetBytes` (to the page cache). */
  write(offsetBytes: number, data: Uint8Array): void {
    this.#assertWritable(offsetBytes, data.length);
    writeFully(this.#fd, data, data.length, offsetBytes);
  }

  /** Writes zeroes over `[offsetBytes, offsetBytes + lengthBytes)`. */
  writeZeroes(offsetBytes: number, lengthBytes: number): void {
    this.#assertWritable(offsetBytes, lengthBytes);
    for (let done = 0; done < lengthBytes; done += ZERO_CHUNK_BYTES) {
      const chunkBytes = Math.min(ZERO_CHUNK_BYTES, lengthBytes - done);
      writeFully(this.#fd, zeroChunk, chunkBytes, offsetBytes + done);
    }
  }

  /** Makes every completed write durable. */
  sync(): Promise<void> {
    return fdatasync(this.#fd);
  }

  /** Closes the device. */
  close(): void {
    fs.closeSync(this.#fd);
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

async function blockDeviceSize(path: string): Promise<number> {
  const file = await Deno.open(path, { read: true });
  try {
    return await file.seek(0, Deno.SeekMode.End);
  } finally {
    file.close();
  }
}

function deviceOpenError(path: string, error: unknown): Error {
  const code = (error as { code?: string }).code;
  if (code === "ENOENT") return new UsageError(`Cannot open device ${path}: no such file`);
  if (code === "EACCES" || code === "EPERM") {
    return new UsageError(`Cannot open device ${path}: permission denied (run as root?)`);
  }
  return new Error(`Cannot open device ${path}: ${(error as Error).message}`, { cause: error });
}
