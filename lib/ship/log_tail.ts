/**
 * Reading a logdir's entries from a given seq onward while its writer keeps appending: the
 * sender's source. {@linkcode LogTail} remembers where it stopped (file and offset), so a poll
 * costs one read at the end of the live segment instead of a rescan of the log.
 *
 * @module
 */
import * as fs from "node:fs";
import { join } from "node:path";
import { assert } from "../_assert.ts";
import { crc32c, crc32cCombine } from "../checksum.ts";
import { IntegrityError } from "../errors.ts";
import {
  decodeEntryHeader,
  ENTRY_HEADER_BYTES,
  type EntryHeader,
  payloadMatches,
} from "../format/entry.ts";
import {
  listSegments,
  MANIFEST_FILE,
  readLogdirSyncRecord,
  SEGMENTS_DIR,
} from "../format/logdir.ts";
import {
  decodeManifest,
  type Manifest,
  MANIFEST_BYTES_MAX,
  nextSeqAfterSealed,
} from "../format/manifest.ts";
import { SYNC_RECORD_FILE } from "../format/sync_record.ts";
import { realStorage } from "../storage/real_storage.ts";
import { readTextFile } from "../storage/storage.ts";
import { readFully } from "../fd_io.ts";
import { parseSegmentFileName, segmentFileName } from "../format/segment.ts";
import { applyFromSeq } from "../timeline.ts";

/** Read-ahead of a tail: one read syscall fetches this many bytes of entries. */
export const TAIL_BUFFER_BYTES = 4 * 1024 * 1024;

/** One entry as it is on disk: `bytes` is header + payload, valid until the next read. */
export interface TailEntry {
  header: EntryHeader;
  bytes: Uint8Array;
  /** The header's own CRC32C (bytes 60..63): a fingerprint of the entry. */
  headerCrc32c: number;
}

/**
 * Whole entries that lie one after another in a tail's read buffer, as on disk: ship sends `bytes`
 * as an ENTRIES body without copying it. Valid until the next read.
 */
export interface TailRun {
  bytes: Uint8Array;
  entries: number;
  firstSeq: number;
  lastSeq: number;
  firstTimeUs: number;
  /** CRC32C of `bytes`, combined from each entry's header CRC and its checked payload CRC. */
  crc32c: number;
}

/** Where an entry starts, or where it will start when it does not exist yet. */
export interface SeqLocation {
  path: string;
  offsetBytes: number;
  /** True when `seq` is the next seq to be written (no entry there yet). */
  atEnd: boolean;
  /** The header CRC of the entry at `seq`, when it exists. */
  headerCrc32c?: number;
}

/** Why {@linkcode locateSeq} found no place for a seq. */
export type SeqProblem = "before-start" | "after-end";

/**
 * Finds where entry `seq` of the logdir starts. "before-start" when the logdir no longer holds
 * it (compacted away or before the base), "after-end" when the log has not reached `seq - 1`.
 * Reads only headers of one segment.
 */
export async function locateSeq(
  logdir: string,
  manifest: Manifest,
  seq: number,
): Promise<SeqLocation | SeqProblem> {
  if (seq < applyFromSeq(manifest)) return "before-start";
  const refs = await listSegments(logdir, manifest);
  let index = -1;
  for (let i = 0; i < refs.length; i++) if (refs[i].firstSeq <= seq) index = i;
  const endPath = join(logdir, SEGMENTS_DIR, segmentFileName(seq));
  if (index < 0) {
    const empty = refs.length === 0 && seq === nextSeqAfterSealed(manifest);
    return empty ? { path: endPath, offsetBytes: 0, atEnd: true } : "before-start";
  }
  const ref = refs[index];
  if (ref.info !== undefined && ref.info.lastSeq < seq) {
    const last = index === refs.length - 1 && seq === ref.info.lastSeq + 1;
    return last ? { path: endPath, offsetBytes: 0, atEnd: true } : "after-end";
  }
  const fd = fs.openSync(ref.path, "r");
  try {
    const endBytes = ref.info?.sizeBytes ?? fs.fstatSync(fd).size;
    const header = new Uint8Array(ENTRY_HEADER_BYTES);
    let position = 0;
    let expected = ref.firstSeq;
    while (position + ENTRY_HEADER_BYTES <= endBytes) {
      readFully(fd, header, ENTRY_HEADER_BYTES, position);
      const decoded = decodeEntryHeader(header);
      if (!decoded.ok || decoded.header.seq !== expected) break;
      const entryEnd = position + ENTRY_HEADER_BYTES + decoded.header.payloadBytes;
      if (entryEnd > endBytes) break;
      if (expected === seq) {
        const crc = new DataView(header.buffer).getUint32(60, true);
        return { path: ref.path, offsetBytes: position, atEnd: false, headerCrc32c: crc };
      }
      position = entryEnd;
      expected++;
    }
    if (expected !== seq) return "after-end";
    const atEndOfSealed = ref.info !== undefined;
    return atEndOfSealed
      ? { path: endPath, offsetBytes: 0, atEnd: true }
      : { path: ref.path, offsetBytes: position, atEnd: true };
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Reads entries in seq order from a position found by {@linkcode locateSeq}, following the
 * writer from segment to segment. {@linkcode LogTail.next} returns undefined when no whole entry
 * is there yet; call it again later.
 *
 * @example
 * ```ts
 * import { readManifest } from "../format/logdir.ts";
 * import { LogTail } from "./log_tail.ts";
 * const logdir = "/var/lib/sectorlog/vm1";
 * const tail = await LogTail.open(logdir, await readManifest(logdir), 1);
 * if (typeof tail !== "string") {
 *   for (let e = await tail.next(); e !== undefined; e = await tail.next()) console.log(e.header.seq);
 *   tail.close();
 * }
 * ```
 */
export class LogTail {
  readonly logdir: string;
  #path: string;
  #fd: number | undefined;
  #position: number;
  #nextSeq: number;
  #buffer = new Uint8Array(TAIL_BUFFER_BYTES);
  #bufferStart = 0;
  #bufferBytes = 0;
  #lastTimeUs: number | undefined;
  /** Entries up to this seq are durable at the source (sealed, or fsynced as its record says). */
  #durableThroughSeq = 0;

  private constructor(logdir: string, location: SeqLocation, seq: number) {
    this.logdir = logdir;
    this.#path = location.path;
    this.#position = location.offsetBytes;
    this.#nextSeq = seq;
  }

  /** Opens a tail whose first entry is `seq`, or says why it cannot. */
  static async open(
    logdir: string,
    manifest: Manifest,
    seq: number,
  ): Promise<LogTail | SeqProblem> {
    const location = await locateSeq(logdir, manifest, seq);
    if (typeof location === "string") return location;
    return new LogTail(logdir, location, seq);
  }

  /** The seq of the next entry {@linkcode LogTail.next} returns. */
  get nextSeq(): number {
    return this.#nextSeq;
  }

  /** The segment file being read and the offset of the next entry in it. */
  get position(): { path: string; offsetBytes: number } {
    return { path: this.#path, offsetBytes: this.#position };
  }

  /**
   * Returns the next entries that are already in the read buffer, up to `maxBytes` (more only when
   * the first entry alone is larger), reading more only for the first; undefined when no entry is
   * complete yet. Each payload is checked against its header, as by {@linkcode LogTail.next}.
   */
  async nextRun(maxBytes: number): Promise<TailRun | undefined> {
    const first = await this.next();
    if (first === undefined) return undefined;
    const run: TailRun = {
      bytes: first.bytes,
      entries: 1,
      firstSeq: first.header.seq,
      lastSeq: first.header.seq,
      firstTimeUs: first.header.timeUs,
      crc32c: entryCrc32c(first),
    };
    for (;;) {
      const entry = this.#tryRead({ refill: false, maxBytes: maxBytes - run.bytes.length });
      if (entry === undefined) break;
      assert(
        entry.bytes.buffer === run.bytes.buffer &&
          entry.bytes.byteOffset === run.bytes.byteOffset + run.bytes.length,
        "an entry read without a refill follows the previous one in the buffer",
      );
      run.bytes = new Uint8Array(
        run.bytes.buffer,
        run.bytes.byteOffset,
        run.bytes.length + entry.bytes.length,
      );
      run.entries++;
      run.lastSeq = entry.header.seq;
      run.crc32c = crc32cCombine(run.crc32c, entryCrc32c(entry), entry.bytes.length);
    }
    return run;
  }

  /** Returns the next entry, or undefined when none is complete yet. */
  next(): Promise<TailEntry | undefined> {
    let entry = this.#tryRead();
    if (entry !== undefined) return Promise.resolve(entry);
    const nextPath = join(this.logdir, SEGMENTS_DIR, segmentFileName(this.#nextSeq));
    if (nextPath === this.#path || !fs.existsSync(nextPath)) return Promise.resolve(undefined);
    // The writer sealed this segment; it may have appended right before, so look once more.
    entry = this.#tryRead();
    if (entry !== undefined) return Promise.resolve(entry);
    this.#checkSealedEnd();
    this.#switchTo(nextPath);
    return Promise.resolve(this.#tryRead());
  }

  /** Bytes of journal after the read position (this segment's rest and the segments after it). */
  pendingBytes(): number {
    let bytes = 0;
    try {
      bytes += Math.max(0, fs.statSync(this.#path).size - this.#position);
    } catch {
      // Not created yet.
    }
    const currentFirst = parseSegmentFileName(this.#path.slice(this.#path.lastIndexOf("/") + 1));
    try {
      for (const name of fs.readdirSync(join(this.logdir, SEGMENTS_DIR))) {
        const firstSeq = parseSegmentFileName(name);
        if (firstSeq === undefined || currentFirst === undefined || firstSeq <= currentFirst) {
          continue;
        }
        bytes += fs.statSync(join(this.logdir, SEGMENTS_DIR, name)).size;
      }
    } catch {
      // A segment vanished under a compaction: the estimate is only for lag reports.
    }
    return bytes;
  }

  /**
   * Throws when the log has moved on without this tail: the segment it reads holds nothing more,
   * no segment starts at the next seq, yet a later one exists (a compaction or a new base dropped
   * the entries in between). Call it when {@linkcode LogTail.next} keeps returning undefined.
   */
  checkOvertaken(): void {
    let sizeBytes = 0;
    try {
      sizeBytes = fs.statSync(this.#path).size;
    } catch {
      // The segment is gone (or not created yet): look at what exists.
    }
    if (sizeBytes > this.#position) return;
    const dir = join(this.logdir, SEGMENTS_DIR);
    let later: number | undefined;
    try {
      for (const name of fs.readdirSync(dir)) {
        const firstSeq = parseSegmentFileName(name);
        if (firstSeq === this.#nextSeq) return;
        if (firstSeq !== undefined && firstSeq > this.#nextSeq) {
          later = Math.min(later ?? firstSeq, firstSeq);
        }
      }
    } catch {
      return;
    }
    if (later !== undefined) {
      throw new Error(
        `The source logdir ${this.logdir} no longer holds seq ${this.#nextSeq} (its log continues at seq ${later}): it was compacted or re-based while shipping`,
      );
    }
  }

  /** Closes the open segment. */
  close(): void {
    if (this.#fd !== undefined) fs.closeSync(this.#fd);
    this.#fd = undefined;
  }

  /**
   * Reads the entry at the position. With `refill: false` it only looks at what is buffered and
   * returns undefined, keeping the buffer, when the entry is not all there or is over `maxBytes`.
   */
  #tryRead(
    options: { refill: boolean; maxBytes: number } = { refill: true, maxBytes: Infinity },
  ): TailEntry | undefined {
    if (!this.#openFile()) return undefined;
    if (!options.refill && !this.#isBuffered(ENTRY_HEADER_BYTES)) return undefined;
    if (!this.#ensureBuffered(ENTRY_HEADER_BYTES)) return this.#notYet();
    const at = this.#position - this.#bufferStart;
    const decoded = decodeEntryHeader(this.#buffer, at);
    if (!decoded.ok) return this.#notYet();
    const header = decoded.header;
    if (header.seq !== this.#nextSeq) {
      throw new IntegrityError(
        `Out-of-sequence entry in ${this.#path} at offset ${this.#position}: seq ${header.seq}, expected ${this.#nextSeq}`,
        { path: this.#path, offsetBytes: this.#position },
      );
    }
    if (this.#lastTimeUs !== undefined && header.timeUs < this.#lastTimeUs) {
      throw new IntegrityError(
        `Time goes backwards in ${this.#path} at offset ${this.#position}: seq ${header.seq}`,
        { path: this.#path, offsetBytes: this.#position },
      );
    }
    // Only what the source holds durably leaves it: an unsynced entry may be gone after a power
    // cut there, and its seq taken by another, while the receiver kept it.
    if (header.seq > this.#durableThroughSeq && !this.#refreshDurable(header.seq)) {
      return this.#notYet();
    }
    const totalBytes = ENTRY_HEADER_BYTES + header.payloadBytes;
    if (!options.refill && (totalBytes > options.maxBytes || !this.#isBuffered(totalBytes))) {
      return undefined;
    }
    if (!this.#ensureBuffered(totalBytes)) return this.#notYet();
    const start = this.#position - this.#bufferStart;
    const bytes = this.#buffer.subarray(start, start + totalBytes);
    if (!payloadMatches(header, bytes.subarray(ENTRY_HEADER_BYTES))) return this.#notYet();
    const headerCrc32c = new DataView(bytes.buffer, bytes.byteOffset + 60, 4).getUint32(0, true);
    this.#position += totalBytes;
    this.#nextSeq++;
    this.#lastTimeUs = header.timeUs;
    return { header, bytes, headerCrc32c };
  }

  /**
   * Re-reads how far the source is durable (its manifest's sealed segments and its sync record)
   * and says whether `seq` is within. A logdir without a sync record (written by an older
   * sectorlog) is trusted as far as its entries are whole.
   */
  #refreshDurable(seq: number): boolean {
    let sealedThroughSeq = 0;
    try {
      const path = join(this.logdir, MANIFEST_FILE);
      const manifest = decodeManifest(readTextFile(realStorage, path, MANIFEST_BYTES_MAX), path);
      sealedThroughSeq = nextSeqAfterSealed(manifest) - 1;
    } catch {
      // A manifest being replaced: the record alone says, or the next poll does.
    }
    const record = readLogdirSyncRecord(this.logdir);
    const recordMissing = record === undefined &&
      realStorage.stat(join(this.logdir, SYNC_RECORD_FILE)) === undefined;
    const syncedSeq = recordMissing ? Number.MAX_SAFE_INTEGER : record?.journalSyncedSeq ?? 0;
    this.#durableThroughSeq = Math.max(this.#durableThroughSeq, sealedThroughSeq, syncedSeq);
    return seq <= this.#durableThroughSeq;
  }

  /** Nothing whole at the position yet (or a write in progress): forget the read-ahead. */
  #notYet(): undefined {
    this.#bufferBytes = 0;
    return undefined;
  }

  #openFile(): boolean {
    if (this.#fd !== undefined) return true;
    try {
      this.#fd = fs.openSync(this.#path, "r");
      return true;
    } catch (error) {
      if ((error as { code?: string }).code === "ENOENT") return false;
      throw error;
    }
  }

  #isBuffered(bytes: number): boolean {
    const end = this.#bufferStart + this.#bufferBytes;
    return this.#position >= this.#bufferStart && this.#position + bytes <= end;
  }

  #ensureBuffered(bytes: number): boolean {
    if (this.#isBuffered(bytes)) return true;
    if (this.#buffer.length < bytes) this.#buffer = new Uint8Array(bytes);
    let filled = 0;
    while (filled < this.#buffer.length) {
      const count = fs.readSync(
        this.#fd!,
        this.#buffer,
        filled,
        this.#buffer.length - filled,
        this.#position + filled,
      );
      if (count === 0) break;
      filled += count;
    }
    this.#bufferStart = this.#position;
    this.#bufferBytes = filled;
    return filled >= bytes;
  }

  /** A sealed segment ends exactly after its last entry; bytes after it are corruption. */
  #checkSealedEnd(): void {
    if (this.#fd === undefined) return;
    const size = fs.fstatSync(this.#fd).size;
    if (size > this.#position) {
      throw new IntegrityError(
        `Corrupt entry in ${this.#path} at offset ${this.#position}: ${
          size - this.#position
        } bytes that are not a valid entry before the next segment`,
        { path: this.#path, offsetBytes: this.#position },
      );
    }
  }

  #switchTo(path: string): void {
    this.close();
    this.#path = path;
    this.#position = 0;
    this.#bufferBytes = 0;
  }
}

/** CRC32C of a whole entry from its header's bytes and its payload CRC (checked when read). */
function entryCrc32c(entry: TailEntry): number {
  return crc32cCombine(
    crc32c(entry.bytes.subarray(0, ENTRY_HEADER_BYTES)),
    entry.header.payloadCrc32c,
    entry.header.payloadBytes,
  );
}
