/**
 * Segments: append-only files of entries, named by the zero-padded hex seq of their first entry so
 * that `ls` order is log order. {@linkcode SegmentScanner} reads one, checking every entry;
 * {@linkcode SegmentAppender} appends to the active one.
 *
 * @module
 */
import { assert } from "../_assert.ts";
import { IntegrityError } from "../errors.ts";
import { realStorage } from "../storage/real_storage.ts";
import { readFully, type Storage, type StorageFile, StorageNotFound } from "../storage/storage.ts";
import {
  decodeEntryHeader,
  encodeEntryHeader,
  ENTRY_HEADER_BYTES,
  ENTRY_PAYLOAD_BYTES_MAX,
  type EntryHeader,
  payloadMatches,
} from "./entry.ts";

/** A segment is sealed once it reaches this size (the entry that crosses it is the last). */
export const SEGMENT_BYTES_MAX = 64 * 1024 * 1024;
/** Read-ahead of a scanner reading payloads; it grows to hold one maximal entry when it must. */
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
  /** Where the segment lives (default: the local filesystem). */
  storage?: Storage;
  /** Stop at this file size (bytes beyond are ignored). Default: the size at open. */
  endBytes?: number;
  /**
   * Treat the first bad entry as the end of the data (a torn tail) instead of corruption, unless
   * it starts before {@linkcode SegmentScanOptions.durableBytes}. True for unsealed segments;
   * sealed segments must be whole. Nothing after the first bad entry is looked at: what lies
   * there is unsynced data or guest bytes, and decides nothing.
   */
  tolerateTornTail: boolean;
  /**
   * Bytes of the file known to be durably written (an fsync covered them, says the sync
   * record). A bad entry that starts before this is damage to durable data, never a torn tail.
   */
  durableBytes?: number;
  /** Check payload checksums (default true). */
  verifyPayloads?: boolean;
  /**
   * Read only headers, skipping payloads (payload is then empty and unchecked), except for mark
   * entries, whose name is read and checked, and entries at or after
   * {@linkcode SegmentScanOptions.payloadsFromBytes}.
   */
  headersOnly?: boolean;
  /**
   * In a header scan, still read and check the payloads of entries that start at or after this
   * offset: the unsynced tail, where a whole header may front a torn payload.
   */
  payloadsFromBytes?: number;
}

/**
 * Reads the entries of one segment file in order, verifying each. After iteration,
 * {@linkcode SegmentScanner.validBytes} is where the valid data ends and
 * {@linkcode SegmentScanner.tornBytes} how many bytes after it form a torn tail.
 */
export class SegmentScanner {
  readonly path: string;
  #options: SegmentScanOptions;
  #storage: Storage;
  /** Grown on demand, up to one read-ahead window (bounded by the file size). */
  #buffer = new Uint8Array(0);
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
    this.#storage = options.storage ?? realStorage;
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
    const file = openSegment(this.#storage, this.path);
    try {
      const fileBytes = file.sizeBytes();
      const endBytes = this.#options.endBytes ?? fileBytes;
      if (fileBytes < endBytes) {
        throw new IntegrityError(
          `Segment ${this.path} is ${fileBytes} bytes, expected ${endBytes}: it was truncated`,
          { path: this.path, offsetBytes: fileBytes },
        );
      }
      let position = 0;
      while (position < endBytes) {
        const result = this.#readEntryAt(file, position, endBytes);
        if (typeof result === "string") {
          this.#handleBadEntry(position, endBytes, result);
          return;
        }
        yield { header: result.header, payload: result.payload, fileOffsetBytes: position };
        position += ENTRY_HEADER_BYTES + result.header.payloadBytes;
        this.#validBytes = position;
      }
    } finally {
      file.close();
    }
  }

  #readEntryAt(
    file: StorageFile,
    position: number,
    endBytes: number,
  ): { header: EntryHeader; payload: Uint8Array } | string {
    const remaining = endBytes - position;
    if (remaining < ENTRY_HEADER_BYTES) return "incomplete entry header";
    const headerOnly = this.#options.headersOnly === true &&
      position < (this.#options.payloadsFromBytes ?? Number.MAX_SAFE_INTEGER);
    // A header scan reads ahead only while entries are small: then one read covers many headers,
    // while with large payloads a read-ahead would mostly fetch payload bytes it skips.
    const readAhead = !headerOnly || this.#lastPayloadBytes <= HEADER_SCAN_READ_AHEAD_PAYLOAD_MAX;
    const headerAt = this.#windowAt(file, position, ENTRY_HEADER_BYTES, endBytes, readAhead);
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
      file,
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
    file: StorageFile,
    position: number,
    length: number,
    endBytes: number,
    readAhead: boolean,
  ): number {
    if (position >= this.#windowStart && position + length <= this.#windowEnd) {
      return position - this.#windowStart;
    }
    const aheadBytes = this.#options.headersOnly === true
      ? HEADER_SCAN_WINDOW_BYTES
      : SCAN_BUFFER_BYTES;
    const readBytes = readAhead
      ? Math.max(length, Math.min(aheadBytes, endBytes - position))
      : length;
    if (this.#buffer.length < readBytes) {
      this.#buffer = new Uint8Array(Math.max(readBytes, Math.min(aheadBytes, endBytes)));
    }
    readFully(file, this.#buffer, readBytes, position);
    this.#windowStart = position;
    this.#windowEnd = position + readBytes;
    return 0;
  }

  #handleBadEntry(position: number, endBytes: number, problem: string): void {
    const durableBytes = this.#options.durableBytes ?? 0;
    if (this.#options.tolerateTornTail && position >= durableBytes) {
      this.#tornBytes = endBytes - position;
      this.#tornProblem = problem;
      return;
    }
    const why = this.#options.tolerateTornTail
      ? ` (inside the ${durableBytes} bytes known to be durably written: not a torn tail)`
      : "";
    throw new IntegrityError(
      `Corrupt entry in ${this.path} at offset ${position}: ${problem}${why}`,
      { path: this.path, offsetBytes: position },
    );
  }
}

/**
 * Opens a segment for reading. A segment that the manifest or a directory listing named but that
 * is gone is a hole in the log: an integrity problem to report (exit 3), not an I/O failure.
 */
function openSegment(storage: Storage, path: string): StorageFile {
  try {
    return storage.open(path);
  } catch (error) {
    if (!(error instanceof StorageNotFound)) throw error;
    throw new IntegrityError(`Segment ${path} is missing`, { path, cause: error });
  }
}

/** Appends entries to one segment file with positional writes. Not safe for two writers. */
export class SegmentAppender {
  readonly path: string;
  readonly firstSeq: number;
  #file: StorageFile;
  #sizeBytes: number;
  #staging = new Uint8Array(ENTRY_HEADER_BYTES + COALESCE_PAYLOAD_BYTES_MAX);
  #closed = false;

  private constructor(path: string, firstSeq: number, file: StorageFile, sizeBytes: number) {
    this.path = path;
    this.firstSeq = firstSeq;
    this.#file = file;
    this.#sizeBytes = sizeBytes;
  }

  /**
   * Opens (creating if needed) the segment at `path`, cut to `validBytes` when it is longer (the
   * cut is durable once {@linkcode SegmentAppender.sync} returns).
   */
  static open(
    path: string,
    firstSeq: number,
    validBytes: number,
    storage: Storage = realStorage,
  ): SegmentAppender {
    const file = storage.open(path, { create: true });
    try {
      if (file.sizeBytes() !== validBytes) file.truncate(validBytes);
    } catch (error) {
      file.close();
      throw error;
    }
    return new SegmentAppender(path, firstSeq, file, validBytes);
  }

  /** Current size in bytes. */
  get sizeBytes(): number {
    return this.#sizeBytes;
  }

  /** Writes one entry at the end of the file (to the page cache; {@linkcode sync} makes it durable). */
  append(header: EntryHeader, payload?: Uint8Array): void {
    assert(!this.#closed, `append to closed segment ${this.path}`);
    assert((payload?.length ?? 0) === header.payloadBytes, "payload length differs from header");
    const position = this.#sizeBytes;
    encodeEntryHeader(header, this.#staging);
    if (header.payloadBytes <= COALESCE_PAYLOAD_BYTES_MAX) {
      if (payload !== undefined) this.#staging.set(payload, ENTRY_HEADER_BYTES);
      this.#file.write(this.#staging, ENTRY_HEADER_BYTES + header.payloadBytes, position);
    } else {
      this.#file.write(this.#staging, ENTRY_HEADER_BYTES, position);
      this.#file.write(payload!, header.payloadBytes, position + ENTRY_HEADER_BYTES);
    }
    this.#sizeBytes = position + ENTRY_HEADER_BYTES + header.payloadBytes;
  }

  /**
   * Writes `bytes`, entries already encoded exactly as they sit on disk (a run of shipped
   * entries), at the end of the file in one positional write. The caller has checked every
   * header and payload; `entryBytesTotal`, the sum of the entries' sizes, guards the framing.
   */
  appendRun(bytes: Uint8Array, entryBytesTotal: number): void {
    assert(!this.#closed, `append to closed segment ${this.path}`);
    assert(bytes.length === entryBytesTotal, "run length differs from its entries");
    this.#file.write(bytes, bytes.length, this.#sizeBytes);
    this.#sizeBytes += bytes.length;
  }

  /** Reads `target.length` appended bytes at `offsetBytes` (the payload of an entry). */
  readAt(target: Uint8Array, offsetBytes: number): void {
    assert(!this.#closed, `read of closed segment ${this.path}`);
    assert(offsetBytes + target.length <= this.#sizeBytes, "read past the appended bytes");
    readFully(this.#file, target, target.length, offsetBytes);
  }

  /** Waits until everything appended so far (and the cut of open) is on stable storage. */
  sync(): Promise<void> {
    assert(!this.#closed, `sync of closed segment ${this.path}`);
    return this.#file.syncData();
  }

  /** Closes the file (does not sync; a sync still running completes first). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#file.close();
  }
}
