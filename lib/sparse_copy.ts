/**
 * Copying images block by block: all-zero blocks become holes in regular files, and a CRC32C of
 * every byte (holes read as zeroes) comes out of the same pass.
 *
 * @module
 */
import { crc32c, crc32cCombine, crc32cHex, crc32cOfZeros } from "./checksum.ts";
import type { Extent } from "./data_extents.ts";
import type { Device } from "./device.ts";
import { readFully as readFdFully, writeFully as writeFdFully } from "./fd_io.ts";
import { readFully, type StorageFile } from "./storage/storage.ts";

/** Bytes read per step of a copy (large reads are several times faster on a cold cache). */
export const COPY_CHUNK_BYTES = 8 * 1024 * 1024;
/** A long copy lets timers and signals run after this many chunks. */
const YIELD_EVERY_CHUNKS = 8;
/** Granularity at which zeroes are detected and left as holes. */
export const HOLE_BLOCK_BYTES = 4096;

/** Returns true when every byte of `bytes` is zero. */
export function isAllZero(bytes: Uint8Array): boolean {
  return rangeIsZero(bytes, wordsOf(bytes), 0, bytes.length);
}

/** An Int32Array view of `bytes` when it is 4-byte aligned (word compares allocate nothing). */
function wordsOf(bytes: Uint8Array): Int32Array | undefined {
  return bytes.byteOffset % 4 === 0
    ? new Int32Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 2)
    : undefined;
}

/** True when `bytes[start, end)` are all zero; `words` is {@linkcode wordsOf}(bytes). */
function rangeIsZero(
  bytes: Uint8Array,
  words: Int32Array | undefined,
  start: number,
  end: number,
): boolean {
  let i = start;
  if (words !== undefined && start % 4 === 0) {
    const wordEnd = end >>> 2;
    for (let w = start >>> 2; w < wordEnd; w++) if (words[w] !== 0) return false;
    i = wordEnd << 2;
  }
  for (; i < end; i++) if (bytes[i] !== 0) return false;
  return true;
}

/** Where a copy reads from: a device or a file descriptor with a size. */
export interface CopySource {
  sizeBytes: number;
  readInto(offsetBytes: number, target: Uint8Array): void;
}

/** Where a copy writes to. */
export interface CopyTarget {
  /** A regular file whose unwritten ranges already read as zeroes (fresh and truncated). */
  holesAreZero: boolean;
  write(offsetBytes: number, data: Uint8Array): void;
}

/** Result of {@linkcode copyImage}. */
export interface CopyResult {
  /** Bytes that held data (written). */
  dataBytes: number;
  /** CRC32C of the whole source, holes read as zeroes, as 8 hex digits. */
  crc32c: string;
}

/** Options of {@linkcode copyImage}. */
export interface CopyOptions {
  /**
   * Where the source holds data, in offset order ({@linkcode dataExtents}); the rest is holes,
   * which are neither read nor (for a target whose holes are zero) written. Default: all data.
   */
  extents?: Iterable<Extent>;
  /** Called after every chunk or hole. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
}

/**
 * Copies `source` to `target` and checksums it in one pass. Holes (between `extents`) are
 * checksummed arithmetically without being read; within data, all-zero blocks are skipped when
 * the target's holes read as zeroes.
 */
export async function copyImage(
  source: CopySource,
  target: CopyTarget,
  options: CopyOptions = {},
): Promise<CopyResult> {
  const chunk = new Uint8Array(COPY_CHUNK_BYTES);
  const sizeBytes = source.sizeBytes;
  const extents = options.extents ?? [{ offsetBytes: 0, lengthBytes: sizeBytes }];
  let crc = 0;
  let dataBytes = 0;
  let position = 0;
  let chunks = 0;
  const hole = (endBytes: number) => {
    const length = endBytes - position;
    crc = crc32cCombine(crc, crc32cOfZeros(length), length);
    if (!target.holesAreZero) writeZeroRange(target, position, length);
    position = endBytes;
    options.onProgress?.(position, sizeBytes);
  };
  for (const extent of extents) {
    const start = Math.max(extent.offsetBytes, position);
    const end = Math.min(extent.offsetBytes + extent.lengthBytes, sizeBytes);
    if (start >= end) continue;
    if (start > position) hole(start);
    while (position < end) {
      const bytes = chunk.subarray(0, Math.min(COPY_CHUNK_BYTES, end - position));
      source.readInto(position, bytes);
      crc = crc32cCombine(crc, crc32c(bytes), bytes.length);
      dataBytes += writeNonZeroRuns(bytes, position, target);
      position += bytes.length;
      options.onProgress?.(position, sizeBytes);
      // Let timers and signals run between chunks of a long copy.
      if (++chunks % YIELD_EVERY_CHUNKS === 0) await new Promise((r) => setTimeout(r, 0));
    }
  }
  if (position < sizeBytes) hole(sizeBytes);
  return { dataBytes, crc32c: crc32cHex(crc) };
}

function writeZeroRange(target: CopyTarget, offsetBytes: number, lengthBytes: number): void {
  const zeroes = new Uint8Array(Math.min(COPY_CHUNK_BYTES, lengthBytes));
  for (let done = 0; done < lengthBytes; done += zeroes.length) {
    target.write(
      offsetBytes + done,
      zeroes.subarray(0, Math.min(zeroes.length, lengthBytes - done)),
    );
  }
}

/**
 * Writes `bytes` (which belong at `offsetBytes`) to `target`, leaving all-zero blocks of
 * {@linkcode HOLE_BLOCK_BYTES} unwritten when the target's holes read as zeroes; returns the bytes
 * written.
 *
 * @example
 * ```ts
 * import { writeNonZeroRuns } from "./sparse_copy.ts";
 * const written: number[] = [];
 * const target = { holesAreZero: true, write: (offset: number) => void written.push(offset) };
 * const bytes = new Uint8Array(3 * 4096);
 * bytes[5000] = 1;
 * writeNonZeroRuns(bytes, 0, target); // 4096: only the middle block, at offset 4096
 * ```
 */
export function writeNonZeroRuns(
  bytes: Uint8Array,
  offsetBytes: number,
  target: CopyTarget,
): number {
  if (!target.holesAreZero) {
    target.write(offsetBytes, bytes);
    return bytes.length;
  }
  let written = 0;
  let runStart = -1;
  const words = wordsOf(bytes);
  // One step past the last block, even a partial one, so that a run reaching the end is written.
  for (let block = 0; block < bytes.length + HOLE_BLOCK_BYTES; block += HOLE_BLOCK_BYTES) {
    const runEnd = Math.min(block, bytes.length);
    const end = Math.min(block + HOLE_BLOCK_BYTES, bytes.length);
    const zero = block >= bytes.length || rangeIsZero(bytes, words, block, end);
    if (!zero && runStart < 0) runStart = block;
    if (zero && runStart >= 0) {
      target.write(offsetBytes + runStart, bytes.subarray(runStart, runEnd));
      written += runEnd - runStart;
      runStart = -1;
    }
  }
  return written;
}

/** A copy source over an open file. */
export function fileSource(file: StorageFile, sizeBytes: number): CopySource {
  return {
    sizeBytes,
    readInto: (offset, target) => readFully(file, target, target.length, offset),
  };
}

/** A copy target over an open file. */
export function fileTarget(file: StorageFile, holesAreZero: boolean): CopyTarget {
  return { holesAreZero, write: (offset, data) => file.write(data, data.length, offset) };
}

/** A copy target over a raw file descriptor (object-storage parts). */
export function fdTarget(fd: number, holesAreZero: boolean): CopyTarget {
  return { holesAreZero, write: (offset, data) => writeFdFully(fd, data, data.length, offset) };
}

/** A copy source over a raw file descriptor. */
export function fdSource(fd: number, sizeBytes: number): CopySource {
  return {
    sizeBytes,
    readInto: (offset, target) => readFdFully(fd, target, target.length, offset),
  };
}

/** A copy source over an open device. */
export function deviceSource(device: Device): CopySource {
  return { sizeBytes: device.sizeBytes, readInto: (o, t) => device.readInto(o, t) };
}
