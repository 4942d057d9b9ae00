/**
 * Segments: append-only files of entries, named by the zero-padded hex seq of their first entry so
 * that `ls` order is log order. {@linkcode SegmentScanner} reads one, checking every entry;
 * {@linkcode SegmentAppender} appends to the active one.
 *
 * @module
 */
import * as fs from "node:fs";
import { assert } from "../_assert.ts";
import { IntegrityError } from "../errors.ts";
import {
  decodeEntryHeader,
  encodeEntryHeader,
  ENTRY_HEADER_BYTES,
  ENTRY_MAGIC,
  ENTRY_PAYLOAD_BYTES_MAX,
  type EntryHeader,
  payloadMatches,
} from "./entry.ts";

/** A segment is sealed once it reaches this size (the entry that crosses it is the last). */
export const SEGMENT_BYTES_MAX = 64 * 1024 * 1024;
/** Read buffer of a scanner; it grows to hold one maximal entry when it must. */
export const SCAN_BUFFER_BYTES = 8 * 1024 * 1024;
/** A header scan reads this much at once while payloads stay small. */
const HEADER_SCAN_WINDOW_BYTES = 256 * 1024;
/** Payloads up to this size keep a header scan reading ahead. */
const HEADER_SCAN_READ_AHEAD_PAYLOAD_MAX = 16 * 1024;
/** Entries up to this payload size are written with their header in one syscall. */
const COALESCE_PAYLOAD_BYTES_MAX = 256 * 1024;

const SEGMENT_NAME_PATTERN = /^([0-9a-f]{16})\.seg$/;

/** The file name of the segment whose first entry has `firstSeq`: `0000000000000001.seg`. */
export function segmentFileName(firstSeq: number): string {
  assert(Number.isSafeInteger(firstSeq) && firstSeq >= 1, `bad first seq ${firstSeq}`);
  return `${firstSeq.toString(16).padStart(16, "0")}.seg`;
}

/** The first seq encoded in a segment file name, or undefined if it is not a segment name. */
export function parseSegmentFileName(name: string): number | undefined {
  const match = SEGMENT_NAME_PATTERN.exec(name);
  return match === null ? undefined : parseInt(match[1], 16);
}

/** One entry read from a segment. `payload` is only valid until the scanner moves on. */
export interface ScannedEntry {
  header: EntryHeader;
  payload: Uint8Array;
  /** Offset of the entry header within its file. */
  fileOffsetBytes: number;
}

/** Options of {@linkcode SegmentScanner}. */
export interface SegmentScanOptions {
  /** Stop at this file size (bytes beyond are ignored). Default: the size at open. */
  endBytes?: number;
  /**
   * Treat a bad entry with nothing valid after it as a torn tail (the end of the data) instead of
   * corruption. True for the active segment; sealed segments must be whole.
   */
  tolerateTornTail: boolean;
  /** Check payload checksums (default true). */
  verifyPayloads?: boolean;
  /**
   * Read only headers, skipping payloads (payload is then empty and unchecked) — except for mark
   * entries, whose name is read and checked.
   */
  headersOnly?: boolean;
}

/**
 * Reads the entries of one segment file in order, verifying each. After iteration,
 * {@linkcode SegmentScanner.validBytes} is where the valid data ends and
 * {@linkcode SegmentScanner.tornBytes} how many bytes after it form a torn tail.
 */
export class SegmentScanner {
  readonly path: string;
  #options: SegmentScanOptions;
  #buffer = new Uint8Array(SCAN_BUFFER_BYTES);
  #lastPayloadBytes = 0;
  /** The file range the buffer holds. */
  #windowStart = 0;
  #windowEnd = 0;
  #validBytes = 0;
  #tornBytes = 0;
  #tornProblem: string | undefined;

  constructor(path: string, options: SegmentScanOptions) {
    this.path = path;
    this.#options = options;
  }

  /** End of the last whole entry. */
  get validBytes(): number {
    return this.#validBytes;
  }
  /** Bytes after {@linkcode validBytes} that were a torn tail (0 when none). */
  get tornBytes(): number {
    return this.#tornBytes;
  }
  /** What was wrong with the torn tail, for messages. */
  get tornProblem(): string | undefined {
    return this.#tornProblem;
  }

  /** Yields every valid entry; throws {@linkcode IntegrityError} on corruption. */
  async *entries(): AsyncGenerator<ScannedEntry> {
    const fd = openSegment(this.path);
    try {
      const fileBytes = fs.fstatSync(fd).size;
      const endBytes = this.#options.endBytes ?? fileBytes;
      if (fileBytes < endBytes) {
        throw new IntegrityError(
          `Segment ${this.path} is ${fileBytes} bytes, expected ${endBytes}: it was truncated`,
          { path: this.path, offsetBytes: fileBytes },
        );
      }
      let position = 0;
      while (position < endBytes) {
        const result = this.#readEntryAt(fd, position, endBytes);
        if (typeof result === "string") {
          this.#handleBadEntry(fd, position, endBytes, result);
          return;
        }
        yield { header: result.header, payload: result.payload, fileOffsetBytes: position };
        position += ENTRY_HEADER_BYTES + result.header.payloadBytes;
        this.#validBytes = position;
      }
    } finally {
      fs.closeSync(fd);
    }
  }

  #readEntryAt(
    fd: number,
    position: number,
    endBytes: number,
  ): { header: EntryHeader; payload: Uint8Array } | string {
    const remaining = endBytes - position;
    if (remaining < ENTRY_HEADER_BYTES) return "incomplete entry header";
    const headerOnly = this.#options.headersOnly === true;
    // A header scan reads ahead only while entries are small: then one read covers many headers,
    // while with large payloads a read-ahead would mostly fetch payload bytes it skips.
    const readAhead = !headerOnly || this.#lastPayloadBytes <= HEADER_SCAN_READ_AHEAD_PAYLOAD_MAX;
    const headerAt = this.#windowAt(fd, position, ENTRY_HEADER_BYTES, endBytes, readAhead);
    const decoded = decodeEntryHeader(this.#buffer, headerAt);
    if (!decoded.ok) return decoded.problem;
    const header = decoded.header;
    this.#lastPayloadBytes = header.payloadBytes;
    if (header.payloadBytes > remaining - ENTRY_HEADER_BYTES) {
      return "entry extends past end of file";
    }
    // Marks keep their (small) name even in header scans: timelines list them in one pass.
    if (headerOnly && header.kind !== "mark") return { header, payload: new Uint8Array(0) };
    assert(header.payloadBytes <= ENTRY_PAYLOAD_BYTES_MAX, "payload over limit passed decoder");
    const entryAt = this.#windowAt(
      fd,
      position,
      ENTRY_HEADER_BYTES + header.payloadBytes,
      endBytes,
      !headerOnly,
    );
    const payloadAt = entryAt + ENTRY_HEADER_BYTES;
    const payload = this.#buffer.subarray(payloadAt, payloadAt + header.payloadBytes);
    if (this.#options.verifyPayloads !== false && !payloadMatches(header, payload)) {
      return "bad payload checksum";
    }
    return { header, payload };
  }

  /**
   * Returns where `[position, position + length)` of the file sits in the read buffer, reading a
   * new window when it is not already there: a whole buffer's worth when `readAhead` (entries
   * are then parsed from memory, one read for many), only `length` bytes otherwise (header
   * scans skip the payloads between headers).
   */
  #windowAt(
    fd: number,
    position: number,
    length: number,
    endBytes: number,
    readAhead: boolean,
  ): number {
    if (position >= this.#windowStart && position + length <= this.#windowEnd) {
      return position - this.#windowStart;
    }
    if (this.#buffer.length < length) this.#buffer = new Uint8Array(length);
    const aheadBytes = this.#options.headersOnly === true
      ? HEADER_SCAN_WINDOW_BYTES
      : this.#buffer.length;
    const readBytes = readAhead
      ? Math.max(length, Math.min(aheadBytes, endBytes - position))
      : length;
    readFully(fd, this.#buffer, readBytes, position);
    this.#windowStart = position;
    this.#windowEnd = position + readBytes;
    return 0;
  }

  #handleBadEntry(fd: number, position: number, endBytes: number, problem: string): void {
    const laterHeaderAt = this.#options.tolerateTornTail
      ? findValidHeader(fd, position + 1, endBytes)
      : position;
    if (laterHeaderAt === undefined) {
      this.#tornBytes = endBytes - position;
      this.#tornProblem = problem;
      return;
    }
    throw new IntegrityError(
      `Corrupt entry in ${this.path} at offset ${position}: ${problem}` +
        (laterHeaderAt > position ? ` (valid entries follow at offset ${laterHeaderAt})` : ""),
      { path: this.path, offsetBytes: position },
    );
  }
}

/**
 * Opens a segment for reading. A segment that the manifest or a directory listing named but that
 * is gone is a hole in the log: an integrity problem to report (exit 3), not an I/O failure.
 */
function openSegment(path: string): number {
  try {
    return fs.openSync(path, "r");
  } catch (error) {
    if ((error as { code?: string }).code !== "ENOENT") throw error;
    throw new IntegrityError(`Segment ${path} is missing`, { path, cause: error });
  }
}

/** Reads exactly `length` bytes at `position`, looping over short reads. */
export function readFully(fd: number, target: Uint8Array, length: number, position: number): void {
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, target, done, length - done, position + done);
    if (n === 0) throw new Error(`Unexpected end of file at offset ${position + done}`);
    done += n;
  }
}

/** Writes all of `source[0, length)` at `position`, looping over short writes. */
export function writeFully(fd: number, source: Uint8Array, length: number, position: number): void {
  let done = 0;
  while (done < length) {
    done += fs.writeSync(fd, source, done, length - done, position + done);
  }
}

/** Finds the first offset in [from, end) holding a header that decodes cleanly. */
function findValidHeader(fd: number, from: number, endBytes: number): number | undefined {
  const windowBytes = 1024 * 1024;
  const window = new Uint8Array(windowBytes + ENTRY_HEADER_BYTES);
  for (let start = from; start < endBytes; start += windowBytes) {
    const length = Math.min(window.length, endBytes - start);
    readFully(fd, window, length, start);
    for (let i = 0; i + ENTRY_HEADER_BYTES <= length && i < windowBytes; i++) {
      if (window[i] !== ENTRY_MAGIC[0] || window[i + 1] !== ENTRY_MAGIC[1]) continue;
      if (decodeEntryHeader(window, i).ok) return start + i;
    }
  }
  return undefined;
}

/** Appends entries to one segment file with positional writes. Not safe for two writers. */
export class SegmentAppender {
  readonly path: string;
  readonly firstSeq: number;
  #fd: number;
  #sizeBytes: number;
  #staging = new Uint8Array(ENTRY_HEADER_BYTES + COALESCE_PAYLOAD_BYTES_MAX);
  #syncsInFlight = 0;
  #closeRequested = false;

  private constructor(path: string, firstSeq: number, fd: number, sizeBytes: number) {
    this.path = path;
    this.firstSeq = firstSeq;
    this.#fd = fd;
    this.#sizeBytes = sizeBytes;
  }

  /** Opens (creating if needed) the segment at `path`, truncated to `validBytes`. */
  static open(path: string, firstSeq: number, validBytes: number): SegmentAppender {
    const fd = fs.openSync(path, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
    fs.ftruncateSync(fd, validBytes);
    return new SegmentAppender(path, firstSeq, fd, validBytes);
  }

  /** Current size in bytes. */
  get sizeBytes(): number {
    return this.#sizeBytes;
  }

  /** Writes one entry at the end of the file (to the page cache; {@linkcode sync} makes it durable). */
  append(header: EntryHeader, payload?: Uint8Array): void {
    assert(!this.#closeRequested, `append to closed segment ${this.path}`);
    assert((payload?.length ?? 0) === header.payloadBytes, "payload length differs from header");
    const position = this.#sizeBytes;
    if (header.payloadBytes <= COALESCE_PAYLOAD_BYTES_MAX) {
      encodeEntryHeader(header, this.#staging);
      if (payload !== undefined) this.#staging.set(payload, ENTRY_HEADER_BYTES);
      writeFully(this.#fd, this.#staging, ENTRY_HEADER_BYTES + header.payloadBytes, position);
    } else {
      encodeEntryHeader(header, this.#staging);
      writeFully(this.#fd, this.#staging, ENTRY_HEADER_BYTES, position);
      writeFully(this.#fd, payload!, header.payloadBytes, position + ENTRY_HEADER_BYTES);
    }
    this.#sizeBytes = position + ENTRY_HEADER_BYTES + header.payloadBytes;
  }

  /**
   * Writes `bytes`, entries already encoded exactly as they sit on disk (a run of shipped
   * entries), at the end of the file in one positional write. The caller has checked every
   * header and payload; `entryBytesTotal`, the sum of the entries' sizes, guards the framing.
   */
  appendRun(bytes: Uint8Array, entryBytesTotal: number): void {
    assert(!this.#closeRequested, `append to closed segment ${this.path}`);
    assert(bytes.length === entryBytesTotal, "run length differs from its entries");
    writeFully(this.#fd, bytes, bytes.length, this.#sizeBytes);
    this.#sizeBytes += bytes.length;
  }

  /** Waits until everything appended so far is on stable storage. */
  async sync(): Promise<void> {
    assert(!this.#closeRequested, `sync of closed segment ${this.path}`);
    this.#syncsInFlight++;
    try {
      await fdatasync(this.#fd);
    } finally {
      this.#syncsInFlight--;
      if (this.#closeRequested && this.#syncsInFlight === 0) fs.closeSync(this.#fd);
    }
  }

  /**
   * Closes the file (does not sync). With an fdatasync still running on the thread pool, the
   * close waits for it: closing under it could let the fd number be reused and synced by mistake.
   */
  close(): void {
    if (this.#closeRequested) return;
    this.#closeRequested = true;
    if (this.#syncsInFlight === 0) fs.closeSync(this.#fd);
  }
}

/** fdatasync on libuv's thread pool, so the event loop keeps serving while the disk works. */
export function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.fdatasync(fd, (error) => error ? reject(error) : resolve());
  });
}
