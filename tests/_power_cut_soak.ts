/**
 * The power-cut soak (private to tests/ and scripts/soak.ts): random workloads on the log-assisted
 * disk over a simulated disk, power cut at a random operation, then recovery and checks of every
 * promise DESIGN.md makes. One seed replays one run exactly.
 *
 * Each epoch: (after a cut) maybe a `mark`, `snapshot --refresh` or `compact` while watch is
 * stopped; then watch's recovery; then two connections of pipelined writes, zeroes and trims,
 * some FUA, flushes and marks, with a compaction, a `snapshot --refresh` and a receiver taking
 * shipped entries running beside them; then a clean close. The power is cut at a random point of
 * all that (or after it). A copy of what survived is then recovered and checked:
 *
 * 1. every change acknowledged before an acknowledged flush, every FUA write and every mark is
 *    in the journal (the journal reaches at least the last of them);
 * 2. after recovery the device equals `restore` of the latest state and the model;
 * 3. `restore --at` flush times and random times after the horizon equal the model at that time;
 * 4. `verify` is clean, and opening never refuses: the journal's entries are those appended,
 *    byte for byte;
 * 5. the receiver holds at least every entry it acknowledged, the same bytes as the source.
 *
 * The model is the soak's own record of every entry appended (through the writer's `onAppend`),
 * cut back to what recovery kept, applied in seq order to the image the first snapshot copied.
 *
 * @module
 */
import { setImmediate } from "node:timers";
import { concatBytes } from "../lib/byte_sink.ts";
import { crc32c, crc32cHex } from "../lib/checksum.ts";
import { compactLogdir } from "../lib/compact.ts";
import { BusyError, IntegrityError } from "../lib/errors.ts";
import { LogAssistedDisk } from "../lib/disk.ts";
import {
  encodeEntryHeader,
  ENTRY_HEADER_BYTES,
  type EntryHeader,
  type EntryKind,
} from "../lib/format/entry.ts";
import {
  manifestFingerprint,
  readLogdirSyncRecord,
  readLogEntries,
  readManifest,
} from "../lib/format/logdir.ts";
import { type Manifest, nextSeqAfterSealed } from "../lib/format/manifest.ts";
import { addMark } from "../lib/mark.ts";
import { restoreAt } from "../lib/restore.ts";
import { HostStore } from "../lib/ship/host_store.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import type { SimRandom } from "../lib/storage/sim_random.ts";
import {
  type CutMode,
  PowerCutError,
  SimDisk,
  type SimStorage,
} from "../lib/storage/sim_storage.ts";
import { readFileBytes, type Storage, StorageNotFound } from "../lib/storage/storage.ts";
import { applyFromSeq } from "../lib/timeline.ts";
import { verifyLogdir } from "../lib/verify.ts";

/** The simulated device: 256 sectors. */
export const SOAK_DEVICE_BYTES = 128 * 1024;
const SECTOR_BYTES = 512;
/** Small segments, so that seals (and cuts during seals) happen all the time. */
const SOAK_SEGMENT_BYTES_MAX = 12 * 1024;
const DEVICE = "/sim/disk.img";
const LOGDIR = "/sim/log";
const STORE = "/sim/store";
const HOST_ID = "vm1";
/** Largest write of the workload, in sectors. */
const WRITE_SECTORS_MAX = 16;
/** Restores at random times checked after each cut (besides the latest and flush times). */
const RANDOM_RESTORES_PER_CUT = 2;
/** Restores at flush times checked after each cut. */
const FLUSH_RESTORES_PER_CUT = 2;

/** One broken promise found by the soak. */
export interface Violation {
  seed: number;
  cut: number;
  message: string;
}

/** What one seed's run did and found. */
export interface SeedReport {
  seed: number;
  cuts: number;
  violations: Violation[];
  /** Operations the workload issued, acknowledged, and acknowledged as durable. */
  ops: number;
  durableOps: number;
  /** Cuts during a session (the rest came after a clean close). */
  cutsMidSession: number;
  cutModes: Record<string, number>;
  /** Entries recovery cut off as a torn tail, over all cuts. */
  tornBytes: number;
  compactions: number;
  refreshes: number;
  marksOffline: number;
  receivedEntries: number;
}

/** Options of {@linkcode soakSeed}. */
export interface SoakOptions {
  seed: number;
  cuts: number;
  /** Called with progress lines (one per cut when verbose). */
  log?: (line: string) => void;
}

/** A recorded journal entry: what the writer appended at a seq. */
interface Recorded {
  kind: EntryKind;
  timeUs: number;
  offsetBytes: number;
  lengthBytes: number;
  payload: Uint8Array | undefined;
}

/** Every entry appended, by seq, cut back to what recovery kept after each power cut. */
class History {
  #entries: (Recorded | undefined)[] = [undefined];

  get lastSeq(): number {
    return this.#entries.length - 1;
  }

  record(header: EntryHeader, payload: Uint8Array | undefined): string | undefined {
    if (header.seq !== this.#entries.length) {
      return `entry seq ${header.seq} appended after seq ${this.lastSeq}`;
    }
    this.#entries.push({
      kind: header.kind,
      timeUs: header.timeUs,
      offsetBytes: header.offsetBytes,
      lengthBytes: header.lengthBytes,
      payload: payload === undefined || payload.length === 0 ? undefined : payload.slice(),
    });
    return undefined;
  }

  at(seq: number): Recorded | undefined {
    return this.#entries[seq];
  }

  truncate(lastSeq: number): void {
    this.#entries.length = Math.min(this.#entries.length, lastSeq + 1);
  }

  /** The device after every entry up to `lastSeq` with time ≤ `timeUs`, over `initial`. */
  modelAt(initial: Uint8Array, lastSeq: number, timeUs: number): Uint8Array {
    const image = initial.slice();
    for (let seq = 1; seq <= lastSeq; seq++) {
      const entry = this.#entries[seq]!;
      if (entry.timeUs > timeUs) break;
      if (entry.kind === "write") image.set(entry.payload!, entry.offsetBytes);
      else if (entry.kind === "zero" || entry.kind === "trim") {
        image.fill(0, entry.offsetBytes, entry.offsetBytes + entry.lengthBytes);
      }
    }
    return image;
  }

  /** Times of flush entries up to `lastSeq` at or after `fromUs`. */
  flushTimes(lastSeq: number, fromUs: number): number[] {
    const times: number[] = [];
    for (let seq = 1; seq <= lastSeq; seq++) {
      const entry = this.#entries[seq]!;
      if (entry.kind === "flush" && entry.timeUs >= fromUs) times.push(entry.timeUs);
    }
    return times;
  }
}

/** A request of the workload. */
interface Op {
  id: number;
  kind: "write" | "zero" | "trim" | "flush" | "mark";
  fua: boolean;
  offsetBytes: number;
  lengthBytes: number;
  name?: string;
  seq?: number;
  acked: boolean;
  durable: boolean;
}

/** The soak's clock: forward by a few µs per call, now and then a step back (clamped by writers). */
class SoakClock {
  nowUs = 1_764_000_000_000_000;
  #random: SimRandom;
  constructor(random: SimRandom) {
    this.#random = random;
  }
  readonly fn = (): number => {
    this.nowUs += this.#random.int(1, 40);
    if (this.#random.chance(0.01)) return this.nowUs - this.#random.int(1, 200);
    return this.nowUs;
  };
}

/** The first byte offset where `a` and `b` differ, or -1. */
function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

function describeError(error: unknown): string {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error);
}

function tick(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Errors the code under test raised in the background, per disk generation. */
const backgroundErrors = new Map<SimDisk, { generation: number; error: unknown }[]>();
let rejectionListener = false;
let currentDisks: SimDisk[] = [];

function listenForBackgroundErrors(): void {
  if (rejectionListener) return;
  rejectionListener = true;
  globalThis.addEventListener("unhandledrejection", (event) => {
    event.preventDefault();
    const reason = event.reason;
    if (reason instanceof PowerCutError) return;
    // Attribute it to the disks of the running soaks: the live generation's errors are bugs.
    for (const disk of currentDisks) {
      backgroundErrors.get(disk)?.push({ generation: disk.generation, error: reason });
    }
  });
}

/** Runs one seed for `options.cuts` power cuts and reports every violation. */
export async function soakSeed(options: SoakOptions): Promise<SeedReport> {
  const soak = new Soak(options);
  listenForBackgroundErrors();
  currentDisks.push(soak.disk);
  backgroundErrors.set(soak.disk, []);
  try {
    await soak.run();
  } finally {
    currentDisks = currentDisks.filter((disk) => disk !== soak.disk);
    backgroundErrors.delete(soak.disk);
  }
  return soak.report;
}

class Soak {
  readonly disk: SimDisk;
  readonly report: SeedReport;
  #options: SoakOptions;
  #random: SimRandom;
  #clock: SoakClock;
  #history = new History();
  #initial = new Uint8Array(0);
  #ops = new Map<number, Op>();
  #nextOpId = 1;
  /** In-flight zeroes and trims by kind, offset and length (unique while in flight). */
  #inFlightRanges = new Map<string, Op>();
  #marksByName = new Map<string, Op>();
  /** Every entry up to this seq was acknowledged durable. */
  #durableThroughSeq = 0;
  /** Every entry up to this seq was acknowledged by the receiver. */
  #receivedThroughSeq = 0;
  #cut = 0;
  #opsPerSessionEstimate = 3000;
  #session: { generation: number; violations: string[] } | undefined;

  constructor(options: SoakOptions) {
    this.#options = options;
    this.disk = new SimDisk({ seed: options.seed });
    this.#random = this.disk.random.fork();
    this.#clock = new SoakClock(this.#random.fork());
    this.report = {
      seed: options.seed,
      cuts: 0,
      violations: [],
      ops: 0,
      durableOps: 0,
      cutsMidSession: 0,
      cutModes: {},
      tornBytes: 0,
      compactions: 0,
      refreshes: 0,
      marksOffline: 0,
      receivedEntries: 0,
    };
  }

  #violation(message: string): void {
    this.report.violations.push({ seed: this.#options.seed, cut: this.#cut, message });
  }

  async run(): Promise<void> {
    await this.#setUp();
    for (this.#cut = 1; this.#cut <= this.#options.cuts; this.#cut++) {
      const before = this.report.violations.length;
      await this.#epoch();
      await this.#verify();
      this.report.cuts++;
      const mode = this.disk.lastCut;
      this.#options.log?.(
        `seed ${this.#options.seed} cut ${this.#cut}: ${mode?.fileMode}/${mode?.dirMode}, ` +
          `journal through seq ${this.#history.lastSeq}, ` +
          `${this.report.violations.length - before} violations`,
      );
      // One broken promise usually breaks the next ones too; stop at the first cut that shows one.
      if (this.report.violations.length > before) return;
    }
  }

  async #setUp(): Promise<void> {
    const storage = this.disk.process();
    storage.mkdir("/sim", { recursive: true });
    storage.mkdir(STORE);
    await storage.syncDirectory("/");
    const image = new Uint8Array(SOAK_DEVICE_BYTES);
    this.#random.fill(image.subarray(0, SOAK_DEVICE_BYTES / 2));
    const device = storage.open(DEVICE, { create: true });
    device.write(image, image.length, 0);
    await device.syncData();
    device.close();
    await storage.syncDirectory("/sim");
    await takeSnapshot(DEVICE, LOGDIR, { storage, clock: this.#clock.fn, hostId: HOST_ID });
    this.#initial = image;
  }

  // ---- one epoch: offline steps, recovery, workload, close; the power cut lands somewhere ----

  async #epoch(): Promise<void> {
    // Every process of the session is made now: code that outlives a power cut (a request whose
    // reply was still on its way) must find its processes dead, never a fresh one.
    const processes = [0, 1, 2, 3].map(() => this.disk.process());
    const generation = this.disk.generation;
    const session = { generation, violations: [] as string[] };
    this.#session = session;
    const opsBefore = this.disk.ops;
    this.disk.cutAfterOps(this.#random.int(1, Math.ceil(this.#opsPerSessionEstimate * 1.1)));
    const cut = new Promise<void>((resolve) => this.disk.onCut(() => resolve()));
    const run = this.#runSession(processes).then(
      () => "done" as const,
      (error) => {
        if (this.disk.generation === generation && !(error instanceof PowerCutError)) {
          session.violations.push(
            `the session failed without a power cut: ${describeError(error)}`,
          );
        }
        return "failed" as const;
      },
    );
    const outcome = await Promise.race([run, cut.then(() => "cut" as const)]);
    if (outcome !== "cut" && this.disk.generation === generation) {
      this.#opsPerSessionEstimate = Math.max(200, this.disk.ops - opsBefore);
      this.disk.powerCut();
    } else {
      this.report.cutsMidSession++;
    }
    const report = this.disk.lastCut!;
    const key = `${report.fileMode}/${report.dirMode}`;
    this.report.cutModes[key] = (this.report.cutModes[key] ?? 0) + 1;
    for (const { generation: g, error } of backgroundErrors.get(this.disk) ?? []) {
      if (g === generation) {
        session.violations.push(`a background task failed: ${describeError(error)}`);
      }
    }
    backgroundErrors.set(this.disk, []);
    for (const message of session.violations) this.#violation(message);
    this.#session = undefined;
  }

  async #runSession(processes: SimStorage[]): Promise<void> {
    const [storage, compacting, refreshing, receiving] = processes;
    if (this.#random.chance(0.25)) await this.#offlineMark(storage);
    if (this.#random.chance(0.1)) await this.#refresh(storage, undefined);
    if (this.#random.chance(0.1)) await this.#compact(storage, undefined);
    const disk = await LogAssistedDisk.open(DEVICE, LOGDIR, {
      storage,
      clock: this.#clock.fn,
      segmentBytesMax: SOAK_SEGMENT_BYTES_MAX,
      onAppend: (header, payload) => this.#appended(header, payload),
    });
    if (disk.writer!.nextSeq - 1 !== this.#history.lastSeq) {
      this.#session!.violations.push(
        `recovery kept the journal through seq ${
          disk.writer!.nextSeq - 1
        }, the same state's recovery before kept seq ${this.#history.lastSeq}`,
      );
    }
    const opsTotal = this.#random.int(10, 120);
    const tasks: Promise<void>[] = [
      this.#connection(disk, Math.ceil(opsTotal / 2), this.#random.int(1, 4)),
      this.#connection(disk, Math.floor(opsTotal / 2), this.#random.int(1, 4)),
    ];
    if (this.#random.chance(0.15)) tasks.push(this.#later(() => this.#compact(compacting, disk)));
    if (this.#random.chance(0.08)) tasks.push(this.#later(() => this.#refresh(refreshing, disk)));
    if (this.#random.chance(0.3)) tasks.push(this.#receive(receiving));
    await Promise.all(tasks);
    await disk.close({ seal: this.#random.chance(0.3) });
  }

  /** Runs `task` after a few turns of the event loop, in its own process. */
  async #later(task: () => Promise<void>): Promise<void> {
    for (let i = this.#random.int(0, 40); i > 0; i--) await tick();
    await task();
  }

  #appended(header: EntryHeader, payload: Uint8Array | undefined): void {
    const problem = this.#history.record(header, payload);
    if (problem !== undefined) this.#session?.violations.push(problem);
    if (header.kind === "write") {
      const id = new DataView(payload!.buffer, payload!.byteOffset, 8).getFloat64(0, true);
      const op = this.#ops.get(id);
      if (op !== undefined) op.seq = header.seq;
    } else if (header.kind === "zero" || header.kind === "trim") {
      const op = this.#inFlightRanges.get(
        rangeKey(header.kind, header.offsetBytes, header.lengthBytes),
      );
      if (op !== undefined) op.seq = header.seq;
    } else if (header.kind === "mark") {
      const op = this.#marksByName.get(new TextDecoder().decode(payload));
      if (op !== undefined) op.seq = header.seq;
    }
  }

  #newOp(kind: Op["kind"]): Op {
    const sectors = SOAK_DEVICE_BYTES / SECTOR_BYTES;
    const lengthSectors = this.#random.int(1, WRITE_SECTORS_MAX);
    const op: Op = {
      id: this.#nextOpId++,
      kind,
      fua: kind !== "flush" && kind !== "mark" && this.#random.chance(0.2),
      offsetBytes: this.#random.int(0, sectors - lengthSectors) * SECTOR_BYTES,
      lengthBytes: lengthSectors * SECTOR_BYTES,
      acked: false,
      durable: false,
    };
    this.#ops.set(op.id, op);
    this.report.ops++;
    return op;
  }

  #randomKind(): Op["kind"] {
    const roll = this.#random.next();
    if (roll < 0.6) return "write";
    if (roll < 0.7) return "zero";
    if (roll < 0.8) return "trim";
    if (roll < 0.97) return "flush";
    return "mark";
  }

  async #connection(disk: LogAssistedDisk, opsCount: number, queueDepth: number): Promise<void> {
    const inFlight = new Set<Promise<void>>();
    for (let i = 0; i < opsCount; i++) {
      while (inFlight.size >= queueDepth) await Promise.race(inFlight);
      const kind = this.#randomKind();
      // NBD: a flush waits for the requests before it on its connection.
      if (kind === "flush") await Promise.all(inFlight);
      const request: Promise<void> = this.#issue(disk, kind).finally(() =>
        inFlight.delete(request)
      );
      inFlight.add(request);
    }
    await Promise.all(inFlight);
  }

  async #issue(disk: LogAssistedDisk, kind: Op["kind"]): Promise<void> {
    const op = this.#newOp(kind);
    switch (kind) {
      case "write": {
        const payload = new Uint8Array(op.lengthBytes);
        this.#random.fill(payload);
        new DataView(payload.buffer).setFloat64(0, op.id, true);
        await disk.write(op.offsetBytes, payload, { fua: op.fua });
        break;
      }
      case "zero":
      case "trim": {
        let key = rangeKey(kind, op.offsetBytes, op.lengthBytes);
        while (this.#inFlightRanges.has(key)) {
          op.offsetBytes = (op.offsetBytes + SECTOR_BYTES) % (SOAK_DEVICE_BYTES - op.lengthBytes);
          op.offsetBytes -= op.offsetBytes % SECTOR_BYTES;
          key = rangeKey(kind, op.offsetBytes, op.lengthBytes);
        }
        this.#inFlightRanges.set(key, op);
        try {
          if (kind === "zero") await disk.zero(op.offsetBytes, op.lengthBytes, { fua: op.fua });
          else await disk.trim(op.offsetBytes, op.lengthBytes, { fua: op.fua });
        } finally {
          this.#inFlightRanges.delete(key);
        }
        break;
      }
      case "flush": {
        const covered = [...this.#ops.values()].filter((other) => other.acked && !other.durable);
        await disk.flush();
        if (this.#sessionAlive()) { for (const other of covered) this.#durable(other); }
        break;
      }
      case "mark": {
        op.name = `m${op.id}`;
        this.#marksByName.set(op.name, op);
        await disk.mark(op.name);
        break;
      }
    }
    // A reply that comes after the power cut never reached the client.
    if (!this.#sessionAlive()) return;
    op.acked = true;
    if (op.fua || kind === "mark") this.#durable(op);
  }

  #sessionAlive(): boolean {
    return this.#session !== undefined && this.#session.generation === this.disk.generation;
  }

  #durable(op: Op): void {
    if (op.durable) return;
    op.durable = true;
    this.report.durableOps++;
    if (op.seq !== undefined) this.#durableThroughSeq = Math.max(this.#durableThroughSeq, op.seq);
  }

  async #offlineMark(storage: Storage): Promise<void> {
    const op = this.#newOp("mark");
    op.name = `offline${op.id}`;
    this.#marksByName.set(op.name, op);
    await addMark(LOGDIR, op.name, {
      storage,
      clock: this.#clock.fn,
      onAppend: (header, payload) => this.#appended(header, payload),
      requestMark: () => Promise.resolve(undefined),
    });
    this.report.marksOffline++;
    if (!this.#sessionAlive()) return;
    op.acked = true;
    this.#durable(op);
  }

  async #refresh(storage: Storage, disk: LogAssistedDisk | undefined): Promise<void> {
    await takeSnapshot(DEVICE, LOGDIR, {
      refresh: true,
      storage,
      clock: this.#clock.fn,
      requestSeal: disk === undefined
        ? () => Promise.resolve(undefined)
        : async () => ({ nextSeq: await disk.writer!.rotate() }),
    });
    this.report.refreshes++;
  }

  async #compact(process: Storage, disk: LogAssistedDisk | undefined): Promise<void> {
    const manifest = await readManifest(LOGDIR, process);
    const nowUs = this.#clock.nowUs;
    const cutUs = this.#random.int(manifest.horizonUs, Math.max(manifest.horizonUs, nowUs));
    try {
      await this.#compactOnce(process, Math.min(cutUs, nowUs), nowUs, disk);
    } catch (error) {
      // A new base taken meanwhile makes compaction give up, changing nothing: run it again later.
      if (!(error instanceof BusyError)) throw error;
    }
    this.report.compactions++;
  }

  async #compactOnce(
    process: Storage,
    cutUs: number,
    nowUs: number,
    disk: LogAssistedDisk | undefined,
  ): Promise<void> {
    await compactLogdir(LOGDIR, {
      cutUs,
      nowUs,
      storage: process,
      keepMarks: this.#random.chance(0.2),
      requestSeal: disk === undefined
        ? () => Promise.resolve(undefined)
        : async () => ({ nextSeq: await disk.writer!.rotate() }),
    });
  }

  /**
   * A receiver in its own process takes what the source journal holds durably (never more: a
   * power cut on the source could take back the rest) and acknowledges after its fsync.
   */
  async #receive(storage: Storage): Promise<void> {
    const store = await HostStore.claim(STORE, HOST_ID, {
      storage,
      segmentBytesMax: SOAK_SEGMENT_BYTES_MAX,
    });
    try {
      for (let round = this.#random.int(1, 6); round > 0; round--) {
        for (let i = this.#random.int(0, 30); i > 0; i--) await tick();
        const before = await manifestFingerprint(LOGDIR, storage);
        try {
          await this.#shipRound(storage, store);
        } catch (error) {
          // A compaction or a new base replaced files the round was reading: a sender retries.
          const moved = (error instanceof StorageNotFound || error instanceof IntegrityError) &&
            (await manifestFingerprint(LOGDIR, storage)) !== before;
          if (!moved) throw error;
        }
      }
    } finally {
      await store.close();
    }
  }

  async #shipRound(storage: Storage, store: HostStore): Promise<void> {
    const manifest = await readManifest(LOGDIR, storage);
    const record = readLogdirSyncRecord(LOGDIR, storage);
    const durableSeq = Math.max(nextSeqAfterSealed(manifest) - 1, record?.journalSyncedSeq ?? 0);
    let writer = store.writer;
    if (writer === undefined || writer.nextSeq < applyFromSeq(manifest)) {
      await this.#installState(storage, store, manifest);
      writer = store.writer!;
    }
    const fromSeq = writer.nextSeq;
    if (fromSeq > durableSeq) return;
    const headers: EntryHeader[] = [];
    const chunks: Uint8Array[] = [];
    for await (const entry of readLogEntries(LOGDIR, manifest, { storage, fromSeq })) {
      if (entry.header.seq > durableSeq) break;
      const bytes = new Uint8Array(ENTRY_HEADER_BYTES + entry.header.payloadBytes);
      encodeEntryHeader(entry.header, bytes);
      bytes.set(entry.payload, ENTRY_HEADER_BYTES);
      headers.push(entry.header);
      chunks.push(bytes);
    }
    let index = 0;
    while (index < headers.length) {
      await writer.ready();
      const run = concatBytes(chunks.slice(index));
      index += writer.appendExistingRun(run, headers.slice(index));
    }
    if (headers.length === 0) return;
    await writer.sync();
    if (!this.#sessionAlive()) return;
    this.#receivedThroughSeq = Math.max(this.#receivedThroughSeq, headers.at(-1)!.seq);
    this.report.receivedEntries += headers.length;
  }

  /** Sends the source's base and levels as a new state (a first ship, or one after a fold). */
  async #installState(storage: Storage, store: HostStore, manifest: Manifest): Promise<void> {
    const install = await store.beginState({
      reason: store.writer === undefined ? "new" : "compacted",
      logdirId: manifest.logdirId,
      createdUs: manifest.createdUs,
      deviceBytes: manifest.deviceBytes,
      sectorBytes: manifest.sectorBytes,
      base: manifest.base,
      horizonUs: manifest.horizonUs,
      levels: manifest.levels,
      compactedMarks: manifest.compactedMarks,
      baseIncluded: true,
    });
    try {
      const base = readFileBytes(
        storage,
        `${LOGDIR}/${manifest.base.file}`,
        Number.MAX_SAFE_INTEGER,
      );
      install.baseChunk(0, base);
      await install.baseEnd(manifest.base.crc32c);
      for (const level of manifest.levels) {
        const bytes = readFileBytes(
          storage,
          `${LOGDIR}/levels/${level.file}`,
          Number.MAX_SAFE_INTEGER,
        );
        install.levelBegin(level.file);
        if (bytes.length > 0) install.levelChunk(0, bytes);
        await install.levelEnd(crc32cHex(crc32c(bytes)));
      }
      await install.commit();
    } catch (error) {
      install.abort();
      throw error;
    }
  }

  // ---- after the cut: recover a copy of what survived and check it ----

  async #verify(): Promise<void> {
    const copy = this.disk.copyDurable(this.#random.int(0, 0xffff_ffff));
    const storage = copy.process();
    let disk: LogAssistedDisk;
    try {
      disk = await LogAssistedDisk.open(DEVICE, LOGDIR, {
        storage,
        clock: this.#clock.fn,
        segmentBytesMax: SOAK_SEGMENT_BYTES_MAX,
      });
    } catch (error) {
      this.#violation(`watch refused to open after the cut: ${describeError(error)}`);
      return;
    }
    const lastSeq = disk.writer!.nextSeq - 1;
    this.report.tornBytes += disk.recovery.tornBytes;
    const manifest = disk.writer!.manifest;
    try {
      if (lastSeq > this.#history.lastSeq) {
        const extra: string[] = [];
        for await (
          const { header } of readLogEntries(LOGDIR, manifest, {
            storage,
            fromSeq: this.#history.lastSeq + 1,
            headersOnly: true,
          })
        ) extra.push(`${header.kind} seq ${header.seq} at ${header.timeUs} µs`);
        this.#violation(
          `the journal ends at seq ${lastSeq}, but only ${this.#history.lastSeq} entries were appended: ${
            extra.join(", ")
          }`,
        );
        return;
      }
      if (lastSeq < this.#durableThroughSeq) {
        this.#violation(
          `the journal ends at seq ${lastSeq}, but entries up to seq ${this.#durableThroughSeq} were acknowledged durable`,
        );
      }
      for (const op of this.#ops.values()) {
        // A flush is no entry of its own to find: what it covered is checked op by op.
        if (op.kind !== "flush" && op.durable && (op.seq === undefined || op.seq > lastSeq)) {
          this.#violation(
            `acknowledged durable ${op.kind} #${op.id} (seq ${op.seq}) is not in the journal (ends at seq ${lastSeq})`,
          );
        }
      }
      await this.#checkEntries(storage, manifest, lastSeq);
    } finally {
      await disk.close();
    }
    this.#history.truncate(lastSeq);
    const model = this.#history.modelAt(this.#initial, lastSeq, Number.MAX_SAFE_INTEGER);
    const device = readFileBytes(storage, DEVICE, Number.MAX_SAFE_INTEGER);
    const at = firstDifference(device, model);
    if (at >= 0) {
      this.#violation(`after recovery the device differs from the journal at offset ${at}`);
    }
    await this.#checkRestores(storage, lastSeq);
    const verified = await verifyLogdir(LOGDIR, { storage });
    if (!verified.ok || verified.tornTail !== undefined) {
      this.#violation(
        `verify after recovery: ${verified.problems.map((p) => p.message).join("; ")}${
          verified.tornTail === undefined ? "" : ` torn tail ${JSON.stringify(verified.tornTail)}`
        }`,
      );
    }
    await this.#checkStore(storage);
    // The next epoch starts over: operations of this one are settled (the history keeps them).
    this.#ops.clear();
    this.#marksByName.clear();
  }

  async #checkEntries(storage: Storage, manifest: Manifest, lastSeq: number): Promise<void> {
    for await (
      const { header, payload } of readLogEntries(LOGDIR, manifest, {
        storage,
        fromSeq: applyFromSeq(manifest),
      })
    ) {
      const recorded = this.#history.at(header.seq);
      const same = recorded !== undefined && recorded.kind === header.kind &&
        recorded.timeUs === header.timeUs && recorded.offsetBytes === header.offsetBytes &&
        recorded.lengthBytes === header.lengthBytes &&
        firstDifference(recorded.payload ?? new Uint8Array(0), payload) < 0;
      if (!same) {
        this.#violation(
          `the journal's seq ${header.seq} (${header.kind} at ${header.offsetBytes}+${header.lengthBytes}, ${header.timeUs} µs) is not the entry appended with that seq`,
        );
        return;
      }
      if (header.seq > lastSeq) return;
    }
  }

  async #checkRestores(storage: Storage, lastSeq: number): Promise<void> {
    const manifest = await readManifest(LOGDIR, storage);
    const lastUs = this.#history.at(lastSeq)?.timeUs ?? manifest.horizonUs;
    const times = this.#history.flushTimes(lastSeq, manifest.horizonUs);
    const chosen: (number | undefined)[] = [undefined];
    for (let i = 0; i < FLUSH_RESTORES_PER_CUT && times.length > 0; i++) {
      chosen.push(times[this.#random.int(0, times.length - 1)]);
    }
    for (let i = 0; i < RANDOM_RESTORES_PER_CUT; i++) {
      chosen.push(this.#random.int(manifest.horizonUs, Math.max(manifest.horizonUs, lastUs)));
    }
    for (const timeUs of chosen) {
      const output = "/sim/restored.img";
      try {
        await restoreAt(LOGDIR, output, {
          storage,
          force: true,
          nowUs: Math.max(this.#clock.nowUs, lastUs),
          at: timeUs === undefined ? undefined : { kind: "instant", timeUs },
        });
      } catch (error) {
        this.#violation(`restore --at ${timeUs ?? "latest"} failed: ${describeError(error)}`);
        continue;
      }
      const image = readFileBytes(storage, output, Number.MAX_SAFE_INTEGER);
      const model = this.#history.modelAt(
        this.#initial,
        lastSeq,
        timeUs ?? Number.MAX_SAFE_INTEGER,
      );
      const at = firstDifference(image, model);
      if (at >= 0) {
        this.#violation(
          `restore --at ${
            timeUs ?? "latest"
          } (horizon ${manifest.horizonUs}) differs from the model at offset ${at}`,
        );
      }
    }
  }

  async #checkStore(storage: Storage): Promise<void> {
    if (storage.stat(STORE) === undefined) return;
    let store: HostStore;
    try {
      store = await HostStore.claim(STORE, HOST_ID, { storage });
    } catch (error) {
      this.#violation(`the receiver could not reopen its store: ${describeError(error)}`);
      return;
    }
    try {
      const writer = store.writer;
      if (writer === undefined) {
        if (this.#receivedThroughSeq > 0) {
          this.#violation(
            `the receiver lost its copy (acknowledged seq ${this.#receivedThroughSeq})`,
          );
        }
        return;
      }
      const lastSeq = writer.nextSeq - 1;
      if (lastSeq < this.#receivedThroughSeq) {
        this.#violation(
          `the receiver holds seq ${lastSeq}, but acknowledged seq ${this.#receivedThroughSeq}`,
        );
      }
      const manifest = writer.manifest;
      for await (
        const { header, payload } of readLogEntries(store.hostDir, manifest, {
          storage,
          fromSeq: applyFromSeq(manifest),
        })
      ) {
        const recorded = this.#history.at(header.seq);
        if (recorded === undefined) break; // beyond what the source kept: it never acked those
        const same = recorded.kind === header.kind && recorded.timeUs === header.timeUs &&
          firstDifference(recorded.payload ?? new Uint8Array(0), payload) < 0;
        if (!same) {
          this.#violation(`the receiver's seq ${header.seq} differs from the source's`);
          return;
        }
      }
      const verified = await verifyLogdir(store.hostDir, { storage });
      if (!verified.ok) {
        this.#violation(
          `verify of the receiver's copy: ${verified.problems.map((p) => p.message).join("; ")}`,
        );
      }
    } finally {
      await store.close();
    }
  }
}

function rangeKey(kind: string, offsetBytes: number, lengthBytes: number): string {
  return `${kind}:${offsetBytes}:${lengthBytes}`;
}

export type { CutMode };
