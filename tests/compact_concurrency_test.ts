import assert from "node:assert/strict";
import { join } from "node:path";
import { COMPACT_LOCK_FILE, compactLogdir } from "../lib/compact.ts";
import { LogAssistedDisk } from "../lib/disk.ts";
import { readManifest } from "../lib/format/logdir.ts";
import { LogdirWriter } from "../lib/format/logdir_writer.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { nowUs } from "../lib/time.ts";
import { verifyLogdir } from "../lib/verify.ts";
import { startWatch } from "../lib/watch.ts";
import { restoreBytes, runCli } from "./_compact_fixture.ts";
import { assertBytesEqual, makeImage, readAll, withTempDir } from "./_helpers.ts";

const DEVICE_BYTES = 256 * 1024;

/** One change the appending process made, as it reports it on stdout. */
interface AppendedOp {
  seq: number;
  timeUs: number;
  kind: "write" | "zero";
  offset: number;
  length: number;
  fill: number;
}

/**
 * The appending process: a log-assisted disk with small segments and the real clock, writing
 * and zeroing pseudo-random ranges, one JSON line per change on stdout.
 */
const APPENDER = `
const [diskModule, device, logdir, stepsText] = Deno.args;
const { LogAssistedDisk } = await import(diskModule);
const disk = await LogAssistedDisk.open(device, logdir, { segmentBytesMax: 16 * 1024 });
let state = 12345;
const next = (n) => (state = (state * 1103515245 + 12345) % 2147483648) % n;
for (let i = 0; i < Number(stepsText); i++) {
  const offset = next(${DEVICE_BYTES / 512}) * 512;
  const length = Math.min(${DEVICE_BYTES} - offset, 512 * (1 + next(16)));
  const fill = 1 + (i % 250);
  const kind = next(5) === 0 ? "zero" : "write";
  if (kind === "zero") await disk.zero(offset, length);
  else await disk.write(offset, new Uint8Array(length).fill(fill));
  const seq = disk.writer.nextSeq - 1;
  console.log(JSON.stringify({ seq, timeUs: disk.writer.lastTimeUs, kind, offset, length, fill }));
  if (i % 10 === 9) await disk.flush();
  if (i % 4 === 3) await new Promise((resolve) => setTimeout(resolve, 1));
}
await disk.close();
`;

/** The image after every op with a time at or before `timeUs`, from an all-zero device. */
function modelAt(ops: AppendedOp[], timeUs: number): Uint8Array {
  const image = new Uint8Array(DEVICE_BYTES);
  for (const op of ops) {
    if (op.timeUs > timeUs) break;
    image.fill(op.kind === "zero" ? 0 : op.fill, op.offset, op.offset + op.length);
  }
  return image;
}

Deno.test("compact in a loop while another process appends: nothing lost, verify clean, restores exact", async () => {
  await withTempDir(async (dir) => {
    const devicePath = join(dir, "disk.img");
    const logdir = join(dir, "log");
    await makeImage(devicePath, DEVICE_BYTES);
    await takeSnapshot(devicePath, logdir);
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "eval",
        APPENDER,
        import.meta.resolve("../lib/disk.ts"),
        devicePath,
        logdir,
        "600",
      ],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const lines: string[] = [];
    const collected = (async () => {
      let pending = "";
      for await (const text of child.stdout.pipeThrough(new TextDecoderStream())) {
        pending += text;
        const complete = pending.split("\n");
        pending = complete.pop()!;
        lines.push(...complete);
      }
    })();
    let running = true;
    const status = child.status.finally(() => running = false);
    while (running && lines.length === 0) await new Promise((resolve) => setTimeout(resolve, 5));
    let foldedRuns = 0;
    while (running) {
      const result = await compactLogdir(logdir, { cutUs: nowUs() - 20_000 });
      // The appender holds the lock and has no control socket: only sealed segments fold.
      if (result.foldedEntries > 0 && result.sealedVia === "none") foldedRuns++;
      assert.ok((await verifyLogdir(logdir)).ok, "verify while appending");
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    await collected;
    const stderr = new TextDecoder().decode(await new Response(child.stderr).arrayBuffer());
    assert.equal((await status).code, 0, stderr);
    assert.ok(foldedRuns > 0, "some compactions folded sealed entries while the appender ran");
    const ops: AppendedOp[] = lines.map((line) => JSON.parse(line));
    assert.equal(ops.length, 600);
    const final = await compactLogdir(logdir, { cutUs: ops[400].timeUs, nowUs: nowUs() });
    assert.equal(final.sealedVia, "compact");
    assert.ok((await verifyLogdir(logdir)).ok);
    const { horizonUs } = await readManifest(logdir);
    // The loop's cuts (20 ms ago) may have passed the last op when the appender ended first.
    const lastUs = Math.max(ops.at(-1)!.timeUs, horizonUs);
    const times = [
      horizonUs,
      lastUs,
      ...ops.filter((op) => op.timeUs >= horizonUs).map((op) => op.timeUs),
    ];
    for (const timeUs of times.filter((_, i) => i < 2 || i % 17 === 0)) {
      const restored = await restoreBytes(logdir, timeUs, nowUs());
      assertBytesEqual(restored, modelAt(ops, timeUs), `restore at ${timeUs}`);
    }
    assertBytesEqual(readAll(devicePath), modelAt(ops, lastUs), "the device itself");
  });
});

Deno.test("compact asks a running watch to seal its live segment and folds it", async () => {
  await withTempDir(async (dir) => {
    const devicePath = join(dir, "disk.img");
    const logdir = join(dir, "log");
    await makeImage(devicePath, DEVICE_BYTES);
    await takeSnapshot(devicePath, logdir);
    const watch = await startWatch(devicePath, logdir, { listen: { path: join(dir, "nbd.sock") } });
    try {
      for (let i = 0; i < 20; i++) await watch.disk.write(0, new Uint8Array(4096).fill(i + 1));
      await watch.disk.flush();
      const result = await compactLogdir(logdir, { cutUs: nowUs() });
      assert.equal(result.sealedVia, "watch");
      assert.ok(result.foldedEntries >= 20, `folded ${result.foldedEntries}`);
      await watch.disk.write(4096, new Uint8Array(4096).fill(99)); // the writer goes on
      await watch.disk.flush();
    } finally {
      await watch.stop();
    }
    assert.ok((await verifyLogdir(logdir)).ok);
    const restored = await restoreBytes(logdir, nowUs(), nowUs());
    assertBytesEqual(restored, readAll(devicePath), "restore of the latest state");
    assert.equal(restored[0], 20);
    assert.equal(restored[4096], 99);
  });
});

Deno.test("a second compact exits 4 at once, naming the pid that holds compact.lock", async () => {
  await withTempDir(async (dir) => {
    const devicePath = join(dir, "disk.img");
    const logdir = join(dir, "log");
    await makeImage(devicePath, DEVICE_BYTES);
    await takeSnapshot(devicePath, logdir);
    const lock = await Deno.open(join(logdir, COMPACT_LOCK_FILE), { write: true, create: true });
    try {
      await lock.lock(true);
      await lock.write(new TextEncoder().encode(`${Deno.pid} compact\n`));
      const run = await runCli(["compact", logdir, "--keep", "0"]);
      assert.equal(run.code, 4, run.stderr);
      assert.match(run.stderr, new RegExp(`another compaction is running \\(pid ${Deno.pid}`));
    } finally {
      lock.close();
    }
    assert.equal((await runCli(["compact", logdir, "--keep", "0"])).code, 0);
  });
});

Deno.test("compact does not seal writes a crashed writer left unflushed: watch must replay them first", async () => {
  await withTempDir(async (dir) => {
    const devicePath = join(dir, "disk.img");
    const logdir = join(dir, "log");
    await makeImage(devicePath, DEVICE_BYTES);
    await takeSnapshot(devicePath, logdir);
    // A writer that journaled a write and died before the device had it (no flush entry).
    const writer = await LogdirWriter.open(logdir, { purpose: "test" });
    await writer.ready();
    writer.appendSync("write", 0, 4096, new Uint8Array(4096).fill(7));
    await writer.close();
    const refused = await compactLogdir(logdir, { cutUs: nowUs() });
    assert.equal(refused.sealedVia, "none");
    assert.match(refused.warnings.join("\n"), /once a watch has replayed them/);
    assert.equal(refused.foldedEntries, 0);
    assert.equal((await readManifest(logdir)).segments.length, 0, "nothing sealed");
    const disk = await LogAssistedDisk.open(devicePath, logdir);
    assert.equal(disk.recovery.replayedEntries, 1);
    // The journal records that the device has the replayed write with the next flush entry,
    // which follows the next write (a reopen alone appends none).
    await disk.write(4096, new Uint8Array(512).fill(8));
    await disk.close();
    assert.equal(readAll(devicePath)[0], 7);
    const folded = await compactLogdir(logdir, { cutUs: nowUs() });
    assert.equal(folded.sealedVia, "compact");
    assert.equal(folded.warnings.length, 0);
    assert.ok(folded.foldedEntries >= 1);
    assertBytesEqual(await restoreBytes(logdir, nowUs(), nowUs()), readAll(devicePath), "latest");
  });
});
