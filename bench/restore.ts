/**
 * Restore benchmark (issue 3): `sectorlog restore` of a 1 GiB device with a 256 MiB journal
 * against `cp --sparse=always` of the base image on the same filesystem, plus the peak RSS of the
 * restore process.
 *
 * Workload:
 * - Base: a 1 GiB image whose first 512 MiB hold random data and whose last 512 MiB are zero (a
 *   hole), snapshotted with the CLI; the base file in the logdir is sparse (512 MiB of data).
 * - Journal: 256 MiB of writes of random size (4 KiB..1 MiB, 4 KiB aligned, uniform) at random
 *   4 KiB-aligned offsets over the whole device, random data, journaled through the library's
 *   `LogAssistedDisk` (write, and a flush every 32 writes), then closed with a seal.
 * - Timed: `deno run -A cli/main.ts restore <logdir> <out>` under `/usr/bin/time -v` (wall time
 *   includes Deno start-up, as a user sees it) against `cp --sparse=always <base file> <copy>`.
 *   Before every timed run: `sync` and, when root, `echo 3 > /proc/sys/vm/drop_caches`.
 *
 * @module
 */
import { join } from "node:path";
import {
  canDropCaches,
  CLI,
  diskScratchDir,
  filesystemOf,
  GiB,
  journalRandomWrites,
  loadAverage,
  mbPerSecond,
  median,
  MiB,
  num,
  parseTimeVerbose,
  printTable,
  Prng,
  removeAll,
  run,
  syncAndDropCaches,
  verdict,
  writeDataThenHole,
} from "./_util.ts";

const DEVICE_BYTES = GiB;
const BASE_DATA_BYTES = 512 * MiB;
const JOURNAL_BYTES = 256 * MiB;
const WRITE_BYTES_MIN = 4096;
const WRITE_BYTES_MAX = MiB;
const FLUSH_EVERY_WRITES = 32;
const RUNS = 3;
const SEED = 0x5ec7010;

/** Issue 3 targets. */
const RATIO_TARGET_MIN = 0.8;
const RSS_TARGET_MAX_BYTES = 200e6;

/** What the restore benchmark measured (also written to the JSON results). */
export interface RestoreBenchResult {
  workload: Record<string, unknown>;
  scratchFilesystem: string;
  droppedCaches: boolean;
  cpMs: number[];
  cpFsyncMs: number[];
  restoreWallMs: number[];
  restoreInternalMs: number[];
  restoreMaxRssBytes: number[];
  cpMedianMs: number;
  cpFsyncMedianMs: number;
  restoreMedianMs: number;
  restoreInternalMedianMs: number;
  ratio: number;
  ratioVerdict: string;
  maxRssBytes: number;
  rssVerdict: string;
  restoredImageMatches: boolean;
  loadAvg: string;
}

/** Runs the restore benchmark and prints its table. */
export async function runRestoreBench(): Promise<RestoreBenchResult> {
  const scratch = await diskScratchDir("sectorlog-bench-restore-");
  try {
    return await benchIn(scratch);
  } finally {
    // SECTORLOG_BENCH_KEEP=1 keeps the logdir and images for profiling by hand.
    if (Deno.env.get("SECTORLOG_BENCH_KEEP") === "1") console.log(`kept ${scratch}`);
    else await removeAll(scratch);
  }
}

async function benchIn(scratch: string): Promise<RestoreBenchResult> {
  const drop = canDropCaches();
  const scratchFilesystem = await filesystemOf(scratch);
  console.log(`\n== restore (issue 3) ==`);
  console.log(`work files: ${scratch} (${scratchFilesystem})`);
  console.log(
    `page cache: ${
      drop
        ? "dropped before every timed run (sync; echo 3 > drop_caches)"
        : "NOT dropped (not root): runs are warm"
    }`,
  );

  const devicePath = join(scratch, "device.img");
  const logdir = join(scratch, "logdir");
  const prng = new Prng(SEED);
  await writeDataThenHole(devicePath, prng, {
    dataBytes: BASE_DATA_BYTES,
    deviceBytes: DEVICE_BYTES,
  });
  const snapshot = await run([...CLI, "snapshot", devicePath, logdir, "--json"]);
  console.log(`snapshot: ${Math.round(snapshot.wallMs)} ms (CLI wall time, informational)`);
  const journal = await journalRandomWrites(devicePath, logdir, prng, {
    deviceBytes: DEVICE_BYTES,
    journalBytes: JOURNAL_BYTES,
    writeBytesMin: WRITE_BYTES_MIN,
    writeBytesMax: WRITE_BYTES_MAX,
    alignBytes: WRITE_BYTES_MIN,
    flushEveryWrites: FLUSH_EVERY_WRITES,
  });
  console.log(
    `journal: ${journal.writes} writes, ${journal.flushes} flushes, ${
      (journal.bytes / MiB).toFixed(0)
    } MiB in ${Math.round(journal.ms)} ms through LogAssistedDisk (seed 0x${SEED.toString(16)})`,
  );
  const manifest = JSON.parse(await Deno.readTextFile(join(logdir, "manifest.json")));
  const basePath = join(logdir, manifest.base.file);
  const segmentBytes = (manifest.segments as { sizeBytes: number }[])
    .reduce((total, segment) => total + segment.sizeBytes, 0);
  const baseDu = (await run(["du", "-B1", basePath])).stdout.split(/\s/)[0];
  console.log(
    `logdir: base ${basePath.split("/").at(-1)} (${DEVICE_BYTES / MiB} MiB apparent, ${
      (Number(baseDu) / MiB).toFixed(0)
    } MiB allocated), ${manifest.segments.length} sealed segments, ${
      (segmentBytes / MiB).toFixed(1)
    } MiB`,
  );

  const copyPath = join(scratch, "copy.img");
  const outPath = join(scratch, "restored.img");
  const cpMs: number[] = [];
  const cpFsyncMs: number[] = [];
  const restoreWallMs: number[] = [];
  const restoreInternalMs: number[] = [];
  const restoreMaxRssBytes: number[] = [];
  let restoredImageMatches = false;
  for (let i = 0; i < RUNS; i++) {
    await syncAndDropCaches(drop);
    cpMs.push((await run(["cp", "--sparse=always", basePath, copyPath])).wallMs);
    await removeAll(copyPath);

    await syncAndDropCaches(drop);
    cpFsyncMs.push(
      (await run([
        "sh",
        "-c",
        `cp --sparse=always '${basePath}' '${copyPath}' && sync '${copyPath}'`,
      ]))
        .wallMs,
    );
    await removeAll(copyPath);

    await syncAndDropCaches(drop);
    const restore = await run([
      "/usr/bin/time",
      "-v",
      ...CLI,
      "restore",
      logdir,
      outPath,
      "--json",
    ]);
    const time = parseTimeVerbose(restore.stderr);
    restoreWallMs.push(restore.wallMs);
    restoreInternalMs.push(JSON.parse(restore.stdout).durationMs);
    restoreMaxRssBytes.push(time.maxRssBytes);
    if (i === 0) {
      restoredImageMatches = (await run(["cmp", "-s", devicePath, outPath], { allowFailure: true }))
        .code === 0;
    }
    await removeAll(outPath);
    console.log(
      `  run ${i + 1}: cp ${Math.round(cpMs[i])} ms, cp+fsync ${
        Math.round(cpFsyncMs[i])
      } ms, restore ${Math.round(restoreWallMs[i])} ms (internal ${
        restoreInternalMs[i]
      } ms, peak RSS ${(restoreMaxRssBytes[i] / 1e6).toFixed(0)} MB)`,
    );
  }

  const cpMedianMs = median(cpMs);
  const restoreMedianMs = median(restoreWallMs);
  const ratio = cpMedianMs / restoreMedianMs;
  const maxRssBytes = Math.max(...restoreMaxRssBytes);
  const result: RestoreBenchResult = {
    workload: {
      deviceBytes: DEVICE_BYTES,
      baseDataBytes: BASE_DATA_BYTES,
      journalBytes: journal.bytes,
      writes: journal.writes,
      flushes: journal.flushes,
      writeBytesMin: WRITE_BYTES_MIN,
      writeBytesMax: WRITE_BYTES_MAX,
      seed: SEED,
      runs: RUNS,
    },
    scratchFilesystem,
    droppedCaches: drop,
    cpMs,
    cpFsyncMs,
    restoreWallMs,
    restoreInternalMs,
    restoreMaxRssBytes,
    cpMedianMs,
    cpFsyncMedianMs: median(cpFsyncMs),
    restoreMedianMs,
    restoreInternalMedianMs: median(restoreInternalMs),
    ratio,
    ratioVerdict: verdict(ratio, RATIO_TARGET_MIN, "min"),
    maxRssBytes,
    rssVerdict: verdict(maxRssBytes, RSS_TARGET_MAX_BYTES, "max"),
    restoredImageMatches,
    loadAvg: await loadAverage(),
  };
  printRestoreTable(result);
  return result;
}

/** Prints the restore result table. */
export function printRestoreTable(r: RestoreBenchResult): void {
  console.log(
    `\nrestore: median of ${RUNS} runs, ${r.droppedCaches ? "cold cache" : "warm cache"}; ` +
      `restored image ${r.restoredImageMatches ? "matches" : "DOES NOT MATCH"} the live device`,
  );
  const gib = DEVICE_BYTES;
  printTable(["measure", "peer (cp)", "sectorlog", "ratio", "target", "result"], [
    [
      "time, ms (cp --sparse=always vs CLI restore)",
      num(r.cpMedianMs, 0),
      num(r.restoreMedianMs, 0),
      `${num(r.ratio, 2)}x`,
      `>= ${RATIO_TARGET_MIN}x (cp/restore)`,
      r.ratioVerdict,
    ],
    [
      "  throughput, MB/s of 1 GiB image",
      num(mbPerSecond(gib, r.cpMedianMs), 0),
      num(mbPerSecond(gib, r.restoreMedianMs), 0),
      "",
      "",
      "",
    ],
    [
      "  info: cp + fsync of the copy, ms",
      num(r.cpFsyncMedianMs, 0),
      num(r.restoreMedianMs, 0),
      `${num(r.cpFsyncMedianMs / r.restoreMedianMs, 2)}x`,
      "(restore fdatasyncs)",
      "",
    ],
    [
      "  info: restore internal durationMs",
      "",
      num(r.restoreInternalMedianMs, 0),
      "",
      "(no Deno start-up)",
      "",
    ],
    [
      "peak RSS of restore, MB",
      "",
      num(r.maxRssBytes / 1e6, 0),
      "",
      `<= ${RSS_TARGET_MAX_BYTES / 1e6} MB`,
      r.rssVerdict,
    ],
  ]);
}
