/**
 * The one writer of a logdir: appends entries to the live segment, seals it into the manifest at
 * the size limit, and on open recovers from a crash by truncating a torn tail.
 *
 * @module
 */
import { join } from "node:path";
import { assert } from "../_assert.ts";
import { IntegrityError } from "../errors.ts";
import { GroupSync } from "../group_sync.ts";
import { nowUs } from "../time.ts";
import { ENTRY_HEADER_BYTES, type EntryHeader, type EntryKind, makeEntryHeader } from "./entry.ts";
import {
  LogdirLock,
  readManifest,
  SEGMENTS_DIR,
  syncDirectory,
  withManifestLock,
  writeManifest,
} from "./logdir.ts";
import { type Manifest, nextSeqAfterSealed, type SegmentInfo } from "./manifest.ts";
import { SEGMENT_BYTES_MAX, SegmentAppender, segmentFileName, SegmentScanner } from "./segment.ts";
import { listSegments } from "./logdir.ts";

/** Options of {@linkcode LogdirWriter.open}. */
export interface LogdirWriterOptions {
  /** What the writer is for, recorded in the lock file and named in busy errors ("watch"). */
  purpose: string;
  /**
   * Runs before a segment is sealed. The log-assisted disk syncs its device here, so that every
   * seal is also a checkpoint: entries of sealed segments never need replay onto the device.
   */
  beforeSeal?: () => Promise<void>;
  /** Wall clock in µs (tests inject one). */
  clock?: () => number;
  /** Seal the live segment at this size. */
  segmentBytesMax?: number;
  /**
   * The logdir's lock, already held by the caller (a receiver holds it across base installs and
   * writers). The writer uses it and leaves it held on close; the caller releases it.
   */
  lock?: LogdirLock;
  /**
   * Leave a complete segment that a crash left unsealed for {@linkcode LogdirWriter.sealRecovered}
   * instead of sealing it during open (the log-assisted disk replays its tail onto the device
   * first, since a sealed segment is never replayed).
   */
  deferRecoverySeal?: boolean;
}

/** What {@linkcode LogdirWriter.open} found and repaired. */
export interface RecoveryReport {
  /** Bytes of torn tail truncated from the live segment (0 when the log was clean). */
  tornBytes: number;
  /** Why the tail was torn. */
  tornProblem?: string;
  /** The live segment and where its valid data ends. */
  segmentPath: string;
  validBytes: number;
  /** The first seq after the last flush entry of the live segment: where device replay starts. */
  unflushedFromSeq: number;
}

interface PendingSeal {
  path: string;
  info: SegmentInfo;
}

interface LiveScan {
  info: SegmentInfo;
  lastFlushSeq: number | undefined;
  scanner: SegmentScanner | undefined;
}

/** Scans an unsealed segment's headers, checking order; a torn tail only where allowed. */
async function scanLive(
  path: string,
  firstSeq: number,
  expectedFirstSeq: number,
  lastTimeUs: number,
  tolerateTornTail: boolean,
): Promise<LiveScan> {
  if (firstSeq !== expectedFirstSeq) {
    throw new IntegrityError(
      `Unsealed segment ${path} starts at seq ${firstSeq}, expected ${expectedFirstSeq}`,
      { path, offsetBytes: 0 },
    );
  }
  const info = emptyInfo(path, firstSeq);
  let lastFlushSeq: number | undefined;
  let expectedSeq = firstSeq;
  const scanner = new SegmentScanner(path, { tolerateTornTail, headersOnly: true });
  for await (const { header, fileOffsetBytes } of scanner.entries()) {
    if (header.seq !== expectedSeq || header.timeUs < lastTimeUs) {
      throw new IntegrityError(
        `Out-of-order entry in ${path} at offset ${fileOffsetBytes}: seq ${header.seq}`,
        { path, offsetBytes: fileOffsetBytes },
      );
    }
    if (info.entries === 0) info.firstUs = header.timeUs;
    info.entries++;
    info.lastUs = header.timeUs;
    info.lastSeq = header.seq;
    lastTimeUs = header.timeUs;
    expectedSeq = header.seq + 1;
    if (header.kind === "flush") lastFlushSeq = header.seq;
  }
  info.sizeBytes = scanner.validBytes;
  if (!tolerateTornTail && info.entries === 0) {
    throw new IntegrityError(`Unsealed segment ${path} before the live one is empty`, { path });
  }
  return { info, lastFlushSeq, scanner };
}

function emptyInfo(path: string, firstSeq: number): SegmentInfo {
  const file = path.slice(path.lastIndexOf("/") + 1);
  return { file, firstSeq, lastSeq: firstSeq - 1, firstUs: 0, lastUs: 0, sizeBytes: 0, entries: 0 };
}

/** fsyncs a file by path (a segment sealed during recovery, which has no appender). */
async function syncFile(path: string): Promise<void> {
  const file = await Deno.open(path, { read: true, write: true });
  try {
    await file.syncData();
  } finally {
    file.close();
  }
}

interface LiveStats {
  firstSeq: number;
  entries: number;
  firstUs: number;
  lastUs: number;
}

/** Appends entries to a logdir; holds the logdir lock until {@linkcode LogdirWriter.close}. */
export class LogdirWriter {
  readonly logdir: string;
  readonly recovery: RecoveryReport;
  #lock: LogdirLock;
  #manifest: Manifest;
  #appender: SegmentAppender;
  #live: LiveStats;
  #nextSeq: number;
  #lastTimeUs: number;
  #options: LogdirWriterOptions;
  /** The background seal of the previous segment, while it runs. */
  #sealing: Promise<void> | undefined;
  /** A failed background seal: every later append and sync reports it. */
  #sealError: Error | undefined;
  #recoveredSeal: PendingSeal | undefined;
  #syncGroup: GroupSync;
  #closed = false;

  private constructor(init: {
    logdir: string;
    lock: LogdirLock;
    manifest: Manifest;
    appender: SegmentAppender;
    live: LiveStats;
    nextSeq: number;
    lastTimeUs: number;
    options: LogdirWriterOptions;
    recovery: RecoveryReport;
  }) {
    this.logdir = init.logdir;
    this.#lock = init.lock;
    this.#manifest = init.manifest;
    this.#appender = init.appender;
    this.#live = init.live;
    this.#nextSeq = init.nextSeq;
    this.#lastTimeUs = init.lastTimeUs;
    this.#options = init.options;
    this.recovery = init.recovery;
    this.#syncGroup = new GroupSync(() => this.#syncOnce());
  }

  /**
   * Takes the logdir lock and opens the live segment, truncating a torn tail.
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
    const lock = options.lock ?? await LogdirLock.acquire(logdir, options.purpose);
    try {
      const manifest = await readManifest(logdir);
      return await LogdirWriter.#recover(logdir, lock, manifest, options);
    } catch (error) {
      if (options.lock === undefined) lock.release();
      throw error;
    }
  }

  static async #recover(
    logdir: string,
    lock: LogdirLock,
    manifest: Manifest,
    options: LogdirWriterOptions,
  ): Promise<LogdirWriter> {
    const expectedFirstSeq = nextSeqAfterSealed(manifest);
    const live = (await listSegments(logdir, manifest)).filter((segment) => !segment.sealed);
    // A writer switches to a new segment before the old one's seal is in the manifest, so a
    // crash can leave two unsealed segments: a complete one and the live one after it.
    if (live.length > 2) {
      throw new IntegrityError(
        `Logdir ${logdir} has ${live.length} unsealed segments (${
          live.map((s) => s.file).join(", ")
        }); at most two can be`,
        { path: live[2].path },
      );
    }
    let lastTimeUs = manifest.segments.at(-1)?.lastUs ?? manifest.horizonUs;
    let nextSeq = expectedFirstSeq;
    let unflushedFromSeq = expectedFirstSeq;
    let pendingSeal: PendingSeal | undefined;
    if (live.length === 2) {
      const complete = await scanLive(live[0].path, live[0].firstSeq, nextSeq, lastTimeUs, false);
      pendingSeal = { path: live[0].path, info: complete.info };
      if (complete.lastFlushSeq !== undefined) unflushedFromSeq = complete.lastFlushSeq + 1;
      nextSeq = complete.info.lastSeq + 1;
      lastTimeUs = complete.info.lastUs;
    }
    const liveRef = live.at(-1);
    const firstSeq = liveRef?.firstSeq ?? nextSeq;
    const path = liveRef?.path ?? join(logdir, SEGMENTS_DIR, segmentFileName(firstSeq));
    const scan = liveRef === undefined
      ? { info: emptyInfo(path, firstSeq), lastFlushSeq: undefined, scanner: undefined }
      : await scanLive(path, firstSeq, nextSeq, lastTimeUs, true);
    if (scan.lastFlushSeq !== undefined) unflushedFromSeq = scan.lastFlushSeq + 1;
    if (scan.info.entries > 0) lastTimeUs = scan.info.lastUs;
    const validBytes = scan.scanner?.validBytes ?? 0;
    const appender = SegmentAppender.open(path, firstSeq, validBytes);
    if (liveRef === undefined) await syncDirectory(join(logdir, SEGMENTS_DIR));
    const writer = new LogdirWriter({
      logdir,
      lock,
      manifest,
      appender,
      live: {
        firstSeq,
        entries: scan.info.entries,
        firstUs: scan.info.firstUs,
        lastUs: scan.info.lastUs,
      },
      nextSeq: firstSeq + scan.info.entries,
      lastTimeUs,
      options,
      recovery: {
        tornBytes: scan.scanner?.tornBytes ?? 0,
        tornProblem: scan.scanner?.tornProblem,
        segmentPath: path,
        validBytes,
        unflushedFromSeq,
      },
    });
    writer.#recoveredSeal = pendingSeal;
    if (pendingSeal !== undefined && options.deferRecoverySeal !== true) {
      await writer.sealRecovered();
    }
    return writer;
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
  /** True when the live segment is full: the next append switches to a new segment. */
  get needsRotation(): boolean {
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

  /**
   * Appends an entry that already has its seq and time (a receiver storing shipped entries).
   * Its seq must be the next one and its time not earlier than the last entry's; the header is
   * re-encoded byte-identically, so checksums travel unchanged.
   */
  appendExisting(header: EntryHeader, payload?: Uint8Array): void {
    if (header.seq !== this.#nextSeq || header.timeUs < this.#lastTimeUs) {
      throw new IntegrityError(
        `Cannot append entry seq ${header.seq} at ${header.timeUs} µs to ${this.logdir}: expected seq ${this.#nextSeq} at or after ${this.#lastTimeUs} µs`,
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
    let previousUs = this.#lastTimeUs;
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
      for (let i = appended; i < end; i++) this.#appended(headers[i]);
      appended = end;
      position = endPosition;
    }
    return appended;
  }

  #beforeAppend(): void {
    assert(!this.#closed, "append after close");
    assert(this.canAppend, "append while a full segment waits for its seal: await ready() first");
    if (this.needsRotation) this.#switchSegment();
  }

  #append(header: EntryHeader, payload: Uint8Array | undefined): void {
    this.#appender.append(header, payload);
    this.#appended(header);
  }

  #appended(header: EntryHeader): void {
    this.#nextSeq++;
    this.#lastTimeUs = header.timeUs;
    if (this.#live.entries === 0) this.#live.firstUs = header.timeUs;
    this.#live.entries++;
    this.#live.lastUs = header.timeUs;
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
    const sealing = this.#sealing;
    await appender.sync();
    await sealing;
    if (this.#sealError !== undefined) throw this.#sealError;
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
    while (this.#sealing !== undefined) await this.#sealing;
    if (this.#sealError !== undefined) throw this.#sealError;
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
    this.#appender = SegmentAppender.open(path, this.#nextSeq, 0);
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
   * The seal: device checkpoint, segment fsync, manifest swap, directory fsync (which also makes
   * the new live segment's name durable). Order matters: a segment is listed as sealed only once
   * its entries and their device writes are durable, so crash replay never needs it.
   */
  async #seal(full: SegmentAppender | undefined, info: SegmentInfo): Promise<void> {
    await this.#options.beforeSeal?.();
    if (full !== undefined) {
      await full.sync();
      full.close();
    } else {
      await syncFile(join(this.logdir, SEGMENTS_DIR, info.file));
    }
    this.#manifest = await withManifestLock(this.logdir, async () => {
      const manifest = await readManifest(this.logdir);
      assert(nextSeqAfterSealed(manifest) === info.firstSeq, "manifest moved under the writer");
      manifest.segments.push(info);
      await writeManifest(this.logdir, manifest);
      return manifest;
    });
    await syncDirectory(join(this.logdir, SEGMENTS_DIR));
  }

  /**
   * Seals the complete segment a crash left unsealed before the live one (see open's
   * `deferRecoverySeal`: the log-assisted disk replays onto its device first).
   */
  async sealRecovered(): Promise<void> {
    const pending = this.#recoveredSeal;
    if (pending === undefined) return;
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
    } finally {
      await this.#sealing;
      this.#closed = true;
      this.#appender.close();
      if (this.#options.lock === undefined) this.#lock.release();
    }
  }
}
