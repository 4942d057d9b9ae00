/**
 * Copying images block by block: all-zero blocks become holes in regular files, and a CRC32C of
 * every byte (holes read as zeroes) comes out of the same pass.
 *
 * @module
 */
import { crc32c, crc32cCombine, crc32cOfZeros } from "./checksum.ts";
import type { Extent } from "./data_extents.ts";
import type { Device } from "./device.ts";
import * as fs from "node:fs";
import { readFully, writeFully } from "./format/segment.ts";

/** Bytes read per step of a copy (large reads are several times faster on a cold cache). */
export const COPY_CHUNK_BYTES = 8 * 1024 * 1024;
/** A long copy lets timers and signals run after this many chunks. */
const YIELD_EVERY_CHUNKS = 8;
/** Granularity at which zeroes are detected and left as holes. */
export const HOLE_BLOCK_BYTES = 4096;

/** Returns true when every byte of `bytes` is zero. */
export function isAllZero(bytes: Uint8Array): boolean {
  const words = bytes.byteOffset % 8 === 0 ? Math.floor(bytes.length / 8) : 0;
  const view = new BigUint64Array(bytes.buffer, bytes.byteOffset, words);
  for (let i = 0; i < words; i++) if (view[i] !== 0n) return false;
  for (let i = words * 8; i < bytes.length; i++) if (bytes[i] !== 0) return false;
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
  /**
   * The same write on a worker thread. When present, {@linkcode copyImage} reads and checksums
   * the next chunk while this chunk is written; writes are issued one at a time, in order.
   */
  writeAsync?(offsetBytes: number, data: Uint8Array): Promise<void>;
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
  // With an asynchronous target two buffers alternate: one is being written while the other is
  // read and checksummed. Both are allocated up front.
  const buffers = [new Uint8Array(COPY_CHUNK_BYTES)];
  if (target.writeAsync !== undefined) buffers.push(new Uint8Array(COPY_CHUNK_BYTES));
  const writesOf: Promise<number>[] = buffers.map(() => Promise.resolve(0));
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
  try {
    for (const extent of extents) {
      const start = Math.max(extent.offsetBytes, position);
      const end = Math.min(extent.offsetBytes + extent.lengthBytes, sizeBytes);
      if (start >= end) continue;
      if (start > position) hole(start);
      while (position < end) {
        const slot = chunks % buffers.length;
        dataBytes += await writesOf[slot]; // The buffer is free once its last writes are done.
        writesOf[slot] = Promise.resolve(0);
        const bytes = buffers[slot].subarray(0, Math.min(COPY_CHUNK_BYTES, end - position));
        source.readInto(position, bytes);
        crc = crc32cCombine(crc, crc32c(bytes), bytes.length);
        const runs = nonZeroRuns(bytes, target.holesAreZero);
        if (target.writeAsync === undefined) {
          dataBytes += writeRunsSync(target, bytes, position, runs);
        } else {
          const previous = writesOf[(slot + buffers.length - 1) % buffers.length];
          const writes = writeRunsAfter(previous, target.writeAsync, bytes, position, runs);
          writes.catch(() => {}); // Reported when awaited; not an unhandled rejection meanwhile.
          writesOf[slot] = writes;
        }
        position += bytes.length;
        options.onProgress?.(position, sizeBytes);
        // Let timers and signals run between chunks of a long copy.
        if (++chunks % YIELD_EVERY_CHUNKS === 0) await new Promise((r) => setTimeout(r, 0));
      }
    }
    if (position < sizeBytes) hole(sizeBytes);
    for (const writes of writesOf) dataBytes += await writes;
  } finally {
    // Never leave a write running on a descriptor the caller may close after an error.
    await Promise.allSettled(writesOf);
  }
  return { dataBytes, crc32c: crc.toString(16).padStart(8, "0") };
}

/** Writes `runs` (pairs of start, end within `bytes`) synchronously; returns the bytes written. */
function writeRunsSync(
  target: CopyTarget,
  bytes: Uint8Array,
  offsetBytes: number,
  runs: number[],
): number {
  let written = 0;
  for (let i = 0; i < runs.length; i += 2) {
    target.write(offsetBytes + runs[i], bytes.subarray(runs[i], runs[i + 1]));
    written += runs[i + 1] - runs[i];
  }
  return written;
}

/** Writes `runs` once `previous` is done, so writes reach the target in copy order. */
async function writeRunsAfter(
  previous: Promise<number>,
  writeAsync: NonNullable<CopyTarget["writeAsync"]>,
  bytes: Uint8Array,
  offsetBytes: number,
  runs: number[],
): Promise<number> {
  await previous.catch(() => 0); // Its failure is reported by its own await.
  let written = 0;
  for (let i = 0; i < runs.length; i += 2) {
    await writeAsync(offsetBytes + runs[i], bytes.subarray(runs[i], runs[i + 1]));
    written += runs[i + 1] - runs[i];
  }
  return written;
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
 * Returns the runs of non-zero blocks of `bytes` as flat (start, end) pairs: all of it when holes
 * are not zero. Scans 32-bit words of one view over the buffer, so a block of data costs one
 * comparison and nothing is allocated per block.
 */
function nonZeroRuns(bytes: Uint8Array, holesAreZero: boolean): number[] {
  if (!holesAreZero) return bytes.length === 0 ? [] : [0, bytes.length];
  const aligned = bytes.byteOffset % 4 === 0;
  const words = new Uint32Array(
    bytes.buffer,
    bytes.byteOffset,
    aligned ? Math.floor(bytes.length / 4) : 0,
  );
  const runs: number[] = [];
  let runStart = -1;
  for (let block = 0; block < bytes.length; block += HOLE_BLOCK_BYTES) {
    const end = Math.min(block + HOLE_BLOCK_BYTES, bytes.length);
    const zero = aligned && end - block === HOLE_BLOCK_BYTES
      ? wordsAreZero(words, block / 4, end / 4)
      : isAllZero(bytes.subarray(block, end));
    if (!zero && runStart < 0) runStart = block;
    if (zero && runStart >= 0) {
      runs.push(runStart, block);
      runStart = -1;
    }
  }
  if (runStart >= 0) runs.push(runStart, bytes.length);
  return runs;
}

function wordsAreZero(words: Uint32Array, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (words[i] !== 0) return false;
  return true;
}

/** A copy source over a raw file descriptor. */
export function fdSource(fd: number, sizeBytes: number): CopySource {
  return { sizeBytes, readInto: (offset, target) => readFully(fd, target, target.length, offset) };
}

/** Options of {@linkcode fdTarget}. */
export interface FdTargetOptions {
  /**
   * Write on a worker thread, overlapping the next chunk's read and checksum. (Starting the
   * writeback of each chunk at once with sync_file_range was measured too: the disk's writes
   * then slowed its reads, and the restore was no faster.)
   */
  writeBehind?: boolean;
}

/** A copy target over a raw file descriptor. */
export function fdTarget(
  fd: number,
  holesAreZero: boolean,
  options: FdTargetOptions = {},
): CopyTarget {
  const write = (offset: number, data: Uint8Array) => writeFully(fd, data, data.length, offset);
  if (options.writeBehind !== true) return { holesAreZero, write };
  return {
    holesAreZero,
    write,
    writeAsync: (offset, data) => pwriteFully(fd, data, offset),
  };
}

/** Writes all of `data` at `offsetBytes` on libuv's thread pool, looping over short writes. */
export async function pwriteFully(
  fd: number,
  data: Uint8Array,
  offsetBytes: number,
): Promise<void> {
  let done = 0;
  while (done < data.length) {
    done += await new Promise<number>((resolve, reject) =>
      fs.write(
        fd,
        data,
        done,
        data.length - done,
        offsetBytes + done,
        (error, written) => error ? reject(error) : resolve(written),
      )
    );
  }
}

/** A copy source over an open device. */
export function deviceSource(device: Device): CopySource {
  return { sizeBytes: device.sizeBytes, readInto: (o, t) => device.readInto(o, t) };
}
