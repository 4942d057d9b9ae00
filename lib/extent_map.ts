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
import { IntegrityError } from "./errors.ts";
import { ENTRY_HEADER_BYTES, type EntryHeader } from "./format/entry.ts";
import type { Manifest } from "./format/manifest.ts";

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
  #buckets = new Map<number, Bucket>();
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
    const isData = extent.kind === "data";
    let offset = start;
    while (offset < end) {
      const bucket = Math.floor(offset / this.bucketBytes);
      const pieceEnd = Math.min(end, (bucket + 1) * this.bucketBytes);
      const record = PIECE;
      record[OFFSET] = offset;
      record[LENGTH] = pieceEnd - offset;
      record[KIND] = isData ? KIND_DATA : KIND_ZERO;
      record[TIME] = extent.timeUs;
      record[SOURCE] = extent.sourceIndex;
      record[ENTRY_OFFSET] = extent.entryOffsetBytes;
      record[SOURCE_OFFSET] = isData ? extent.sourceOffsetBytes + (offset - start) : 0;
      this.#insert(bucket, record);
      offset = pieceEnd;
    }
  }

  /** Inserts the extent in `piece` (one record, inside `bucket`) over what it covers. */
  #insert(bucketIndex: number, piece: Float64Array): void {
    let bucket = this.#buckets.get(bucketIndex);
    if (bucket === undefined) {
      bucket = { columns: new Float64Array(BUCKET_RECORDS_MIN * FIELDS), count: 0 };
      this.#buckets.set(bucketIndex, bucket);
    }
    const start = piece[OFFSET];
    const end = start + piece[LENGTH];
    const first = firstEndingAfter(bucket, start);
    const { columns, count } = bucket;
    const capacity = columns.length / FIELDS;
    let last = first;
    while (last < count && columns[OFFSET * capacity + last] < end) last++;
    // The parts of the first and last covered extents that stay visible, saved before the
    // records move.
    const keepsHead = first < last && columns[OFFSET * capacity + first] < start;
    const lastEnd = first < last
      ? columns[OFFSET * capacity + last - 1] + columns[LENGTH * capacity + last - 1]
      : 0;
    const keepsTail = lastEnd > end;
    if (keepsHead) headOf(columns, first, start, HEAD);
    if (keepsTail) tailOf(columns, last - 1, end, TAIL);
    for (let i = first; i < last; i++) this.#account(columns, capacity, i, -1);
    const replacing = (keepsHead ? 1 : 0) + 1 + (keepsTail ? 1 : 0);
    const newCount = count - (last - first) + replacing;
    const target = growTo(bucket, newCount);
    const targetCapacity = target.length / FIELDS;
    if (first + replacing !== last && last < count) { // else the records after stay in place
      for (let field = 0; field < FIELDS; field++) {
        const column = field * targetCapacity;
        target.copyWithin(column + first + replacing, column + last, column + count);
      }
    }
    let index = first;
    if (keepsHead) this.#place(target, index++, HEAD);
    this.#place(target, index++, piece);
    if (keepsTail) this.#place(target, index, TAIL);
    bucket.count = newCount;
  }

  /** Writes `record` as record `index` of `columns` and counts it. */
  #place(columns: Float64Array, index: number, record: Float64Array): void {
    const capacity = columns.length / FIELDS;
    for (let field = 0; field < FIELDS; field++) columns[field * capacity + index] = record[field];
    this.#account(columns, capacity, index, 1);
  }

  #account(columns: Float64Array, capacity: number, index: number, sign: 1 | -1): void {
    this.#extentCount += sign;
    const lengthBytes = columns[LENGTH * capacity + index];
    if (columns[KIND * capacity + index] === KIND_DATA) this.#dataBytes += sign * lengthBytes;
    else this.#zeroBytes += sign * lengthBytes;
  }

  /** Every extent in device offset order. */
  *extents(): Generator<Extent> {
    const buckets = [...this.#buckets.keys()].sort((a, b) => a - b);
    for (const bucketIndex of buckets) {
      const { columns, count } = this.#buckets.get(bucketIndex)!;
      const capacity = columns.length / FIELDS;
      for (let index = 0; index < count; index++) {
        yield {
          offsetBytes: columns[OFFSET * capacity + index],
          lengthBytes: columns[LENGTH * capacity + index],
          kind: columns[KIND * capacity + index] === KIND_DATA ? "data" : "zero",
          timeUs: columns[TIME * capacity + index],
          sourceIndex: columns[SOURCE * capacity + index],
          entryOffsetBytes: columns[ENTRY_OFFSET * capacity + index],
          sourceOffsetBytes: columns[SOURCE_OFFSET * capacity + index],
        };
      }
    }
  }
}

/**
 * The extents of one bucket, sorted and disjoint, in one typed array of {@linkcode FIELDS}
 * columns (field `f` of record `i` at `f × capacity + i`): a JS object per extent would cost
 * several times the memory and the garbage collector's attention at every split, and the
 * offsets column alone is what a lookup touches, in few cache lines.
 */
interface Bucket {
  columns: Float64Array;
  count: number;
}

/** The fields of a record, in column order. */
const OFFSET = 0;
const LENGTH = 1;
const KIND = 2;
const TIME = 3;
const SOURCE = 4;
const ENTRY_OFFSET = 5;
const SOURCE_OFFSET = 6;
const FIELDS = 7;
const KIND_DATA = 0;
const KIND_ZERO = 1;
const BUCKET_RECORDS_MIN = 4;
/** Scratch records of {@linkcode ExtentMap.set}, one field each: the piece, the kept head, tail. */
const PIECE = new Float64Array(FIELDS);
const HEAD = new Float64Array(FIELDS);
const TAIL = new Float64Array(FIELDS);

/** Makes room for `count` records in `bucket` (doubling) and returns its columns. */
function growTo(bucket: Bucket, count: number): Float64Array {
  const old = bucket.columns;
  const oldCapacity = old.length / FIELDS;
  if (count <= oldCapacity) return old;
  let capacity = oldCapacity;
  while (capacity < count) capacity *= 2;
  const columns = new Float64Array(capacity * FIELDS);
  for (let field = 0; field < FIELDS; field++) {
    const from = field * oldCapacity;
    columns.set(old.subarray(from, from + bucket.count), field * capacity);
  }
  bucket.columns = columns;
  return columns;
}

/** Copies record `index` of `columns` into `to`. */
function readRecord(columns: Float64Array, index: number, to: Float64Array): void {
  const capacity = columns.length / FIELDS;
  for (let field = 0; field < FIELDS; field++) to[field] = columns[field * capacity + index];
}

/** Writes into `to` the part of record `index` before `end` (a kept head). */
function headOf(columns: Float64Array, index: number, end: number, to: Float64Array): void {
  readRecord(columns, index, to);
  to[LENGTH] = end - to[OFFSET];
}

/** Writes into `to` the part of record `index` from `start` on, its source moved along. */
function tailOf(columns: Float64Array, index: number, start: number, to: Float64Array): void {
  readRecord(columns, index, to);
  const cut = start - to[OFFSET];
  to[OFFSET] = start;
  to[LENGTH] -= cut;
  if (to[KIND] === KIND_DATA) to[SOURCE_OFFSET] += cut;
}

/**
 * Index of the first record of `bucket` that ends after `offsetBytes`: a binary search of the
 * offsets column (records are disjoint, so only the one before the first later start can still
 * reach past `offsetBytes`).
 */
function firstEndingAfter(bucket: Bucket, offsetBytes: number): number {
  const { columns, count } = bucket;
  const capacity = columns.length / FIELDS;
  let low = 0;
  let high = count;
  while (low < high) {
    const middle = (low + high) >>> 1;
    if (columns[OFFSET * capacity + middle] <= offsetBytes) low = middle + 1;
    else high = middle;
  }
  // low: the first record starting after offsetBytes.
  const before = low - 1;
  if (
    before >= 0 &&
    columns[OFFSET * capacity + before] + columns[LENGTH * capacity + before] > offsetBytes
  ) {
    return before;
  }
  return low;
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

/** The extent an entry (at `fileOffsetBytes` of source `sourceIndex`) leaves on the device. */
export function extentOfEntry(
  header: EntryHeader,
  fileOffsetBytes: number,
  sourceIndex: number,
): Extent {
  const isData = header.kind === "write";
  return {
    offsetBytes: header.offsetBytes,
    lengthBytes: header.lengthBytes,
    kind: isData ? "data" : "zero",
    timeUs: header.timeUs,
    sourceIndex,
    entryOffsetBytes: fileOffsetBytes,
    sourceOffsetBytes: isData ? fileOffsetBytes + ENTRY_HEADER_BYTES : 0,
  };
}

/** Refuses an entry that reaches past the device: corruption, never applied. */
export function checkEntryInDevice(
  header: EntryHeader,
  manifest: Manifest,
  path: string,
  offset: number,
): void {
  if (header.offsetBytes + header.lengthBytes > manifest.deviceBytes) {
    throw new IntegrityError(
      `Entry in ${path} at offset ${offset} writes ${header.lengthBytes} bytes at ${header.offsetBytes}, past the end of the ${manifest.deviceBytes}-byte device`,
      { path, offsetBytes: offset },
    );
  }
}
