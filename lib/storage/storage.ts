/**
 * The one interface every file operation of sectorlog's write path goes through: device writes
 * and fsyncs, segment appends, truncations and fsyncs, manifest temp files, renames and directory
 * fsyncs, base images, unlinks and locks. Production uses {@linkcode realStorage} (node:fs);
 * the power-cut tests use a simulated disk (`sim_storage.ts`) that loses, keeps or tears what no
 * fsync covered, which the code under test cannot tell from a real one.
 *
 * Data operations are synchronous positional reads and writes (to the page cache: fast and
 * ordered); durability comes only from the asynchronous {@linkcode StorageFile.syncData} and
 * {@linkcode Storage.syncDirectory}, the two points at which a power cut can no longer undo what
 * came before them.
 *
 * @module
 */
import type { Extent } from "../data_extents.ts";

/** What a path names. */
export type StorageKind = "file" | "directory" | "block-device" | "other";

/** The result of {@linkcode Storage.stat}. */
export interface StorageStat {
  kind: StorageKind;
  sizeBytes: number;
}

/** How {@linkcode Storage.open} opens a file. */
export interface StorageOpenOptions {
  /** Open for writing as well as reading. */
  write?: boolean;
  /** Create the file when it does not exist (implies write). */
  create?: boolean;
  /** Fail when the file exists (with create). */
  exclusive?: boolean;
  /** Truncate to 0 bytes on open (implies write). */
  truncate?: boolean;
  /** Permission bits of a created file, before the umask (default 0o666). */
  mode?: number;
}

/** An open file or block device. */
export interface StorageFile {
  readonly path: string;
  /** The current size in bytes (what fstat says). */
  sizeBytes(): number;
  /** Reads up to `lengthBytes` at `offsetBytes` into `target[0..)`; returns the bytes read. */
  read(target: Uint8Array, lengthBytes: number, offsetBytes: number): number;
  /** Writes all of `source[0, lengthBytes)` at `offsetBytes` (to the page cache). */
  write(source: Uint8Array, lengthBytes: number, offsetBytes: number): void;
  /** Sets the size to `sizeBytes` (to the page cache, like a write). */
  truncate(sizeBytes: number): void;
  /** Makes every completed write and truncation of this file durable (fdatasync). */
  syncData(): Promise<void>;
  /** Takes an exclusive lock on the file (flock); false when another holder has it. */
  tryLock(): boolean;
  /** Waits for and takes an exclusive lock on the file. */
  lock(): Promise<void>;
  /** Closes the file, releasing its lock. Safe while a syncData runs: the close waits for it. */
  close(): void;
}

/** The file operations sectorlog uses. Paths are absolute or relative to the working directory. */
export interface Storage {
  /** A name for messages ("local", "simulated disk"). */
  readonly name: string;
  /** Opens `path`; throws {@linkcode StorageNotFound} when it does not exist and `create` is off. */
  open(path: string, options?: StorageOpenOptions): StorageFile;
  /** What `path` names, or undefined when nothing does. Follows symbolic links. */
  stat(path: string): StorageStat | undefined;
  /** The names in directory `path` (no "." or ".."), in no particular order. */
  readDir(path: string): string[];
  /** Creates directory `path` (and missing parents with `recursive`; mode before umask 0o777). */
  mkdir(path: string, options?: { recursive?: boolean; mode?: number }): void;
  /** Renames `from` to `to`, replacing `to` (atomic; durable after syncDirectory of both parents). */
  rename(from: string, to: string): void;
  /** Adds the name `to` for the file `existing` (a hard link). */
  link(existing: string, to: string): void;
  /** Removes a file name; {@linkcode StorageNotFound} when there is none. */
  unlink(path: string): void;
  /** Removes a directory and everything below it; nothing when it does not exist. */
  removeTree(path: string): void;
  /** Makes the creations, renames and unlinks inside directory `path` durable. */
  syncDirectory(path: string): Promise<void>;
  /**
   * The data extents of the file at `path` in offset order, clipped to `sizeBytes` (holes read as
   * zeroes and need not be read). A storage that cannot tell reports all of it as data.
   */
  dataExtents(path: string, sizeBytes: number): Iterable<Extent>;
}

/** A path that does not exist (ENOENT). */
export class StorageNotFound extends Error {
  override name = "StorageNotFound";
  readonly path: string;
  constructor(path: string, options?: { cause?: unknown }) {
    super(`No such file or directory: ${path}`, { cause: options?.cause });
    this.path = path;
  }
}

/** Reads exactly `lengthBytes` at `offsetBytes`, looping over short reads. */
export function readFully(
  file: StorageFile,
  target: Uint8Array,
  lengthBytes: number,
  offsetBytes: number,
): void {
  let done = 0;
  while (done < lengthBytes) {
    const n = file.read(target.subarray(done), lengthBytes - done, offsetBytes + done);
    if (n === 0) {
      throw new Error(`Unexpected end of file ${file.path} at offset ${offsetBytes + done}`);
    }
    done += n;
  }
}

/** Reads a whole file, refusing one over `bytesMax` with a RangeError. */
export function readFileBytes(storage: Storage, path: string, bytesMax: number): Uint8Array {
  const file = storage.open(path);
  try {
    const sizeBytes = file.sizeBytes();
    if (sizeBytes > bytesMax) {
      throw new RangeError(`${path} is ${sizeBytes} bytes, more than the ${bytesMax} allowed`);
    }
    const bytes = new Uint8Array(sizeBytes);
    let done = 0;
    while (done < sizeBytes) {
      const n = file.read(bytes.subarray(done), sizeBytes - done, done);
      if (n === 0) break; // it shrank meanwhile
      done += n;
    }
    return bytes.subarray(0, done);
  } finally {
    file.close();
  }
}

/** Reads a whole (small) file as UTF-8 text, refusing one over `bytesMax`. */
export function readTextFile(storage: Storage, path: string, bytesMax: number): string {
  return new TextDecoder().decode(readFileBytes(storage, path, bytesMax));
}

/**
 * Replaces `path` with `bytes` atomically and durably: write a temporary file beside it, fsync
 * it, rename it over `path`, fsync the directory. A power cut leaves the old or the new content.
 */
export async function replaceFileDurably(
  storage: Storage,
  path: string,
  bytes: Uint8Array,
  options: { tempSuffix?: string } = {},
): Promise<void> {
  const tempPath = `${path}${options.tempSuffix ?? ".tmp"}`;
  const file = storage.open(tempPath, { create: true, truncate: true });
  try {
    file.write(bytes, bytes.length, 0);
    await file.syncData();
  } finally {
    file.close();
  }
  storage.rename(tempPath, path);
  await storage.syncDirectory(parentOf(path));
}

/** Removes `path` if it exists. */
export function unlinkIfExists(storage: Storage, path: string): void {
  try {
    storage.unlink(path);
  } catch (error) {
    if (!(error instanceof StorageNotFound)) throw error;
  }
}

/** True when something exists at `path`. */
export function exists(storage: Storage, path: string): boolean {
  return storage.stat(path) !== undefined;
}

/** The directory that holds `path` ("." for a bare name). */
export function parentOf(path: string): string {
  const trimmed = path.length > 1 ? path.replace(/\/+$/, "") : path;
  const slash = trimmed.lastIndexOf("/");
  if (slash < 0) return ".";
  if (slash === 0) return "/";
  return trimmed.slice(0, slash);
}
