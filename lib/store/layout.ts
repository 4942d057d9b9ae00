/**
 * Where a logdir's objects live in object storage (docs/FORMAT.md, "Logdirs in object storage"):
 * the names of its objects under the prefix and reading its manifest. A leaf module: the writers
 * (store_logdir.ts), leases, retired objects and readers all build on it.
 *
 * @module
 */
import { IntegrityError } from "../errors.ts";
import {
  decodeManifest,
  type Manifest,
  MANIFEST_BYTES_MAX,
  type SegmentInfo,
} from "../format/manifest.ts";
import type { ObjectStore } from "./object_store.ts";

/** The manifest object's name under the prefix. */
export const MANIFEST_OBJECT = "manifest.json";

function hex16(value: number): string {
  return value.toString(16).padStart(16, "0");
}

/** `segments/<16 hex first seq>-<16 hex last seq>.seg`: `ls` order is log order. */
export function segmentObjectName(info: SegmentInfo): string {
  return `segments/${hex16(info.firstSeq)}-${hex16(info.lastSeq)}.seg`;
}

/** `base/<file>` (the base file name is unique per snapshot). */
export function baseObjectName(file: string): string {
  return `base/${file}`;
}

/** `levels/<file>` (level files are named by their cut seq). */
export function levelObjectName(file: string): string {
  return `levels/${file}`;
}

/** A logdir in object storage: a store and the key prefix the logdir lives under. */
export interface StoreLogdir {
  store: ObjectStore;
  /** Key prefix without trailing slash ("" for the bucket's root). */
  prefix: string;
}

/** The full key of `name` under the logdir's prefix. */
export function objectKey(target: StoreLogdir, name: string): string {
  return target.prefix === "" ? name : `${target.prefix}/${name}`;
}

/** The names of the objects `manifest` refers to. */
export function manifestObjectNames(manifest: Manifest): Set<string> {
  return new Set([
    baseObjectName(manifest.base.file),
    ...manifest.levels.map((level) => levelObjectName(level.file)),
    ...manifest.segments.map(segmentObjectName),
  ]);
}

/** The manifest the store holds under the prefix, or undefined when there is none. */
export async function readStoreManifest(target: StoreLogdir): Promise<Manifest | undefined> {
  const key = objectKey(target, MANIFEST_OBJECT);
  const bytes = await target.store.get(key);
  if (bytes === undefined) return undefined;
  if (bytes.length > MANIFEST_BYTES_MAX) {
    throw new IntegrityError(`Manifest ${target.store.describe(key)} is too large`);
  }
  return decodeManifest(new TextDecoder().decode(bytes), target.store.describe(key));
}
