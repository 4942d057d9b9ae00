/**
 * The extent map of a compaction: for every byte range of the device that entries touched, where
 * its latest state lives (a range of a source file, or zeroes). It holds positions, never data,
 * so its memory grows with the number of distinct extents, not with the bytes they cover.
 *
 * The device is cut into fixed buckets, each holding a short sorted array of extents, so that an
 * insert only splices one small array: a single array for the whole device would make folding n
 * entries O(n²).
 *
 * @module
 */
import { assert } from "./_assert.ts";
import { ENTRY_HEADER_BYTES } from "./format/entry.ts";

/** Size of one bucket of the map; no extent crosses a bucket boundary. */
export const EXTENT_BUCKET_BYTES = 1024 * 1024;
/** Largest payload of a write entry in a level. */
export const LEVEL_WRITE_BYTES_MAX = 1024 * 1024;
/** Largest range of a zero entry in a level (the entry format allows up to 4 GiB - 1). */
export const LEVEL_ZERO_BYTES_MAX = 1024 * 1024 * 1024;

/** What a range reads back as: bytes from a source file, or zeroes (zero and trim entries). */
export type ExtentKind = "data" | "zero";

/** One range of the device and where its latest state lives. */
export interface Extent {
  offsetBytes: number;
  lengthBytes: number;
  kind: ExtentKind;
  /** Time of the entry that wrote this state. */
  timeUs: number;
  /** Index of the source file in the caller's table. */
  sourceIndex: number;
  /** Offset of the header of the entry that wrote this state, within its source file. */
  entryOffsetBytes: number;
  /** For data: offset within the source file of this extent's first byte (0 for zeroes). */
  sourceOffsetBytes: number;
}

/**
 * The latest state of every touched range of a device, built by applying entries in log order.
 *
 * @example
 * ```ts
 * import { ExtentMap } from "./extent_map.ts";
 * const map = new ExtentMap(1 << 20);
 * map.set({ offsetBytes: 0, lengthBytes: 4096, kind: "data", timeUs: 1, sourceIndex: 0,
 *   entryOffsetBytes: 0, sourceOffsetBytes: 64 });
 * map.set({ offsetBytes: 1024, lengthBytes: 512, kind: "zero", timeUs: 2, sourceIndex: 0,
 *   entryOffsetBytes: 4160, sourceOffsetBytes: 0 });
 * console.log([...map.extents()].length); // 3: data, zero, data
 * ```
 */
export class ExtentMap {
  readonly deviceBytes: number;
  readonly bucketBytes: number;
  #buckets = new Map<number, Extent[]>();
  #extentCount = 0;
  #dataBytes = 0;
  #zeroBytes = 0;

  constructor(deviceBytes: number, bucketBytes = EXTENT_BUCKET_BYTES) {
    assert(Number.isSafeInteger(deviceBytes) && deviceBytes >= 0, "bad device size");
    assert(
      Number.isSafeInteger(bucketBytes) && bucketBytes > 0 && bucketBytes <= LEVEL_WRITE_BYTES_MAX,
      "bucket must fit one level write entry",
    );
    this.deviceBytes = deviceBytes;
    this.bucketBytes = bucketBytes;
  }

  /** Number of extents held. */
  get extentCount(): number {
    return this.#extentCount;
  }
  /** Bytes covered by data extents. */
  get dataBytes(): number {
    return this.#dataBytes;
  }
  /** Bytes covered by zero extents. */
  get zeroBytes(): number {
    return this.#zeroBytes;
  }
  /**
   * An upper bound of the size of the level this map becomes: one entry per extent (an extent
   * never exceeds a bucket, so it fits one entry); {@linkcode levelRuns} only merges.
   */
  get encodedBytesMax(): number {
    return this.#extentCount * ENTRY_HEADER_BYTES + this.#dataBytes;
  }

  /** Makes `extent` the latest state of its range, trimming or dropping what it covers. */
  set(extent: Extent): void {
    const start = extent.offsetBytes;
    const end = start + extent.lengthBytes;
    assert(
      Number.isSafeInteger(start) && start >= 0 && extent.lengthBytes > 0 &&
        end <= this.deviceBytes,
      `extent ${start}+${extent.lengthBytes} outside the device of ${this.deviceBytes} bytes`,
    );
    let offset = start;
    while (offset < end) {
      const bucket = Math.floor(offset / this.bucketBytes);
      const pieceEnd = Math.min(end, (bucket + 1) * this.bucketBytes);
      this.#insert(bucket, sliceExtent(extent, offset, pieceEnd));
      offset = pieceEnd;
    }
  }

  #insert(bucket: number, piece: Extent): void {
    let list = this.#buckets.get(bucket);
    if (list === undefined) {
      list = [];
      this.#buckets.set(bucket, list);
    }
    const start = piece.offsetBytes;
    const end = start + piece.lengthBytes;
    const first = firstEndingAfter(list, start);
    let last = first;
    while (last < list.length && list[last].offsetBytes < end) last++;
    const replacement: Extent[] = [];
    if (first < last && list[first].offsetBytes < start) {
      replacement.push(sliceExtent(list[first], list[first].offsetBytes, start));
    }
    replacement.push(piece);
    if (first < last) {
      const covered = list[last - 1];
      const coveredEnd = covered.offsetBytes + covered.lengthBytes;
      if (coveredEnd > end) replacement.push(sliceExtent(covered, end, coveredEnd));
    }
    for (let i = first; i < last; i++) this.#account(list[i], -1);
    for (const extent of replacement) this.#account(extent, 1);
    list.splice(first, last - first, ...replacement);
  }

  #account(extent: Extent, sign: 1 | -1): void {
    this.#extentCount += sign;
    if (extent.kind === "data") this.#dataBytes += sign * extent.lengthBytes;
    else this.#zeroBytes += sign * extent.lengthBytes;
  }

  /** Every extent in device offset order. */
  *extents(): Generator<Extent> {
    const buckets = [...this.#buckets.keys()].sort((a, b) => a - b);
    for (const bucket of buckets) yield* this.#buckets.get(bucket)!;
  }
}

/** Index of the first extent of `list` (sorted, disjoint) that ends after `offsetBytes`. */
function firstEndingAfter(list: Extent[], offsetBytes: number): number {
  let low = 0;
  let high = list.length;
  while (low < high) {
    const middle = (low + high) >>> 1;
    const extent = list[middle];
    if (extent.offsetBytes + extent.lengthBytes <= offsetBytes) low = middle + 1;
    else high = middle;
  }
  return low;
}

/** The part [start, end) of `extent`, with its source offset moved along for data. */
function sliceExtent(extent: Extent, start: number, end: number): Extent {
  return {
    ...extent,
    offsetBytes: start,
    lengthBytes: end - start,
    sourceOffsetBytes: extent.kind === "data"
      ? extent.sourceOffsetBytes + (start - extent.offsetBytes)
      : 0,
  };
}

/** One entry of a level: adjacent extents of one kind merged up to the entry size limits. */
export interface LevelRun {
  kind: ExtentKind;
  offsetBytes: number;
  lengthBytes: number;
  /** The latest time among the pieces. */
  timeUs: number;
  /** The extents that make up the run, in offset order. */
  pieces: Extent[];
}

/**
 * The entries a level holds for `map`, in offset order: adjacent extents of the same kind merge
 * while the run stays within {@linkcode LEVEL_WRITE_BYTES_MAX} (data) or
 * {@linkcode LEVEL_ZERO_BYTES_MAX} (zeroes).
 */
export function* levelRuns(map: ExtentMap): Generator<LevelRun> {
  let run: LevelRun | undefined;
  for (const extent of map.extents()) {
    const limit = extent.kind === "data" ? LEVEL_WRITE_BYTES_MAX : LEVEL_ZERO_BYTES_MAX;
    if (
      run !== undefined && run.kind === extent.kind &&
      run.offsetBytes + run.lengthBytes === extent.offsetBytes &&
      run.lengthBytes + extent.lengthBytes <= limit
    ) {
      run.lengthBytes += extent.lengthBytes;
      run.timeUs = Math.max(run.timeUs, extent.timeUs);
      run.pieces.push(extent);
      continue;
    }
    if (run !== undefined) yield run;
    run = {
      kind: extent.kind,
      offsetBytes: extent.offsetBytes,
      lengthBytes: extent.lengthBytes,
      timeUs: extent.timeUs,
      pieces: [extent],
    };
  }
  if (run !== undefined) yield run;
}

/** The exact size and entry count of the level {@linkcode levelRuns} makes of `map`. */
export function measureLevel(map: ExtentMap): { sizeBytes: number; entries: number } {
  let sizeBytes = 0;
  let entries = 0;
  for (const run of levelRuns(map)) {
    entries++;
    sizeBytes += ENTRY_HEADER_BYTES + (run.kind === "data" ? run.lengthBytes : 0);
  }
  return { sizeBytes, entries };
}
