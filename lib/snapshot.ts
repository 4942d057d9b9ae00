/**
 * The base snapshot (claim 34): a sparse copy of the device taken before any write is logged.
 *
 * @module
 */
import { join } from "node:path";
import { Device } from "./device.ts";
import { requestSeal } from "./control.ts";
import { LogAssistedDisk } from "./disk.ts";
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
import {
  type BaseInfo,
  type Manifest,
  MANIFEST_FORMAT,
  MANIFEST_FORMAT_VERSION,
} from "./format/manifest.ts";
import { copyImage, type CopySource, deviceSource, fileTarget } from "./sparse_copy.ts";
import { realStorage } from "./storage/real_storage.ts";
import { parentOf, type Storage } from "./storage/storage.ts";
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
  /** Where the device and the logdir live (default: the local filesystem). */
  storage?: Storage;
  /**
   * How to ask the writer that holds the logdir (a running `watch`) to seal its live segment;
   * undefined when none listens. Default: its control socket.
   */
  requestSeal?: (logdir: string) => Promise<{ nextSeq: number } | undefined>;
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
  const storage = options.storage ?? realStorage;
  const existing = await readExistingManifest(logdir, storage);
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
  const created = storage.stat(logdir) === undefined;
  storage.mkdir(logdir, { recursive: true });
  // A new logdir's own name must survive a power cut once the snapshot says it is done.
  if (created) await syncDirectory(parentOf(logdir), storage);
  await ensureLogdirFolders(logdir, storage);
  if (existing === undefined) {
    const lock = await LogdirLock.acquire(logdir, "snapshot", { storage });
    try {
      const device = await Device.open(devicePath, { readOnly: true, storage });
      try {
        return await snapshotInto(deviceSource(device), device, logdir, undefined, 1, options);
      } finally {
        device.close();
      }
    } finally {
      lock.release();
    }
  }
  // Replacing a base: every entry before the copy begins must be in a sealed segment (so it can
  // be dropped) and on the device (so the copy sees it). With no writer running, open the disk
  // as its writer: that recovers it as watch does (re-applies what the device may lack) and
  // keeps others off during the copy. With `watch` running, ask it to seal, and let it append
  // during the copy: its entries from the seal on are replayed over the new base.
  let disk: LogAssistedDisk;
  try {
    disk = await LogAssistedDisk.open(devicePath, logdir, {
      purpose: "snapshot",
      storage,
      clock: options.clock,
    });
  } catch (error) {
    if (!(error instanceof BusyError)) throw error;
    const sealed = await (options.requestSeal ?? requestSeal)(logdir);
    if (sealed === undefined) throw error;
    const device = await Device.open(devicePath, { readOnly: true, storage });
    try {
      return await snapshotInto(
        deviceSource(device),
        device,
        logdir,
        existing,
        sealed.nextSeq,
        options,
      );
    } finally {
      device.close();
    }
  }
  try {
    const replayFromSeq = await disk.writer!.rotate();
    const source: CopySource = {
      sizeBytes: disk.sizeBytes,
      readInto: (offsetBytes, target) => disk.readSync(offsetBytes, target),
    };
    return await snapshotInto(source, disk.device, logdir, existing, replayFromSeq, options, {
      lastStampUs: () => disk.writer!.lastTimeUs,
    });
  } finally {
    await disk.close();
  }
}

async function readExistingManifest(
  logdir: string,
  storage: Storage,
): Promise<Manifest | undefined> {
  try {
    return await readManifest(logdir, storage);
  } catch (error) {
    if (error instanceof UsageError) return undefined;
    throw error;
  }
}

async function snapshotInto(
  source: CopySource,
  device: Device,
  logdir: string,
  existing: Manifest | undefined,
  replayFromSeq: number,
  options: SnapshotOptions,
  writer: { lastStampUs(): number } | undefined = undefined,
): Promise<SnapshotResult> {
  const storage = options.storage ?? realStorage;
  const clock = options.clock ?? nowUs;
  const startedUs = clock();
  const file = baseFileName(startedUs);
  const path = join(logdir, file);
  const tempPath = `${path}.partial`;
  const target = storage.open(tempPath, { create: true, truncate: true });
  let copy;
  try {
    target.truncate(device.sizeBytes);
    copy = await copyImage(source, fileTarget(target, true), {
      // An image file's holes are skipped; a block device reports all of itself as data.
      extents: device.isBlockDevice
        ? undefined
        : storage.dataExtents(device.path, device.sizeBytes),
      onProgress: options.onProgress,
    });
    await target.syncData();
  } finally {
    target.close();
  }
  storage.rename(tempPath, path);
  // The copy may hold any entry stamped up to the writer's last stamp when it ended, which a
  // clock that stepped back leaves ahead of this clock: the horizon is the later of the two.
  const endedUs = Math.max(clock(), startedUs, writer?.lastStampUs() ?? startedUs);
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
  const storage = options.storage ?? realStorage;
  // The renamed base must be durable before a manifest names it.
  await syncDirectory(logdir, storage);
  await withManifestLock(logdir, async () => {
    const current = existing === undefined ? undefined : await readManifest(logdir, storage);
    // Segments sealed by a running writer during the copy hold entries the new base replays.
    const kept = (current?.segments ?? []).filter((s) => s.firstSeq >= base.replayFromSeq);
    const dropped = (current?.segments ?? []).filter((s) => s.firstSeq < base.replayFromSeq);
    // No entry the new base already holds may be stamped after its horizon: a clock that stepped
    // back can leave the copy's end before them.
    const horizonUs = Math.max(endedUs, dropped.at(-1)?.lastUs ?? endedUs);
    const manifest: Manifest = {
      format: MANIFEST_FORMAT,
      formatVersion: MANIFEST_FORMAT_VERSION,
      logdirId: current?.logdirId ?? crypto.randomUUID(),
      hostId: current?.hostId ?? options.hostId ?? Deno.hostname(),
      createdUs: current?.createdUs ?? base.startedUs,
      deviceBytes,
      sectorBytes: SECTOR_BYTES,
      base: { ...base, endedUs: horizonUs },
      horizonUs,
      levels: [],
      segments: kept,
      compactedMarks: [],
    };
    await writeManifest(logdir, manifest, storage);
    if (current === undefined) return;
    removeIfExists(join(logdir, current.base.file), storage);
    for (const level of current.levels) {
      removeIfExists(join(logdir, LEVELS_DIR, level.file), storage);
    }
    for (const segment of dropped) {
      removeIfExists(join(logdir, SEGMENTS_DIR, segment.file), storage);
    }
  }, storage);
  await syncDirectory(logdir, storage);
  await syncDirectory(join(logdir, LEVELS_DIR), storage);
  await syncDirectory(join(logdir, SEGMENTS_DIR), storage);
}
