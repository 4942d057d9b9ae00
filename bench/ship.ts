/**
 * Ship benchmark (issue 5): `sectorlog ship` of 1 GiB of journal over loopback to a
 * `sectorlog receive`, against a plain TCP copy of the same segment files between two Deno
 * processes (bench/_tcp_pipe.ts: read into one buffer, discard; no framing, checksums or fsync),
 * plus the peak RSS of the sender and of the receiver.
 *
 * Workload:
 * - Device: a 256 MiB image that is all hole, snapshotted with the CLI, so the base carries no
 *   data (ship still reads it and both sides checksum its 256 MiB of zeros).
 * - Journal: 1 GiB of writes of random size (64 KiB..1 MiB, 4 KiB aligned, uniform) at random
 *   4 KiB-aligned offsets, random data, journaled through the library's `LogAssistedDisk` (a flush
 *   every 32 writes), then closed with a seal. The logdir is on a real disk; its files stay in the
 *   page cache (not dropped: both peers read them warm).
 * - Timed, in turn, RUNS times: the TCP copy (client wall time, Deno start-up included); then
 *   `deno run -A cli/main.ts ship <logdir> 127.0.0.1:<port> --host-id bench --json` under
 *   `/usr/bin/time -v` to a fresh `sectorlog receive <store> --listen 127.0.0.1:0` child whose
 *   store is on /dev/shm (the cost of the code path), then on the logdir's disk (fsync real: every
 *   ack follows an fdatasync). `sync` before every timed run. The receiver's peak RSS is its VmHWM.
 * - Throughput is journal bytes (segment files) per second of wall time.
 *
 * `SECTORLOG_BENCH_PROF=<dir>` writes V8 CPU profiles of the first ship and receive of each
 * variant into `<dir>`; `SECTORLOG_BENCH_RUNS=<n>` changes RUNS; `SECTORLOG_BENCH_KEEP=1` keeps
 * the scratch directories.
 *
 * @module
 */
import { join } from "node:path";
import { readManifest } from "../lib/format/logdir.ts";
import {
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
  REPO_ROOT,
  RssSampler,
  run,
  type RunResult,
  verdict,
} from "./_util.ts";

const DEVICE_BYTES = 256 * MiB;
const JOURNAL_BYTES = GiB;
const WRITE_BYTES_MIN = 64 * 1024;
const WRITE_BYTES_MAX = MiB;
const WRITE_ALIGN_BYTES = 4096;
const FLUSH_EVERY_WRITES = 32;
const RUNS = Number(Deno.env.get("SECTORLOG_BENCH_RUNS") ?? 3);
const SEED = 0x5417;
const HOST_ID = "bench";
const START_TIMEOUT_MS = 60_000;
const SHM_PARENT = "/dev/shm";

/** Issue 5 targets. */
const RATIO_TARGET_MIN = 0.8;
const RSS_TARGET_MAX_BYTES = 150e6;

/** One timed ship. */
interface ShipRun {
  wallMs: number;
  internalMs: number;
  senderMaxRssBytes: number;
  receiverHwmBytes: number;
  storeSegmentBytes: number;
  lastSeq: number;
}

/** One variant's runs and medians. */
interface ShipVariant {
  label: string;
  storeFilesystem: string;
  runs: ShipRun[];
  wallMedianMs: number;
  internalMedianMs: number;
  mbPerSecond: number;
  ratio: number;
  ratioVerdict: string;
  senderMaxRssBytes: number;
  receiverMaxRssBytes: number;
  rssVerdict: string;
  copiesComplete: boolean;
}

/** What the ship benchmark measured (also written to the JSON results). */
export interface ShipBenchResult {
  workload: Record<string, unknown>;
  logdirFilesystem: string;
  pipeWallMs: number[];
  pipeInternalMs: number[];
  pipeWallMedianMs: number;
  pipeInternalMedianMs: number;
  pipeMbPerSecond: number;
  shm: ShipVariant;
  disk: ShipVariant;
  ddMbPerSecond: number;
  loadAvg: string;
}

/** Runs the ship benchmark and prints its table. */
export async function runShipBench(): Promise<ShipBenchResult> {
  const scratch = await diskScratchDir("sectorlog-bench-ship-");
  const shmScratch = await Deno.makeTempDir({ dir: SHM_PARENT, prefix: "sectorlog-bench-ship-" });
  try {
    return await benchIn(scratch, shmScratch);
  } finally {
    if (Deno.env.get("SECTORLOG_BENCH_KEEP") === "1") {
      console.log(`kept ${scratch} and ${shmScratch}`);
    } else {
      await removeAll(scratch);
      await removeAll(shmScratch);
    }
  }
}

async function benchIn(scratch: string, shmScratch: string): Promise<ShipBenchResult> {
  console.log(`\n== ship (issue 5) ==`);
  const logdirFilesystem = await filesystemOf(scratch);
  console.log(`logdir and on-disk store: ${scratch} (${logdirFilesystem})`);
  console.log(`tmpfs store: ${shmScratch} (${await filesystemOf(shmScratch)})`);
  const devicePath = join(scratch, "device.img");
  const logdir = join(scratch, "logdir");
  const file = await Deno.open(devicePath, { write: true, create: true, truncate: true });
  await file.truncate(DEVICE_BYTES);
  file.close();
  await run([...CLI, "snapshot", devicePath, logdir, "--json"]);
  const journal = await journalWritesUpToSeq(devicePath, logdir);
  const segments = await segmentFiles(join(logdir, "segments"));
  const journalBytes = segments.reduce((total, segment) => total + segment.sizeBytes, 0);
  console.log(
    `journal: ${journal.writes} writes, ${journal.flushes} flushes, ${
      (journal.bytes / MiB).toFixed(0)
    } MiB of data in ${Math.round(journal.ms)} ms through LogAssistedDisk (seed 0x${
      SEED.toString(16)
    }); ${segments.length} segment files, ${(journalBytes / MiB).toFixed(1)} MiB; device ${
      DEVICE_BYTES / MiB
    } MiB, base all hole`,
  );
  const ddMbPerSecond = await diskBandwidth(scratch);
  console.log(`disk: dd 1 GiB conv=fdatasync ${num(ddMbPerSecond, 0)} MB/s`);

  const pipeWallMs: number[] = [];
  const pipeInternalMs: number[] = [];
  const shmRuns: ShipRun[] = [];
  const diskRuns: ShipRun[] = [];
  const profDir = Deno.env.get("SECTORLOG_BENCH_PROF");
  for (let i = 0; i < RUNS; i++) {
    await run(["sync"]);
    const pipe = await pipeOnce(segments.map((segment) => segment.path), journalBytes);
    pipeWallMs.push(pipe.wallMs);
    pipeInternalMs.push(pipe.internalMs);
    console.log(
      `  run ${i + 1}: tcp copy ${Math.round(pipe.wallMs)} ms (${
        num(mbPerSecond(journalBytes, pipe.wallMs), 0)
      } MB/s) load ${await loadAverage()}`,
    );
    for (
      const [label, parent, runs] of [["shm", shmScratch, shmRuns], [
        "disk",
        scratch,
        diskRuns,
      ]] as const
    ) {
      await run(["sync"]);
      const store = join(parent, `store-${i}`);
      const ship = await shipOnce(logdir, store, i === 0 ? profDir : undefined, label);
      runs.push(ship);
      await removeAll(store);
      console.log(
        `  run ${i + 1}: ship to ${label} store ${Math.round(ship.wallMs)} ms (${
          num(mbPerSecond(journalBytes, ship.wallMs), 0)
        } MB/s; internal ${ship.internalMs} ms), RSS sender ${
          num(ship.senderMaxRssBytes / 1e6, 0)
        } MB, receiver ${num(ship.receiverHwmBytes / 1e6, 0)} MB, load ${await loadAverage()}`,
      );
    }
  }
  const pipeWallMedianMs = median(pipeWallMs);
  const variant = (label: string, filesystem: string, runs: ShipRun[]): ShipVariant => {
    const wallMedianMs = median(runs.map((r) => r.wallMs));
    const ratio = pipeWallMedianMs / wallMedianMs;
    const senderMaxRssBytes = Math.max(...runs.map((r) => r.senderMaxRssBytes));
    const receiverMaxRssBytes = Math.max(...runs.map((r) => r.receiverHwmBytes));
    return {
      label,
      storeFilesystem: filesystem,
      runs,
      wallMedianMs,
      internalMedianMs: median(runs.map((r) => r.internalMs)),
      mbPerSecond: mbPerSecond(journalBytes, wallMedianMs),
      ratio,
      ratioVerdict: verdict(ratio, RATIO_TARGET_MIN, "min"),
      senderMaxRssBytes,
      receiverMaxRssBytes,
      rssVerdict: verdict(
        Math.max(senderMaxRssBytes, receiverMaxRssBytes),
        RSS_TARGET_MAX_BYTES,
        "max",
      ),
      copiesComplete: runs.every((r) =>
        r.storeSegmentBytes === journalBytes && r.lastSeq === journal.lastSeq
      ),
    };
  };
  const result: ShipBenchResult = {
    workload: {
      deviceBytes: DEVICE_BYTES,
      baseDataBytes: 0,
      journalDataBytes: journal.bytes,
      journalBytes,
      segments: segments.length,
      writes: journal.writes,
      flushes: journal.flushes,
      lastSeq: journal.lastSeq,
      writeBytesMin: WRITE_BYTES_MIN,
      writeBytesMax: WRITE_BYTES_MAX,
      seed: SEED,
      runs: RUNS,
    },
    logdirFilesystem,
    pipeWallMs,
    pipeInternalMs,
    pipeWallMedianMs,
    pipeInternalMedianMs: median(pipeInternalMs),
    pipeMbPerSecond: mbPerSecond(journalBytes, pipeWallMedianMs),
    shm: variant("store on /dev/shm (tmpfs)", await filesystemOf(shmScratch), shmRuns),
    disk: variant("store on the logdir's disk (fsync real)", logdirFilesystem, diskRuns),
    ddMbPerSecond,
    loadAvg: await loadAverage(),
  };
  printShipTable(result);
  return result;
}

/** Prints the ship result table. */
export function printShipTable(r: ShipBenchResult): void {
  const journalMiB = num(Number(r.workload.journalBytes) / MiB, 0);
  console.log(
    `\nship: median of ${RUNS} runs, ${journalMiB} MiB of journal over 127.0.0.1, wall time of ` +
      `the sending process (Deno start-up included on both sides); receiver copies ${
        r.shm.copiesComplete && r.disk.copiesComplete ? "complete" : "INCOMPLETE"
      } (every run: same segment bytes, last seq acked)`,
  );
  const rows: string[][] = [];
  for (const v of [r.shm, r.disk]) {
    rows.push(
      [
        `throughput, MB/s, ${v.label}`,
        num(r.pipeMbPerSecond, 0),
        num(v.mbPerSecond, 0),
        `${num(v.ratio, 2)}x`,
        `>= ${RATIO_TARGET_MIN}x (ship/copy)`,
        v.ratioVerdict,
      ],
      [
        "  info: internal ms (no Deno start-up)",
        num(r.pipeInternalMedianMs, 0),
        num(v.internalMedianMs, 0),
        `${num(r.pipeInternalMedianMs / v.internalMedianMs, 2)}x`,
        "",
        "",
      ],
      [
        "  peak RSS, MB, sender / receiver",
        "",
        `${num(v.senderMaxRssBytes / 1e6, 0)} / ${num(v.receiverMaxRssBytes / 1e6, 0)}`,
        "",
        `<= ${RSS_TARGET_MAX_BYTES / 1e6} MB each`,
        v.rssVerdict,
      ],
    );
  }
  rows.push([
    "  info: disk bandwidth, dd conv=fdatasync",
    "",
    num(r.ddMbPerSecond, 0),
    "",
    "(ceiling of the disk store)",
    "",
  ]);
  printTable(["measure", "peer (tcp copy)", "sectorlog", "ratio", "target", "result"], rows);
}

/** One plain TCP copy of `files`: a server child that discards, a client child that sends. */
async function pipeOnce(
  files: string[],
  expectedBytes: number,
): Promise<{ wallMs: number; internalMs: number }> {
  const pipe = `${REPO_ROOT}/bench/_tcp_pipe.ts`;
  const server = Child.start(["deno", "run", "-A", pipe, "server", "127.0.0.1:0"]);
  try {
    const port = await server.port();
    const client = await run(["deno", "run", "-A", pipe, "client", `127.0.0.1:${port}`, ...files]);
    const report = JSON.parse(client.stdout) as { bytes: number; durationMs: number };
    if (report.bytes !== expectedBytes) {
      throw new Error(`The TCP copy sent ${report.bytes} bytes, expected ${expectedBytes}`);
    }
    return { wallMs: client.wallMs, internalMs: report.durationMs };
  } finally {
    await server.stop();
  }
}

/** One ship to a fresh receiver child whose store is `store`. */
async function shipOnce(
  logdir: string,
  store: string,
  profDir: string | undefined,
  tag: string,
): Promise<ShipRun> {
  const prof = (name: string) =>
    profDir === undefined
      ? []
      : ["--cpu-prof", `--cpu-prof-dir=${profDir}`, `--cpu-prof-name=${name}-${tag}.cpuprofile`];
  const cli = (name: string) => [...CLI.slice(0, 3), ...prof(name), ...CLI.slice(3)];
  const receiver = Child.start([...cli("receive"), "receive", store, "--listen", "127.0.0.1:0"]);
  let ship: RunResult;
  try {
    const port = await receiver.port();
    ship = await run([
      "/usr/bin/time",
      "-v",
      ...cli("ship"),
      "ship",
      logdir,
      `127.0.0.1:${port}`,
      "--host-id",
      HOST_ID,
      "--json",
    ]);
  } catch (error) {
    await receiver.stop();
    throw error;
  }
  // Stopped before its store is read: a clean stop syncs and closes the host's writer.
  const receiverHwmBytes = await receiver.stop();
  const summary = JSON.parse(ship.stdout) as { durationMs: number; lastSeq: number };
  const hostSegments = await segmentFiles(join(store, HOST_ID, "segments"));
  return {
    wallMs: ship.wallMs,
    internalMs: summary.durationMs,
    senderMaxRssBytes: parseTimeVerbose(ship.stderr).maxRssBytes,
    receiverHwmBytes,
    storeSegmentBytes: hostSegments.reduce((total, segment) => total + segment.sizeBytes, 0),
    lastSeq: summary.lastSeq,
  };
}

/**
 * A long-running child (receiver or TCP sink): waits for its `listening on HOST:PORT` line on
 * stderr, samples its memory, keeps its stderr for error messages, and is stopped by its pid.
 */
class Child {
  readonly argv: string[];
  #process: Deno.ChildProcess;
  #sampler: RssSampler;
  #stderr = "";
  #listening: Promise<number>;
  #exited = false;

  private constructor(argv: string[]) {
    this.argv = argv;
    this.#process = new Deno.Command(argv[0], {
      args: argv.slice(1),
      cwd: REPO_ROOT,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.#sampler = new RssSampler(this.#process.pid, 50);
    this.#process.status.then(() => this.#exited = true);
    this.#listening = this.#drainStderr();
  }

  static start(argv: string[]): Child {
    return new Child(argv);
  }

  /** The port from the child's `listening on HOST:PORT` line. */
  async port(): Promise<number> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      return await Promise.race([
        this.#listening,
        new Promise<never>((_, reject) =>
          timer = setTimeout(
            () => reject(new Error(`${this.argv.join(" ")} did not listen: ${this.#stderr}`)),
            START_TIMEOUT_MS,
          )
        ),
      ]);
    } finally {
      clearTimeout(timer);
    }
  }

  async #drainStderr(): Promise<number> {
    let port: number | undefined;
    let resolvePort!: (port: number) => void;
    let rejectPort!: (error: Error) => void;
    const listening = new Promise<number>((resolve, reject) => {
      resolvePort = resolve;
      rejectPort = reject;
    });
    void (async () => {
      for await (const text of this.#process.stderr.pipeThrough(new TextDecoderStream())) {
        this.#stderr = (this.#stderr + text).slice(-20_000);
        const match = /listening on [^\s]*?:(\d+)/.exec(this.#stderr);
        if (port === undefined && match !== null) {
          port = Number(match[1]);
          resolvePort(port);
        }
      }
      if (port === undefined) {
        rejectPort(new Error(`${this.argv.join(" ")} exited before listening: ${this.#stderr}`));
      }
    })();
    return await listening;
  }

  /** SIGTERM, wait, and return the child's VmHWM (peak RSS) in bytes. */
  async stop(): Promise<number> {
    this.#sampler.sample();
    if (!this.#exited) {
      try {
        this.#process.kill("SIGTERM");
      } catch { /* already gone */ }
    }
    const status = await this.#process.status;
    this.#sampler.stop();
    if (!status.success && status.signal !== "SIGTERM") {
      console.log(`  ${this.argv.join(" ")} exited with ${status.code}:\n${this.#stderr}`);
    }
    return this.#sampler.hwmBytes;
  }
}

/** Segment files of a segments directory, in seq order, with their sizes. */
async function segmentFiles(dir: string): Promise<{ path: string; sizeBytes: number }[]> {
  const files: { path: string; sizeBytes: number }[] = [];
  for await (const entry of Deno.readDir(dir)) {
    if (!entry.isFile) continue;
    const path = join(dir, entry.name);
    files.push({ path, sizeBytes: (await Deno.stat(path)).size });
  }
  // Zero-padded hex names: name order is seq order.
  return files.sort((a, b) => a.path < b.path ? -1 : a.path > b.path ? 1 : 0);
}

/** MB/s of `dd` writing 1 GiB with an fdatasync at the end, in `dir`. */
async function diskBandwidth(dir: string): Promise<number> {
  const path = join(dir, "dd.bin");
  const result = await run([
    "dd",
    "if=/dev/zero",
    `of=${path}`,
    "bs=1M",
    "count=1024",
    "conv=fdatasync",
  ]);
  await removeAll(path);
  return mbPerSecond(GiB, result.wallMs);
}

/** Journals the bench's writes and returns their counts with the last seq they reached. */
async function journalWritesUpToSeq(devicePath: string, logdir: string) {
  const journal = await journalRandomWrites(devicePath, logdir, new Prng(SEED), {
    deviceBytes: DEVICE_BYTES,
    journalBytes: JOURNAL_BYTES,
    writeBytesMin: WRITE_BYTES_MIN,
    writeBytesMax: WRITE_BYTES_MAX,
    alignBytes: WRITE_ALIGN_BYTES,
    flushEveryWrites: FLUSH_EVERY_WRITES,
  });
  const manifest = await readManifest(logdir);
  return { ...journal, lastSeq: manifest.segments.at(-1)?.lastSeq ?? 0 };
}
