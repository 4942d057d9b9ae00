/**
 * The production {@linkcode Storage}: node:fs positional I/O on the page cache, fdatasync on
 * libuv's thread pool (the event loop keeps serving while the disk works), flock through Deno.
 *
 * @module
 */
import * as fs from "node:fs";
import { assert } from "../_assert.ts";
import { dataExtents } from "../data_extents.ts";
import {
  type Storage,
  type StorageFile,
  StorageNotFound,
  type StorageOpenOptions,
  type StorageStat,
} from "./storage.ts";

/** A file opened through node:fs. */
class RealFile implements StorageFile {
  readonly path: string;
  #fd: number;
  #isBlockDevice: boolean;
  #lockFile: Deno.FsFile | undefined;
  #syncsInFlight = 0;
  #closeRequested = false;

  constructor(path: string, fd: number, isBlockDevice: boolean) {
    this.path = path;
    this.#fd = fd;
    this.#isBlockDevice = isBlockDevice;
  }

  sizeBytes(): number {
    this.#assertOpen();
    return this.#isBlockDevice ? blockDeviceBytes(this.path) : fs.fstatSync(this.#fd).size;
  }

  read(target: Uint8Array, lengthBytes: number, offsetBytes: number): number {
    this.#assertOpen();
    return fs.readSync(this.#fd, target, 0, lengthBytes, offsetBytes);
  }

  write(source: Uint8Array, lengthBytes: number, offsetBytes: number): void {
    this.#assertOpen();
    let done = 0;
    while (done < lengthBytes) {
      done += fs.writeSync(this.#fd, source, done, lengthBytes - done, offsetBytes + done);
    }
  }

  truncate(sizeBytes: number): void {
    this.#assertOpen();
    fs.ftruncateSync(this.#fd, sizeBytes);
  }

  async syncData(): Promise<void> {
    this.#assertOpen();
    this.#syncsInFlight++;
    try {
      await new Promise<void>((resolve, reject) => {
        fs.fdatasync(this.#fd, (error) => error ? reject(error) : resolve());
      });
    } finally {
      this.#syncsInFlight--;
      if (this.#closeRequested && this.#syncsInFlight === 0) fs.closeSync(this.#fd);
    }
  }

  tryLock(): boolean {
    this.#assertOpen();
    const lockFile = this.#openLockFile();
    return lockFile.tryLockSync(true);
  }

  async lock(): Promise<void> {
    this.#assertOpen();
    await this.#openLockFile().lock(true);
  }

  /**
   * With an fdatasync still running on the thread pool, the close waits for it: closing under it
   * could let the fd number be reused and synced by mistake.
   */
  close(): void {
    if (this.#closeRequested) return;
    this.#closeRequested = true;
    this.#lockFile?.close();
    this.#lockFile = undefined;
    if (this.#syncsInFlight === 0) fs.closeSync(this.#fd);
  }

  /** flock is per open file description; Deno offers it on its own file handle only. */
  #openLockFile(): Deno.FsFile {
    this.#lockFile ??= Deno.openSync(this.path, { read: true });
    return this.#lockFile;
  }

  #assertOpen(): void {
    assert(!this.#closeRequested, `use of closed file ${this.path}`);
  }
}

function blockDeviceBytes(path: string): number {
  const file = Deno.openSync(path, { read: true });
  try {
    return file.seekSync(0, Deno.SeekMode.End);
  } finally {
    file.close();
  }
}

function notFoundOr(error: unknown, path: string): unknown {
  return (error as { code?: string }).code === "ENOENT"
    ? new StorageNotFound(path, { cause: error })
    : error;
}

function kindOf(stat: fs.Stats): StorageStat["kind"] {
  if (stat.isFile()) return "file";
  if (stat.isDirectory()) return "directory";
  if (stat.isBlockDevice()) return "block-device";
  return "other";
}

/** The local filesystem. */
export const realStorage: Storage = {
  name: "local",

  open(path: string, options: StorageOpenOptions = {}): StorageFile {
    const write = options.write === true || options.create === true || options.truncate === true;
    let flags = write ? fs.constants.O_RDWR : fs.constants.O_RDONLY;
    if (options.create === true) flags |= fs.constants.O_CREAT;
    if (options.exclusive === true) flags |= fs.constants.O_EXCL;
    if (options.truncate === true) flags |= fs.constants.O_TRUNC;
    let fd: number;
    try {
      fd = fs.openSync(path, flags, options.mode ?? 0o666);
    } catch (error) {
      throw notFoundOr(error, path);
    }
    let isBlockDevice = false;
    try {
      isBlockDevice = fs.fstatSync(fd).isBlockDevice();
    } catch (error) {
      fs.closeSync(fd);
      throw error;
    }
    return new RealFile(path, fd, isBlockDevice);
  },

  stat(path: string): StorageStat | undefined {
    let stat: fs.Stats;
    try {
      stat = fs.statSync(path);
    } catch (error) {
      if ((error as { code?: string }).code === "ENOENT") return undefined;
      throw error;
    }
    const kind = kindOf(stat);
    return { kind, sizeBytes: kind === "block-device" ? blockDeviceBytes(path) : stat.size };
  },

  readDir(path: string): string[] {
    try {
      return fs.readdirSync(path);
    } catch (error) {
      throw notFoundOr(error, path);
    }
  },

  mkdir(path: string, options: { recursive?: boolean; mode?: number } = {}): void {
    try {
      fs.mkdirSync(path, { recursive: options.recursive === true, mode: options.mode ?? 0o777 });
    } catch (error) {
      throw notFoundOr(error, path);
    }
  },

  rename(from: string, to: string): void {
    try {
      fs.renameSync(from, to);
    } catch (error) {
      throw notFoundOr(error, from);
    }
  },

  link(existing: string, to: string): void {
    try {
      fs.linkSync(existing, to);
    } catch (error) {
      throw notFoundOr(error, existing);
    }
  },

  unlink(path: string): void {
    try {
      fs.unlinkSync(path);
    } catch (error) {
      throw notFoundOr(error, path);
    }
  },

  removeTree(path: string): void {
    fs.rmSync(path, { recursive: true, force: true });
  },

  async syncDirectory(path: string): Promise<void> {
    let dir: Deno.FsFile;
    try {
      dir = await Deno.open(path, { read: true });
    } catch (error) {
      throw error instanceof Deno.errors.NotFound
        ? new StorageNotFound(path, { cause: error })
        : error;
    }
    try {
      await dir.sync();
    } finally {
      dir.close();
    }
  },

  dataExtents(path: string, sizeBytes: number) {
    return dataExtents(path, sizeBytes);
  },
};
