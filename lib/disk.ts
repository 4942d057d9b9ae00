/**
 * The log-assisted disk (LAD): every write is stamped with the time and journaled; the device
 * gets it only once the journal holds it durably. `watch` is an NBD front for it; tests and the
 * power-cut soak drive it directly.
 *
 * Why the device waits for the journal: a power cut may keep a device write that no fsync
 * covered and lose the journal entry it came from, and then the device holds a state no journal
 * describes. So a change goes to the journal (page cache) and into a queue of pending changes
 * at once, and is acknowledged; the applier fsyncs the journal (group commit) and only then
 * writes the queued changes to the device. Reads see the device with the pending changes laid
 * over it. A FLUSH appends a flush entry and fsyncs the journal; a device fsync runs behind,
 * and the sync record notes how far the device is durable, so that recovery replays only the
 * entries after it.
 *
 * @module
 */
import { setImmediate } from "node:timers";
import { assert } from "./_assert.ts";
import { Device } from "./device.ts";
import { UsageError } from "./errors.ts";
import { type EntryHeader, MARK_NAME_BYTES_MAX } from "./format/entry.ts";
import { readLogEntries, readManifest } from "./format/logdir.ts";
import { LogdirWriter, type LogdirWriterOptions } from "./format/logdir_writer.ts";
import type { SegmentAppender } from "./format/segment.ts";
import { GroupSync } from "./group_sync.ts";
import type { BackendWriteOptions, BackendZeroOptions, BlockBackend } from "./nbd/backend.ts";
import { realStorage } from "./storage/real_storage.ts";
import type { Storage } from "./storage/storage.ts";

/** Changes journaled but not yet written to the device that one disk holds; writes wait beyond. */
export const PENDING_CHANGES_MAX = 4096;
/** Payload bytes of pending writes one disk holds; writes wait beyond. */
export const PENDING_BYTES_MAX = 64 * 1024 * 1024;
/** Bytes written to the device between two device fsyncs run in the background. */
export const CHECKPOINT_BYTES = 64 * 1024 * 1024;
/** Bytes the applier writes to the device before it lets the event loop run. */
const APPLY_SLICE_BYTES = 8 * 1024 * 1024;
/** Bytes copied from the journal to the device at once. */
const APPLY_CHUNK_BYTES = 1024 * 1024;

/** Options of {@linkcode LogAssistedDisk.open}. */
export interface DiskOpenOptions {
  /** Serve reads only; nothing is journaled and the logdir is not locked. */
  readOnly?: boolean;
  /** The lock purpose, named when another process finds the logdir busy (default "watch"). */
  purpose?: string;
  /** Wall clock in µs (tests inject one). */
  clock?: () => number;
  /** Seal segments at this size (tests use small ones). */
  segmentBytesMax?: number;
  /** Where the device and the logdir live (default: the local filesystem). */
  storage?: Storage;
  /** Called after each entry is journaled (see {@linkcode LogdirWriterOptions.onAppend}). */
  onAppend?: LogdirWriterOptions["onAppend"];
}

/** What opening the disk found and did. */
export interface DiskRecovery {
  /** Bytes of torn journal tail that were cut. */
  tornBytes: number;
  /** Entries the device may have lacked, re-applied to it (write-ahead recovery). */
  replayedEntries: number;
}

/** Counters of a running disk. */
export interface DiskStats {
  writes: number;
  zeroes: number;
  trims: number;
  flushes: number;
  marks: number;
  bytesWritten: number;
}

/** Mark names are printable text. */
// deno-lint-ignore no-control-regex -- control characters are exactly what mark names must not hold
const MARK_NAME_PATTERN = /^[^\x00-\x1f\x7f]+$/;

/** A change in the journal that the device does not have yet. */
interface PendingChange {
  seq: number;
  kind: "write" | "zero" | "trim";
  offsetBytes: number;
  lengthBytes: number;
  /** Where a write's payload sits in the journal (it is read back from there). */
  segment: SegmentAppender | undefined;
  payloadOffsetBytes: number;
}

/**
 * A device whose every write is also journaled to a logdir, write-ahead: the device is written
 * only from entries the journal holds durably, and a flush makes the journal durable.
 */
export class LogAssistedDisk implements BlockBackend {
  readonly device: Device;
  readonly recovery: DiskRecovery;
  readonly stats: DiskStats = {
    writes: 0,
    zeroes: 0,
    trims: 0,
    flushes: 0,
    marks: 0,
    bytesWritten: 0,
  };
  #writer: LogdirWriter | undefined;
  #flushGroup: GroupSync;
  #checkpointGroup: GroupSync;
  #dirtySinceFlush = false;
  /** Pending changes in seq order, from {@linkcode #pendingHead}. */
  #pending: PendingChange[] = [];
  #pendingHead = 0;
  #pendingBytes = 0;
  #roomWaiters: (() => void)[] = [];
  #applier: Promise<void> | undefined;
  #appliedSinceCheckpointBytes = 0;
  #checkpointWanted = false;
  #applyBuffer: Uint8Array | undefined;
  /** Seq of the last change written to the device (all before it were too). */
  #appliedSeq = 0;
  /** A failed device write or fsync: the disk refuses everything after it. */
  #failure: Error | undefined;

  private constructor(device: Device, writer: LogdirWriter | undefined, recovery: DiskRecovery) {
    this.device = device;
    this.#writer = writer;
    this.recovery = recovery;
    this.#flushGroup = new GroupSync(() => this.#flushOnce());
    this.#checkpointGroup = new GroupSync(() => this.#checkpointOnce());
  }

  /**
   * Opens `devicePath` behind the logdir at `logdir`. Refuses a logdir without a base snapshot or
   * made for a device of another size. After a crash it cuts the torn journal tail and re-applies
   * the entries the device may lack.
   *
   * @example
   * ```ts
   * import { LogAssistedDisk } from "./disk.ts";
   * const disk = await LogAssistedDisk.open("/dev/loop3", "/var/lib/sectorlog/vm1");
   * await disk.write(4096, new Uint8Array(4096).fill(1));
   * await disk.flush();
   * await disk.close();
   * ```
   */
  static async open(
    devicePath: string,
    logdir: string,
    options: DiskOpenOptions = {},
  ): Promise<LogAssistedDisk> {
    const storage = options.storage ?? realStorage;
    const manifest = await readManifest(logdir, storage);
    const device = await Device.open(devicePath, { readOnly: options.readOnly, storage });
    try {
      if (device.sizeBytes !== manifest.deviceBytes) {
        throw new UsageError(
          `Cannot use device ${devicePath} with logdir ${logdir}: the device is ${device.sizeBytes} bytes, the logdir was made for ${manifest.deviceBytes} bytes`,
          { hint: "use the device the snapshot was taken of, or take a new snapshot" },
        );
      }
      if (options.readOnly === true) {
        return new LogAssistedDisk(device, undefined, { tornBytes: 0, replayedEntries: 0 });
      }
      // The seal hook needs the disk, which needs the writer: bind it once both exist.
      let disk: LogAssistedDisk | undefined;
      const writer = await LogdirWriter.open(logdir, {
        purpose: options.purpose ?? "watch",
        storage,
        device: { syncThrough: (seq) => disk!.#syncThrough(seq) },
        clock: options.clock,
        segmentBytesMax: options.segmentBytesMax,
        onAppend: options.onAppend,
      });
      try {
        const replayedEntries = await replayOntoDevice(writer, device);
        disk = new LogAssistedDisk(device, writer, {
          tornBytes: writer.recovery.tornBytes,
          replayedEntries,
        });
        disk.#appliedSeq = writer.recovery.lastChangeSeq;
        await writer.sealRecovered();
        return disk;
      } catch (error) {
        await writer.close().catch(() => {});
        throw error;
      }
    } catch (error) {
      device.close();
      throw error;
    }
  }

  /** The device size in bytes. */
  get sizeBytes(): number {
    return this.device.sizeBytes;
  }
  /** True when opened read-only. */
  get readOnly(): boolean {
    return this.#writer === undefined;
  }
  /** A flush syncs the one journal, so it covers writes of every connection. */
  get canMultiConn(): boolean {
    return true;
  }
  /** The journal writer (undefined when read-only). */
  get writer(): LogdirWriter | undefined {
    return this.#writer;
  }
  /** Changes journaled and acknowledged that the device does not hold yet. */
  get pendingChanges(): number {
    return this.#pending.length - this.#pendingHead;
  }

  /** Reads from the device, with the pending changes laid over it. */
  read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    try {
      this.readSync(offsetBytes, buffer);
      return Promise.resolve();
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** {@linkcode read}, synchronously: what the device holds plus what it is about to get. */
  readSync(offsetBytes: number, buffer: Uint8Array): void {
    this.#throwIfFailed();
    this.device.readInto(offsetBytes, buffer);
    const endBytes = offsetBytes + buffer.length;
    for (let i = this.#pendingHead; i < this.#pending.length; i++) {
      const change = this.#pending[i];
      const from = Math.max(change.offsetBytes, offsetBytes);
      const to = Math.min(change.offsetBytes + change.lengthBytes, endBytes);
      if (from >= to) continue;
      const target = buffer.subarray(from - offsetBytes, to - offsetBytes);
      if (change.kind === "write") {
        change.segment!.readAt(target, change.payloadOffsetBytes + from - change.offsetBytes);
      } else {
        target.fill(0);
      }
    }
  }

  /** Journals `data` at `offsetBytes`; with `fua` the reply waits for durability. */
  async write(offsetBytes: number, data: Uint8Array, options?: BackendWriteOptions): Promise<void> {
    const writer = this.#requireWriter();
    this.#assertInDevice(offsetBytes, data.length);
    while (!this.#hasRoom(writer, data.length)) await this.#roomChanged(writer);
    const header = writer.appendSync("write", offsetBytes, data.length, data);
    const at = writer.lastAppendedAt();
    this.#enqueue({
      seq: header.seq,
      kind: "write",
      offsetBytes,
      lengthBytes: data.length,
      segment: at.segment,
      payloadOffsetBytes: at.payloadOffsetBytes,
    });
    this.stats.writes++;
    this.stats.bytesWritten += data.length;
    if (options?.fua === true) await this.#makeDurable(header.seq);
  }

  /** Journals zeroes over the range. */
  async zero(
    offsetBytes: number,
    lengthBytes: number,
    options?: BackendZeroOptions,
  ): Promise<void> {
    await this.#zeroLike("zero", offsetBytes, lengthBytes, options?.fua === true);
    this.stats.zeroes++;
  }

  /** Journals a discard of the range (it reads back as zeroes). */
  async trim(
    offsetBytes: number,
    lengthBytes: number,
    options?: BackendWriteOptions,
  ): Promise<void> {
    await this.#zeroLike("trim", offsetBytes, lengthBytes, options?.fua === true);
    this.stats.trims++;
  }

  async #zeroLike(kind: "zero" | "trim", offsetBytes: number, lengthBytes: number, fua: boolean) {
    const writer = this.#requireWriter();
    this.#assertInDevice(offsetBytes, lengthBytes);
    while (!this.#hasRoom(writer, 0)) await this.#roomChanged(writer);
    const header = writer.appendSync(kind, offsetBytes, lengthBytes);
    this.#enqueue({
      seq: header.seq,
      kind,
      offsetBytes,
      lengthBytes,
      segment: undefined,
      payloadOffsetBytes: 0,
    });
    if (fua) await this.#makeDurable(header.seq);
  }

  /**
   * True when one more change of `payloadBytes` fits the pending queue and the journal can take
   * an append now. Callers append in the same synchronous step as the check that said so.
   */
  #hasRoom(writer: LogdirWriter, payloadBytes: number): boolean {
    this.#throwIfFailed();
    const pending = this.pendingChanges;
    const full = pending >= PENDING_CHANGES_MAX ||
      (pending > 0 && this.#pendingBytes + payloadBytes > PENDING_BYTES_MAX);
    return !full && writer.canAppend;
  }

  /** Waits for what {@linkcode #hasRoom} lacked: the applier to drain, or a seal to end. */
  async #roomChanged(writer: LogdirWriter): Promise<void> {
    if (!writer.canAppend) {
      await writer.ready();
      return;
    }
    await new Promise<void>((resolve) => this.#roomWaiters.push(resolve));
  }

  #enqueue(change: PendingChange): void {
    this.#pending.push(change);
    this.#pendingBytes += change.kind === "write" ? change.lengthBytes : 0;
    this.#dirtySinceFlush = true;
    this.#startApplier();
  }

  /** Makes the journal durable through `seq` and the device current through it. */
  async #makeDurable(seq: number): Promise<void> {
    await this.#requireWriter().sync();
    await this.#applyThrough(seq);
  }

  /**
   * Makes every write completed before the call durable: a flush entry, then a journal fsync;
   * the changes before it then go to the device. Concurrent flushes share one run.
   */
  flush(): Promise<void> {
    return this.#flushGroup.request();
  }

  async #flushOnce(): Promise<void> {
    const writer = this.#requireWriter();
    this.#throwIfFailed();
    let throughSeq = writer.nextSeq - 1;
    if (this.#dirtySinceFlush) {
      while (!writer.canAppend) await writer.ready();
      this.#dirtySinceFlush = false;
      throughSeq = writer.appendSync("flush", 0, 0).seq;
      this.stats.flushes++;
    }
    await writer.sync();
    await this.#applyThrough(throughSeq);
    // The device is brought to disk behind the reply; the sync record then moves replay on.
    this.#checkpointWanted = true;
    this.#startCheckpoint();
  }

  /** Appends a named point in time and makes it durable. */
  async mark(name: string): Promise<EntryHeader> {
    const payload = encodeMarkName(name);
    const writer = this.#requireWriter();
    this.#throwIfFailed();
    while (!writer.canAppend) await writer.ready();
    const header = writer.appendSync("mark", 0, 0, payload);
    this.stats.marks++;
    await writer.sync();
    return header;
  }

  /**
   * Flushes, writes every pending change to the device and syncs it (so the next open replays
   * nothing), optionally seals the live segment, releases the logdir and closes the device.
   */
  async close(options: { seal?: boolean } = {}): Promise<void> {
    try {
      const writer = this.#writer;
      if (writer !== undefined) {
        try {
          await this.flush();
          await this.#applier;
          await this.#applyThrough(writer.nextSeq - 1);
          await this.#checkpointGroup.request();
        } finally {
          await writer.close({ seal: options.seal });
        }
      }
    } finally {
      this.device.close();
    }
  }

  // ---- the applier: journal-durable changes to the device ----

  #startApplier(): void {
    if (this.#applier !== undefined) return;
    this.#applier = this.#applyLoop().finally(() => {
      this.#applier = undefined;
      if (this.pendingChanges > 0 && this.#failure === undefined) this.#startApplier();
    });
  }

  async #applyLoop(): Promise<void> {
    const writer = this.#requireWriter();
    try {
      while (this.pendingChanges > 0) {
        const throughSeq = this.#pending[this.#pending.length - 1].seq;
        await writer.sync();
        await this.#applyThrough(throughSeq);
        if (this.#appliedSinceCheckpointBytes >= CHECKPOINT_BYTES) this.#checkpointWanted = true;
        this.#startCheckpoint();
      }
    } catch (error) {
      this.#fail(error);
    }
  }

  /**
   * Writes the pending changes up to `seq` to the device, in order. Only for changes the journal
   * holds durably. Safe to run beside itself: each step takes the queue's head synchronously.
   */
  async #applyThrough(seq: number): Promise<void> {
    let sliceBytes = 0;
    while (this.pendingChanges > 0 && this.#pending[this.#pendingHead].seq <= seq) {
      this.#throwIfFailed();
      const change = this.#pending[this.#pendingHead];
      try {
        this.#applyOne(change);
      } catch (error) {
        this.#fail(error);
        throw error;
      }
      this.#pendingHead++;
      this.#appliedSeq = change.seq;
      if (change.kind === "write") this.#pendingBytes -= change.lengthBytes;
      this.#appliedSinceCheckpointBytes += change.lengthBytes;
      sliceBytes += change.lengthBytes;
      if (this.#pendingHead >= 1024 && this.#pendingHead * 2 >= this.#pending.length) {
        this.#pending = this.#pending.slice(this.#pendingHead);
        this.#pendingHead = 0;
      }
      if (sliceBytes >= APPLY_SLICE_BYTES) {
        this.#wakeRoomWaiters();
        sliceBytes = 0;
        await new Promise((resolve) => setImmediate(resolve));
      }
    }
    this.#wakeRoomWaiters();
  }

  #applyOne(change: PendingChange): void {
    if (change.kind !== "write") {
      this.device.writeZeroes(change.offsetBytes, change.lengthBytes);
      return;
    }
    this.#applyBuffer ??= new Uint8Array(APPLY_CHUNK_BYTES);
    for (let done = 0; done < change.lengthBytes; done += APPLY_CHUNK_BYTES) {
      const chunk = this.#applyBuffer.subarray(
        0,
        Math.min(APPLY_CHUNK_BYTES, change.lengthBytes - done),
      );
      change.segment!.readAt(chunk, change.payloadOffsetBytes + done);
      this.device.write(change.offsetBytes + done, chunk);
    }
  }

  #wakeRoomWaiters(): void {
    const waiters = this.#roomWaiters;
    this.#roomWaiters = [];
    for (const wake of waiters) wake();
  }

  #startCheckpoint(): void {
    if (!this.#checkpointWanted || this.#failure !== undefined) return;
    this.#checkpointGroup.request().catch((error) => this.#fail(error));
  }

  /** A device fsync, then the sync record says replay may start after what it covered. */
  async #checkpointOnce(): Promise<void> {
    this.#checkpointWanted = false;
    this.#appliedSinceCheckpointBytes = 0;
    // The last change written, not the last entry: a mark or flush after it may not be durable,
    // and the record must never claim more than the journal can be trusted to hold.
    const throughSeq = this.#appliedSeq;
    await this.device.sync();
    this.#requireWriter().noteDeviceSynced(throughSeq);
  }

  /** The seal hook: the journal holds every entry up to `seq` durably; the device must too. */
  async #syncThrough(seq: number): Promise<void> {
    await this.#applyThrough(seq);
    await this.#checkpointGroup.request();
  }

  #fail(error: unknown): void {
    this.#failure ??= error instanceof Error ? error : new Error(String(error));
    this.#wakeRoomWaiters();
  }

  #throwIfFailed(): void {
    if (this.#failure !== undefined) throw this.#failure;
  }

  /** Checked before journaling, so an out-of-range call never leaves an entry behind. */
  #assertInDevice(offsetBytes: number, lengthBytes: number): void {
    assert(
      Number.isSafeInteger(offsetBytes) && Number.isSafeInteger(lengthBytes) && offsetBytes >= 0 &&
        lengthBytes > 0 && offsetBytes + lengthBytes <= this.device.sizeBytes,
      `range ${offsetBytes}+${lengthBytes} is outside ${this.device.path} (${this.device.sizeBytes} bytes)`,
    );
  }

  #requireWriter(): LogdirWriter {
    assert(this.#writer !== undefined, "write on a read-only log-assisted disk");
    return this.#writer;
  }
}

/** Validates a mark name and returns its UTF-8 bytes. */
export function encodeMarkName(name: string): Uint8Array {
  const bytes = new TextEncoder().encode(name);
  if (bytes.length === 0 || bytes.length > MARK_NAME_BYTES_MAX || !MARK_NAME_PATTERN.test(name)) {
    throw new UsageError(
      `Invalid mark name ${
        JSON.stringify(name)
      }: use 1 to ${MARK_NAME_BYTES_MAX} bytes of printable text`,
    );
  }
  return bytes;
}

/**
 * Re-applies the journal's entries that the device may lack (from the writer's replay point on),
 * so that after a crash the device equals the journal's latest state, then syncs the device and
 * notes it in the sync record. Recovery made those entries durable first.
 */
async function replayOntoDevice(writer: LogdirWriter, device: Device): Promise<number> {
  const fromSeq = writer.replayFromSeq;
  let replayed = 0;
  if (fromSeq < writer.nextSeq) {
    const entries = readLogEntries(writer.logdir, writer.manifest, {
      fromSeq,
      storage: writer.storage,
    });
    for await (const { header, payload } of entries) {
      if (header.kind === "write") device.write(header.offsetBytes, payload);
      else if (header.kind === "zero" || header.kind === "trim") {
        device.writeZeroes(header.offsetBytes, header.lengthBytes);
      } else continue;
      replayed++;
    }
    await device.sync();
  }
  // The claim names the last change, not a later mark or flush (see #checkpointOnce).
  writer.noteDeviceSynced(writer.recovery.lastChangeSeq);
  return replayed;
}
