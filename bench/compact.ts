/**
 * Compaction benchmark (issue 6): `sectorlog compact --keep 0` of a 2 GiB journal on a 1 GiB
 * device against a sequential `cat` of the same segment files with a warm page cache, plus the
 * peak RSS of the compaction process.
 *
 * Workload:
 * - Base: a 1 GiB device image that is one hole (all zero), snapshotted with the CLI.
 * - Journal: 2 GiB of writes into a 256 MiB region of the device (offset 384 MiB), so every
 *   sector of it is rewritten ~8 times. Sizes 4 KiB × 2^k, k uniform in 0..6 (4 KiB..256 KiB, half
 *   of the writes ≤ 16 KiB), at random 4 KiB-aligned offsets in the region, journaled through the
 *   library's `LogAssistedDisk` (write, and a flush every 32 writes), then closed with a seal.
 *   Payloads are slices of a random pool, stamped with the write's index, so generation is fast.
 * - Timed, per run on a fresh copy of the logdir (`cp -r`, then `sync`): `cat <segments> >
 *   /dev/null` once to warm the cache, then timed, then `deno run -A cli/main.ts compact <logdir>
 *   --keep 0 --json` under `/usr/bin/time -v` (wall time includes Deno start-up, as a user sees
 *   it, and the fdatasync of the level). Throughput is journal bytes / time for both.
 * - Checked once: `restore` of the compacted copy equals the live device image.
 * - Informational: `rm` of the segment files of one more fresh, synced, warm copy: deleting them
 *   is part of every compaction (on a filesystem mounted with online discard it is not cheap).
 * - SECTORLOG_BENCH_COMPACT_WORKLOAD=small: 2 GiB of 4 KiB writes over the whole device instead
 *   (~500 000 entries), for the per-entry costs and the memory.
 *
 * @module
 */
import { join } from "node:path";
import { LogAssistedDisk } from "../lib/disk.ts";
import {
  CLI,
  diskScratchDir,
  filesystemOf,
  GiB,
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
  verdict,
} from "./_util.ts";

const DEVICE_BYTES = GiB;
const JOURNAL_BYTES = 2 * GiB;
const WRITE_BYTES_MIN = 4096;

/** Where the journal's writes land and how large they are. */
interface Workload {
  name: string;
  regionOffsetBytes: number;
  regionBytes: number;
  /** Writes are 4 KiB × 2^k, k uniform in 0..sizeDoublings. */
  sizeDoublings: number;
}

/**
 * The workload, and (SECTORLOG_BENCH_COMPACT_WORKLOAD=small) 4 KiB writes over the whole
 * device: many more entries and extents, for profiling the per-entry costs and the memory.
 */
const WORKLOADS: Record<string, Workload> = {
  mixed: {
    name: "mixed",
    regionOffsetBytes: 384 * MiB,
    regionBytes: 256 * MiB,
    sizeDoublings: 6, // up to 4 KiB × 2^6 = 256 KiB
  },
  small: { name: "small", regionOffsetBytes: 0, regionBytes: DEVICE_BYTES, sizeDoublings: 0 },
};
const WORKLOAD_NAME = Deno.env.get("SECTORLOG_BENCH_COMPACT_WORKLOAD") ?? "mixed";
const WORKLOAD = WORKLOADS[WORKLOAD_NAME];
if (WORKLOAD === undefined) {
  throw new Error(
    `Cannot run the compact bench: unknown SECTORLOG_BENCH_COMPACT_WORKLOAD ${WORKLOAD_NAME}, expected one of ${
      Object.keys(WORKLOADS).join(", ")
    }`,
  );
}
const PAYLOAD_POOL_BYTES = 16 * MiB;
const FLUSH_EVERY_WRITES = 32;
const RUNS = 3;
const SEED = 0xc0c7ac7;

/** Issue 6 targets. */
const RATIO_TARGET_MIN = 0.3;
const RSS_TARGET_MAX_BYTES = 200e6;

/** What the compaction benchmark measured (also written to the JSON results). */
export interface CompactBenchResult {
  workload: Record<string, unknown>;
  scratchFilesystem: string;
  journalBytes: number;
  catMs: number[];
  rmMs: number;
  compactWallMs: number[];
  compactInternalMs: number[];
  compactMaxRssBytes: number[];
  catMedianMs: number;
  compactMedianMs: number;
  compactInternalMedianMs: number;
  ratio: number;
  ratioVerdict: string;
  maxRssBytes: number;
  rssVerdict: string;
  levelBytes: number;
  levelEntries: number;
  reclaimedBytes: number;
  restoredImageMatches: boolean;
  loadAvg: string;
}

/** Runs the compaction benchmark and prints its table. */
export async function runCompactBench(): Promise<CompactBenchResult> {
  const scratch = await diskScratchDir("sectorlog-bench-compact-");
  try {
    return await benchIn(scratch);
  } finally {
    // SECTORLOG_BENCH_KEEP=1 keeps the logdir and image for profiling by hand.
    if (Deno.env.get("SECTORLOG_BENCH_KEEP") === "1") console.log(`kept ${scratch}`);
    else await removeAll(scratch);
  }
}

async function benchIn(scratch: string): Promise<CompactBenchResult> {
  const scratchFilesystem = await filesystemOf(scratch);
  console.log(`\n== compact (issue 6), workload ${WORKLOAD.name} ==`);
  console.log(`work files: ${scratch} (${scratchFilesystem})`);
  console.log(`page cache: warm for both (cat once before timing; the copy was just written)`);

  const devicePath = join(scratch, "device.img");
  const logdir = join(scratch, "logdir");
  await Deno.writeFile(devicePath, new Uint8Array(0));
  await Deno.truncate(devicePath, DEVICE_BYTES);
  const snapshot = await run([...CLI, "snapshot", devicePath, logdir, "--json"]);
  console.log(`snapshot: ${Math.round(snapshot.wallMs)} ms (CLI wall time, informational)`);
  const journal = await journalWrites(devicePath, logdir, new Prng(SEED));
  console.log(
    `journal: ${journal.writes} writes, ${journal.flushes} flushes, ${
      (journal.bytes / MiB).toFixed(0)
    } MiB in ${Math.round(journal.ms)} ms through LogAssistedDisk (seed 0x${SEED.toString(16)})`,
  );
  const segmentFiles = await sealedSegmentFiles(logdir);
  let journalBytes = 0;
  for (const file of segmentFiles) journalBytes += (await Deno.stat(join(logdir, file))).size;
  console.log(
    `logdir: ${segmentFiles.length} sealed segments, ${(journalBytes / MiB).toFixed(1)} MiB`,
  );

  const copy = join(scratch, "copy");
  const catMs: number[] = [];
  const compactWallMs: number[] = [];
  const compactInternalMs: number[] = [];
  const compactMaxRssBytes: number[] = [];
  let summary: { levelBytes: number; levelEntries: number; reclaimedBytes: number } | undefined;
  let restoredImageMatches = false;
  for (let i = 0; i < RUNS; i++) {
    await removeAll(copy);
    await run(["cp", "-r", logdir, copy]);
    await run(["sync"]);
    const cat = ["sh", "-c", 'cat "$@" > /dev/null', "cat", ...segmentFiles];
    await run(cat, { cwd: copy });
    catMs.push((await run(cat, { cwd: copy })).wallMs);
    const compact = await run([
      "/usr/bin/time",
      "-v",
      ...CLI,
      "compact",
      copy,
      "--keep",
      "0",
      "--json",
    ]);
    const time = parseTimeVerbose(compact.stderr);
    const json = JSON.parse(compact.stdout);
    compactWallMs.push(compact.wallMs);
    compactInternalMs.push(json.durationMs);
    compactMaxRssBytes.push(time.maxRssBytes);
    if (i === 0) {
      summary = json;
      restoredImageMatches = await restoreMatches(copy, devicePath, join(scratch, "restored.img"));
    }
    console.log(
      `  run ${i + 1}: cat ${Math.round(catMs[i])} ms, compact ${
        Math.round(compactWallMs[i])
      } ms (internal ${compactInternalMs[i]} ms, peak RSS ${
        (compactMaxRssBytes[i] / 1e6).toFixed(0)
      } MB)`,
    );
  }
  const rmMs = await timeRemoval(logdir, copy, segmentFiles);
  console.log(`  rm of the segment files of a fresh warm copy: ${Math.round(rmMs)} ms`);

  const catMedianMs = median(catMs);
  const compactMedianMs = median(compactWallMs);
  const ratio = catMedianMs / compactMedianMs;
  const maxRssBytes = Math.max(...compactMaxRssBytes);
  const result: CompactBenchResult = {
    workload: {
      deviceBytes: DEVICE_BYTES,
      name: WORKLOAD.name,
      regionOffsetBytes: WORKLOAD.regionOffsetBytes,
      regionBytes: WORKLOAD.regionBytes,
      writtenBytes: journal.bytes,
      writes: journal.writes,
      flushes: journal.flushes,
      writeBytesMin: WRITE_BYTES_MIN,
      writeBytesMax: WRITE_BYTES_MIN * 2 ** WORKLOAD.sizeDoublings,
      seed: SEED,
      runs: RUNS,
    },
    scratchFilesystem,
    journalBytes,
    catMs,
    rmMs,
    compactWallMs,
    compactInternalMs,
    compactMaxRssBytes,
    catMedianMs,
    compactMedianMs,
    compactInternalMedianMs: median(compactInternalMs),
    ratio,
    ratioVerdict: verdict(ratio, RATIO_TARGET_MIN, "min"),
    maxRssBytes,
    rssVerdict: verdict(maxRssBytes, RSS_TARGET_MAX_BYTES, "max"),
    levelBytes: summary!.levelBytes,
    levelEntries: summary!.levelEntries,
    reclaimedBytes: summary!.reclaimedBytes,
    restoredImageMatches,
    loadAvg: await loadAverage(),
  };
  printCompactTable(result);
  return result;
}

/** Prints the compaction result table. */
export function printCompactTable(r: CompactBenchResult): void {
  console.log(
    `\ncompact --keep 0: median of ${RUNS} runs, warm cache; level ${
      (r.levelBytes / MiB).toFixed(1)
    } MiB in ${r.levelEntries} entries, reclaimed ${(r.reclaimedBytes / MiB).toFixed(0)} MiB; ` +
      `restore after compaction ${
        r.restoredImageMatches ? "matches" : "DOES NOT MATCH"
      } the live device`,
  );
  printTable(["measure", "peer (cat)", "sectorlog", "ratio", "target", "result"], [
    [
      "time, ms (warm cat of the segments vs CLI compact)",
      num(r.catMedianMs, 0),
      num(r.compactMedianMs, 0),
      `${num(r.ratio, 2)}x`,
      `>= ${RATIO_TARGET_MIN}x (cat/compact)`,
      r.ratioVerdict,
    ],
    [
      `  throughput, MB/s of the ${(r.journalBytes / MiB).toFixed(0)} MiB journal`,
      num(mbPerSecond(r.journalBytes, r.catMedianMs), 0),
      num(mbPerSecond(r.journalBytes, r.compactMedianMs), 0),
      "",
      "",
      "",
    ],
    [
      "  info: compact internal durationMs",
      "",
      num(r.compactInternalMedianMs, 0),
      "",
      "(no Deno start-up)",
      "",
    ],
    [
      "  info: rm of the segment files, ms",
      num(r.rmMs, 0),
      "",
      "",
      "(part of compact: a floor)",
      "",
    ],
    [
      "peak RSS of compact, MB",
      "",
      num(r.maxRssBytes / 1e6, 0),
      "",
      `<= ${RSS_TARGET_MAX_BYTES / 1e6} MB`,
      r.rssVerdict,
    ],
  ]);
}

/**
 * Time to delete the segment files, as compaction must once it has swapped the manifest: on a
 * fresh copy, synced and warm like the timed ones (a floor that no compaction can go below).
 */
async function timeRemoval(logdir: string, copy: string, segmentFiles: string[]) {
  await removeAll(copy);
  await run(["cp", "-r", logdir, copy]);
  await run(["sync"]);
  await run(["sh", "-c", 'cat "$@" > /dev/null', "cat", ...segmentFiles], { cwd: copy });
  const { wallMs } = await run(["rm", ...segmentFiles], { cwd: copy });
  await removeAll(copy);
  return wallMs;
}

/** The sealed segment files of `logdir`, relative to it, in log order. */
async function sealedSegmentFiles(logdir: string): Promise<string[]> {
  const manifest = JSON.parse(await Deno.readTextFile(join(logdir, "manifest.json")));
  return (manifest.segments as { file: string }[]).map((segment) => `segments/${segment.file}`);
}

/** True when restoring `logdir` at its latest state gives the bytes of `devicePath`. */
async function restoreMatches(logdir: string, devicePath: string, outPath: string) {
  await run([...CLI, "restore", logdir, outPath]);
  try {
    return (await run(["cmp", "-s", devicePath, outPath], { allowFailure: true })).code === 0;
  } finally {
    await removeAll(outPath);
  }
}

/** Journals JOURNAL_BYTES of writes into the region through the log-assisted disk. */
async function journalWrites(
  devicePath: string,
  logdir: string,
  prng: Prng,
): Promise<{ writes: number; flushes: number; bytes: number; ms: number }> {
  const startedMs = performance.now();
  const pool = new Uint8Array(PAYLOAD_POOL_BYTES);
  prng.fill(pool);
  const disk = await LogAssistedDisk.open(devicePath, logdir, { purpose: "bench" });
  let writes = 0;
  let flushes = 0;
  let bytes = 0;
  try {
    while (bytes < JOURNAL_BYTES) {
      const lengthBytes = WRITE_BYTES_MIN * 2 ** prng.below(WORKLOAD.sizeDoublings + 1);
      const offsetBytes = WORKLOAD.regionOffsetBytes +
        WRITE_BYTES_MIN * prng.below((WORKLOAD.regionBytes - lengthBytes) / WRITE_BYTES_MIN + 1);
      // A fresh buffer per request, as NBD hands the disk; stamped so no two writes are equal.
      const poolAt = WRITE_BYTES_MIN * prng.below((PAYLOAD_POOL_BYTES - lengthBytes) / 4096 + 1);
      const data = pool.slice(poolAt, poolAt + lengthBytes);
      new DataView(data.buffer).setUint32(0, writes, true);
      await disk.write(offsetBytes, data);
      writes++;
      bytes += lengthBytes;
      if (writes % FLUSH_EVERY_WRITES === 0) {
        await disk.flush();
        flushes++;
      }
    }
    await disk.flush();
    flushes++;
  } finally {
    await disk.close({ seal: true });
  }
  return { writes, flushes, bytes, ms: performance.now() - startedMs };
}
