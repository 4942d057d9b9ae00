/**
 * A simulated disk for power-cut tests, in memory, seeded and deterministic (in the spirit of
 * TigerBeetle's VOPR and FoundationDB's simulation). It keeps, per file, what is durable and what
 * is only cached, and per directory which creations, renames and unlinks a directory fsync made
 * durable. At a power cut ({@linkcode SimDisk.powerCut}) every process using it dies, and:
 *
 * - each file write that no fsync covered is independently kept, lost, or torn at 512-byte
 *   sector granularity (some sectors new, the others old), and a lost write that grew the file
 *   may leave the size grown over zeroes (metadata written, data not);
 * - each unsynced truncation is kept or lost;
 * - each directory keeps a prefix of its unsynced changes (directory operations reach the disk
 *   in order per directory, but may be undone from any point on);
 * - every lock is released.
 *
 * The code under test sees a {@linkcode Storage} and cannot tell it from a real disk: fsyncs and
 * lock waits complete asynchronously, in an order the seed chooses among those outstanding.
 *
 * @module
 */
import { setImmediate } from "node:timers";
import { posix } from "node:path";
import { assert } from "../_assert.ts";
import type { Extent } from "../data_extents.ts";
import { SimRandom } from "./sim_random.ts";
import {
  type Storage,
  type StorageFile,
  StorageNotFound,
  type StorageOpenOptions,
  type StorageStat,
} from "./storage.ts";

/** The granularity at which the simulated disk tears writes. */
export const SIM_SECTOR_BYTES = 512;

/** Thrown by every operation of a process after the power cut that killed it. */
export class PowerCutError extends Error {
  override name = "PowerCutError";
}

/** What the simulated disk does with unsynced data at a power cut. */
export type CutMode =
  /** Every unsynced write and directory change is lost (a disk without a write cache). */
  | "lose-all"
  /** Every unsynced write and directory change is kept (the cache was written back in time). */
  | "keep-all"
  /** Each unsynced write independently kept, lost or torn; each directory keeps a random prefix. */
  | "random"
  /** A prefix of each file's unsynced writes is kept, the one after it torn, the rest lost. */
  | "prefix";

/** All cut modes, for soaks that pick one per cut. */
export const CUT_MODES: readonly CutMode[] = ["lose-all", "keep-all", "random", "prefix"];

/** What a power cut did, for the soak's report. */
export interface PowerCutReport {
  fileMode: CutMode;
  dirMode: CutMode;
  writesKept: number;
  writesLost: number;
  writesTorn: number;
  truncatesKept: number;
  truncatesLost: number;
  dirChangesKept: number;
  dirChangesUndone: number;
}

/** Options of {@linkcode SimDisk}. */
export interface SimDiskOptions {
  /** Seed of the schedule and the faults. */
  seed: number;
}

/** Growable file content. */
class Bytes {
  data: Uint8Array;
  size: number;

  constructor(data = new Uint8Array(0), size = 0) {
    this.data = data;
    this.size = size;
  }

  clone(): Bytes {
    return new Bytes(this.data.slice(0, this.size), this.size);
  }

  #reserve(sizeBytes: number): void {
    if (sizeBytes <= this.data.length) return;
    const grown = new Uint8Array(Math.max(sizeBytes, this.data.length * 2, 4096));
    grown.set(this.data.subarray(0, this.size));
    this.data = grown;
  }

  write(offsetBytes: number, source: Uint8Array): void {
    const end = offsetBytes + source.length;
    this.#reserve(end);
    if (offsetBytes > this.size) this.data.fill(0, this.size, offsetBytes);
    this.data.set(source, offsetBytes);
    this.size = Math.max(this.size, end);
  }

  truncate(sizeBytes: number): void {
    if (sizeBytes > this.size) {
      this.#reserve(sizeBytes);
      this.data.fill(0, this.size, sizeBytes);
    }
    this.size = sizeBytes;
  }

  /** Grows the size to `sizeBytes` over zeroes (never shrinks). */
  growTo(sizeBytes: number): void {
    if (sizeBytes > this.size) this.truncate(sizeBytes);
  }
}

type FileOp =
  | { id: number; type: "write"; offsetBytes: number; bytes: Uint8Array }
  | { id: number; type: "truncate"; sizeBytes: number };

/** Ids of pending operations, increasing, so a sync knows which came before it. */
let nextOpId = 1;

interface Waiter {
  handle: SimFile;
  resolve: () => void;
}

class FileNode {
  readonly kind = "file";
  current = new Bytes();
  durable = new Bytes();
  pending: FileOp[] = [];
  lockHolder: SimFile | undefined;
  lockWaiters: Waiter[] = [];
}

/** One change of a directory operation: `name` now names `node`, or nothing. */
interface DirChange {
  name: string;
  node: Node | undefined;
}

/** A directory operation: changes applied atomically (a rename is two). */
interface DirOp {
  id: number;
  changes: DirChange[];
}

class DirNode {
  readonly kind = "directory";
  entries = new Map<string, Node>();
  durable = new Map<string, Node>();
  /** Unsynced operations, in order. */
  pending: DirOp[] = [];
}

type Node = FileNode | DirNode;

function applyChanges(map: Map<string, Node>, changes: DirChange[]): void {
  for (const { name, node } of changes) {
    if (node === undefined) map.delete(name);
    else map.set(name, node);
  }
}

/** Completions waiting for the scheduler, each tagged with the generation that asked. */
interface Completion {
  generation: number;
  run: () => void;
}

/**
 * The simulated disk: durable state plus page cache, shared by every simulated process that
 * {@linkcode SimDisk.process} hands out until the next {@linkcode SimDisk.powerCut}.
 */
export class SimDisk {
  readonly random: SimRandom;
  #root = new DirNode();
  #generation = 1;
  #queue: Completion[] = [];
  #pumpScheduled = false;
  #ops = 0;
  #cutAtOp: number | undefined;
  #cutListeners: ((report: PowerCutReport) => void)[] = [];
  #lastReport: PowerCutReport | undefined;
  #faultRandom: SimRandom;

  constructor(options: SimDiskOptions) {
    this.random = new SimRandom(options.seed);
    this.#faultRandom = this.random.fork();
  }

  /** The current generation: processes of older ones are dead. */
  get generation(): number {
    return this.#generation;
  }
  /** Operations (writes, truncations, syncs, directory changes) counted so far. */
  get ops(): number {
    return this.#ops;
  }
  /** The report of the last power cut. */
  get lastCut(): PowerCutReport | undefined {
    return this.#lastReport;
  }

  /**
   * A new simulated disk holding a copy of this one's durable state (what a power cut that loses
   * every unsynced change would leave), to examine without disturbing this one.
   */
  copyDurable(seed: number): SimDisk {
    const copy = new SimDisk({ seed });
    const files = new Map<FileNode, FileNode>();
    const copyDir = (from: DirNode, to: DirNode) => {
      for (const [name, node] of from.durable) {
        let copied: Node;
        if (node.kind === "directory") {
          copied = new DirNode();
          copyDir(node, copied);
        } else {
          let file = files.get(node);
          if (file === undefined) {
            file = new FileNode();
            file.durable = node.durable.clone();
            file.current = node.durable.clone();
            files.set(node, file);
          }
          copied = file;
        }
        to.durable.set(name, copied);
        to.entries.set(name, copied);
      }
    };
    copyDir(this.#root, copy.#root);
    return copy;
  }

  /** A storage for a new process of the current generation. */
  process(): SimStorage {
    return new SimStorage(this, this.#generation);
  }

  /**
   * Cuts the power when operation number `op` (counted from now) is about to happen; the
   * operation then throws {@linkcode PowerCutError}. Undefined disarms.
   */
  cutAfterOps(ops: number | undefined): void {
    this.#cutAtOp = ops === undefined ? undefined : this.#ops + ops;
  }

  /** Calls `listener` at the next power cut (automatic or explicit). */
  onCut(listener: (report: PowerCutReport) => void): void {
    this.#cutListeners.push(listener);
  }

  /**
   * Cuts the power now: every process dies, unsynced data and directory changes are kept, lost
   * or torn as `modes` (random by default) say, and every lock is released.
   */
  powerCut(modes: { fileMode?: CutMode; dirMode?: CutMode } = {}): PowerCutReport {
    const random = this.#faultRandom;
    const report: PowerCutReport = {
      fileMode: modes.fileMode ?? random.pick(CUT_MODES),
      dirMode: modes.dirMode ?? random.pick(CUT_MODES),
      writesKept: 0,
      writesLost: 0,
      writesTorn: 0,
      truncatesKept: 0,
      truncatesLost: 0,
      dirChangesKept: 0,
      dirChangesUndone: 0,
    };
    this.#generation++;
    this.#cutAtOp = undefined;
    this.#queue = [];
    const files = new Set<FileNode>();
    this.#crashDirectory(this.#root, report, files);
    for (const file of files) this.#crashFile(file, report);
    this.#lastReport = report;
    const listeners = this.#cutListeners;
    this.#cutListeners = [];
    for (const listener of listeners) listener(report);
    return report;
  }

  #crashDirectory(dir: DirNode, report: PowerCutReport, files: Set<FileNode>): void {
    const random = this.#faultRandom;
    const kept = report.dirMode === "lose-all"
      ? 0
      : report.dirMode === "keep-all"
      ? dir.pending.length
      : random.int(0, dir.pending.length);
    for (const op of dir.pending.slice(0, kept)) applyChanges(dir.durable, op.changes);
    report.dirChangesKept += kept;
    report.dirChangesUndone += dir.pending.length - kept;
    dir.pending = [];
    dir.entries = new Map(dir.durable);
    for (const node of dir.entries.values()) {
      if (node.kind === "directory") this.#crashDirectory(node, report, files);
      else files.add(node);
    }
  }

  #crashFile(file: FileNode, report: PowerCutReport): void {
    const random = this.#faultRandom;
    const mode = report.fileMode;
    const content = file.durable;
    const prefix = mode === "prefix" ? random.int(0, file.pending.length) : 0;
    file.pending.forEach((op, index) => {
      let fate: "keep" | "lose" | "tear";
      if (mode === "keep-all") fate = "keep";
      else if (mode === "lose-all") fate = "lose";
      else if (mode === "prefix") {
        fate = index < prefix ? "keep" : index === prefix && random.chance(0.5) ? "tear" : "lose";
      } else fate = random.pick(["keep", "lose", "tear"] as const);
      if (op.type === "truncate") {
        if (fate === "lose") report.truncatesLost++;
        else {
          content.truncate(op.sizeBytes);
          report.truncatesKept++;
        }
        return;
      }
      const end = op.offsetBytes + op.bytes.length;
      if (fate === "keep") {
        content.write(op.offsetBytes, op.bytes);
        report.writesKept++;
      } else if (fate === "lose") {
        // Metadata may reach the disk without the data: the file grew, the bytes read as zero.
        if (mode === "random" && random.chance(0.25)) content.growTo(end);
        report.writesLost++;
      } else {
        tearInto(content, op.offsetBytes, op.bytes, random);
        report.writesTorn++;
      }
    });
    file.pending = [];
    file.current = content.clone();
    file.lockHolder = undefined;
    file.lockWaiters = [];
  }

  // ---- used by SimStorage and SimFile ----

  /** Counts one operation of `generation`, cutting the power when the armed count is reached. */
  countOp(generation: number): void {
    this.assertAlive(generation);
    this.#ops++;
    if (this.#cutAtOp !== undefined && this.#ops >= this.#cutAtOp) {
      this.powerCut();
      throw new PowerCutError(`power cut at operation ${this.#ops}`);
    }
  }

  assertAlive(generation: number): void {
    if (generation !== this.#generation) {
      throw new PowerCutError("the process died in a power cut");
    }
  }

  /** Runs `run` later, in an order the seed picks among all outstanding completions. */
  schedule(generation: number, run: () => void): void {
    this.#queue.push({ generation, run });
    if (this.#pumpScheduled) return;
    this.#pumpScheduled = true;
    setImmediate(() => this.#pump());
  }

  #pump(): void {
    this.#pumpScheduled = false;
    if (this.#queue.length === 0) return;
    const index = this.random.int(0, this.#queue.length - 1);
    const [completion] = this.#queue.splice(index, 1);
    if (this.#queue.length > 0) {
      this.#pumpScheduled = true;
      setImmediate(() => this.#pump());
    }
    if (completion.generation === this.#generation) completion.run();
  }

  get root(): DirNode {
    return this.#root;
  }
}

/** Writes `bytes` at `offsetBytes` sector by sector, each sector kept or lost at random. */
function tearInto(content: Bytes, offsetBytes: number, bytes: Uint8Array, random: SimRandom) {
  const end = offsetBytes + bytes.length;
  let position = offsetBytes;
  let keptEnd = 0;
  while (position < end) {
    const sectorEnd = Math.min(
      end,
      (Math.floor(position / SIM_SECTOR_BYTES) + 1) * SIM_SECTOR_BYTES,
    );
    if (random.chance(0.5)) {
      content.write(position, bytes.subarray(position - offsetBytes, sectorEnd - offsetBytes));
      keptEnd = sectorEnd;
    }
    position = sectorEnd;
  }
  if (keptEnd === 0 && random.chance(0.5)) content.growTo(end);
}

function normalize(path: string): string {
  return posix.resolve("/", path);
}

function split(path: string): { parent: string; name: string } {
  const normalized = normalize(path);
  assert(normalized !== "/", "the root has no parent");
  return { parent: posix.dirname(normalized), name: posix.basename(normalized) };
}

/** One process's view of a {@linkcode SimDisk}; dead (every call throws) after a power cut. */
export class SimStorage implements Storage {
  readonly name = "simulated disk";
  readonly disk: SimDisk;
  readonly generation: number;

  constructor(disk: SimDisk, generation: number) {
    this.disk = disk;
    this.generation = generation;
  }

  /** True until a power cut kills this process. */
  get alive(): boolean {
    return this.generation === this.disk.generation;
  }

  #lookup(path: string): Node | undefined {
    this.disk.assertAlive(this.generation);
    const normalized = normalize(path);
    let node: Node = this.disk.root;
    if (normalized === "/") return node;
    for (const part of normalized.slice(1).split("/")) {
      if (node.kind !== "directory") return undefined;
      const next = node.entries.get(part);
      if (next === undefined) return undefined;
      node = next;
    }
    return node;
  }

  #parentDir(path: string): { dir: DirNode; name: string } {
    const { parent, name } = split(path);
    const dir = this.#lookup(parent);
    if (dir === undefined) throw new StorageNotFound(parent);
    if (dir.kind !== "directory") throw new Error(`Not a directory: ${parent}`);
    return { dir, name };
  }

  #change(dir: DirNode, changes: DirChange[]): void {
    this.disk.countOp(this.generation);
    applyChanges(dir.entries, changes);
    dir.pending.push({ id: nextOpId++, changes });
  }

  open(path: string, options: StorageOpenOptions = {}): StorageFile {
    const write = options.write === true || options.create === true || options.truncate === true;
    let node = this.#lookup(path);
    if (node !== undefined && options.create === true && options.exclusive === true) {
      throw new Error(`File exists: ${path}`);
    }
    if (node === undefined) {
      if (options.create !== true) throw new StorageNotFound(path);
      const { dir, name } = this.#parentDir(path);
      node = new FileNode();
      this.#change(dir, [{ name, node }]);
    }
    if (node.kind !== "file") throw new Error(`Is a directory: ${path}`);
    const file = new SimFile(this, normalize(path), node, write);
    if (options.truncate === true && node.current.size > 0) file.truncate(0);
    return file;
  }

  stat(path: string): StorageStat | undefined {
    const node = this.#lookup(path);
    if (node === undefined) return undefined;
    return node.kind === "file"
      ? { kind: "file", sizeBytes: node.current.size }
      : { kind: "directory", sizeBytes: 0 };
  }

  readDir(path: string): string[] {
    const node = this.#lookup(path);
    if (node === undefined) throw new StorageNotFound(path);
    if (node.kind !== "directory") throw new Error(`Not a directory: ${path}`);
    return [...node.entries.keys()];
  }

  mkdir(path: string, options: { recursive?: boolean; mode?: number } = {}): void {
    const existing = this.#lookup(path);
    if (existing !== undefined) {
      if (options.recursive === true && existing.kind === "directory") return;
      throw new Error(`File exists: ${path}`);
    }
    const { parent } = split(path);
    if (options.recursive === true && this.#lookup(parent) === undefined) {
      this.mkdir(parent, options);
    }
    const { dir, name } = this.#parentDir(path);
    this.#change(dir, [{ name, node: new DirNode() }]);
  }

  rename(from: string, to: string): void {
    const source = this.#parentDir(from);
    const target = this.#parentDir(to);
    const node = source.dir.entries.get(source.name);
    if (node === undefined) throw new StorageNotFound(from);
    // Every rename sectorlog makes stays within one directory; the simulation keeps to that.
    assert(source.dir === target.dir, `simulated rename across directories: ${from} -> ${to}`);
    if (normalize(from) === normalize(to)) return;
    this.#change(source.dir, [{ name: source.name, node: undefined }, { name: target.name, node }]);
  }

  link(existing: string, to: string): void {
    const node = this.#lookup(existing);
    if (node === undefined) throw new StorageNotFound(existing);
    assert(node.kind === "file", `link of a directory ${existing}`);
    const { dir, name } = this.#parentDir(to);
    if (dir.entries.has(name)) throw new Error(`File exists: ${to}`);
    this.#change(dir, [{ name, node }]);
  }

  unlink(path: string): void {
    const { dir, name } = this.#parentDir(path);
    const node = dir.entries.get(name);
    if (node === undefined) throw new StorageNotFound(path);
    assert(node.kind === "file", `unlink of a directory ${path}`);
    this.#change(dir, [{ name, node: undefined }]);
  }

  removeTree(path: string): void {
    const node = this.#lookup(path);
    if (node === undefined) return;
    if (node.kind === "directory") {
      for (const name of [...node.entries.keys()]) {
        this.removeTree(posix.join(normalize(path), name));
      }
    }
    const { dir, name } = this.#parentDir(path);
    this.#change(dir, [{ name, node: undefined }]);
  }

  syncDirectory(path: string): Promise<void> {
    const node = this.#lookup(path);
    if (node === undefined) return Promise.reject(new StorageNotFound(path));
    if (node.kind !== "directory") return Promise.reject(new Error(`Not a directory: ${path}`));
    this.disk.countOp(this.generation);
    const coveredId = nextOpId - 1;
    return this.#complete(() => {
      // The changes made before the call are durable now; later ones stay pending.
      const covered = node.pending.filter((op) => op.id <= coveredId);
      for (const op of covered) applyChanges(node.durable, op.changes);
      node.pending = node.pending.filter((op) => op.id > coveredId);
    });
  }

  dataExtents(path: string, sizeBytes: number): Iterable<Extent> {
    const node = this.#lookup(path);
    const size = Math.min(sizeBytes, node?.kind === "file" ? node.current.size : 0);
    return size > 0 ? [{ offsetBytes: 0, lengthBytes: size }] : [];
  }

  /** A promise that `work` runs and resolves at a moment the scheduler picks. */
  #complete(work: () => void): Promise<void> {
    return new Promise((resolve, reject) => {
      this.disk.schedule(this.generation, () => {
        try {
          this.disk.countOp(this.generation);
          work();
          resolve();
        } catch (error) {
          reject(error);
        }
      });
    });
  }

  /** Used by {@linkcode SimFile}. */
  completeLater(work: () => void): Promise<void> {
    return this.#complete(work);
  }
}

/** An open file of a simulated process. */
class SimFile implements StorageFile {
  readonly path: string;
  #storage: SimStorage;
  #node: FileNode;
  #writable: boolean;
  #closed = false;

  constructor(storage: SimStorage, path: string, node: FileNode, writable: boolean) {
    this.#storage = storage;
    this.path = path;
    this.#node = node;
    this.#writable = writable;
  }

  #check(): void {
    this.#storage.disk.assertAlive(this.#storage.generation);
    assert(!this.#closed, `use of closed file ${this.path}`);
  }

  sizeBytes(): number {
    this.#check();
    return this.#node.current.size;
  }

  read(target: Uint8Array, lengthBytes: number, offsetBytes: number): number {
    this.#check();
    const content = this.#node.current;
    const n = Math.max(0, Math.min(lengthBytes, content.size - offsetBytes));
    if (n > 0) target.set(content.data.subarray(offsetBytes, offsetBytes + n));
    return n;
  }

  write(source: Uint8Array, lengthBytes: number, offsetBytes: number): void {
    this.#check();
    assert(this.#writable, `write to ${this.path}, opened read-only`);
    if (lengthBytes === 0) return;
    this.#storage.disk.countOp(this.#storage.generation);
    const bytes = source.slice(0, lengthBytes);
    this.#node.current.write(offsetBytes, bytes);
    this.#node.pending.push({ id: nextOpId++, type: "write", offsetBytes, bytes });
  }

  truncate(sizeBytes: number): void {
    this.#check();
    assert(this.#writable, `truncate of ${this.path}, opened read-only`);
    this.#storage.disk.countOp(this.#storage.generation);
    this.#node.current.truncate(sizeBytes);
    this.#node.pending.push({ id: nextOpId++, type: "truncate", sizeBytes });
  }

  syncData(): Promise<void> {
    try {
      this.#check();
      this.#storage.disk.countOp(this.#storage.generation);
    } catch (error) {
      return Promise.reject(error);
    }
    const node = this.#node;
    const coveredId = nextOpId - 1;
    return this.#storage.completeLater(() => {
      // What was written before the call is durable now; writes made since stay pending.
      for (const op of node.pending) {
        if (op.id > coveredId) break;
        if (op.type === "write") node.durable.write(op.offsetBytes, op.bytes);
        else node.durable.truncate(op.sizeBytes);
      }
      node.pending = node.pending.filter((op) => op.id > coveredId);
    });
  }

  tryLock(): boolean {
    this.#check();
    const node = this.#node;
    if (node.lockHolder !== undefined && node.lockHolder !== this) return false;
    node.lockHolder = this;
    return true;
  }

  lock(): Promise<void> {
    try {
      this.#check();
    } catch (error) {
      return Promise.reject(error);
    }
    if (this.tryLock()) return this.#storage.completeLater(() => {});
    return new Promise((resolve) => this.#node.lockWaiters.push({ handle: this, resolve }));
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    const node = this.#node;
    if (!this.#storage.alive || node.lockHolder !== this) return;
    node.lockHolder = undefined;
    node.lockWaiters = node.lockWaiters.filter((waiter) => !waiter.handle.#closed);
    const next = node.lockWaiters.shift();
    if (next === undefined) return;
    node.lockHolder = next.handle;
    this.#storage.disk.schedule(this.#storage.generation, next.resolve);
  }
}
