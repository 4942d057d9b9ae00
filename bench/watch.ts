/**
 * Watch benchmark (issue 4): fio over NBD (unix socket, fio's `nbd` engine through libnbd)
 * against three servers, each serving a fresh 1 GiB image file on disk:
 * - `qemu-nbd -f raw -t -k <socket> --cache=writeback --aio=threads <image>`: buffered writes
 *   through the page cache and fdatasync on NBD FLUSH, which is how `sectorlog watch` writes the
 *   device, so the only difference is the journal;
 * - `sectorlog watch` with its logdir on tmpfs (/dev/shm): the cost of the code path;
 * - `sectorlog watch` with its logdir on the image's disk: the cost of writing everything twice.
 *
 * Jobs, in order, on one server process (sync and page-cache drop between jobs):
 * - seq-1M-qd8: sequential 1 MiB writes, iodepth 8, the whole 1 GiB, `end_fsync=1` (so the NBD
 *   FLUSH at the end, with every fsync it implies, is part of the job);
 * - rand-4k-qd16 and rand-4k-qd1: 4 KiB random writes, 15 s time-based, no flushes.
 * fio's `--direct` is not used: it applies to file engines, the nbd engine has no page cache.
 * The disk's own bandwidth: `dd if=/dev/zero of=<file> bs=1M count=1024 conv=fdatasync`.
 *
 * @module
 */
import { join } from "node:path";
import {
  canDropCaches,
  CLI,
  diskScratchDir,
  filesystemOf,
  loadAverage,
  mbPerSecond,
  num,
  printTable,
  removeAll,
  RssSampler,
  run,
  syncAndDropCaches,
  verdict,
} from "./_util.ts";

const RANDOM_RUNTIME_S = Number(Deno.env.get("SECTORLOG_BENCH_RUNTIME_S") ?? 15);
const FIO_TIMEOUT_MS = 300_000;
const SERVER_START_TIMEOUT_MS = 60_000;

/** Issue 4 targets. */
const TARGETS = {
  seqVsQemuMin: 0.6,
  qd16VsQemuMin: 0.6,
  qd1VsQemuMin: 0.8,
  p99VsQemuMax: 2,
  seqOnDiskVsDdMin: 0.4,
  rssMaxBytes: 150e6,
};

interface FioJob {
  name: string;
  args: string[];
}

const JOBS: FioJob[] = [
  {
    name: "seq-1M-qd8",
    args: ["--rw=write", "--bs=1M", "--iodepth=8", "--size=1G", "--end_fsync=1"],
  },
  {
    name: "rand-4k-qd16",
    args: [
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=16",
      "--time_based",
      `--runtime=${RANDOM_RUNTIME_S}`,
      "--randrepeat=1",
    ],
  },
  {
    name: "rand-4k-qd1",
    args: [
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=1",
      "--time_based",
      `--runtime=${RANDOM_RUNTIME_S}`,
      "--randrepeat=1",
    ],
  },
];

/** One fio job's figures. */
export interface JobResult {
  job: string;
  mbPerSecond: number;
  iops: number;
  p99Us: number;
  p50Us: number;
  ioBytes: number;
  fioRuntimeMs: number;
  /** Wall time of the whole fio process (connect, I/O, end fsync, disconnect). */
  fioWallMs: number;
  /** ioBytes over fioWallMs: includes the final FLUSH of the seq job. */
  wallMbPerSecond: number;
}

/** One server's run. */
export interface ServerResult {
  server: string;
  command: string;
  logdirFilesystem?: string;
  jobs: JobResult[];
  maxRssBytes: number;
  hwmBytes: number;
  rssSamples: number;
  stopMs: number;
  logdirBytes?: number;
}

export interface WatchBenchResult {
  scratchFilesystem: string;
  tmpfsFilesystem: string;
  droppedCaches: boolean;
  ddMbPerSecond: number;
  servers: ServerResult[];
  checks: {
    measure: string;
    peer: string;
    ours: string;
    ratio: string;
    target: string;
    result: string;
  }[];
  loadAvg: string;
}

/** Runs the watch benchmark and prints its tables. */
export async function runWatchBench(): Promise<WatchBenchResult> {
  const scratch = await diskScratchDir("sectorlog-bench-watch-");
  const shm = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "sectorlog-bench-" });
  try {
    return await benchIn(scratch, shm);
  } finally {
    await removeAll(scratch);
    await removeAll(shm);
  }
}

async function benchIn(scratch: string, shm: string): Promise<WatchBenchResult> {
  const drop = canDropCaches();
  const scratchFilesystem = await filesystemOf(scratch);
  const tmpfsFilesystem = await filesystemOf(shm);
  console.log(`\n== watch (issue 4) ==`);
  console.log(`image and on-disk logdir: ${scratch} (${scratchFilesystem})`);
  console.log(`tmpfs logdir: ${shm} (${tmpfsFilesystem})`);
  console.log(
    `fio ${(await run(["fio", "--version"])).stdout.trim()}, ioengine=nbd over a unix socket; ` +
      `random jobs ${RANDOM_RUNTIME_S} s each; page cache ${
        drop ? "dropped" : "NOT dropped"
      } between jobs`,
  );

  const ddMbPerSecond = await measureDd(scratch, drop);
  console.log(`disk: dd bs=1M count=1024 conv=fdatasync: ${num(ddMbPerSecond, 0)} MB/s`);

  const image = join(scratch, "device.img");
  const servers: ServerResult[] = [];
  const configs = [
    { server: "qemu-nbd", logdir: undefined },
    { server: "watch, logdir tmpfs", logdir: join(shm, "logdir") },
    { server: "watch, logdir disk", logdir: join(scratch, "logdir") },
  ];
  for (const config of configs) {
    await freshImage(image);
    if (config.logdir !== undefined) {
      await run([...CLI, "snapshot", image, config.logdir, "--json"]);
    }
    await syncAndDropCaches(drop);
    const result = await benchServer(config.server, image, config.logdir, scratch, drop);
    servers.push(result);
    if (config.logdir !== undefined) await removeAll(config.logdir);
    await removeAll(image);
  }

  const result: WatchBenchResult = {
    scratchFilesystem,
    tmpfsFilesystem,
    droppedCaches: drop,
    ddMbPerSecond,
    servers,
    checks: checks(servers, ddMbPerSecond),
    loadAvg: await loadAverage(),
  };
  printWatchTables(result);
  return result;
}

/** Prints the raw figures per server and job, then the ratio checks against the targets. */
export function printWatchTables(r: WatchBenchResult): void {
  console.log(`\nwatch: raw figures (MB = 10^6 bytes; latency = fio completion latency)`);
  const rows: string[][] = [];
  for (const server of r.servers) {
    for (const job of server.jobs) {
      rows.push([
        server.server,
        job.job,
        num(job.mbPerSecond, 1),
        num(job.iops, 0),
        num(job.p50Us, 0),
        num(job.p99Us, 0),
        num(job.wallMbPerSecond, 1),
      ]);
    }
  }
  printTable(
    ["server", "job", "MB/s", "IOPS", "p50 us", "p99 us", "MB/s incl. connect+final flush"],
    rows,
  );
  console.log("");
  printTable(
    ["server", "RSS max MB", "VmHWM MB", "stop (SIGTERM) ms", "logdir MB", "command"],
    r.servers.map((server) => [
      server.server,
      num(server.maxRssBytes / 1e6, 0),
      num(server.hwmBytes / 1e6, 0),
      num(server.stopMs, 0),
      server.logdirBytes === undefined ? "" : num(server.logdirBytes / 1e6, 0),
      server.command.replace(/\/(tmp|var\/tmp|dev\/shm)\/sectorlog-bench-[^/ ]*/g, "$SCRATCH")
        .replace(/deno run -A (--cpu-prof.* )?\S*cli\/main\.ts/, "sectorlog"),
    ]),
  );
  console.log(
    `\nwatch: ratios against peers measured in this run (dd: ${num(r.ddMbPerSecond, 0)} MB/s)`,
  );
  printTable(
    ["measure", "peer", "sectorlog", "ratio", "target", "result"],
    r.checks.map((c) => [c.measure, c.peer, c.ours, c.ratio, c.target, c.result]),
  );
}

function checks(servers: ServerResult[], ddMbPerSecond: number): WatchBenchResult["checks"] {
  const [qemu, tmpfs, disk] = servers;
  const job = (server: ServerResult, name: string) => server.jobs.find((j) => j.job === name)!;
  const out: WatchBenchResult["checks"] = [];
  const higher = (
    measure: string,
    peer: number,
    ours: number,
    target: number,
    unit: string,
    decimals = 0,
  ) => {
    const ratio = ours / peer;
    out.push({
      measure,
      peer: `${num(peer, decimals)} ${unit}`,
      ours: `${num(ours, decimals)} ${unit}`,
      ratio: `${num(ratio, 2)}x`,
      target: `>= ${target}x`,
      result: verdict(ratio, target, "min"),
    });
  };
  const lower = (measure: string, peer: number, ours: number, target: number) => {
    const ratio = ours / peer;
    out.push({
      measure,
      peer: `${num(peer, 0)} us`,
      ours: `${num(ours, 0)} us`,
      ratio: `${num(ratio, 2)}x`,
      target: `<= ${target}x`,
      result: verdict(ratio, target, "max"),
    });
  };
  const seq = "seq-1M-qd8";
  higher(
    "tmpfs logdir: 1M seq MB/s vs qemu-nbd",
    job(qemu, seq).mbPerSecond,
    job(tmpfs, seq).mbPerSecond,
    TARGETS.seqVsQemuMin,
    "MB/s",
  );
  higher(
    "tmpfs logdir: 4k QD16 IOPS vs qemu-nbd",
    job(qemu, "rand-4k-qd16").iops,
    job(tmpfs, "rand-4k-qd16").iops,
    TARGETS.qd16VsQemuMin,
    "IOPS",
  );
  higher(
    "tmpfs logdir: 4k QD1 IOPS vs qemu-nbd",
    job(qemu, "rand-4k-qd1").iops,
    job(tmpfs, "rand-4k-qd1").iops,
    TARGETS.qd1VsQemuMin,
    "IOPS",
  );
  for (const name of JOBS.map((j) => j.name)) {
    lower(
      `tmpfs logdir: p99 ${name} vs qemu-nbd`,
      job(qemu, name).p99Us,
      job(tmpfs, name).p99Us,
      TARGETS.p99VsQemuMax,
    );
  }
  higher(
    "disk logdir: 1M seq MB/s (incl. final flush) vs dd",
    ddMbPerSecond,
    job(disk, seq).wallMbPerSecond,
    TARGETS.seqOnDiskVsDdMin,
    "MB/s",
  );
  higher(
    "  info: disk logdir: 1M seq MB/s (fio bw) vs dd",
    ddMbPerSecond,
    job(disk, seq).mbPerSecond,
    TARGETS.seqOnDiskVsDdMin,
    "MB/s",
  );
  higher(
    "  info: qemu-nbd 1M seq MB/s (incl. final flush) vs dd",
    ddMbPerSecond,
    job(qemu, seq).wallMbPerSecond,
    TARGETS.seqOnDiskVsDdMin,
    "MB/s",
  );
  for (const name of ["rand-4k-qd16", "rand-4k-qd1"]) {
    higher(
      `  info: disk logdir: ${name} IOPS vs qemu-nbd`,
      job(qemu, name).iops,
      job(disk, name).iops,
      name.endsWith("qd1") ? TARGETS.qd1VsQemuMin : TARGETS.qd16VsQemuMin,
      "IOPS",
    );
  }
  for (const server of [tmpfs, disk]) {
    out.push({
      measure: `${server.server}: RSS max (VmRSS/VmHWM)`,
      peer: `qemu ${num(qemu.hwmBytes / 1e6, 0)} MB`,
      ours: `${num(server.maxRssBytes / 1e6, 0)}/${num(server.hwmBytes / 1e6, 0)} MB`,
      ratio: "",
      target: `<= ${TARGETS.rssMaxBytes / 1e6} MB`,
      result: verdict(Math.max(server.maxRssBytes, server.hwmBytes), TARGETS.rssMaxBytes, "max"),
    });
  }
  return out;
}

async function measureDd(scratch: string, drop: boolean): Promise<number> {
  const path = join(scratch, "dd.img");
  await syncAndDropCaches(drop);
  const dd = await run([
    "dd",
    "if=/dev/zero",
    `of=${path}`,
    "bs=1M",
    "count=1024",
    "conv=fdatasync",
  ]);
  await removeAll(path);
  // "1073741824 bytes (1.1 GB, 1.0 GiB) copied, 2.1 s, 511 MB/s"
  const match = /(\d+) bytes .* copied, ([\d.]+) s/.exec(dd.stderr);
  if (match === null) throw new Error(`Cannot parse dd output: ${dd.stderr}`);
  return mbPerSecond(Number(match[1]), Number(match[2]) * 1000);
}

/** A 1 GiB image of written zeroes: allocated blocks, like a real device (and a cheap snapshot). */
async function freshImage(path: string): Promise<void> {
  await removeAll(path);
  await run(["dd", "if=/dev/zero", `of=${path}`, "bs=1M", "count=1024", "conv=fdatasync"]);
}

async function benchServer(
  server: string,
  image: string,
  logdir: string | undefined,
  scratch: string,
  drop: boolean,
): Promise<ServerResult> {
  const socket = join(scratch, "nbd.sock");
  await removeAll(socket);
  const argv = logdir === undefined
    ? ["qemu-nbd", "-f", "raw", "-t", "-k", socket, "--cache=writeback", "--aio=threads", image]
    : watchArgv(image, logdir, socket, server);
  console.log(`\n${server}: ${argv.join(" ")}`);
  const child = new Deno.Command(argv[0], {
    args: argv.slice(1),
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const stderrText = new Response(child.stderr).text();
  const sampler = new RssSampler(child.pid);
  const jobs: JobResult[] = [];
  let stopMs = 0;
  try {
    await waitForSocket(socket, child);
    for (const job of JOBS) {
      jobs.push(await runFio(job, socket, scratch));
      const j = jobs.at(-1)!;
      console.log(
        `  ${job.name}: ${num(j.mbPerSecond)} MB/s, ${num(j.iops, 0)} IOPS, p99 ${
          num(j.p99Us, 0)
        } us (wall ${num(j.fioWallMs, 0)} ms) load ${await loadAverage()}`,
      );
      await syncAndDropCaches(drop);
    }
  } finally {
    const stoppingMs = performance.now();
    try {
      child.kill("SIGTERM");
    } catch { /* already gone */ }
    const status = await child.status;
    stopMs = performance.now() - stoppingMs;
    sampler.stop();
    const stderr = await stderrText;
    if (!status.success && !(logdir === undefined && status.signal === "SIGTERM")) {
      console.log(`  ${server} exited with ${status.code} ${status.signal ?? ""}:\n${stderr}`);
    }
  }
  const logdirBytes = logdir === undefined
    ? undefined
    : Number((await run(["du", "-sB1", logdir])).stdout.split(/\s/)[0]);
  return {
    server,
    command: argv.join(" "),
    logdirFilesystem: logdir === undefined ? undefined : await filesystemOf(logdir),
    jobs,
    maxRssBytes: sampler.maxRssBytes,
    hwmBytes: sampler.hwmBytes,
    rssSamples: sampler.samples,
    stopMs,
    logdirBytes,
  };
}

function watchArgv(image: string, logdir: string, socket: string, server: string): string[] {
  const argv = [...CLI];
  // SECTORLOG_BENCH_PROF=<dir>: write a V8 CPU profile of each watch process into <dir>.
  const profDir = Deno.env.get("SECTORLOG_BENCH_PROF");
  if (profDir !== undefined) {
    const tag = server.includes("tmpfs") ? "tmpfs" : "disk";
    argv.splice(
      3,
      0,
      "--cpu-prof",
      `--cpu-prof-dir=${profDir}`,
      `--cpu-prof-name=watch-${tag}.cpuprofile`,
    );
  }
  return [...argv, "watch", image, logdir, "--socket", socket];
}

async function waitForSocket(socket: string, child: Deno.ChildProcess): Promise<void> {
  let exited = false;
  child.status.then(() => exited = true);
  const deadline = performance.now() + SERVER_START_TIMEOUT_MS;
  while (performance.now() < deadline) {
    if (exited) throw new Error(`Server exited before listening on ${socket}`);
    try {
      if (Deno.statSync(socket).isSocket) return;
    } catch { /* not yet */ }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`Server did not listen on ${socket} within ${SERVER_START_TIMEOUT_MS} ms`);
}

async function runFio(job: FioJob, socket: string, scratch: string): Promise<JobResult> {
  const output = join(scratch, `fio-${job.name}.json`);
  const argv = [
    "fio",
    `--name=${job.name}`,
    "--ioengine=nbd",
    `--uri=nbd+unix:///?socket=${socket}`,
    ...job.args,
    "--output-format=json",
    `--output=${output}`,
  ];
  const child = new Deno.Command(argv[0], {
    args: argv.slice(1),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const startedMs = performance.now();
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch { /* gone */ }
  }, FIO_TIMEOUT_MS);
  const done = await child.output();
  clearTimeout(timer);
  const fioWallMs = performance.now() - startedMs;
  if (!done.success) {
    throw new Error(
      `fio ${job.name} failed (${done.code} ${done.signal ?? ""}): ${
        new TextDecoder().decode(done.stderr)
      }`,
    );
  }
  const text = await Deno.readTextFile(output);
  // The nbd engine prints "fio: connected to NBD server" before the JSON.
  const report = JSON.parse(text.slice(text.indexOf("{")));
  const fioJob = report.jobs[0];
  if (fioJob.error !== 0) throw new Error(`fio ${job.name} reported error ${fioJob.error}`);
  const write = fioJob.write;
  const percentiles = write.clat_ns.percentile;
  return {
    job: job.name,
    mbPerSecond: write.bw_bytes / 1e6,
    iops: write.iops,
    p50Us: percentiles["50.000000"] / 1000,
    p99Us: percentiles["99.000000"] / 1000,
    ioBytes: write.io_bytes,
    fioRuntimeMs: write.runtime,
    fioWallMs,
    wallMbPerSecond: mbPerSecond(write.io_bytes, fioWallMs),
  };
}
