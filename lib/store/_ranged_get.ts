/**
 * Downloading objects as parallel ranged GETs: every object is cut into parts of
 * {@linkcode GET_PART_BYTES}, and at most {@linkcode GETS_IN_FLIGHT_MAX} parts are in flight at
 * once, so memory stays bounded by that many parts whatever the size of the objects.
 *
 * @module
 */
import { assert } from "../_assert.ts";
import { IntegrityError } from "../errors.ts";
import { type ObjectStore, StoreError } from "./object_store.ts";

/** Bytes of one ranged GET (large enough that per-request overhead is small). */
export const GET_PART_BYTES = 8 * 1024 * 1024;
/** Ranged GETs in flight at once; memory holds at most this many parts (32 MiB by default). */
export const GETS_IN_FLIGHT_MAX = 4;
/** Upper bound on {@linkcode RangedGetOptions.inFlightMax}. */
const GETS_IN_FLIGHT_LIMIT = 64;

/** One object to download, and where its parts go. */
export interface RangedObject {
  key: string;
  /** The size the manifest says; a larger or smaller object is an {@linkcode IntegrityError}. */
  sizeBytes: number;
  /**
   * Receives each part; parts arrive in any order, never two at once for the same bytes. `bytes`
   * is a reused buffer: it is valid only until onPart returns.
   */
  onPart(offsetBytes: number, bytes: Uint8Array): void;
}

/** Options of {@linkcode getRanged}. */
export interface RangedGetOptions {
  /** Bytes per GET (default {@linkcode GET_PART_BYTES}). */
  partBytes?: number;
  /** GETs in flight at once (default {@linkcode GETS_IN_FLIGHT_MAX}). */
  inFlightMax?: number;
  /** Called after each part with the bytes it held. */
  onPart?: (lengthBytes: number) => void;
  /** Says where the object's name comes from, for the message when it is missing. */
  namedBy: string;
}

interface Part {
  object: RangedObject;
  offsetBytes: number;
  lengthBytes: number;
}

/**
 * Downloads `objects` in parts with bounded parallelism. A missing object, or one whose size is
 * not what the manifest says, is an {@linkcode IntegrityError} naming it; the first failure stops
 * new GETs, and the call returns only after every GET in flight has ended (so no part is handed
 * to a sink after it returned).
 */
export async function getRanged(
  store: ObjectStore,
  objects: readonly RangedObject[],
  options: RangedGetOptions,
): Promise<void> {
  const partBytes = options.partBytes ?? GET_PART_BYTES;
  const inFlightMax = options.inFlightMax ?? GETS_IN_FLIGHT_MAX;
  assert(Number.isSafeInteger(partBytes) && partBytes >= 1, "partBytes must be ≥ 1");
  assert(inFlightMax >= 1 && inFlightMax <= GETS_IN_FLIGHT_LIMIT, "inFlightMax out of range");
  // One shared iterator: each worker takes the next part when its GET is done. next() runs
  // synchronously, so no two workers take the same part.
  const parts = partsOf(objects, partBytes);
  let failure: { error: unknown } | undefined;
  const worker = async () => {
    // One buffer per worker, reused for every part it fetches (one byte more: see getPart).
    // The store may transfer it (BYOB reads): getPart hands back the buffer to use next.
    let buffer: Uint8Array = new Uint8Array(partBytes + 1);
    for (let next = parts.next(); !next.done && failure === undefined; next = parts.next()) {
      try {
        buffer = await getPart(store, next.value, options, buffer);
      } catch (error) {
        failure ??= { error };
      }
    }
  };
  await Promise.all(Array.from({ length: inFlightMax }, worker));
  if (failure !== undefined) throw failure.error;
}

function* partsOf(objects: readonly RangedObject[], partBytes: number): Generator<Part> {
  for (const object of objects) {
    assert(Number.isSafeInteger(object.sizeBytes) && object.sizeBytes >= 0, "bad object size");
    if (object.sizeBytes === 0) yield { object, offsetBytes: 0, lengthBytes: 0 };
    for (let offsetBytes = 0; offsetBytes < object.sizeBytes; offsetBytes += partBytes) {
      const lengthBytes = Math.min(partBytes, object.sizeBytes - offsetBytes);
      yield { object, offsetBytes, lengthBytes };
    }
  }
}

async function getPart(
  store: ObjectStore,
  part: Part,
  options: RangedGetOptions,
  buffer: Uint8Array,
): Promise<Uint8Array> {
  const { object, offsetBytes, lengthBytes } = part;
  if (object.sizeBytes === 0) {
    // An empty range cannot be asked for: only check that the object is there and empty.
    const info = await store.head(object.key);
    if (info === undefined) throw missingObject(store, object.key, options.namedBy);
    if (info.sizeBytes !== 0) throw wrongSize(store, object, `is ${info.sizeBytes} bytes`);
    return buffer;
  }
  const size = buffer.length;
  // The last part asks for one byte more: an object longer than the manifest says answers with it.
  const isLast = offsetBytes + lengthBytes === object.sizeBytes;
  let bytes: Uint8Array | undefined;
  try {
    // The buffer has room for one byte more than a part, so a reply longer than asked shows.
    bytes = await store.get(object.key, {
      offsetBytes,
      lengthBytes: isLast ? lengthBytes + 1 : lengthBytes,
    }, buffer.subarray(0, lengthBytes + 1));
  } catch (error) {
    // 416: the range starts past the object's end.
    if (error instanceof StoreError && statusOf(error.cause) === 416) {
      throw wrongSize(store, object, `ends before byte ${offsetBytes}`);
    }
    throw error;
  }
  if (bytes === undefined) throw missingObject(store, object.key, options.namedBy);
  if (bytes.length > lengthBytes) throw wrongSize(store, object, "is larger");
  if (bytes.length < lengthBytes) {
    throw wrongSize(store, object, `ends at byte ${offsetBytes + bytes.length}`);
  }
  object.onPart(offsetBytes, bytes);
  options.onPart?.(lengthBytes);
  // A store that read BYOB transferred the buffer to `bytes`; one that copied left it as it was.
  if (buffer.buffer.byteLength > 0) return buffer;
  return bytes.buffer.byteLength >= size
    ? new Uint8Array(bytes.buffer as ArrayBuffer, 0, size)
    : new Uint8Array(size);
}

/** The error for an object a manifest names that is not in the store. */
export function missingObject(store: ObjectStore, key: string, namedBy: string): IntegrityError {
  const what = store.describe(key);
  return new IntegrityError(
    `Object ${what} named by ${namedBy} is missing: ` +
      "ship the logdir again from its host to upload it again",
    { path: what },
  );
}

function wrongSize(store: ObjectStore, object: RangedObject, actual: string): IntegrityError {
  const what = store.describe(object.key);
  return new IntegrityError(
    `Object ${what} ${actual}: the manifest says it is ${object.sizeBytes} bytes`,
    { path: what },
  );
}

function statusOf(error: unknown): number | undefined {
  return (error as { $metadata?: { httpStatusCode?: number } } | undefined)?.$metadata
    ?.httpStatusCode;
}
