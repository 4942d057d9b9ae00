/**
 * The one writer of a logdir: appends entries to the live segment, seals it into the manifest at
 * the size limit, and on open recovers from a crash or a power cut.
 *
 * Recovery decides the end of the log from what was durably written, never from what lies after
 * it: the unsealed segments are read in order and end at the first entry that is not whole (bad
 * header, bad payload, cut short) or does not follow on (seq, time). If that entry starts inside
 * what the sync record says an fsync covered, the damage is to durable data and open refuses; else
 * it is a torn tail, cut off durably (truncate and fsync; unsealed files after it are removed and
 * the directory fsynced) before anything new is appended. See docs/FORMAT.md, "Durability".
 *
 * @module
 */
import { join } from "node:path";
import { assert } from "../_assert.ts";
import { IntegrityError } from "../errors.ts";
import { GroupSync } from "../group_sync.ts";
import { realStorage } from "../storage/real_storage.ts";
import type { Storage } from "../storage/storage.ts";
import { nowUs } from "../time.ts";
import { ENTRY_HEADER_BYTES, type EntryHeader, type EntryKind, makeEntryHeader } from "./entry.ts";
import {
  durableBytesOf,
  listSegments,
  LogdirLock,
  readLogdirSyncRecord,
  readManifest,
  type SegmentRef,
  SEGMENTS_DIR,
  syncDirectory,
  withManifestLock,
  writeManifest,
} from "./logdir.ts";
import { type Manifest, nextSeqAfterSealed, type SegmentInfo } from "./manifest.ts";
import { SEGMENT_BYTES_MAX, SegmentAppender, segmentFileName, SegmentScanner } from "./segment.ts";
import { SYNC_RECORD_FILE, SyncRecordFile } from "./sync_record.ts";

/**
 * The device a log-assisted disk keeps in step with the journal. With one, segments are sealed
 * only once the device holds their entries durably; the writer leaves replay to its owner.
 */
export interface WriterDevice {
  /**
   * Makes every entry up to `seq` durable on the device. Called by a seal after the segment's
   * entries are durable in the journal (so the device may now be written from them).
   */
  syncThrough(seq: number): Promise<void>;
}

/** Options of {@linkcode LogdirWriter.open}. */
export interface LogdirWriterOptions {
  /** What the writer is for, recorded in the lock file and named in busy errors ("watch"). */
  purpose: string;
  /** Where the logdir lives (default: the local filesystem). */
  storage?: Storage;
  /**
   * The device this journal describes (the log-assisted disk). A complete segment that a crash
   * left unsealed then waits for {@linkcode LogdirWriter.sealRecovered}, after the owner replayed
   * the journal onto the device.
   */
  device?: WriterDevice;
  /**
   * A journal no device follows (a receiver's copy of another host's log): nothing needs replay,
   * every segment may be sealed. Without this or `device`, the writer keeps the replay a device
   * still owes (a `mark` or `compact` while `watch` is stopped): entries a watch must re-apply are
   * never sealed, so that its next open still replays them.
   */
  journalOnly?: boolean;
  /** Wall clock in µs (tests inject one). */
  clock?: () => number;
  /**
   * Called after each entry is appended (to the page cache, not yet durable), in seq order, with
   * its header and payload (lent: copy what you keep). For counters and for tests that follow
   * the log as it is written.
   */
  onAppend?: (header: EntryHeader, payload: Uint8Array | undefined) => void;
  /** Seal the live segment at this size. */
  segmentBytesMax?: number;
  /**
   * The logdir's lock, already held by the caller (a receiver holds it across base installs and
   * writers). The writer uses it and leaves it held on close; the caller releases it.
   */
  lock?: LogdirLock;
}

/** What {@linkcode LogdirWriter.open} found and repaired. */
export interface RecoveryReport {
  /** Bytes of torn tail cut from the unsealed segments (0 when the log was clean). */
  tornBytes: number;
  /** Why the tail was torn. */
  tornProblem?: string;
  /** Unsealed segment files after the torn tail that were removed. */
  removedFiles: string[];
  /** The live segment and where its valid data ends. */
  segmentPath: string;
  validBytes: number;
  /**
   * The first seq whose write the device may lack: replay onto the device starts here. Entries
   * before it are in sealed segments or covered by a device sync the sync record names.
   */
  replayFromSeq: number;
  /** Seq of the last write, zero or trim among the unsealed entries (0 when none). */
  lastChangeSeq: number;
}

interface PendingSeal {
  path: string;
  info: SegmentInfo;
}

interface LiveStats {
  firstSeq: number;
  entries: number;
  firstUs: number;
  lastUs: number;
}

/** What the walk over the unsealed segments found. */
interface TailScan {
  /** The unsealed segments kept, each with its valid length and totals. */
  kept: { ref: SegmentRef; info: SegmentInfo }[];
  /** The segment whose tail is cut, and where. */
  cut?: { ref: SegmentRef; validBytes: number; tornBytes: number; problem: string };
  /** Unsealed files beyond the end of the log. */
  beyond: SegmentRef[];
  lastTimeUs: number;
  lastChangeSeq: number;
}

function emptyInfo(file: string, firstSeq: number): SegmentInfo {
  return { file, firstSeq, lastSeq: firstSeq - 1, firstUs: 0, lastUs: 0, sizeBytes: 0, entries: 0 };
}

function isChange(kind: EntryKind): boolean {
  return kind === "write" || kind === "zero" || kind === "trim";
}

/** fsyncs the file at `path` (a segment that recovery found and has no appender for). */
async function syncFile(storage: Storage, path: string): Promise<void> {
  const file = storage.open(path, { write: true });
  try {
    await file.syncData();
  } finally {
    file.close();
  }
}

/** Where the payload of the last appended entry sits (the log-assisted disk reads it back). */
export interface AppendedAt {
  segment: SegmentAppender;
  payloadOffsetBytes: number;
}

/** Appends entries to a logdir; holds the logdir lock until {@linkcode LogdirWriter.close}. */
export class LogdirWriter {
  readonly logdir: string;
  readonly recovery: RecoveryReport;
  readonly storage: Storage;
  #lock: LogdirLock;
  #manifest: Manifest;
  #appender: SegmentAppender;
  #live: LiveStats;
  #nextSeq: number;
  /** The floor of new stamps: the last entry's time, and never before the horizon. */
  #lastTimeUs: number;
  /** The last entry's time (MIN when unknown): entries that arrive stamped follow it. */
  #lastEntryUs: number;
  #options: LogdirWriterOptions;
  /** The background seal of the previous segment, while it runs. */
  #sealing: Promise<void> | undefined;
  /** A failed background seal: every later append and sync reports it. */
  #sealError: Error | undefined;
  #recoveredSeal: PendingSeal | undefined;
  #syncGroup: GroupSync;
  #record: SyncRecordFile;
  /** What the last completed journal sync covered (for the sync record). */
  #journalSynced: { segmentFirstSeq: number; bytes: number; seq: number };
  #deviceSyncedSeq: number | undefined;
  /** First seq a device may still lack (see {@linkcode RecoveryReport.replayFromSeq}). */
  #replayFromSeq: number;
  #lastChangeSeq: number;
  #lastAppendAt = 0;
  #closed = false;

  private constructor(init: {
    logdir: string;
    storage: Storage;
    lock: LogdirLock;
    manifest: Manifest;
    appender: SegmentAppender;
    live: LiveStats;
    lastTimeUs: number;
    lastEntryUs: number;
    options: LogdirWriterOptions;
    recovery: RecoveryReport;
    record: SyncRecordFile;
    deviceSyncedSeq: number | undefined;
  }) {
    this.logdir = init.logdir;
    this.storage = init.storage;
    this.#lock = init.lock;
    this.#manifest = init.manifest;
    this.#appender = init.appender;
    this.#live = init.live;
    this.#nextSeq = init.live.firstSeq + init.live.entries;
    this.#lastTimeUs = init.lastTimeUs;
    this.#lastEntryUs = init.lastEntryUs;
    this.#options = init.options;
    this.recovery = init.recovery;
    this.#record = init.record;
    this.#deviceSyncedSeq = init.deviceSyncedSeq;
    this.#replayFromSeq = init.recovery.replayFromSeq;
    this.#lastChangeSeq = init.recovery.lastChangeSeq;
    this.#journalSynced = {
      segmentFirstSeq: init.live.firstSeq,
      bytes: init.appender.sizeBytes,
      seq: this.#nextSeq - 1,
    };
    this.#syncGroup = new GroupSync(() => this.#syncOnce());
  }

  /**
   * Takes the logdir lock and recovers the unsealed segments (see the module doc).
   *
   * @example
   * ```ts
   * import { LogdirWriter } from "./logdir_writer.ts";
   * const writer = await LogdirWriter.open("/var/lib/sectorlog/vm1", { purpose: "mark" });
   * writer.appendSync("mark", 0, 0, new TextEncoder().encode("before-upgrade"));
   * await writer.close();
   * ```
   */
  static async open(logdir: string, options: LogdirWriterOptions): Promise<LogdirWriter> {
    const storage = options.storage ?? realStorage;
    const lock = options.lock ?? await LogdirLock.acquire(logdir, options.purpose, { storage });
    try {
      const manifest = await readManifest(logdir, storage);
      return await LogdirWriter.#recover(logdir, storage, lock, manifest, options);
    } catch (error) {
      if (options.lock === undefined) lock.release();
      throw error;
    }
  }

  static async #recover(
    logdir: string,
    storage: Storage,
    lock: LogdirLock,
    manifest: Manifest,
    options: LogdirWriterOptions,
  ): Promise<LogdirWriter> {
    const sealedNextSeq = nextSeqAfterSealed(manifest);
    const recordPath = join(logdir, SYNC_RECORD_FILE);
    const record = readLogdirSyncRecord(logdir, storage);
    const hadRecordFile = storage.stat(recordPath) !== undefined;
    const unsealed = (await listSegments(logdir, manifest, storage)).filter((s) => !s.sealed);
    const scan = await scanTail(storage, unsealed, sealedNextSeq, manifest, record);
    if (scan.kept.length > 2) {
      throw new IntegrityError(
        `Logdir ${logdir} has ${scan.kept.length} complete unsealed segments (${
          scan.kept.map((s) => s.ref.file).join(", ")
        }); at most two can be`,
        { path: scan.kept[2].ref.path },
      );
    }
    const segmentsDir = join(logdir, SEGMENTS_DIR);
    const liveKept = scan.kept.at(-1);
    const pendingSeal = scan.kept.length === 2 ? scan.kept[0] : undefined;
    const firstSeq = liveKept?.info.firstSeq ?? sealedNextSeq;
    const path = liveKept?.ref.path ?? join(segmentsDir, segmentFileName(firstSeq));
    const validBytes = liveKept?.info.sizeBytes ?? 0;
    // The cut is made durable before anything is appended: bytes of the torn tail must not come
    // back behind new entries after another power cut.
    const appender = SegmentAppender.open(path, firstSeq, validBytes, storage);
    try {
      await appender.sync();
      // Unsynced entries that survived the cut are made durable before a device replays them.
      if (pendingSeal !== undefined) await syncFile(storage, pendingSeal.ref.path);
      const sealedDeviceSeq = Math.max(sealedNextSeq, manifest.base.replayFromSeq) - 1;
      const deviceSyncedSeq = options.journalOnly === true
        ? undefined
        : Math.max(record?.deviceSyncedSeq ?? sealedDeviceSeq, sealedDeviceSeq);
      const lastSeq = liveKept?.info.lastSeq ?? firstSeq - 1;
      if (deviceSyncedSeq !== undefined && deviceSyncedSeq > Math.max(lastSeq, sealedDeviceSeq)) {
        throw new IntegrityError(
          `Cannot recover ${logdir}: its sync record says the device holds entries up to seq ${deviceSyncedSeq}, but the journal ends at seq ${lastSeq}`,
          { path: recordPath },
        );
      }
      const recordFile = SyncRecordFile.open(storage, recordPath);
      recordFile.write({
        segmentFirstSeq: firstSeq,
        journalSyncedBytes: validBytes,
        journalSyncedSeq: lastSeq,
        deviceSyncedSeq,
      });
      await recordFile.sync();
      for (const ref of scan.beyond) storage.unlink(ref.path);
      if (liveKept === undefined || scan.beyond.length > 0 || !hadRecordFile) {
        await syncDirectory(segmentsDir, storage);
        if (!hadRecordFile) await syncDirectory(logdir, storage);
      }
      const writer = new LogdirWriter({
        logdir,
        storage,
        lock,
        manifest,
        appender,
        live: {
          firstSeq,
          entries: liveKept?.info.entries ?? 0,
          firstUs: liveKept?.info.firstUs ?? 0,
          lastUs: liveKept?.info.lastUs ?? 0,
        },
        // New stamps never go back: not before the last entry, nor before the horizon.
        lastTimeUs: Math.max(scan.lastTimeUs, manifest.horizonUs),
        // Entries that arrive with their stamps (a receiver's) follow the entry before them only:
        // after a new base, the writer that stamped them may be behind its horizon.
        lastEntryUs: scan.lastTimeUs,
        options,
        record: recordFile,
        deviceSyncedSeq,
        recovery: {
          tornBytes: scan.cut?.tornBytes ?? 0,
          tornProblem: scan.cut?.problem,
          removedFiles: scan.beyond.map((ref) => ref.path),
          segmentPath: path,
          validBytes,
          replayFromSeq: options.journalOnly === true
            ? lastSeq + 1
            : Math.max(sealedNextSeq, (deviceSyncedSeq ?? 0) + 1),
          lastChangeSeq: scan.lastChangeSeq,
        },
      });
      if (pendingSeal !== undefined) {
        writer.#recoveredSeal = { path: pendingSeal.ref.path, info: pendingSeal.info };
        if (options.device === undefined) await writer.sealRecovered();
      }
      return writer;
    } catch (error) {
      appender.close();
      throw error;
    }
  }

  /** The manifest as of open or the last seal. */
  get manifest(): Manifest {
    return this.#manifest;
  }
  /** The seq the next entry will carry. */
  get nextSeq(): number {
    return this.#nextSeq;
  }
  /** Time stamp of the last entry (or the horizon when none). */
  get lastTimeUs(): number {
    return this.#lastTimeUs;
  }
  /** The first seq a device may still lack: entries from here on are replayed on open. */
  get replayFromSeq(): number {
    return this.#replayFromSeq;
  }
  /**
   * True when unsealed entries hold writes that a watch must still re-apply to its device (a
   * writer without a device never seals them).
   */
  get hasReplayDebt(): boolean {
    return this.#options.journalOnly !== true && this.#lastChangeSeq >= this.#replayFromSeq;
  }
  /** True when the live segment is full: the next append switches to a new segment. */
  get needsRotation(): boolean {
    if (this.#options.device === undefined && this.hasReplayDebt) return false;
    return this.#appender.sizeBytes >= (this.#options.segmentBytesMax ?? SEGMENT_BYTES_MAX);
  }

  /**
   * True when {@linkcode appendSync} may be called now: the live segment has room, or it is
   * full and no earlier seal is still running (the append then switches segments itself).
   */
  get canAppend(): boolean {
    return this.#sealError === undefined && (!this.needsRotation || this.#sealing === undefined);
  }

  /**
   * Resolves when an append may go ahead (waits for a running seal when the live segment is full
   * again before it ended). Callers re-check {@linkcode canAppend} after it, in the same
   * synchronous step as their append.
   */
  async ready(): Promise<void> {
    while (!this.canAppend) {
      if (this.#sealError !== undefined) throw this.#sealError;
      await this.#sealing?.catch(() => {});
    }
  }

  /**
   * Appends one entry, stamped with the wall clock (never earlier than the entry before), to the
   * page cache. Call {@linkcode sync} for durability. Check {@linkcode canAppend} first.
   */
  appendSync(
    kind: EntryKind,
    offsetBytes: number,
    lengthBytes: number,
    payload?: Uint8Array,
  ): EntryHeader {
    this.#beforeAppend();
    const clock = this.#options.clock ?? nowUs;
    const timeUs = Math.max(clock(), this.#lastTimeUs);
    const header = makeEntryHeader(
      { kind, seq: this.#nextSeq, timeUs, offsetBytes, lengthBytes },
      payload,
    );
    this.#append(header, payload);
    return header;
  }

  /** Where the payload of the entry appended last sits, until its segment is sealed. */
  lastAppendedAt(): AppendedAt {
    return { segment: this.#appender, payloadOffsetBytes: this.#lastAppendAt + ENTRY_HEADER_BYTES };
  }

  /**
   * Appends an entry that already has its seq and time (a receiver storing shipped entries).
   * Its seq must be the next one and its time not earlier than the last entry's; the header is
   * re-encoded byte-identically, so checksums travel unchanged.
   */
  appendExisting(header: EntryHeader, payload?: Uint8Array): void {
    if (header.seq !== this.#nextSeq || header.timeUs < this.#lastEntryUs) {
      throw new IntegrityError(
        `Cannot append entry seq ${header.seq} at ${header.timeUs} µs to ${this.logdir}: expected seq ${this.#nextSeq} at or after ${this.#lastEntryUs} µs`,
      );
    }
    this.#beforeAppend();
    this.#append(header, payload);
  }

  /**
   * Appends a run of entries that already have their seq and time, given as their encoded bytes
   * (header and payload, back to back, exactly the on-disk format) and their decoded headers, in
   * one write per segment they land in. Seq and time rules are those of
   * {@linkcode appendExisting}, checked for every entry before anything is written. Segments fill
   * and seal as with one append per entry. Returns how many entries it appended: fewer than all
   * when the run fills the live segment while an earlier seal still runs; the caller then awaits
   * {@linkcode ready} and calls again with the rest.
   */
  appendExistingRun(bytes: Uint8Array, headers: readonly EntryHeader[]): number {
    let expectedSeq = this.#nextSeq;
    let previousUs = this.#lastEntryUs;
    let entryBytesTotal = 0;
    for (const header of headers) {
      if (header.seq !== expectedSeq || header.timeUs < previousUs) {
        throw new IntegrityError(
          `Cannot append entry seq ${header.seq} at ${header.timeUs} µs to ${this.logdir}: expected seq ${expectedSeq} at or after ${previousUs} µs`,
        );
      }
      expectedSeq++;
      previousUs = header.timeUs;
      entryBytesTotal += ENTRY_HEADER_BYTES + header.payloadBytes;
    }
    assert(bytes.length === entryBytesTotal, "run bytes differ from the sum of its entries");
    const segmentBytesMax = this.#options.segmentBytesMax ?? SEGMENT_BYTES_MAX;
    let appended = 0;
    let position = 0;
    while (appended < headers.length && this.canAppend) {
      this.#beforeAppend();
      // The same split as one append per entry: the entry that reaches the limit is the last.
      let sizeBytes = this.#appender.sizeBytes;
      let end = appended;
      let endPosition = position;
      while (end < headers.length && (end === appended || sizeBytes < segmentBytesMax)) {
        const entryBytes = ENTRY_HEADER_BYTES + headers[end].payloadBytes;
        sizeBytes += entryBytes;
        endPosition += entryBytes;
        end++;
      }
      this.#appender.appendRun(bytes.subarray(position, endPosition), endPosition - position);
      for (let i = appended; i < end; i++) {
        this.#appended(headers[i]);
        if (this.#options.onAppend !== undefined) {
          const payloadAt = position + ENTRY_HEADER_BYTES;
          this.#options.onAppend(
            headers[i],
            bytes.subarray(payloadAt, payloadAt + headers[i].payloadBytes),
          );
        }
        position += ENTRY_HEADER_BYTES + headers[i].payloadBytes;
      }
      appended = end;
      assert(position === endPosition, "run entries and bytes disagree");
    }
    return appended;
  }

  #beforeAppend(): void {
    assert(!this.#closed, "append after close");
    assert(this.canAppend, "append while a full segment waits for its seal: await ready() first");
    if (this.needsRotation) this.#switchSegment();
  }

  #append(header: EntryHeader, payload: Uint8Array | undefined): void {
    this.#lastAppendAt = this.#appender.sizeBytes;
    this.#appender.append(header, payload);
    this.#appended(header);
    this.#options.onAppend?.(header, payload);
  }

  #appended(header: EntryHeader): void {
    this.#nextSeq++;
    this.#lastTimeUs = Math.max(this.#lastTimeUs, header.timeUs);
    this.#lastEntryUs = header.timeUs;
    if (this.#live.entries === 0) this.#live.firstUs = header.timeUs;
    this.#live.entries++;
    this.#live.lastUs = header.timeUs;
    if (isChange(header.kind)) this.#lastChangeSeq = header.seq;
  }

  /**
   * Makes every entry appended before the call durable (group commit: one fsync for many). It
   * also waits for a seal in progress, whose segment holds earlier entries.
   */
  sync(): Promise<void> {
    return this.#syncGroup.request();
  }

  async #syncOnce(): Promise<void> {
    const appender = this.#appender;
    const covered = {
      segmentFirstSeq: appender.firstSeq,
      bytes: appender.sizeBytes,
      seq: this.#live.firstSeq + this.#live.entries - 1,
    };
    const sealing = this.#sealing;
    await appender.sync();
    await sealing;
    if (this.#sealError !== undefined) throw this.#sealError;
    // Only now, with the fsync done and every earlier segment sealed, may the record say so.
    if (covered.segmentFirstSeq >= this.#journalSynced.segmentFirstSeq) {
      this.#journalSynced = covered;
      this.#writeRecord();
    }
  }

  /**
   * Notes that every entry up to `seq` is durable on the device (the log-assisted disk calls this
   * after a device fsync): replay on the next open starts after it.
   */
  noteDeviceSynced(seq: number): void {
    assert(this.#options.journalOnly !== true, "device sync noted on a journal without a device");
    assert(seq < this.#nextSeq, `device synced through seq ${seq}, beyond the journal`);
    if (this.#deviceSyncedSeq !== undefined && seq <= this.#deviceSyncedSeq) return;
    this.#deviceSyncedSeq = seq;
    this.#replayFromSeq = Math.max(this.#replayFromSeq, seq + 1);
    if (!this.#closed) this.#writeRecord();
  }

  #writeRecord(): void {
    this.#record.write({
      segmentFirstSeq: this.#journalSynced.segmentFirstSeq,
      journalSyncedBytes: this.#journalSynced.bytes,
      journalSyncedSeq: this.#journalSynced.seq,
      deviceSyncedSeq: this.#deviceSyncedSeq,
    });
  }

  /** Number of fsyncs of the journal so far (for tests and stats). */
  get syncCount(): number {
    return this.#syncGroup.runs;
  }

  /**
   * Seals the live segment into the manifest, starting a new one, and resolves once the seal is
   * durable, with the first seq of the new live segment (entries before it are all sealed, even
   * if more were appended while the seal ran). No-op (beyond waiting for a running seal) when
   * the live segment is empty.
   */
  async rotate(): Promise<number> {
    assert(
      this.#options.device !== undefined || !this.hasReplayDebt,
      `seal of ${this.logdir} while it holds writes a watch must still replay onto its device`,
    );
    while (this.#sealing !== undefined) await this.#sealing;
    if (this.#sealError !== undefined) throw this.#sealError;
    await this.sealRecovered();
    if (this.#live.entries > 0) this.#switchSegment();
    // Every entry before this seq is now in a sealed segment; appends may go on meanwhile.
    const liveFromSeq = this.#live.firstSeq;
    await this.#sealing;
    if (this.#sealError !== undefined) throw this.#sealError;
    return liveFromSeq;
  }

  /**
   * Switches appends to a new segment at once and seals the full one in the background, so
   * writers never wait for the seal's fsyncs unless the new segment fills up before it ends.
   */
  #switchSegment(): void {
    assert(this.#sealing === undefined, "one seal at a time");
    assert(this.#live.entries > 0, "sealing an empty segment");
    const full = this.#appender;
    const info = this.#liveInfo();
    const path = join(this.logdir, SEGMENTS_DIR, segmentFileName(this.#nextSeq));
    this.#appender = SegmentAppender.open(path, this.#nextSeq, 0, this.storage);
    this.#live = { firstSeq: this.#nextSeq, entries: 0, firstUs: 0, lastUs: 0 };
    const sealing = this.#seal(full, info).catch((error) => {
      this.#sealError = error instanceof Error ? error : new Error(String(error));
    }).finally(() => {
      if (this.#sealing === sealing) this.#sealing = undefined;
    });
    this.#sealing = sealing;
  }

  #liveInfo(): SegmentInfo {
    return {
      file: segmentFileName(this.#live.firstSeq),
      firstSeq: this.#live.firstSeq,
      lastSeq: this.#nextSeq - 1,
      firstUs: this.#live.firstUs,
      lastUs: this.#live.lastUs,
      sizeBytes: this.#appender.sizeBytes,
      entries: this.#live.entries,
    };
  }

  /**
   * The seal: segment fsync, device checkpoint through its last entry, manifest swap, directory
   * fsync (which also makes the new live segment's name durable). Order matters: a segment is
   * listed as sealed only once its entries and their device writes are durable, so crash replay
   * never needs it.
   */
  async #seal(full: SegmentAppender | undefined, info: SegmentInfo): Promise<void> {
    if (full !== undefined) await full.sync();
    else await syncFile(this.storage, join(this.logdir, SEGMENTS_DIR, info.file));
    await this.#options.device?.syncThrough(info.lastSeq);
    full?.close();
    this.#manifest = await withManifestLock(this.logdir, async () => {
      const manifest = await readManifest(this.logdir, this.storage);
      assert(nextSeqAfterSealed(manifest) === info.firstSeq, "manifest moved under the writer");
      manifest.segments.push(info);
      await writeManifest(this.logdir, manifest, this.storage);
      return manifest;
    }, this.storage);
    await syncDirectory(join(this.logdir, SEGMENTS_DIR), this.storage);
  }

  /**
   * Seals the complete segment a crash left unsealed before the live one. With a device, its
   * owner calls this after replaying the journal onto the device; without one, it waits (for
   * ever, if need be) until no replay is owed.
   */
  async sealRecovered(): Promise<void> {
    const pending = this.#recoveredSeal;
    if (pending === undefined) return;
    if (this.#options.device === undefined && this.hasReplayDebt) return;
    this.#recoveredSeal = undefined;
    await this.#seal(undefined, pending.info);
  }

  /** Syncs, optionally seals the live segment, and releases the lock. */
  async close(options: { seal?: boolean } = {}): Promise<void> {
    if (this.#closed) return;
    try {
      await this.sealRecovered();
      if (options.seal === true) await this.rotate();
      await this.sync();
      this.#writeRecord();
      await this.#record.sync();
    } finally {
      await this.#sealing;
      this.#closed = true;
      this.#appender.close();
      this.#record.close();
      if (this.#options.lock === undefined) this.#lock.release();
    }
  }
}

/**
 * Reads the unsealed segments in log order and finds where the log ends (see the module doc).
 * Throws {@linkcode IntegrityError} for damage inside what the sync record says was durable.
 */
async function scanTail(
  storage: Storage,
  unsealed: SegmentRef[],
  sealedNextSeq: number,
  manifest: Manifest,
  record: ReturnType<typeof readLogdirSyncRecord>,
): Promise<TailScan> {
  const scan: TailScan = {
    kept: [],
    beyond: [],
    // Time order is checked between entries: entries of the live segment may be stamped before
    // the horizon (a new base copied while they were written holds them, and replays them).
    lastTimeUs: manifest.segments.at(-1)?.lastUs ?? Number.MIN_SAFE_INTEGER,
    lastChangeSeq: 0,
  };
  let expectedSeq = sealedNextSeq;
  for (const ref of unsealed) {
    if (scan.cut !== undefined || ref.firstSeq !== expectedSeq) {
      // Past the end of the log: a file of a torn tail's future, or one a crash left behind.
      if (scan.cut === undefined && scan.kept.length === 0 && ref.firstSeq < expectedSeq) continue;
      scan.beyond.push(ref);
      continue;
    }
    const durableBytes = durableBytesOf(record, ref);
    const info = emptyInfo(ref.file, ref.firstSeq);
    const scanner = new SegmentScanner(ref.path, {
      storage,
      tolerateTornTail: true,
      durableBytes,
      headersOnly: true,
      payloadsFromBytes: durableBytes,
    });
    let lastChangeSeq = scan.lastChangeSeq;
    let outOfOrder: { offsetBytes: number; problem: string } | undefined;
    for await (const { header, fileOffsetBytes } of scanner.entries()) {
      if (header.seq !== expectedSeq || header.timeUs < scan.lastTimeUs) {
        const problem = header.seq !== expectedSeq
          ? `seq ${header.seq}, expected ${expectedSeq}`
          : `time ${header.timeUs} µs before the entry before it`;
        if (fileOffsetBytes < durableBytes) {
          throw new IntegrityError(
            `Out-of-order entry in ${ref.path} at offset ${fileOffsetBytes}: ${problem}, inside the ${durableBytes} bytes known to be durably written`,
            { path: ref.path, offsetBytes: fileOffsetBytes },
          );
        }
        outOfOrder = {
          offsetBytes: fileOffsetBytes,
          problem: `entry does not follow on: ${problem}`,
        };
        break;
      }
      if (info.entries === 0) info.firstUs = header.timeUs;
      info.entries++;
      info.lastUs = header.timeUs;
      info.lastSeq = header.seq;
      scan.lastTimeUs = header.timeUs;
      expectedSeq = header.seq + 1;
      if (isChange(header.kind)) lastChangeSeq = header.seq;
    }
    scan.lastChangeSeq = lastChangeSeq;
    const fileBytes = storage.stat(ref.path)?.sizeBytes ?? 0;
    const validBytes = outOfOrder?.offsetBytes ?? scanner.validBytes;
    info.sizeBytes = validBytes;
    if (validBytes < fileBytes) {
      scan.cut = {
        ref,
        validBytes,
        tornBytes: fileBytes - validBytes,
        problem: outOfOrder?.problem ?? scanner.tornProblem ?? "torn",
      };
    }
    scan.kept.push({ ref, info });
  }
  // A segment left empty by the cut, after a kept one, is the live segment-to-be: keep it only
  // when it is the first (an empty live segment is fine; an empty one after another is not).
  while (scan.kept.length > 1 && scan.kept.at(-1)!.info.entries === 0) {
    scan.beyond.unshift(scan.kept.pop()!.ref);
  }
  // The record may speak of a segment whose durable bytes are not among those kept: lost data.
  if (
    record !== undefined && record.journalSyncedBytes > 0 && record.segmentFirstSeq >= sealedNextSeq
  ) {
    const named = scan.kept.find((kept) => kept.info.firstSeq === record.segmentFirstSeq);
    if (named === undefined || named.info.sizeBytes < record.journalSyncedBytes) {
      const file = segmentFileName(record.segmentFirstSeq);
      throw new IntegrityError(
        `Segment ${file} was durably written through offset ${record.journalSyncedBytes}, but ${
          named === undefined
            ? "it is missing"
            : `only ${named.info.sizeBytes} bytes of it are whole`
        }`,
        { path: named?.ref.path ?? file, offsetBytes: named?.info.sizeBytes ?? 0 },
      );
    }
  }
  return scan;
}
