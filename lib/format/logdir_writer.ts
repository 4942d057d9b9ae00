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
import { type EntryHeader, type EntryKind, makeEntryHeader } from "./entry.ts";
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
  #rotation: Promise<void> | undefined;
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
    this.#syncGroup = new GroupSync(async () => {
      if (this.#rotation !== undefined) await this.#rotation;
      await this.#appender.sync();
    });
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
    if (live.length > 1) {
      throw new IntegrityError(
        `Logdir ${logdir} has ${live.length} unsealed segments (${
          live.map((s) => s.file).join(", ")
        }); only one can be live`,
        { path: live[1].path },
      );
    }
    const firstSeq = live[0]?.firstSeq ?? expectedFirstSeq;
    const path = live[0]?.path ?? join(logdir, SEGMENTS_DIR, segmentFileName(firstSeq));
    if (firstSeq !== expectedFirstSeq) {
      throw new IntegrityError(
        `Live segment ${path} starts at seq ${firstSeq}, expected ${expectedFirstSeq} after the sealed segments`,
        { path, offsetBytes: 0 },
      );
    }
    const stats: LiveStats = { firstSeq, entries: 0, firstUs: 0, lastUs: 0 };
    let unflushedFromSeq = firstSeq;
    let lastTimeUs = manifest.segments.at(-1)?.lastUs ?? manifest.horizonUs;
    const scanner = new SegmentScanner(path, { tolerateTornTail: true, headersOnly: true });
    if (live.length === 1) {
      let expectedSeq = firstSeq;
      for await (const { header, fileOffsetBytes } of scanner.entries()) {
        if (header.seq !== expectedSeq || header.timeUs < lastTimeUs) {
          throw new IntegrityError(
            `Out-of-order entry in ${path} at offset ${fileOffsetBytes}: seq ${header.seq}`,
            { path, offsetBytes: fileOffsetBytes },
          );
        }
        if (stats.entries === 0) stats.firstUs = header.timeUs;
        stats.entries++;
        stats.lastUs = header.timeUs;
        lastTimeUs = header.timeUs;
        expectedSeq = header.seq + 1;
        if (header.kind === "flush") unflushedFromSeq = header.seq + 1;
      }
    }
    const appender = SegmentAppender.open(path, firstSeq, scanner.validBytes);
    if (live.length === 0) await syncDirectory(join(logdir, SEGMENTS_DIR));
    return new LogdirWriter({
      logdir,
      lock,
      manifest,
      appender,
      live: stats,
      nextSeq: firstSeq + stats.entries,
      lastTimeUs,
      options,
      recovery: {
        tornBytes: scanner.tornBytes,
        tornProblem: scanner.tornProblem,
        segmentPath: path,
        validBytes: scanner.validBytes,
        unflushedFromSeq,
      },
    });
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
  /** True when the live segment is full and must be sealed before the next append. */
  get needsRotation(): boolean {
    return this.#appender.sizeBytes >= (this.#options.segmentBytesMax ?? SEGMENT_BYTES_MAX);
  }

  /** True when {@linkcode appendSync} may be called now (no seal pending or running). */
  get canAppend(): boolean {
    return !this.needsRotation && this.#rotation === undefined;
  }

  /**
   * Resolves when an append may go ahead (seals a full segment first). Callers re-check
   * {@linkcode canAppend} after it, in the same synchronous step as their append.
   */
  async ready(): Promise<void> {
    while (!this.canAppend) {
      await (this.#rotation ?? this.rotate());
    }
  }

  /**
   * Appends one entry, stamped with the wall clock (never earlier than the entry before), to the
   * page cache. Call {@linkcode sync} for durability. Call {@linkcode ready} first.
   */
  appendSync(
    kind: EntryKind,
    offsetBytes: number,
    lengthBytes: number,
    payload?: Uint8Array,
  ): EntryHeader {
    assert(!this.#closed, "append after close");
    assert(this.#rotation === undefined, "append during rotation: await ready() first");
    const clock = this.#options.clock ?? nowUs;
    const timeUs = Math.max(clock(), this.#lastTimeUs);
    const header = makeEntryHeader(
      { kind, seq: this.#nextSeq, timeUs, offsetBytes, lengthBytes },
      payload,
    );
    this.#appender.append(header, payload);
    this.#nextSeq++;
    this.#lastTimeUs = timeUs;
    if (this.#live.entries === 0) this.#live.firstUs = timeUs;
    this.#live.entries++;
    this.#live.lastUs = timeUs;
    return header;
  }

  /**
   * Appends an entry that already has its seq and time (a receiver storing shipped entries).
   * Its seq must be the next one and its time not earlier than the last entry's; the header is
   * re-encoded byte-identically, so checksums travel unchanged.
   */
  appendExisting(header: EntryHeader, payload?: Uint8Array): void {
    assert(!this.#closed, "append after close");
    assert(this.#rotation === undefined, "append during rotation: await ready() first");
    if (header.seq !== this.#nextSeq || header.timeUs < this.#lastTimeUs) {
      throw new IntegrityError(
        `Cannot append entry seq ${header.seq} at ${header.timeUs} µs to ${this.logdir}: expected seq ${this.#nextSeq} at or after ${this.#lastTimeUs} µs`,
      );
    }
    this.#appender.append(header, payload);
    this.#nextSeq++;
    this.#lastTimeUs = header.timeUs;
    if (this.#live.entries === 0) this.#live.firstUs = header.timeUs;
    this.#live.entries++;
    this.#live.lastUs = header.timeUs;
  }

  /** Makes every entry appended before the call durable (group commit: one fsync for many). */
  sync(): Promise<void> {
    return this.#syncGroup.request();
  }

  /** Number of fsyncs of the journal so far (for tests and stats). */
  get syncCount(): number {
    return this.#syncGroup.runs;
  }

  /** Seals the live segment into the manifest and starts a new one. No-op when it is empty. */
  rotate(): Promise<void> {
    if (this.#rotation === undefined) {
      this.#rotation = this.#seal().finally(() => this.#rotation = undefined);
    }
    return this.#rotation;
  }

  async #seal(): Promise<void> {
    if (this.#live.entries === 0) return;
    await this.#options.beforeSeal?.();
    await this.#appender.sync();
    const info: SegmentInfo = {
      file: segmentFileName(this.#live.firstSeq),
      firstSeq: this.#live.firstSeq,
      lastSeq: this.#nextSeq - 1,
      firstUs: this.#live.firstUs,
      lastUs: this.#live.lastUs,
      sizeBytes: this.#appender.sizeBytes,
      entries: this.#live.entries,
    };
    this.#manifest = await withManifestLock(this.logdir, async () => {
      const manifest = await readManifest(this.logdir);
      assert(nextSeqAfterSealed(manifest) === info.firstSeq, "manifest moved under the writer");
      manifest.segments.push(info);
      await writeManifest(this.logdir, manifest);
      return manifest;
    });
    this.#appender.close();
    const path = join(this.logdir, SEGMENTS_DIR, segmentFileName(this.#nextSeq));
    this.#appender = SegmentAppender.open(path, this.#nextSeq, 0);
    await syncDirectory(join(this.logdir, SEGMENTS_DIR));
    this.#live = { firstSeq: this.#nextSeq, entries: 0, firstUs: 0, lastUs: 0 };
  }

  /** Syncs, optionally seals the live segment, and releases the lock. */
  async close(options: { seal?: boolean } = {}): Promise<void> {
    if (this.#closed) return;
    try {
      if (options.seal === true) await this.rotate();
      await this.sync();
    } finally {
      this.#closed = true;
      this.#appender.close();
      if (this.#options.lock === undefined) this.#lock.release();
    }
  }
}
