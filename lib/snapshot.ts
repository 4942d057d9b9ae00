/**
 * The base snapshot (claim 34): a sparse copy of the device taken before any write is logged.
 *
 * @module
 */
import * as fs from "node:fs";
import { join } from "node:path";
import { Device } from "./device.ts";
import { requestSeal } from "./control.ts";
import { BusyError, UsageError } from "./errors.ts";
import {
  baseFileName,
  ensureLogdirFolders,
  LEVELS_DIR,
  LogdirLock,
  readManifest,
  removeIfExists,
  SEGMENTS_DIR,
  syncDirectory,
  withManifestLock,
  writeManifest,
} from "./format/logdir.ts";
import { LogdirWriter } from "./format/logdir_writer.ts";
import {
  type BaseInfo,
  type Manifest,
  MANIFEST_FORMAT,
  MANIFEST_FORMAT_VERSION,
} from "./format/manifest.ts";
import { fdatasync } from "./format/segment.ts";
import { dataExtents } from "./data_extents.ts";
import { copyImage, deviceSource, fdTarget } from "./sparse_copy.ts";
import { formatTimeUtc, nowUs } from "./time.ts";

/** The sector size recorded for every device. */
export const SECTOR_BYTES = 512;

/** Options of {@linkcode takeSnapshot}. */
export interface SnapshotOptions {
  /** Replace an existing base; history before the new base is dropped. */
  force?: boolean;
  /**
   * Take a new base of a logdir that has one, also while `watch` runs: the running writer seals
   * its live segment first, and the new base replays the log from that point, so writes that go
   * on during the copy are exact. History before the new base is dropped.
   */
  refresh?: boolean;
  /** Host id recorded in a new logdir (default: the machine's hostname). */
  hostId?: string;
  /** Progress callback, called after every chunk copied. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** Wall clock in µs (tests inject one). */
  clock?: () => number;
}

/** What {@linkcode takeSnapshot} made. */
export interface SnapshotResult {
  logdir: string;
  baseFile: string;
  deviceBytes: number;
  dataBytes: number;
  crc32c: string;
  startedUs: number;
  endedUs: number;
  /** The first seq a restore replays on top of this base. */
  replayFromSeq: number;
  /** True when an earlier base (and the history that needed it) was replaced. */
  replaced: boolean;
}

/**
 * Copies `devicePath` into a new base snapshot of `logdir`, creating the logdir if needed.
 * Refuses a logdir that already has a base unless `force`.
 *
 * @example
 * ```ts
 * import { takeSnapshot } from "./snapshot.ts";
 * const result = await takeSnapshot("/dev/loop3", "/var/lib/sectorlog/vm1");
 * console.log(result.crc32c);
 * ```
 */
export async function takeSnapshot(
  devicePath: string,
  logdir: string,
  options: SnapshotOptions = {},
): Promise<SnapshotResult> {
  const existing = await readExistingManifest(logdir);
  if (existing === undefined && options.refresh === true) {
    throw new UsageError(`Cannot refresh the snapshot of ${logdir}: it has no base snapshot yet`, {
      hint: `run \`sectorlog snapshot <device> ${logdir}\` without --refresh`,
    });
  }
  if (existing !== undefined && options.force !== true && options.refresh !== true) {
    throw new UsageError(
      `Cannot snapshot into ${logdir}: it already has a base snapshot taken at ${
        formatTimeUtc(existing.base.endedUs)
      }`,
      {
        hint:
          "pass --refresh to take a new base (history before it is dropped); it works while watch runs",
      },
    );
  }
  await Deno.mkdir(logdir, { recursive: true });
  await ensureLogdirFolders(logdir);
  if (existing === undefined) {
    const lock = await LogdirLock.acquire(logdir, "snapshot");
    try {
      return await snapshotInto(devicePath, logdir, undefined, 1, options);
    } finally {
      lock.release();
    }
  }
  // Replacing a base: every entry before the copy begins must be in a sealed segment (so it can
  // be dropped) and on the device (so the copy sees it). With no writer running, hold the writer
  // lock during the copy; with `watch` running, ask it to seal, and let it append during the copy:
  // its entries from the seal on are replayed over the new base.
  let writer: LogdirWriter;
  try {
    writer = await LogdirWriter.open(logdir, { purpose: "snapshot" });
  } catch (error) {
    if (!(error instanceof BusyError)) throw error;
    const sealed = await requestSeal(logdir);
    if (sealed === undefined) throw error;
    return await snapshotInto(devicePath, logdir, existing, sealed.nextSeq, options);
  }
  try {
    const replayFromSeq = await writer.rotate();
    return await snapshotInto(devicePath, logdir, existing, replayFromSeq, options);
  } finally {
    await writer.close();
  }
}

async function readExistingManifest(logdir: string): Promise<Manifest | undefined> {
  try {
    return await readManifest(logdir);
  } catch (error) {
    if (error instanceof UsageError) return undefined;
    throw error;
  }
}

async function snapshotInto(
  devicePath: string,
  logdir: string,
  existing: Manifest | undefined,
  replayFromSeq: number,
  options: SnapshotOptions,
): Promise<SnapshotResult> {
  const clock = options.clock ?? nowUs;
  const device = await Device.open(devicePath, { readOnly: true });
  try {
    const startedUs = clock();
    const file = baseFileName(startedUs);
    const path = join(logdir, file);
    const tempPath = `${path}.partial`;
    const fd = fs.openSync(tempPath, "w");
    let copy;
    try {
      fs.ftruncateSync(fd, device.sizeBytes);
      copy = await copyImage(deviceSource(device), fdTarget(fd, true), {
        // An image file's holes are skipped; a block device reports all of itself as data.
        extents: device.isBlockDevice ? undefined : dataExtents(devicePath, device.sizeBytes),
        onProgress: options.onProgress,
      });
      await fdatasync(fd);
    } finally {
      fs.closeSync(fd);
    }
    await Deno.rename(tempPath, path);
    const endedUs = Math.max(clock(), startedUs);
    const base: BaseInfo = {
      file,
      startedUs,
      endedUs,
      replayFromSeq,
      crc32c: copy.crc32c,
      dataBytes: copy.dataBytes,
    };
    await installBase(logdir, existing, base, device.sizeBytes, options, endedUs);
    return {
      logdir,
      baseFile: file,
      deviceBytes: device.sizeBytes,
      dataBytes: copy.dataBytes,
      crc32c: copy.crc32c,
      startedUs,
      endedUs,
      replayFromSeq,
      replaced: existing !== undefined,
    };
  } finally {
    device.close();
  }
}

/** Swaps the manifest to the new base, then removes the files only the old base needed. */
async function installBase(
  logdir: string,
  existing: Manifest | undefined,
  base: BaseInfo,
  deviceBytes: number,
  options: SnapshotOptions,
  endedUs: number,
): Promise<void> {
  await withManifestLock(logdir, async () => {
    const current = existing === undefined ? undefined : await readManifest(logdir);
    // Segments sealed by a running writer during the copy hold entries the new base replays.
    const kept = (current?.segments ?? []).filter((s) => s.firstSeq >= base.replayFromSeq);
    const dropped = (current?.segments ?? []).filter((s) => s.firstSeq < base.replayFromSeq);
    const manifest: Manifest = {
      format: MANIFEST_FORMAT,
      formatVersion: MANIFEST_FORMAT_VERSION,
      logdirId: current?.logdirId ?? crypto.randomUUID(),
      hostId: current?.hostId ?? options.hostId ?? Deno.hostname(),
      createdUs: current?.createdUs ?? base.startedUs,
      deviceBytes,
      sectorBytes: SECTOR_BYTES,
      base,
      horizonUs: endedUs,
      levels: [],
      segments: kept,
      compactedMarks: [],
    };
    await writeManifest(logdir, manifest);
    if (current === undefined) return;
    removeIfExists(join(logdir, current.base.file));
    for (const level of current.levels) removeIfExists(join(logdir, LEVELS_DIR, level.file));
    for (const segment of dropped) {
      removeIfExists(join(logdir, SEGMENTS_DIR, segment.file));
    }
  });
  await syncDirectory(logdir);
}
