/**
 * One host's copy in a receive store: `storedir/<hostId>/`, an ordinary logdir. A
 * {@linkcode HostStore} holds the host's writer lock for a whole ship session, appends shipped
 * entries, and installs a whole new state (base, levels) when the sender transfers one.
 *
 * A state is built in `storedir/.incoming-<hostId>/` and swapped in with two renames
 * (`<hostId>` → `.old-<hostId>-<µs>`, `.incoming-<hostId>` → `<hostId>`), so the host directory
 * always holds a whole old state or a whole new one. A crash between the renames leaves a complete
 * `.incoming-<hostId>` (its manifest is written last), which the next claim renames into place.
 *
 * @module
 */
import { join } from "node:path";
import { assert } from "../_assert.ts";
import { crc32c, crc32cCombine, crc32cOfZeros } from "../checksum.ts";
import { IntegrityError } from "../errors.ts";
import {
  ensureLogdirFolders,
  LEVELS_DIR,
  LogdirLock,
  MANIFEST_FILE,
  readManifest,
  syncDirectory,
  writeManifest,
} from "../format/logdir.ts";
import { LogdirWriter } from "../format/logdir_writer.ts";
import {
  decodeManifest,
  encodeManifest,
  type Manifest,
  MANIFEST_FORMAT,
  MANIFEST_FORMAT_VERSION,
} from "../format/manifest.ts";
import { SegmentScanner } from "../format/segment.ts";
import { realStorage } from "../storage/real_storage.ts";
import { exists, type Storage, type StorageFile } from "../storage/storage.ts";
import { applyFromSeq } from "../timeline.ts";
import { baseId, type StateBegin, type StoreState } from "./_messages.ts";
import { locateSeq } from "./log_tail.ts";
import { crc32cHex, ProtocolError } from "./wire.ts";

/** The lock purpose the receiver writes into a host's lock file. */
const LOCK_PURPOSE = "receive";

/** Options of {@linkcode HostStore.claim}. */
export interface HostStoreOptions {
  /** Seal live segments at this size (tests use small ones). */
  segmentBytesMax?: number;
  /** Where the store lives (default: the local filesystem). */
  storage?: Storage;
}

/** The directory names a host uses inside the store. */
export function hostPaths(storedir: string, hostId: string): {
  hostDir: string;
  incomingDir: string;
  oldPrefix: string;
} {
  return {
    hostDir: join(storedir, hostId),
    incomingDir: join(storedir, `.incoming-${hostId}`),
    oldPrefix: `.old-${hostId}-`,
  };
}

/** A host's copy, claimed (locked) for one session. */
export class HostStore {
  readonly storedir: string;
  readonly hostId: string;
  readonly hostDir: string;
  readonly storage: Storage;
  #options: HostStoreOptions;
  /** The lock of the host directory, or of the incoming directory while there is no copy. */
  #lock: LogdirLock;
  #writer: LogdirWriter | undefined;
  #install: StateInstall | undefined;
  /** A {@linkcode HostStore.seal} in progress (close and installs wait for it). */
  #sealRun: Promise<unknown> | undefined;
  #closing = false;

  private constructor(
    storedir: string,
    hostId: string,
    lock: LogdirLock,
    options: HostStoreOptions,
  ) {
    this.storedir = storedir;
    this.hostId = hostId;
    this.hostDir = hostPaths(storedir, hostId).hostDir;
    this.#lock = lock;
    this.#options = options;
    this.storage = options.storage ?? realStorage;
  }

  /**
   * Takes the host's lock (throws a BusyError when another process holds it), finishes
   * a swap a crash interrupted, and opens the host's writer when it has a copy.
   */
  static async claim(
    storedir: string,
    hostId: string,
    options: HostStoreOptions = {},
  ): Promise<HostStore> {
    const storage = options.storage ?? realStorage;
    const paths = hostPaths(storedir, hostId);
    await recoverInterruptedSwap(storage, storedir, hostId);
    const hasCopy = exists(storage, join(paths.hostDir, MANIFEST_FILE));
    const lockDir = hasCopy ? paths.hostDir : paths.incomingDir;
    storage.mkdir(lockDir, { recursive: true });
    const lock = await LogdirLock.acquire(lockDir, LOCK_PURPOSE, { storage });
    const store = new HostStore(storedir, hostId, lock, options);
    try {
      if (hasCopy) await store.#openWriter();
      return store;
    } catch (error) {
      lock.release();
      throw error;
    }
  }

  /** The writer, when the host has a copy. */
  get writer(): LogdirWriter | undefined {
    return this.#writer;
  }

  /** What the host's copy holds, for WELCOME. */
  async state(): Promise<StoreState> {
    if (this.#writer === undefined) return { present: false, lastSeq: 0, applyFromSeq: 1 };
    const manifest = await readManifest(this.hostDir, this.storage);
    const lastSeq = this.#writer.nextSeq - 1;
    const state: StoreState = {
      present: true,
      logdirId: manifest.logdirId,
      deviceBytes: manifest.deviceBytes,
      baseId: baseId(manifest.base),
      lastSeq,
      applyFromSeq: applyFromSeq(manifest),
      horizonUs: manifest.horizonUs,
    };
    if (lastSeq >= 1) {
      const location = await locateSeq(this.hostDir, manifest, lastSeq);
      if (typeof location !== "string") state.lastHeaderCrc32c = location.headerCrc32c;
    }
    return state;
  }

  /**
   * Seals the live segment (while the session goes on appending), so that every entry appended
   * so far is in a sealed segment that `shipToStore` uploads. Returns the first seq of the new
   * live segment, or undefined when there is nothing to seal: no copy yet, a state install
   * running, or the store closing.
   */
  async seal(): Promise<number | undefined> {
    const writer = this.#writer;
    if (this.#closing || this.#install !== undefined || writer === undefined) return undefined;
    const run = writer.rotate();
    const settled = run.then(() => {}, () => {});
    this.#sealRun = settled;
    try {
      return await run;
    } finally {
      if (this.#sealRun === settled) this.#sealRun = undefined;
    }
  }

  /** Starts installing a new state in the incoming directory. */
  async beginState(begin: StateBegin): Promise<StateInstall> {
    assert(this.#install === undefined, "a state install is already running");
    // The install closes and reopens the writer: a seal in progress ends first.
    await this.#sealRun;
    const paths = hostPaths(this.storedir, this.hostId);
    let incomingLock = this.#writer === undefined ? this.#lock : undefined;
    if (incomingLock === undefined) {
      this.storage.mkdir(paths.incomingDir, { recursive: true });
      incomingLock = await LogdirLock.acquire(paths.incomingDir, LOCK_PURPOSE, {
        storage: this.storage,
      });
    }
    try {
      clearIncoming(this.storage, paths.incomingDir);
      await ensureLogdirFolders(paths.incomingDir, this.storage);
      const current = this.#writer === undefined
        ? undefined
        : await readManifest(this.hostDir, this.storage);
      this.#install = new StateInstall(this, paths.incomingDir, incomingLock, begin, current);
      this.#install.start();
      return this.#install;
    } catch (error) {
      if (incomingLock !== this.#lock) incomingLock.release();
      this.#install = undefined;
      throw error;
    }
  }

  /** Swaps a finished install in (called by {@linkcode StateInstall.commit}). */
  async swapIn(install: StateInstall, incomingLock: LogdirLock): Promise<void> {
    assert(this.#install === install, "swapIn of an install that is not running");
    const paths = hostPaths(this.storedir, this.hostId);
    await this.#sealRun;
    if (this.#writer !== undefined) {
      await this.#writer.close();
      this.#writer = undefined;
    }
    let oldDir: string | undefined;
    if (exists(this.storage, paths.hostDir)) {
      oldDir = join(this.storedir, `${paths.oldPrefix}${Date.now() * 1000}`);
      this.storage.rename(paths.hostDir, oldDir);
    }
    this.storage.rename(paths.incomingDir, paths.hostDir);
    await syncDirectory(this.storedir, this.storage);
    if (this.#lock !== incomingLock) this.#lock.release();
    this.#lock = incomingLock;
    this.#install = undefined;
    if (oldDir !== undefined) this.storage.removeTree(oldDir);
    await this.#openWriter();
  }

  /** Removes what a failed install wrote, and its lock unless it is the store's own. */
  discardState(install: StateInstall, incomingLock: LogdirLock): void {
    if (this.#install !== install) return;
    this.#install = undefined;
    const incomingDir = hostPaths(this.storedir, this.hostId).incomingDir;
    if (incomingLock === this.#lock) {
      clearIncoming(this.storage, incomingDir);
      return;
    }
    try {
      this.storage.removeTree(incomingDir);
    } finally {
      incomingLock.release();
    }
  }

  async #openWriter(): Promise<void> {
    this.#writer = await LogdirWriter.open(this.hostDir, {
      purpose: LOCK_PURPOSE,
      lock: this.#lock,
      storage: this.storage,
      journalOnly: true,
      segmentBytesMax: this.#options.segmentBytesMax,
    });
    // Entries a killed receiver appended but never synced may still sit in the page cache; they
    // count in the state sent to the sender, so make them durable first.
    await this.#writer.sync();
  }

  /**
   * Syncs and closes the writer and releases the locks. A host that never got a copy leaves no
   * directory behind (a refused or aborted first ship creates nothing in the store).
   */
  async close(): Promise<void> {
    this.#closing = true;
    try {
      await this.#sealRun;
      this.#install?.abort();
      if (this.#writer !== undefined) {
        await this.#writer.close();
      } else {
        // Without a copy, the lock held is the incoming directory's: remove it while holding it.
        const incomingDir = hostPaths(this.storedir, this.hostId).incomingDir;
        if (!exists(this.storage, join(incomingDir, MANIFEST_FILE))) {
          try {
            this.storage.removeTree(incomingDir);
          } catch { /* best effort: a leftover is cleared by the next claim */ }
        }
      }
    } finally {
      this.#writer = undefined;
      this.#lock.release();
    }
  }
}

/** Renames a complete incoming directory into place after a crash between the swap's renames. */
async function recoverInterruptedSwap(
  storage: Storage,
  storedir: string,
  hostId: string,
): Promise<void> {
  const paths = hostPaths(storedir, hostId);
  const incomingComplete = exists(storage, join(paths.incomingDir, MANIFEST_FILE));
  if (!exists(storage, paths.hostDir) && incomingComplete) {
    storage.rename(paths.incomingDir, paths.hostDir);
    await syncDirectory(storedir, storage);
  }
  let removed = false;
  for (const entry of storage.readDir(storedir)) {
    if (entry.startsWith(paths.oldPrefix) && /^\d+$/.test(entry.slice(paths.oldPrefix.length))) {
      storage.removeTree(join(storedir, entry));
      removed = true;
    }
  }
  if (removed) await syncDirectory(storedir, storage);
}

/** Empties an incoming directory except its lock file. */
function clearIncoming(storage: Storage, dir: string): void {
  for (const name of storage.readDir(dir)) {
    if (name === "lock") continue;
    storage.removeTree(join(dir, name));
  }
}

/**
 * A state being received: the base (streamed into a sparse file, checked against its CRC32C) and
 * the levels (streamed, then scanned entry by entry), then the manifest, then the swap.
 */
export class StateInstall {
  readonly begin: StateBegin;
  #store: HostStore;
  #dir: string;
  #lock: LogdirLock;
  #current: Manifest | undefined;
  #base: FileReceive | undefined;
  #baseDone = false;
  #levelIndex = 0;
  #level: FileReceive | undefined;

  constructor(
    store: HostStore,
    dir: string,
    lock: LogdirLock,
    begin: StateBegin,
    current: Manifest | undefined,
  ) {
    this.#store = store;
    this.#dir = dir;
    this.#lock = lock;
    this.begin = begin;
    this.#current = current;
  }

  /** Opens the base file, or links the base the host already holds. */
  start(): void {
    const base = this.begin.base;
    const path = join(this.#dir, base.file);
    if (this.begin.baseIncluded) {
      this.#base = FileReceive.open(
        this.#store.storage,
        `${path}.partial`,
        this.begin.deviceBytes,
        true,
      );
      return;
    }
    const current = this.#current;
    if (current === undefined || baseId(current.base) !== baseId(base)) {
      throw new ProtocolError(
        `STATE_BEGIN says the receiver holds base ${
          baseId(base)
        }, but host ${this.#store.hostId} has ${
          current === undefined ? "no base" : baseId(current.base)
        }`,
      );
    }
    this.#store.storage.link(join(this.#store.hostDir, current.base.file), path);
    this.#baseDone = true;
  }

  /** Writes one decompressed base chunk. */
  baseChunk(offsetBytes: number, raw: Uint8Array): void {
    if (this.#base === undefined || this.#baseDone) {
      throw new ProtocolError("BASE_CHUNK outside a base transfer");
    }
    this.#base.write(offsetBytes, raw, false);
  }

  /** Checks and finishes the base. */
  async baseEnd(crc32c: string): Promise<void> {
    if (this.#base === undefined || this.#baseDone) {
      throw new ProtocolError("BASE_END outside a base transfer");
    }
    const actual = await this.#base.finish();
    const expected = this.begin.base.crc32c;
    if (actual !== expected || crc32c !== expected) {
      throw new IntegrityError(
        `Base of host ${this.#store.hostId} arrived with crc32c ${actual}, expected ${expected}`,
      );
    }
    this.#store.storage.rename(
      `${join(this.#dir, this.begin.base.file)}.partial`,
      join(this.#dir, this.begin.base.file),
    );
    this.#baseDone = true;
  }

  /** Starts receiving level `index` (levels arrive in manifest order). */
  levelBegin(file: string): void {
    const level = this.begin.levels[this.#levelIndex];
    if (
      !this.#baseDone || this.#level !== undefined || level === undefined || level.file !== file
    ) {
      throw new ProtocolError(`LEVEL_BEGIN of ${file} out of order`);
    }
    const path = join(this.#dir, LEVELS_DIR, `${level.file}.partial`);
    this.#level = FileReceive.open(this.#store.storage, path, level.sizeBytes, false);
  }

  /** Writes one decompressed level chunk (chunks arrive in order, without holes). */
  levelChunk(offsetBytes: number, raw: Uint8Array): void {
    if (this.#level === undefined) throw new ProtocolError("LEVEL_CHUNK outside a level transfer");
    this.#level.write(offsetBytes, raw, true);
  }

  /** Checks and finishes the current level. */
  async levelEnd(crc32c: string): Promise<void> {
    const level = this.begin.levels[this.#levelIndex];
    if (this.#level === undefined || level === undefined) {
      throw new ProtocolError("LEVEL_END outside a level transfer");
    }
    const receive = this.#level;
    this.#level = undefined;
    const actual = await receive.finish();
    if (receive.receivedBytes !== level.sizeBytes || actual !== crc32c) {
      throw new IntegrityError(
        `Level ${level.file} of host ${this.#store.hostId} arrived with ${receive.receivedBytes} bytes and crc32c ${actual}, expected ${level.sizeBytes} bytes and ${crc32c}`,
      );
    }
    const path = join(this.#dir, LEVELS_DIR, level.file);
    this.#store.storage.rename(`${path}.partial`, path);
    const scanner = new SegmentScanner(path, {
      storage: this.#store.storage,
      tolerateTornTail: false,
      endBytes: level.sizeBytes,
    });
    for await (const _ of scanner.entries()) {
      // Every entry's checksums are checked by the scan itself.
    }
    this.#levelIndex++;
  }

  /** Writes the manifest and swaps the new state in. Returns the new manifest. */
  async commit(): Promise<Manifest> {
    if (!this.#baseDone || this.#level !== undefined) {
      throw new ProtocolError("STATE_END before the base and levels were complete");
    }
    if (this.#levelIndex !== this.begin.levels.length) {
      throw new ProtocolError(
        `STATE_END after ${this.#levelIndex} of ${this.begin.levels.length} levels`,
      );
    }
    const b = this.begin;
    const candidate: Manifest = {
      format: MANIFEST_FORMAT,
      formatVersion: MANIFEST_FORMAT_VERSION,
      logdirId: b.logdirId,
      hostId: this.#store.hostId,
      createdUs: b.createdUs,
      deviceBytes: b.deviceBytes,
      sectorBytes: b.sectorBytes,
      base: b.base,
      horizonUs: b.horizonUs,
      levels: b.levels,
      segments: [],
      compactedMarks: b.compactedMarks,
    };
    let manifest: Manifest;
    try {
      manifest = decodeManifest(encodeManifest(candidate), "STATE_BEGIN");
    } catch (error) {
      throw new ProtocolError((error as Error).message);
    }
    const storage = this.#store.storage;
    await syncDirectory(join(this.#dir, LEVELS_DIR), storage);
    await syncDirectory(this.#dir, storage);
    await writeManifest(this.#dir, manifest, storage);
    await this.#store.swapIn(this, this.#lock);
    return manifest;
  }

  /** Closes open files of an unfinished install and removes what it wrote. */
  abort(): void {
    this.#base?.close();
    this.#level?.close();
    this.#store.discardState(this, this.#lock);
  }
}

/**
 * A file arriving in chunks at increasing offsets; the CRC32C counts the holes as zeroes, combined
 * in O(log n) (crc32cOfZeros) rather than hashed, so a large sparse base costs nothing for them.
 */
class FileReceive {
  readonly path: string;
  readonly sizeBytes: number;
  #file: StorageFile | undefined;
  /** CRC32C of bytes [0, #crcBytes) of the file. */
  #crc32c = 0;
  #crcBytes = 0;
  receivedBytes = 0;

  private constructor(path: string, sizeBytes: number, file: StorageFile) {
    this.path = path;
    this.sizeBytes = sizeBytes;
    this.#file = file;
  }

  static open(storage: Storage, path: string, sizeBytes: number, sparse: boolean): FileReceive {
    const file = storage.open(path, { create: true, truncate: true });
    if (sparse) file.truncate(sizeBytes);
    return new FileReceive(path, sizeBytes, file);
  }

  write(offsetBytes: number, raw: Uint8Array, contiguous: boolean): void {
    assert(this.#file !== undefined, "write after close");
    if (offsetBytes < this.#crcBytes || (contiguous && offsetBytes !== this.#crcBytes)) {
      throw new ProtocolError(
        `Chunk at offset ${offsetBytes} of ${this.path} arrived out of order (expected ${
          contiguous ? "" : "at or after "
        }${this.#crcBytes})`,
      );
    }
    if (raw.length === 0 || offsetBytes + raw.length > this.sizeBytes) {
      throw new ProtocolError(
        `Chunk of ${raw.length} bytes at offset ${offsetBytes} does not fit ${this.path} (${this.sizeBytes} bytes)`,
      );
    }
    this.#crcZeroesUpTo(offsetBytes);
    this.#file.write(raw, raw.length, offsetBytes);
    this.#crc32c = crc32cCombine(this.#crc32c, crc32c(raw), raw.length);
    this.#crcBytes = offsetBytes + raw.length;
    this.receivedBytes += raw.length;
  }

  #crcZeroesUpTo(offsetBytes: number): void {
    const holeBytes = offsetBytes - this.#crcBytes;
    this.#crc32c = crc32cCombine(this.#crc32c, crc32cOfZeros(holeBytes), holeBytes);
    this.#crcBytes = offsetBytes;
  }

  /** Syncs and closes the file; returns the CRC32C of all of it. */
  async finish(): Promise<string> {
    assert(this.#file !== undefined, "finish after close");
    this.#crcZeroesUpTo(this.sizeBytes);
    await this.#file.syncData();
    this.close();
    return crc32cHex(this.#crc32c);
  }

  close(): void {
    this.#file?.close();
    this.#file = undefined;
  }
}
