/**
 * S3 benchmark (issue 9): `sectorlog ship <logdir> s3://…` and `sectorlog restore s3://… OUT`
 * against a throw-away single-node OpenStack Swift (tests/s3/swift.sh, started through
 * tests/_s3_harness.ts and stopped at the end, also on failure or Ctrl-C), each against a plain
 * use of the same AWS SDK in the same run (bench/_s3_peer.ts), plus the peak RSS of sectorlog.
 *
 * Workloads:
 * - Ship: a 32 MiB device that is all hole, snapshotted with the CLI, then 512 MiB of writes of
 *   random size (64 KiB..1 MiB, 4 KiB aligned) at random offsets, random data, journaled through
 *   the library's `LogAssistedDisk` and closed with a seal. Timed, in turn: the peer uploads the
 *   files ship uploads (the base file and every sealed segment file) with one `PutObjectCommand`
 *   per file, one request at a time (a plain loop awaiting each send: the SDK runs one request
 *   per command and adds no parallelism of its own); then `sectorlog ship <logdir>
 *   s3://bench/ship-<run> --s3-endpoint … --json` to a fresh prefix. Throughput is the uploaded
 *   object bytes (the same for both) per second of wall time.
 * - Restore: a 1 GiB device whose first 512 MiB hold random data (the rest a hole), snapshotted,
 *   then 256 MiB of journal (4 KiB..1 MiB writes), shipped once to s3://bench/restore. Timed at
 *   two points: `--at` the middle of the journal's time span, and the latest state. The peer
 *   downloads the objects that restore needs for that point (the base, every level, the segments
 *   whose first entry is not after the point) with `GetObjectCommand` ranges of 8 MiB, 4 in
 *   flight, each written at its offset in a local file (no fsync, no hole detection). sectorlog
 *   runs `restore s3://bench/restore <out> [--at T] --json`; throughput is the bytes of those
 *   objects per second of wall time (restore also writes the 1 GiB image and fdatasyncs it).
 * - All commands run as children under `/usr/bin/time -v` (wall time includes Deno start-up and
 *   loading the SDK on both sides; peak RSS from it), credentials via AWS_* environment variables.
 *   Before every timed run: `sync` and, when root, drop the page cache (the Swift node's object
 *   files included). Each measurement is taken RUNS times and the best is compared, because the
 *   machine is shared.
 *
 * `SECTORLOG_BENCH_RUNS=<n>` changes RUNS; `SECTORLOG_BENCH_KEEP=1` keeps the scratch directory.
 *
 * @module
 */
import { join } from "node:path";
import { LEVELS_DIR, readManifest, SEGMENTS_DIR } from "../lib/format/logdir.ts";
import type { Manifest } from "../lib/format/manifest.ts";
import { baseObjectName, levelObjectName, segmentObjectName } from "../lib/store/store_logdir.ts";
import { formatTimeUtc } from "../lib/time.ts";
import { startSwift, type SwiftNode, swiftSkipReason } from "../tests/_s3_harness.ts";
import type { PeerPlan, PeerReport } from "./_s3_peer.ts";
import {
  canDropCaches,
  CLI,
  diskScratchDir,
  filesystemOf,
  GiB,
  journalRandomWrites,
  loadAverage,
  mbPerSecond,
  MiB,
  num,
  parseTimeVerbose,
  printTable,
  Prng,
  removeAll,
  REPO_ROOT,
  run,
  syncAndDropCaches,
  verdict,
  writeDataThenHole,
} from "./_util.ts";

const BUCKET = "bench";
const SHIP_DEVICE_BYTES = 32 * MiB;
const SHIP_JOURNAL_BYTES = 512 * MiB;
const RESTORE_DEVICE_BYTES = GiB;
const RESTORE_DATA_BYTES = 512 * MiB;
const RESTORE_JOURNAL_BYTES = 256 * MiB;
const FLUSH_EVERY_WRITES = 32;
const PEER_PART_BYTES = 8 * MiB;
const PEER_IN_FLIGHT = 4;
const RUNS = Number(Deno.env.get("SECTORLOG_BENCH_RUNS") ?? 3);
const SEED = 0x53_3b;
const PEER = `${REPO_ROOT}/bench/_s3_peer.ts`;

/** Issue 9 targets. */
const RATIO_TARGET_MIN = 0.8;
const RSS_TARGET_MAX_BYTES = 200e6;

/** An object of a logdir in the store and the local file it comes from or goes to. */
interface LogdirObject {
  name: string;
  path: string;
  sizeBytes: number;
}

/** One timed command. */
interface Timed {
  wallMs: number;
  internalMs: number;
  maxRssBytes: number;
}

/** One comparison: the peer's and sectorlog's runs, the best of each, ratio and verdicts. */
interface Comparison {
  label: string;
  /** What sectorlog's durationMs covers. */
  internalNote: string;
  bytes: number;
  objects: number;
  peer: Timed[];
  sectorlog: Timed[];
  peerBestMs: number;
  sectorlogBestMs: number;
  peerMbPerSecond: number;
  sectorlogMbPerSecond: number;
  ratio: number;
  ratioVerdict: string;
  sectorlogMaxRssBytes: number;
  peerMaxRssBytes: number;
  rssVerdict: string;
  /** Every run moved the expected bytes (and the first restore matched its reference image). */
  checked: boolean;
}

/** What the S3 benchmark measured (also written to the JSON results). */
export interface S3BenchResult {
  workload: Record<string, unknown>;
  scratchFilesystem: string;
  droppedCaches: boolean;
  ship: Comparison;
  restoreMiddle: Comparison;
  restoreLatest: Comparison;
  loadAvg: string;
}

/** Runs the S3 benchmark and prints its tables; skips (with the reason) without Swift. */
export async function runS3Bench(): Promise<S3BenchResult | { skipped: string }> {
  console.log(`\n== s3 (issue 9) ==`);
  const skip = swiftSkipReason("bench s3");
  if (skip !== undefined) return { skipped: skip };
  const scratch = await diskScratchDir("sectorlog-bench-s3-");
  const swift = await startSwift();
  const cleanUp = async () => {
    await swift.stop();
    if (Deno.env.get("SECTORLOG_BENCH_KEEP") === "1") console.log(`kept ${scratch}`);
    else await removeAll(scratch);
  };
  // Swift's servers run in their own sessions: stop them on Ctrl-C as on any other exit.
  const onSignal = () => void cleanUp().finally(() => Deno.exit(130));
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    await swift.createBucket(BUCKET);
    return await benchIn(scratch, swift);
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    await cleanUp();
  }
}

async function benchIn(scratch: string, swift: SwiftNode): Promise<S3BenchResult> {
  const drop = canDropCaches();
  const scratchFilesystem = await filesystemOf(scratch);
  console.log(
    `work files: ${scratch} (${scratchFilesystem}); Swift node ${swift.endpoint} in ` +
      `${swift.dir} (${await filesystemOf(swift.dir)}), one process per server`,
  );
  console.log(
    `machine: ${navigator.hardwareConcurrency} cores shared with other engineers' jobs (and ` +
      `with the Swift node): expect noise; best of ${RUNS} runs compared`,
  );
  console.log(
    `page cache: ${
      drop ? "dropped before every timed run" : "NOT dropped (not root): runs are warm"
    }`,
  );
  const env = {
    AWS_ACCESS_KEY_ID: swift.accessKeyId,
    AWS_SECRET_ACCESS_KEY: swift.secretAccessKey,
    AWS_REGION: swift.region,
  };
  const context = { scratch, swift, env, drop };
  const ship = await shipBench(context);
  const { middle, latest, workload } = await restoreBench(context);
  const result: S3BenchResult = {
    workload: { ...workload, ship: ship.workload, runs: RUNS, seed: SEED },
    scratchFilesystem,
    droppedCaches: drop,
    ship: ship.comparison,
    restoreMiddle: middle,
    restoreLatest: latest,
    loadAvg: await loadAverage(),
  };
  printS3Tables(result);
  return result;
}

/** What every phase needs. */
interface Context {
  scratch: string;
  swift: SwiftNode;
  env: Record<string, string>;
  drop: boolean;
}

async function shipBench(context: Context) {
  const { scratch, swift, env, drop } = context;
  const devicePath = join(scratch, "ship-device.img");
  const logdir = join(scratch, "ship-logdir");
  await writeDataThenHole(devicePath, new Prng(SEED), {
    dataBytes: 0,
    deviceBytes: SHIP_DEVICE_BYTES,
  });
  await run([...CLI, "snapshot", devicePath, logdir, "--json"]);
  const journal = await journalRandomWrites(devicePath, logdir, new Prng(SEED), {
    deviceBytes: SHIP_DEVICE_BYTES,
    journalBytes: SHIP_JOURNAL_BYTES,
    writeBytesMin: 64 * 1024,
    writeBytesMax: MiB,
    alignBytes: 4096,
    flushEveryWrites: FLUSH_EVERY_WRITES,
  });
  const manifest = await readManifest(logdir);
  const objects = logdirObjects(logdir, manifest, () => true);
  const bytes = sumBytes(objects);
  console.log(
    `ship logdir: ${journal.writes} writes, ${(journal.bytes / MiB).toFixed(0)} MiB journaled ` +
      `in ${Math.round(journal.ms)} ms; uploads ${objects.length} objects, ${
        (bytes / MiB).toFixed(1)
      } MiB (base ${SHIP_DEVICE_BYTES / MiB} MiB, all hole, + ${manifest.segments.length} ` +
      `sealed segments)`,
  );
  const peer: Timed[] = [];
  const sectorlog: Timed[] = [];
  let checked = true;
  for (let i = 0; i < RUNS; i++) {
    await syncAndDropCaches(drop);
    const put = await runPeer("put", join(scratch, "put-plan.json"), {
      endpoint: swift.endpoint,
      bucket: BUCKET,
      objects: objects.map((o) => ({ ...o, key: `peer-${i}/${o.name}` })),
    }, env);
    checked &&= put.report.bytes === bytes;
    peer.push(put.timed);
    await syncAndDropCaches(drop);
    const shipped = await runTimed([
      ...CLI,
      "ship",
      logdir,
      `s3://${BUCKET}/ship-${i}`,
      "--s3-endpoint",
      swift.endpoint,
      "--json",
    ], env);
    const summary = JSON.parse(shipped.stdout);
    checked &&= summary.objectsUploaded === objects.length && summary.bytesUploaded === bytes;
    sectorlog.push(shipped.timed);
    console.log(
      `  run ${i + 1}: PutObject ${describeRun(put.timed, bytes)}; ship ${
        describeRun(shipped.timed, bytes)
      }; load ${await loadAverage()}`,
    );
  }
  return {
    workload: {
      deviceBytes: SHIP_DEVICE_BYTES,
      journalDataBytes: journal.bytes,
      writes: journal.writes,
      segments: manifest.segments.length,
      uploadBytes: bytes,
    },
    comparison: compare(
      ["ship", "the whole ship"],
      bytes,
      objects.length,
      peer,
      sectorlog,
      checked,
    ),
  };
}

async function restoreBench(context: Context) {
  const { scratch, swift, env } = context;
  const devicePath = join(scratch, "restore-device.img");
  const logdir = join(scratch, "restore-logdir");
  const prng = new Prng(SEED + 1);
  await writeDataThenHole(devicePath, prng, {
    dataBytes: RESTORE_DATA_BYTES,
    deviceBytes: RESTORE_DEVICE_BYTES,
  });
  await run([...CLI, "snapshot", devicePath, logdir, "--json"]);
  const journal = await journalRandomWrites(devicePath, logdir, prng, {
    deviceBytes: RESTORE_DEVICE_BYTES,
    journalBytes: RESTORE_JOURNAL_BYTES,
    writeBytesMin: 4096,
    writeBytesMax: MiB,
    alignBytes: 4096,
    flushEveryWrites: FLUSH_EVERY_WRITES,
  });
  const url = `s3://${BUCKET}/restore`;
  const shipped = await run(
    [...CLI, "ship", logdir, url, "--s3-endpoint", swift.endpoint, "--json"],
    { env },
  );
  const manifest = await readManifest(logdir);
  const segments = manifest.segments;
  const middleUs = Math.round((segments[0].firstUs + segments.at(-1)!.lastUs) / 2);
  console.log(
    `restore logdir: ${RESTORE_DEVICE_BYTES / MiB} MiB device, ${RESTORE_DATA_BYTES / MiB} MiB ` +
      `of it data, ${journal.writes} writes, ${(journal.bytes / MiB).toFixed(0)} MiB journaled, ` +
      `${segments.length} sealed segments; shipped to ${url} in ${
        Math.round(shipped.wallMs)
      } ms (untimed)`,
  );
  const middle = await restorePoint(context, {
    label: "restore --at middle",
    url,
    logdir,
    at: formatTimeUtc(middleUs),
    objects: logdirObjects(logdir, manifest, (segment) => segment.firstUs <= middleUs),
    reference: undefined,
  });
  const latest = await restorePoint(context, {
    label: "restore, latest state",
    url,
    logdir,
    at: undefined,
    objects: logdirObjects(logdir, manifest, () => true),
    reference: devicePath,
  });
  const workload = {
    restoreDeviceBytes: RESTORE_DEVICE_BYTES,
    restoreDataBytes: RESTORE_DATA_BYTES,
    restoreJournalDataBytes: journal.bytes,
    restoreSegments: segments.length,
    middleUs,
    peerPartBytes: PEER_PART_BYTES,
    peerInFlight: PEER_IN_FLIGHT,
  };
  return { middle, latest, workload };
}

/** One restore point, RUNS times: the ranged download, then the CLI restore. */
async function restorePoint(
  context: Context,
  point: {
    label: string;
    url: string;
    logdir: string;
    at: string | undefined;
    objects: LogdirObject[];
    /** The image the restore must equal; undefined: a local restore of `logdir` at `at`. */
    reference: string | undefined;
  },
): Promise<Comparison> {
  const { scratch, swift, env, drop } = context;
  const bytes = sumBytes(point.objects);
  const atArgs = point.at === undefined ? [] : ["--at", point.at];
  console.log(
    `${point.label}${
      point.at === undefined ? "" : ` (${point.at})`
    }: needs ${point.objects.length} objects, ${(bytes / MiB).toFixed(1)} MiB`,
  );
  const peerDir = join(scratch, "peer-get");
  const outPath = join(scratch, "restored.img");
  const peer: Timed[] = [];
  const sectorlog: Timed[] = [];
  let checked = true;
  for (let i = 0; i < RUNS; i++) {
    await Deno.mkdir(peerDir, { recursive: true });
    await syncAndDropCaches(drop);
    const got = await runPeer("get", join(scratch, "get-plan.json"), {
      endpoint: swift.endpoint,
      bucket: BUCKET,
      objects: point.objects.map((o) => ({
        key: `restore/${o.name}`,
        path: join(peerDir, o.name.replaceAll("/", "_")),
        sizeBytes: o.sizeBytes,
      })),
      partBytes: PEER_PART_BYTES,
      inFlight: PEER_IN_FLIGHT,
    }, env);
    checked &&= got.report.bytes === bytes;
    peer.push(got.timed);
    await removeAll(peerDir);
    await syncAndDropCaches(drop);
    const restored = await runTimed([
      ...CLI,
      "restore",
      point.url,
      outPath,
      ...atArgs,
      "--s3-endpoint",
      swift.endpoint,
      "--json",
    ], env);
    sectorlog.push(restored.timed);
    if (i === 0) checked &&= await matchesReference(outPath, point, scratch);
    await removeAll(outPath);
    console.log(
      `  run ${i + 1}: ranged GET ${describeRun(got.timed, bytes)}; restore ${
        describeRun(restored.timed, bytes)
      }; load ${await loadAverage()}`,
    );
  }
  return compare(
    [point.label, "the image write only, after the download"],
    bytes,
    point.objects.length,
    peer,
    sectorlog,
    checked,
  );
}

/** True when the restored image equals the reference (made by a local restore when needed). */
async function matchesReference(
  outPath: string,
  point: { logdir: string; at: string | undefined; reference: string | undefined },
  scratch: string,
): Promise<boolean> {
  let reference = point.reference;
  if (reference === undefined) {
    reference = join(scratch, "reference.img");
    const atArgs = point.at === undefined ? [] : ["--at", point.at];
    await run([...CLI, "restore", point.logdir, reference, ...atArgs, "--json"]);
  }
  const same = (await run(["cmp", "-s", reference, outPath], { allowFailure: true })).code === 0;
  if (point.reference === undefined) await removeAll(reference);
  if (!same) console.log(`  restored image DOES NOT MATCH ${reference}`);
  return same;
}

/** The objects of a logdir in the store, as shipToStore names them, with their local files. */
function logdirObjects(
  logdir: string,
  manifest: Manifest,
  segmentNeeded: (segment: Manifest["segments"][number]) => boolean,
): LogdirObject[] {
  return [
    {
      name: baseObjectName(manifest.base.file),
      path: join(logdir, manifest.base.file),
      sizeBytes: manifest.deviceBytes,
    },
    ...manifest.levels.map((level) => ({
      name: levelObjectName(level.file),
      path: join(logdir, LEVELS_DIR, level.file),
      sizeBytes: level.sizeBytes,
    })),
    ...manifest.segments.filter(segmentNeeded).map((segment) => ({
      name: segmentObjectName(segment),
      path: join(logdir, SEGMENTS_DIR, segment.file),
      sizeBytes: segment.sizeBytes,
    })),
  ];
}

function sumBytes(objects: { sizeBytes: number }[]): number {
  return objects.reduce((total, object) => total + object.sizeBytes, 0);
}

/** Runs `argv` under `/usr/bin/time -v`; internal time from its `--json` durationMs. */
async function runTimed(
  argv: string[],
  env: Record<string, string>,
): Promise<{ stdout: string; timed: Timed }> {
  const result = await run(["/usr/bin/time", "-v", ...argv], { env });
  const summary = JSON.parse(result.stdout) as { durationMs: number };
  return {
    stdout: result.stdout,
    timed: {
      wallMs: result.wallMs,
      internalMs: summary.durationMs,
      maxRssBytes: parseTimeVerbose(result.stderr).maxRssBytes,
    },
  };
}

/** Runs bench/_s3_peer.ts with `plan` (written to `planPath`). */
async function runPeer(
  mode: "put" | "get",
  planPath: string,
  plan: PeerPlan,
  env: Record<string, string>,
): Promise<{ report: PeerReport; timed: Timed }> {
  await Deno.writeTextFile(planPath, JSON.stringify(plan));
  const { stdout, timed } = await runTimed(["deno", "run", "-A", PEER, mode, planPath], env);
  return { report: JSON.parse(stdout) as PeerReport, timed };
}

function describeRun(timed: Timed, bytes: number): string {
  return `${Math.round(timed.wallMs)} ms (${num(mbPerSecond(bytes, timed.wallMs), 0)} MB/s, ` +
    `internal ${Math.round(timed.internalMs)} ms, RSS ${num(timed.maxRssBytes / 1e6, 0)} MB)`;
}

function compare(
  [label, internalNote]: [string, string],
  bytes: number,
  objects: number,
  peer: Timed[],
  sectorlog: Timed[],
  checked: boolean,
): Comparison {
  const peerBestMs = Math.min(...peer.map((t) => t.wallMs));
  const sectorlogBestMs = Math.min(...sectorlog.map((t) => t.wallMs));
  const ratio = peerBestMs / sectorlogBestMs;
  const sectorlogMaxRssBytes = Math.max(...sectorlog.map((t) => t.maxRssBytes));
  return {
    label,
    internalNote,
    bytes,
    objects,
    peer,
    sectorlog,
    peerBestMs,
    sectorlogBestMs,
    peerMbPerSecond: mbPerSecond(bytes, peerBestMs),
    sectorlogMbPerSecond: mbPerSecond(bytes, sectorlogBestMs),
    ratio,
    ratioVerdict: verdict(ratio, RATIO_TARGET_MIN, "min"),
    sectorlogMaxRssBytes,
    peerMaxRssBytes: Math.max(...peer.map((t) => t.maxRssBytes)),
    rssVerdict: verdict(sectorlogMaxRssBytes, RSS_TARGET_MAX_BYTES, "max"),
    checked,
  };
}

/** Prints the S3 result table. */
export function printS3Tables(r: S3BenchResult): void {
  console.log(
    `\ns3: best of ${RUNS} runs, ${r.droppedCaches ? "cold cache" : "warm cache"}, wall time ` +
      `of each process (Deno start-up and SDK load included on both sides); ` +
      `results ${
        [r.ship, r.restoreMiddle, r.restoreLatest].every((c) => c.checked)
          ? "checked"
          : "NOT CHECKED"
      } (bytes moved; restored images equal their references); 2 shared cores: noisy`,
  );
  const rows: string[][] = [];
  const peers = new Map([
    [r.ship, "PutObject, one at a time"],
    [r.restoreMiddle, `ranged GET, ${PEER_PART_BYTES / MiB} MiB x ${PEER_IN_FLIGHT}`],
    [r.restoreLatest, `ranged GET, ${PEER_PART_BYTES / MiB} MiB x ${PEER_IN_FLIGHT}`],
  ]);
  for (const [c, peer] of peers) {
    rows.push(
      [
        `${c.label}: MB/s of ${(c.bytes / MiB).toFixed(0)} MiB in ${c.objects} objects`,
        `${num(c.peerMbPerSecond, 0)} (${peer})`,
        num(c.sectorlogMbPerSecond, 0),
        `${num(c.ratio, 2)}x`,
        `>= ${RATIO_TARGET_MIN}x`,
        c.ratioVerdict,
      ],
      [
        `  info: best internal ms (sectorlog: ${c.internalNote})`,
        num(Math.min(...c.peer.map((t) => t.internalMs)), 0),
        num(Math.min(...c.sectorlog.map((t) => t.internalMs)), 0),
        "",
        "",
        "",
      ],
      [
        "  peak RSS, MB",
        num(c.peerMaxRssBytes / 1e6, 0),
        num(c.sectorlogMaxRssBytes / 1e6, 0),
        "",
        `<= ${RSS_TARGET_MAX_BYTES / 1e6} MB`,
        c.rssVerdict,
      ],
    );
  }
  printTable(["measure", "peer (same SDK)", "sectorlog", "ratio", "target", "result"], rows);
}
